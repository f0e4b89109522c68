"""The network proxy: an HTTP forward proxy, CONNECT tunnels and SOCKS5, all on one listener.

The server knows nothing of policies. It takes a `decide(host, port, addresses)` callback (see
`corral.net.decide`; it must be pure, as its answers are remembered), a `resolver(host, port) ->
addresses` and an `events(name, fields)` sink, and:

- judges the name first and resolves only names that pass (no DNS lookups for refused names);
- resolves each destination once, judges the addresses, and connects to exactly those addresses,
  so a DNS answer that changes (rebinding) changes nothing;
- refuses a request whose `Host` header names another host than its target, and closes a tunnel
  whose TLS ClientHello names (SNI) another host than the one it was opened to;
- never follows a redirect: responses, 3xx included, go back to the client as they are;
- forwards through an optional upstream HTTP proxy (`http://[user:pass@]host:port`);
- answers a refusal with 403 and an `X-Corral-Rule` header naming the rule (SOCKS5: reply 0x02);
- reports every decision as a `net.decision` event, and connections that fail or time out as `net.error`;
- bounds every client: the request head must arrive within `header_timeout` (slowloris), be at most
  `max_header_bytes`, and at most `max_connections` clients are served at once.

A SOCKS5 greeting starts with byte 0x05, an HTTP request with a letter: one port serves both.
`ProxyThread` runs a server on its own event loop for callers that have none (the backends).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from corral.net.decide import Decision, HostError, parse_host

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Sequence
    from typing import Any, TypeVar

    T = TypeVar("T")

    Decide = Callable[[str, int, Sequence[str] | None], Decision]
    Resolver = Callable[[str, int], Sequence[str]]
    EventSink = Callable[[str, dict[str, object]], None]

log = logging.getLogger(__name__)

__all__ = ["ProxyServer", "ProxyThread", "client_hello_sni", "system_resolver"]

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authorization", "proxy-authenticate", "te", "trailer",
    "upgrade",
})  # fmt: skip
_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_CHUNK = 1 << 18
MAX_CLIENT_HELLO = 1 << 16
SOCKS_VERSION = 5


def system_resolver(host: str, port: int) -> list[str]:
    """The host's own resolver: every address, in the order getaddrinfo gives them. Raises OSError."""
    out: list[str] = []
    for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP):
        address = str(info[4][0])
        if address not in out:
            out.append(address)
    return out


class _Refused(Exception):
    """A request the proxy answers with an error status (and closes)."""

    def __init__(self, status: int, reason: str, detail: str, *, rule: str = "") -> None:
        self.status = status
        self.reason = reason
        self.detail = detail
        self.rule = rule
        super().__init__(detail)


class _Head:
    """A parsed request or response head: the three words of the first line, then the fields."""

    __slots__ = ("by_name", "fields", "first")

    def __init__(self, first: tuple[str, str, str], fields: list[tuple[str, str]]) -> None:
        self.first = first
        self.fields = fields
        self.by_name: dict[str, list[str]] = {}
        for key, value in fields:
            self.by_name.setdefault(key.lower(), []).append(value)

    def get(self, name: str) -> str | None:
        values = self.by_name.get(name)
        return values[0] if values else None

    def get_all(self, name: str) -> list[str]:
        return self.by_name.get(name, [])

    def tokens(self, name: str) -> set[str]:
        return {t.strip().lower() for value in self.get_all(name) for t in value.split(",") if t.strip()}


def parse_head(data: bytes, *, response: bool = False) -> _Head:
    """Strict HTTP/1.x head parsing (CRLF only, no folding, token names). Raises ValueError."""
    if not data.endswith(b"\r\n\r\n"):
        raise ValueError("incomplete head")
    lines = data[:-4].split(b"\r\n")
    try:
        first_line = lines[0].decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("non-ASCII first line") from None
    if response:
        version, _, rest = first_line.partition(" ")
        status, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or len(status) != 3 or not status.isdigit():
            raise ValueError(f"bad status line {first_line[:80]!r}")
        first = (version, status, reason)
    else:
        parts = first_line.split(" ")
        if len(parts) != 3 or parts[2] not in ("HTTP/1.1", "HTTP/1.0") or not parts[0] or not parts[1]:
            raise ValueError(f"bad request line {first_line[:80]!r}")
        if not _TCHAR.issuperset(parts[0]):
            raise ValueError(f"bad method {parts[0][:20]!r}")
        first = (parts[0], parts[1], parts[2])
    fields: list[tuple[str, str]] = []
    for raw in lines[1:]:
        if b"\n" in raw or b"\r" in raw or b"\0" in raw:
            raise ValueError("bare CR or LF in a header")
        name, colon, value = raw.partition(b":")
        if not colon or not name or not _TCHAR.issuperset(name.decode("latin-1")):
            raise ValueError(f"bad header line {raw[:80]!r}")
        fields.append((name.decode("latin-1"), value.decode("latin-1").strip(" \t")))
    return _Head(first, fields)


def split_authority(text: str, *, default_port: int | None) -> tuple[str, int]:
    """`host:port`, `[v6]:port` or (with a default port) `host` -> (host, port). Raises ValueError."""
    if "@" in text:
        raise ValueError("credentials in the authority are not accepted")
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError(f"unclosed '[' in {text!r}")
        host, rest = text[: close + 1], text[close + 1 :]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            host, rest = text, ""
        else:
            rest = ":" + port_text
    if rest:
        if not rest.startswith(":") or not rest[1:].isdigit() or not 0 < int(rest[1:]) < 65536:
            raise ValueError(f"bad port in {text!r}")
        return host, int(rest[1:])
    if default_port is None:
        raise ValueError(f"{text!r} has no port")
    return host, default_port


def _same_host(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return parse_host(a)[0] == parse_host(b)[0]
    except HostError:  # the decision refuses such a host with its own rule; compare the text meanwhile
        return a.lower().rstrip(".") == b.lower().rstrip(".")


def client_hello_sni(data: bytes) -> str | bool | None:
    """The server name (SNI) in the TLS ClientHello at the start of `data`.

    Returns the name, None when the ClientHello names no server, or False when more bytes are
    needed. A ClientHello split across several TLS records is put back together first. Raises
    ValueError when the bytes are not a well-formed ClientHello.
    """
    handshake = bytearray()
    pos = 0
    while True:
        if len(data) < pos + 5:
            return False
        content_type, major, length = data[pos], data[pos + 1], int.from_bytes(data[pos + 3 : pos + 5], "big")
        if content_type != 22 or major != 3 or not 0 < length <= 18432:
            raise ValueError("not a TLS handshake record")
        if len(data) < pos + 5 + length:
            return False
        handshake += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
        if len(handshake) >= 4:
            if handshake[0] != 1:
                raise ValueError("not a ClientHello")
            size = int.from_bytes(handshake[1:4], "big")
            if size > MAX_CLIENT_HELLO:
                raise ValueError("ClientHello too large")
            if len(handshake) >= 4 + size:
                return _sni(bytes(handshake[4 : 4 + size]))


def _sni(body: bytes) -> str | None:
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(body):
            raise ValueError("truncated ClientHello")
        out = body[pos : pos + n]
        pos += n
        return out

    def length(n: int) -> int:
        return int.from_bytes(take(n), "big")

    take(2 + 32)  # legacy version, random
    take(length(1))  # session id
    take(length(2))  # cipher suites
    take(length(1))  # compression methods
    if pos == len(body):
        return None
    extensions = length(2)
    end = pos + extensions
    if end != len(body):
        raise ValueError("bad extensions length")
    name: str | None = None
    seen_sni = False
    while pos < end:
        ext_type, ext_len = length(2), length(2)
        ext = take(ext_len)
        if ext_type != 0:
            continue
        if seen_sni:
            raise ValueError("two server_name extensions")
        seen_sni = True
        list_len = int.from_bytes(ext[:2], "big")
        if list_len != len(ext) - 2:
            raise ValueError("bad server_name list")
        i = 2
        while i < len(ext):
            kind, size = ext[i], int.from_bytes(ext[i + 1 : i + 3], "big")
            value = ext[i + 3 : i + 3 + size]
            if len(value) != size:
                raise ValueError("truncated server_name")
            i += 3 + size
            if kind == 0:
                if name is not None:
                    raise ValueError("two host names in server_name")
                try:
                    name = value.decode("ascii")
                except UnicodeDecodeError:
                    raise ValueError("non-ASCII server name") from None
    return name


class _Upstream:
    """An upstream HTTP proxy: where to connect and how to authenticate."""

    def __init__(self, url: str) -> None:
        if not url.startswith("http://"):
            raise ValueError(f"only http:// upstream proxies are supported, got {url!r}")
        rest = url[len("http://") :].split("/", 1)[0]
        userinfo, at, hostport = rest.rpartition("@")
        self.authorization: str | None = None
        if at:
            import base64
            from urllib.parse import unquote

            token = base64.b64encode(unquote(userinfo).encode()).decode()
            self.authorization = f"Basic {token}"
        host, port = split_authority(hostport, default_port=3128)
        self.host = host[1:-1] if host.startswith("[") else host
        self.port = port

    def header(self) -> bytes:
        return f"Proxy-Authorization: {self.authorization}\r\n".encode() if self.authorization else b""


class _Client:
    """One client connection and, for plain HTTP, the upstream connection it reuses."""

    __slots__ = ("reader", "up_key", "up_reader", "up_writer", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.up_key: tuple[object, ...] | None = None
        self.up_reader: asyncio.StreamReader | None = None
        self.up_writer: asyncio.StreamWriter | None = None

    def drop_upstream(self) -> None:
        if self.up_writer is not None:
            self.up_writer.transport.abort()
        self.up_key = self.up_reader = self.up_writer = None


class ProxyServer:
    """The proxy. Start it inside a running event loop (`start_tcp`, `start_unix`), or use `ProxyThread`."""

    def __init__(
        self,
        *,
        decide: Decide,
        resolver: Resolver = system_resolver,
        events: EventSink | None = None,
        upstream: str | None = None,
        header_timeout: float = 10.0,
        idle_timeout: float = 120.0,
        connect_timeout: float = 10.0,
        response_timeout: float = 300.0,
        max_header_bytes: int = 64 << 10,
        max_connections: int = 4096,
        dns_cache_seconds: float = 5.0,
    ) -> None:
        self.decide = decide
        self.resolver = resolver
        self.events = events
        self.upstream = _Upstream(upstream) if upstream else None
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.response_timeout = response_timeout
        self.max_header_bytes = max_header_bytes
        self.max_connections = max_connections
        # Answers are kept a few seconds (saves a thread hop per request). Rebinding gains nothing from
        # it: every answer, cached or not, is judged before use and connected to as judged.
        self.dns_cache_seconds = dns_cache_seconds
        self._dns: dict[str, tuple[float, tuple[str, ...]]] = {}
        self._decisions: dict[tuple[str, int, tuple[str, ...] | None], Decision] = {}
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="corral-resolve")

    # ------------------------------------------------------------------ lifecycle
    async def start_tcp(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on TCP; returns the port."""
        server = await asyncio.start_server(self._accept, host, port, limit=self.max_header_bytes, backlog=4096)
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def start_unix(self, path: str) -> None:
        server = await asyncio.start_unix_server(self._accept, path, limit=self.max_header_bytes, backlog=4096)
        self._servers.append(server)

    async def aclose(self) -> None:
        """Stop listening and end every connection."""
        for server in self._servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ reporting
    def _emit(self, event: str, fields: dict[str, object]) -> None:
        if self.events is None:
            return
        try:
            self.events(event, fields)
        except Exception:  # an audit sink must never break the proxy
            log.exception("network event sink failed")

    def _report(self, decision: Decision, via: str, **extra: object) -> None:
        self._emit("net.decision", {"via": via, **decision.as_event(), **extra})

    # ------------------------------------------------------------------ connections
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._tasks) >= self.max_connections:
            self._emit("net.error", {"error": f"more than {self.max_connections} connections; closed one"})
            writer.transport.abort()
            return
        self._tasks.add(task)
        client = _Client(reader, writer)
        # One deadline for the whole request head (or SOCKS greeting), from the moment of connection.
        deadline = asyncio.get_running_loop().time() + self.header_timeout
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    first = await reader.readexactly(1)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            except TimeoutError:
                self._emit("net.error", {"error": f"nothing received within {self.header_timeout:g}s"})
                return
            if first[0] == SOCKS_VERSION:
                await self._socks5(client, deadline)
            else:
                await self._http(client, first, deadline)
        except asyncio.CancelledError:
            pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception("proxy connection failed")
        finally:
            self._tasks.discard(task)
            client.drop_upstream()
            _close(writer)

    async def _read_head(self, reader: asyncio.StreamReader, prefix: bytes, deadline: float) -> bytes:
        """A head by `deadline`, within max_header_bytes. Raises _Refused (408/431/400)."""
        try:
            async with asyncio.timeout_at(deadline):
                rest = await reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            raise _Refused(408, "Request Timeout", f"request head not received within {self.header_timeout:g}s",
                           rule="timeout:head") from None  # fmt: skip
        except asyncio.LimitOverrunError:
            raise _Refused(431, "Request Header Fields Too Large", f"request head over {self.max_header_bytes} bytes",
                           rule="bad-request:too-large") from None  # fmt: skip
        except asyncio.IncompleteReadError as exc:
            if exc.partial or prefix:
                raise _Refused(400, "Bad Request", "connection closed inside the request head",
                               rule="bad-request:truncated") from None  # fmt: skip
            raise
        return prefix + rest

    async def _refuse(self, client: _Client, refused: _Refused, via: str, **extra: object) -> None:
        if refused.rule.startswith("timeout"):
            self._emit("net.error", {"via": via, "error": refused.detail, "rule": refused.rule, **extra})
        elif refused.rule.startswith("bad-request"):
            self._emit("net.decision", {"via": via, "action": "deny", "rule": refused.rule, "detail": refused.detail,
                                        **extra})  # fmt: skip
        body = f"corral: {refused.detail}" + (f" (rule {refused.rule})" if refused.rule else "") + "\n"
        data = body.encode("utf-8", "replace")
        head = f"HTTP/1.1 {refused.status} {refused.reason}\r\n"
        if refused.rule:
            head += f"X-Corral-Rule: {_header_safe(refused.rule)}\r\n"
        head += f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n"
        with contextlib.suppress(ConnectionError):
            client.writer.write(head.encode("latin-1", "replace") + data)
            async with asyncio.timeout(self.header_timeout):
                await client.writer.drain()

    async def _decide(self, host: str, port: int) -> Decision:
        """Judge the name, resolve it (once), judge the addresses."""
        decision = self._judge(host, port, None)
        if not decision.allowed or decision.addresses:
            return decision
        try:
            addresses = await self._resolve(decision.host, port)
        except (OSError, UnicodeError) as exc:
            if self.upstream is not None:
                # The upstream proxy resolves what we cannot (a corporate network without outside DNS).
                return decision.replace(detail=f"{decision.detail}; resolved by the upstream proxy ({exc})")
            return Decision(action="deny", rule="unresolved", detail=f"cannot resolve {decision.host}: {exc}",
                            host=decision.host, port=port)  # fmt: skip
        return self._judge(host, port, addresses)

    def _judge(self, host: str, port: int, addresses: tuple[str, ...] | None) -> Decision:
        """`decide`, remembered: it is pure, and a keep-alive client asks the same question again and again."""
        key = (host, port, addresses)
        decision = self._decisions.get(key)
        if decision is None:
            decision = self.decide(host, port, None if addresses is None else list(addresses))
            if len(self._decisions) >= 4096:
                self._decisions.clear()
            self._decisions[key] = decision
        return decision

    async def _resolve(self, host: str, port: int) -> tuple[str, ...]:
        now = time.monotonic()
        cached = self._dns.get(host)
        if cached is not None and cached[0] > now:
            return cached[1]
        loop = asyncio.get_running_loop()
        addresses = tuple(await loop.run_in_executor(self._executor, self.resolver, host, port))
        if self.dns_cache_seconds > 0 and addresses:
            if len(self._dns) >= 4096:
                self._dns.clear()
            self._dns[host] = (now + self.dns_cache_seconds, addresses)
        return addresses

    async def _open(self, decision: Decision, *, tunnel: bool) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to the checked destination (through the upstream proxy when there is one)."""
        if self.upstream is not None:
            reader, writer = await self._connect_to(self.upstream.host, self.upstream.port)
            if tunnel:
                target = _authority(decision.addresses[0] if decision.addresses else decision.host, decision.port)
                writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n".encode() + self.upstream.header()
                             + b"\r\n")  # fmt: skip
                try:
                    async with asyncio.timeout(self.connect_timeout):
                        head = parse_head(await reader.readuntil(b"\r\n\r\n"), response=True)
                except (TimeoutError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                    writer.transport.abort()
                    raise OSError(f"the upstream proxy did not answer CONNECT: {exc!r}") from None
                if not head.first[1].startswith("2"):
                    writer.transport.abort()
                    raise OSError(f"the upstream proxy refused: {head.first[1]} {head.first[2]}")
            return reader, writer
        error: BaseException | None = None
        for address in decision.addresses:
            try:
                return await self._connect_to(address, decision.port)
            except OSError as exc:
                error = exc
        raise OSError(f"cannot connect to {decision.host}:{decision.port}: {error}")

    async def _connect_to(self, host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            async with asyncio.timeout(self.connect_timeout):
                return await asyncio.open_connection(host, port, limit=self.max_header_bytes)
        except TimeoutError:
            raise OSError(f"connecting to {host} port {port} timed out") from None

    # ------------------------------------------------------------------ HTTP
    async def _http(self, client: _Client, first: bytes, deadline: float) -> None:
        prefix = first
        while True:
            try:
                data = await self._read_head(client.reader, prefix, deadline)
                head = parse_head(data)
            except _Refused as refused:
                await self._refuse(client, refused, "http")
                return
            except ValueError as exc:
                await self._refuse(client, _Refused(400, "Bad Request", str(exc), rule="bad-request:syntax"), "http")
                return
            try:
                if head.first[0] == "CONNECT":
                    await self._connect_method(client, head)
                    return
                keep = await self._forward(client, head)
            except _Refused as refused:
                await self._refuse(client, refused, "http", method=head.first[0])
                return
            if not keep:
                return
            try:
                async with asyncio.timeout(self.idle_timeout):
                    prefix = await client.reader.readexactly(1)
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                return
            deadline = asyncio.get_running_loop().time() + self.header_timeout

    async def _connect_method(self, client: _Client, head: _Head) -> None:
        try:
            host, port = split_authority(head.first[1], default_port=None)
        except ValueError as exc:
            raise _Refused(400, "Bad Request", f"CONNECT target: {exc}", rule="bad-request:target") from None
        host_field = head.get("host")
        if host_field is not None:
            try:
                named, named_port = split_authority(host_field, default_port=port)
            except ValueError:
                named, named_port = host_field, port
            if not _same_host(named, host) or named_port != port:
                decision = Decision(action="deny", rule="host-mismatch", host=host, port=port,
                                    detail=f"CONNECT to {head.first[1]} with Host: {host_field}")  # fmt: skip
                self._report(decision, "connect")
                raise _Refused(403, "Forbidden", decision.detail, rule=decision.rule)
        decision = await self._decide(host, port)
        self._report(decision, "connect")
        if not decision.allowed:
            raise _Refused(403, "Forbidden", f"blocked by the network policy: {decision.detail}", rule=decision.rule)
        try:
            up_reader, up_writer = await self._open(decision, tunnel=True)
        except OSError as exc:
            self._emit("net.error", {"via": "connect", "host": decision.host, "port": port, "error": str(exc)})
            raise _Refused(502, "Bad Gateway", str(exc), rule="connect-failed") from None
        client.writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await self._tunnel(client, up_reader, up_writer, decision, "connect")

    async def _forward(self, client: _Client, head: _Head) -> bool:
        """One plain-HTTP request and its response. Returns whether the client connection stays open."""
        method, target, version = head.first
        if target.startswith("https://"):
            raise _Refused(
                400, "Bad Request", "https:// through a plain request: use CONNECT", rule="bad-request:scheme"
            )
        if not target.startswith("http://"):
            raise _Refused(
                400, "Bad Request", f"not a proxy request (target {target[:80]!r})", rule="bad-request:target"
            )
        rest = target[len("http://") :]
        cut = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
        authority, path = rest[:cut], rest[cut:]
        if path.startswith("?"):
            path = "/" + path
        path = path.split("#", 1)[0] or "/"
        try:
            host, port = split_authority(authority, default_port=80)
        except ValueError as exc:
            raise _Refused(400, "Bad Request", f"target: {exc}", rule="bad-request:target") from None
        url = f"http://{authority}{path.split('?', 1)[0]}"  # for the log: no query string (it may hold secrets)
        host_fields = head.get_all("host")
        if len(host_fields) > 1:
            raise _Refused(400, "Bad Request", "more than one Host header", rule="bad-request:host")
        if host_fields:
            try:
                named, named_port = split_authority(host_fields[0], default_port=80)
            except ValueError:
                named, named_port = host_fields[0], -1
            if not _same_host(named, host) or named_port != port:
                decision = Decision(action="deny", rule="host-mismatch", host=host, port=port,
                                    detail=f"request for {authority} with Host: {host_fields[0]}")  # fmt: skip
                self._report(decision, "http", method=method, url=url)
                raise _Refused(403, "Forbidden", decision.detail, rule=decision.rule)
        body = _body_framing(head)
        decision = await self._decide(host, port)
        self._report(decision, "http", method=method, url=url)
        if not decision.allowed:
            raise _Refused(403, "Forbidden", f"blocked by the network policy: {decision.detail}", rule=decision.rule)

        key = ("upstream",) if self.upstream is not None else (decision.host, port, decision.addresses)
        if client.up_key != key or client.up_writer is None or client.up_writer.transport.is_closing():
            client.drop_upstream()
            try:
                client.up_reader, client.up_writer = await self._open(decision, tunnel=False)
            except OSError as exc:
                self._emit("net.error", {"via": "http", "host": decision.host, "port": port, "error": str(exc)})
                raise _Refused(502, "Bad Gateway", str(exc), rule="connect-failed") from None
            client.up_key = key
        up_reader, up_writer = client.up_reader, client.up_writer
        assert up_reader is not None and up_writer is not None

        upgrade = "upgrade" in head.tokens("connection") and head.get("upgrade") is not None
        drop = HOP_BY_HOP | head.tokens("connection")
        if body[0] != "none" and (head.get("expect") or "").lower() == "100-continue":
            # Answer the client's Expect ourselves: the body is relayed before the upstream's answer is read.
            drop |= {"expect"}
            client.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if self.upstream is not None:
            where = decision.addresses[0] if decision.addresses else decision.host
            line = f"{method} http://{_authority(where, port)}{path} HTTP/1.1\r\n"
        else:
            line = f"{method} {path} HTTP/1.1\r\n"
        out = [line.encode("latin-1")]
        if not host_fields:
            out.append(f"Host: {authority}\r\n".encode("latin-1"))
        for name, value in head.fields:
            if name.lower() not in drop:
                out.append(f"{name}: {value}\r\n".encode("latin-1"))
        if upgrade:
            out.append(f"Connection: Upgrade\r\nUpgrade: {head.get('upgrade')}\r\n".encode("latin-1"))
        if self.upstream is not None:
            out.append(self.upstream.header())
        out.append(b"\r\n")
        up_writer.write(b"".join(out))
        await _copy_body(client.reader, up_writer, body)
        await up_writer.drain()

        # The response, after any interim (1xx) ones.
        while True:
            try:
                async with asyncio.timeout(self.response_timeout):
                    response = parse_head(await up_reader.readuntil(b"\r\n\r\n"), response=True)
            except (TimeoutError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    ConnectionError) as exc:  # fmt: skip
                client.drop_upstream()
                self._emit("net.error", {"via": "http", "host": decision.host, "port": port,
                                         "error": f"bad or no response: {exc!r}"})  # fmt: skip
                raise _Refused(
                    502, "Bad Gateway", f"no valid response from {decision.host}", rule="bad-response"
                ) from None
            status = int(response.first[1])
            if status == 101 and upgrade:
                client.writer.write(_serialize(response, drop=HOP_BY_HOP | response.tokens("connection")))
                await self._tunnel(client, up_reader, up_writer, decision, "http", check_sni=False)
                client.up_key = client.up_reader = client.up_writer = None
                return False
            if 100 <= status < 200:
                client.writer.write(_serialize(response, drop=HOP_BY_HOP | response.tokens("connection")))
                await client.writer.drain()
                continue
            break
        try:
            framing = _response_framing(response, method)
        except ValueError as exc:
            client.drop_upstream()
            raise _Refused(
                502, "Bad Gateway", f"bad response from {decision.host}: {exc}", rule="bad-response"
            ) from None
        keep = (
            version == "HTTP/1.1"
            and "close" not in head.tokens("connection")
            and framing[0] != "close"
            and "close" not in response.tokens("connection")
        )
        extra = b"" if keep else b"Connection: close\r\n"
        out_head = _serialize(response, drop=HOP_BY_HOP | response.tokens("connection"), extra=extra)
        if framing[0] == "length" and framing[1] <= _CHUNK:  # a small body: one write for head and body
            try:
                client.writer.write(out_head + await up_reader.readexactly(framing[1]))
            except asyncio.IncompleteReadError:
                raise ConnectionError("the server closed inside a body") from None
        else:
            client.writer.write(out_head)
            await _copy_body(up_reader, client.writer, framing)
        await client.writer.drain()
        if framing[0] == "close" or "close" in response.tokens("connection"):
            client.drop_upstream()
        return keep

    # ------------------------------------------------------------------ SOCKS5
    async def _socks5(self, client: _Client, deadline: float) -> None:
        reader, writer = client.reader, client.writer
        try:
            async with asyncio.timeout_at(deadline):
                count = (await reader.readexactly(1))[0]
                methods = await reader.readexactly(count)
                if 0 not in methods:
                    writer.write(b"\x05\xff")
                    await writer.drain()
                    detail = "the client offered no method without authentication"
                    self._emit("net.decision", {"via": "socks5", "action": "deny", "rule": "bad-request:socks-auth",
                                                "detail": detail})  # fmt: skip
                    return
                writer.write(b"\x05\x00")
                version, command, _reserved, kind = await reader.readexactly(4)
                if kind == 1:
                    host = str(ipaddress.IPv4Address(await reader.readexactly(4)))
                elif kind == 4:
                    host = str(ipaddress.IPv6Address(await reader.readexactly(16)))
                elif kind == 3:
                    raw = await reader.readexactly((await reader.readexactly(1))[0])
                    host = raw.decode("latin-1")
                else:
                    host = ""
                port = int.from_bytes(await reader.readexactly(2), "big") if host else 0
        except TimeoutError:
            self._emit("net.error", {"via": "socks5", "error": f"request not received within {self.header_timeout:g}s",
                                     "rule": "timeout:head"})  # fmt: skip
            return
        if version != SOCKS_VERSION or command != 1 or not host:
            reply = 0x07 if command != 1 else 0x08  # command / address type not supported
            writer.write(bytes((5, reply, 0, 1)) + bytes(6))
            detail = f"unsupported SOCKS request (command {command}, address type {kind})"
            self._emit("net.decision", {"via": "socks5", "action": "deny", "rule": "bad-request:socks",
                                        "detail": detail})  # fmt: skip
            return
        decision = await self._decide(host, port)
        self._report(decision, "socks5")
        if not decision.allowed:
            writer.write(b"\x05\x02\x00\x01" + bytes(6))  # connection not allowed by ruleset
            await writer.drain()
            return
        try:
            up_reader, up_writer = await self._open(decision, tunnel=True)
        except OSError as exc:
            self._emit("net.error", {"via": "socks5", "host": decision.host, "port": port, "error": str(exc)})
            writer.write(b"\x05\x05\x00\x01" + bytes(6))  # connection refused
            await writer.drain()
            return
        writer.write(b"\x05\x00\x00\x01" + bytes(6))
        await self._tunnel(client, up_reader, up_writer, decision, "socks5")

    # ------------------------------------------------------------------ tunnels
    async def _tunnel(
        self,
        client: _Client,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
        decision: Decision,
        via: str,
        *,
        check_sni: bool = True,
    ) -> None:
        """Relay both ways until both sides are done. With `check_sni`, a TLS ClientHello must name
        the tunnel's own host (or no host at all)."""
        try:
            await client.writer.drain()
            first: bytes | None = b""
            if check_sni:
                first = await self._first_bytes(client.reader, up_writer, up_reader, client.writer, decision, via)
                if first is None:
                    return
            if first:
                up_writer.write(first)
            to_client = asyncio.ensure_future(_pipe(up_reader, client.writer))
            to_upstream = asyncio.ensure_future(_pipe(client.reader, up_writer))
            try:
                await asyncio.gather(to_client, to_upstream)
            finally:
                to_client.cancel()
                to_upstream.cancel()
        finally:
            up_writer.transport.abort()

    async def _first_bytes(
        self,
        reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        decision: Decision,
        via: str,
    ) -> bytes | None:
        """The client's first bytes, checked; None when the tunnel must close. While waiting for them,
        whatever the server says first (SSH, SMTP banners) goes through."""
        banner = asyncio.ensure_future(_pipe(up_reader, client_writer, close=False))
        try:
            data = await reader.read(_CHUNK)
            if not data or data[0] != 22:
                return data
            try:
                async with asyncio.timeout(self.header_timeout):
                    while (sni := client_hello_sni(data)) is False:
                        more = await reader.read(_CHUNK)
                        if not more or len(data) > MAX_CLIENT_HELLO + 4096:
                            raise ValueError("incomplete ClientHello")
                        data += more
            except (ValueError, TimeoutError) as exc:
                detail = f"the tunnel's TLS ClientHello could not be read: {exc}"
                self._report(Decision(action="deny", rule="tls-unreadable", host=decision.host, port=decision.port,
                                      detail=detail), via)  # fmt: skip
                return None
            if isinstance(sni, str) and not _same_host(sni, decision.host):
                self._report(Decision(action="deny", rule="sni-mismatch", host=decision.host, port=decision.port,
                                      detail=f"tunnel to {decision.host} sent a TLS ClientHello for {sni[:255]}"),
                             via)  # fmt: skip
                return None
            return data
        finally:
            banner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await banner


def _header_safe(text: str) -> str:
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in text)[:200]


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _serialize(head: _Head, *, drop: frozenset[str] | set[str], extra: bytes = b"") -> bytes:
    _version, status, reason = head.first
    out = [f"HTTP/1.1 {status} {reason}\r\n".encode("latin-1")]
    if head.get("transfer-encoding") is not None:
        drop = {*drop, "content-length"}  # Transfer-Encoding wins; passing both on invites response smuggling
    for name, value in head.fields:
        if name.lower() not in drop:
            out.append(f"{name}: {value}\r\n".encode("latin-1"))
    if status == "101":
        out.append(f"Connection: Upgrade\r\nUpgrade: {head.get('upgrade') or ''}\r\n".encode("latin-1"))
    out.append(extra)
    out.append(b"\r\n")
    return b"".join(out)


def _body_framing(head: _Head) -> tuple[str, int]:
    """How a request body ends: ("none", 0), ("length", n) or ("chunked", 0). Refuses ambiguous framing."""
    codings = head.tokens("transfer-encoding")
    lengths = {v.strip() for v in head.get_all("content-length")}
    if codings and lengths:
        raise _Refused(400, "Bad Request", "both Transfer-Encoding and Content-Length", rule="bad-request:framing")
    if codings:
        if codings != {"chunked"}:
            raise _Refused(
                501, "Not Implemented", "only chunked transfer coding is accepted", rule="bad-request:framing"
            )
        return ("chunked", 0)
    if lengths:
        if len(lengths) > 1 or not next(iter(lengths)).isdigit():
            raise _Refused(400, "Bad Request", "bad Content-Length", rule="bad-request:framing")
        return ("length", int(next(iter(lengths))))
    return ("none", 0)


def _response_framing(head: _Head, method: str) -> tuple[str, int]:
    status = int(head.first[1])
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return ("none", 0)
    codings = head.get_all("transfer-encoding")
    if codings:
        last = codings[-1].split(",")[-1].strip().lower()
        return ("chunked", 0) if last == "chunked" else ("close", 0)
    lengths = {v.strip() for v in head.get_all("content-length")}
    if lengths:
        if len(lengths) > 1 or not next(iter(lengths)).isdigit():
            raise ValueError("bad Content-Length")
        return ("length", int(next(iter(lengths))))
    return ("close", 0)


async def _copy_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, framing: tuple[str, int]) -> None:
    try:
        await _copy_framed(reader, writer, framing)
    except asyncio.LimitOverrunError:
        raise ConnectionError("a chunk-size line or trailer is too long") from None


async def _copy_framed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, framing: tuple[str, int]) -> None:
    kind, size = framing
    if kind == "length":
        await _copy_exact(reader, writer, size)
    elif kind == "chunked":
        while True:
            line = await reader.readuntil(b"\r\n")
            size_text = line[:-2].split(b";", 1)[0].strip()
            if not size_text or len(size_text) > 16 or any(c not in b"0123456789abcdefABCDEF" for c in size_text):
                raise ConnectionError("bad chunk size")
            chunk = int(size_text, 16)
            writer.write(line)
            if chunk == 0:
                while True:
                    trailer = await reader.readuntil(b"\r\n")
                    writer.write(trailer)
                    if trailer == b"\r\n":
                        return
            await _copy_exact(reader, writer, chunk + 2)
    elif kind == "close":
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()


async def _copy_exact(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, size: int) -> None:
    while size > 0:
        data = await reader.read(min(size, _CHUNK))
        if not data:
            raise ConnectionError("connection closed inside a body")
        writer.write(data)
        size -= len(data)
        await writer.drain()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, close: bool = True) -> None:
    """Copy until end of file, then pass the end on (half-close) when `close`."""
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        writer.transport.abort()
        return
    if close:
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()


def _close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.close()


class ProxyThread:
    """A `ProxyServer` on its own event loop in a daemon thread, for callers without an event loop.

    proxy = ProxyThread(ProxyServer(decide=..., events=...))
    port = proxy.start_tcp()        # or proxy.start_unix(path)
    ...
    proxy.stop()
    """

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="corral-proxy", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start_tcp(self, host: str = "127.0.0.1", port: int = 0) -> int:
        return self._call(self.server.start_tcp(host, port))

    def start_unix(self, path: str) -> None:
        self._call(self.server.start_unix(path))

    def stop(self) -> None:
        """Close every connection and end the thread. Idempotent."""
        if not self._thread.is_alive():
            return
        try:
            self._call(self.server.aclose())
        except Exception:
            log.exception("stopping the proxy")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()
