"""Loopback-only fixtures for the network tests: origin servers, a proxy with a mapped resolver, the audit log.

Every name a test uses is mapped by the proxy's resolver to a loopback address; nothing here sends
a packet anywhere else. Private ranges are tested on the pure decision function, or inside a
network namespace a test makes itself (test_netns.py).
"""

from __future__ import annotations

import http.server
import resource
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from corral.audit import AuditLog, read_events
from corral.net.decide import Decision, Rules, decide
from corral.net.proxy import ProxyServer, ProxyThread
from corral.policy.model import Network


class Origin:
    """A threaded HTTP/1.1 server on 127.0.0.1 (or another loopback address) that records every request."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.hits: list[tuple[str, str, dict[str, str], bytes]] = []
        origin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                origin.hits.append((self.command, self.path, dict(self.headers), body))
                if self.path.startswith("/redirect"):
                    target = self.path.partition("?to=")[2]
                    self.send_response(302)
                    self.send_header("Location", target)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.path.startswith("/big/"):
                    size = int(self.path.split("/")[2])
                    self.send_response(200)
                    self.send_header("Content-Length", str(size))
                    self.end_headers()
                    block = b"x" * 65536
                    while size > 0:
                        self.wfile.write(block[: min(size, len(block))])
                        size -= len(block)
                    return
                if self.path == "/chunked":
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for part in (b"one ", b"two ", b"three"):
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                    self.wfile.write(b"0\r\n\r\n")
                    return
                reply = f"{self.command} {self.path} host={self.headers.get('Host')} body={body.decode()}".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(reply)

            do_GET = do_POST = do_HEAD = do_PUT = _handle  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.host = host
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def paths(self) -> list[str]:
        return [path for _method, path, _headers, _body in self.hits]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Recorder:
    """A raw TCP server that records what each connection sends (and echoes it back)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, 0))
        self.listener.listen(128)
        self.port = int(self.listener.getsockname()[1])
        self.received: list[bytes] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        data = b""
        with conn:
            conn.settimeout(5)
            try:
                while chunk := conn.recv(65536):
                    data += chunk
                    conn.sendall(chunk)
            except OSError:
                pass
        with self._lock:
            self.received.append(data)

    def close(self) -> None:
        self.listener.close()


class Proxy:
    """A running proxy on 127.0.0.1 with a name->addresses map as its resolver; events go to an audit file."""

    def __init__(self, network: Network, names: dict[str, Sequence[str]], audit_path: Path, **options: object) -> None:
        self.names = names
        self.resolved: list[str] = []
        self.audit = AuditLog(str(audit_path))
        self.audit_path = audit_path
        rules = Rules.from_network(network)

        def judge(host: str, port: int, addresses: Sequence[str] | None) -> Decision:
            return decide(rules, host, port, addresses)

        def resolver(host: str, port: int) -> Sequence[str]:
            self.resolved.append(host)
            if host not in self.names:
                raise OSError(f"test resolver: no such name {host}")
            answer = self.names[host]
            return answer() if callable(answer) else answer  # type: ignore[no-any-return]

        def sink(event: str, fields: dict[str, object]) -> None:
            self.audit.write(event, sandbox="test", **fields)

        options.setdefault("dns_cache_seconds", 0)  # the tests count resolutions
        self.server = ProxyServer(decide=judge, resolver=resolver, events=sink, **options)  # type: ignore[arg-type]
        self.thread = ProxyThread(self.server)
        self.port = self.thread.start_tcp()

    def events(self, name: str | None = None) -> list[dict[str, object]]:
        return [e for e in read_events(str(self.audit_path)) if name is None or e["event"] == name]

    def decisions(self) -> list[tuple[object, object, object]]:
        return [(e["action"], e["rule"], e.get("host")) for e in self.events("net.decision")]

    def stop(self) -> None:
        self.thread.stop()
        self.audit.close()


@pytest.fixture
def origin() -> Iterator[Origin]:
    server = Origin()
    yield server
    server.close()


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    server = Recorder()
    yield server
    server.close()


ProxyFactory = Callable[..., Proxy]


@pytest.fixture
def make_proxy(tmp_path: Path) -> Iterator[ProxyFactory]:
    made: list[Proxy] = []

    def factory(network: Network, names: dict[str, Sequence[str]] | None = None, **options: object) -> Proxy:
        proxy = Proxy(network, names or {}, tmp_path / f"audit-{len(made)}.jsonl", **options)
        made.append(proxy)
        return proxy

    yield factory
    for proxy in made:
        proxy.stop()


def exchange(port: int, data: bytes, *, timeout: float = 10) -> bytes:
    """Send `data` to the proxy on 127.0.0.1:`port` and read until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        out = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
        return out


def http_get(port: int, url: str, *, host: str | None = None, extra: str = "") -> bytes:
    authority = url.split("/")[2]
    head = f"GET {url} HTTP/1.1\r\nHost: {host or authority}\r\n{extra}Connection: close\r\n\r\n"
    return exchange(port, head.encode())


def status_and_rule(response: bytes) -> tuple[int, str | None]:
    head = response.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    lines = head.split("\r\n")
    status = int(lines[0].split(" ")[1]) if lines and lines[0].startswith("HTTP/") else 0
    rule = next((line.split(":", 1)[1].strip() for line in lines if line.lower().startswith("x-corral-rule:")), None)
    return status, rule


def socks_connect(port: int, kind: int, address: bytes, dport: int) -> tuple[socket.socket, bytes]:
    """A SOCKS5 CONNECT (no authentication); returns the socket and the 10-byte reply."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"\x05\x01\x00")
    assert sock.recv(2) == b"\x05\x00"
    prefix = bytes([len(address)]) if kind == 3 else b""
    sock.sendall(bytes([5, 1, 0, kind]) + prefix + address + dport.to_bytes(2, "big"))
    reply = b""
    while len(reply) < 10:
        chunk = sock.recv(10 - len(reply))
        if not chunk:
            break
        reply += chunk
    return sock, reply


@pytest.fixture(scope="session", autouse=True)
def _enough_descriptors() -> None:
    """1000 proxied connections hold ~4000 descriptors in this one process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 16384 if hard == resource.RLIM_INFINITY else min(hard, 16384)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
