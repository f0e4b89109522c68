"""The in-process guard: the proxy's rules for Python code that fetches URLs on the host.

For agent frameworks whose tools fetch URLs themselves (no sandbox between them and the network):

    from corral.net import check_url, requests_session, GuardTransport
    check_url("http://169.254.169.254/latest/meta-data/")     # raises NetworkDenied (blocked-address:metadata)
    session = requests_session(network=corral.Network(mode="allow", allow=["api.example.com"]))
    client = httpx.Client(transport=GuardTransport())          # no network given: any public address

Without a `network`, the guard admits any name on any port whose addresses are all public: an
SSRF guard. With one, it applies that network's allowlist exactly as the proxy does.

`check_url` alone has a gap: the HTTP library resolves the name again when it connects, and a
DNS answer may change in between (rebinding). The transports close it: they judge the addresses
at the moment they connect and connect to exactly those, so every connection, each redirect
included, is checked. requests and httpx are imported only when their transport is used.
"""

from __future__ import annotations

import functools

from corral.errors import PolicyDenied
from corral.net.decide import Decision, Rules, decide
from corral.net.proxy import system_resolver

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence
    from typing import Any

    import httpcore
    import requests

    from corral.net.proxy import EventSink, Resolver
    from corral.policy.model import Network

__all__ = [
    "AsyncGuardTransport", "Guard", "GuardTransport", "GuardedAdapter", "NetworkDenied", "check_url", "decide_url",
    "requests_session",
]  # fmt: skip

DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


class NetworkDenied(PolicyDenied):
    """The network policy refused a destination. `decision` holds the host, port, rule and reason."""

    def __init__(self, decision: Decision) -> None:
        self.decision = decision
        super().__init__(f"corral: blocked by the network policy: {decision.detail}", rule=decision.rule)


class Guard:
    """The rules, a resolver and an audit sink, bound together. Thread-safe (no mutable state)."""

    def __init__(
        self, network: Network | None = None, *, resolver: Resolver | None = None, events: EventSink | None = None
    ) -> None:
        if network is None:
            self.rules = Rules.public()
        else:
            from corral.net.service import compile_rules

            self.rules = compile_rules(network)
        self.resolver = resolver or system_resolver
        self.events = events

    def decide(self, host: str, port: int, *, via: str = "guard") -> Decision:
        """Judge the name, resolve it, judge the addresses; report the decision."""
        decision = decide(self.rules, host, port)
        if decision.allowed and not decision.addresses:
            try:
                addresses: Sequence[str] | None = list(self.resolver(decision.host, port))
            except (OSError, UnicodeError) as exc:
                decision = Decision(action="deny", rule="unresolved", detail=f"cannot resolve {decision.host}: {exc}",
                                    host=decision.host, port=port)  # fmt: skip
                addresses = None
            if addresses is not None:
                decision = decide(self.rules, host, port, addresses)
        self._report(decision, via)
        return decision

    def check(self, host: str, port: int, *, via: str = "guard") -> Decision:
        """`decide`, raising `NetworkDenied` on a refusal."""
        decision = self.decide(host, port, via=via)
        if not decision.allowed:
            raise NetworkDenied(decision)
        return decision

    def decide_url(self, url: str) -> Decision:
        parsed = _split_url(url)
        if isinstance(parsed, Decision):
            self._report(parsed, "guard")
            return parsed
        return self.decide(*parsed)

    def check_url(self, url: str) -> Decision:
        decision = self.decide_url(url)
        if not decision.allowed:
            raise NetworkDenied(decision)
        return decision

    def _report(self, decision: Decision, via: str) -> None:
        if self.events is not None:
            try:
                self.events("net.decision", {"via": via, **decision.as_event()})
            except Exception:  # an audit sink must never break the caller
                import logging

                logging.getLogger(__name__).exception("network event sink failed")


def _split_url(url: str) -> tuple[str, int] | Decision:
    """(host, port) of an http(s)/ws(s) URL, or the refusal."""
    from urllib.parse import urlsplit

    def refuse(rule: str, detail: str) -> Decision:
        return Decision(action="deny", rule=rule, detail=detail)

    if not isinstance(url, str) or any(ord(c) < 33 or ord(c) == 127 or c == "\\" for c in url):
        return refuse("bad-url", f"{url!r} has spaces, control characters or backslashes")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return refuse("bad-url", f"{url!r}: {exc}")
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        return refuse("scheme", f"the {scheme or 'missing'} scheme is not allowed (only http, https, ws, wss)")
    netloc = parts.netloc.rpartition("@")[2]  # what follows the credentials, as urllib3 reads it too
    host = netloc[: netloc.find("]") + 1] if netloc.startswith("[") else netloc.partition(":")[0]
    if not host:
        return refuse("bad-url", f"{url!r} has no host")
    return host, port or DEFAULT_PORTS[scheme]


def decide_url(
    url: str, *, network: Network | None = None, resolver: Resolver | None = None, events: EventSink | None = None
) -> Decision:
    """The decision for `url` (resolving its name): never raises for a refusal."""
    return Guard(network, resolver=resolver, events=events).decide_url(url)


def check_url(
    url: str, *, network: Network | None = None, resolver: Resolver | None = None, events: EventSink | None = None
) -> Decision:
    """Raise `NetworkDenied` unless `url` may be fetched; return the decision (with the checked addresses).

    Without `network`: any public destination (an SSRF guard). The check happens now; fetch through
    `requests_session` / `GuardedAdapter` or `GuardTransport` to have every connection checked as it is made.
    """
    return Guard(network, resolver=resolver, events=events).check_url(url)


# ---------------------------------------------------------------------- requests
def _guarded_pool_classes(guard: Guard) -> dict[str, type]:
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
    from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
    from urllib3.util import connection as util

    def new_conn(conn: Any) -> Any:
        import socket

        decision = guard.check(conn._dns_host, conn.port, via="requests")
        error: OSError | None = None
        for address in decision.addresses:
            try:
                return util.create_connection((address, conn.port), conn.timeout, source_address=conn.source_address,
                                              socket_options=conn.socket_options)  # fmt: skip
            except TimeoutError as exc:
                raise ConnectTimeoutError(conn, f"Connection to {conn.host} timed out") from exc
            except socket.timeout as exc:  # noqa: UP041 (a distinct class before Python 3.10)
                raise ConnectTimeoutError(conn, f"Connection to {conn.host} timed out") from exc
            except OSError as exc:
                error = exc
        raise NewConnectionError(conn, f"Failed to establish a new connection: {error}")

    class GuardedHTTPConnection(HTTPConnection):
        def _new_conn(self) -> Any:
            return new_conn(self)

    class GuardedHTTPSConnection(HTTPSConnection):
        def _new_conn(self) -> Any:
            return new_conn(self)

    class GuardedHTTPConnectionPool(HTTPConnectionPool):
        ConnectionCls = GuardedHTTPConnection

    class GuardedHTTPSConnectionPool(HTTPSConnectionPool):
        ConnectionCls = GuardedHTTPSConnection

    return {"http": GuardedHTTPConnectionPool, "https": GuardedHTTPSConnectionPool}


@functools.cache
def _adapter_class() -> type:
    from requests.adapters import HTTPAdapter
    from requests.utils import select_proxy

    class GuardedAdapterImpl(HTTPAdapter):
        """A requests transport adapter that checks every connection it makes against the network rules."""

        def __init__(
            self,
            *,
            network: Network | None = None,
            resolver: Resolver | None = None,
            events: EventSink | None = None,
            **kwargs: Any,
        ) -> None:
            self.guard = Guard(network, resolver=resolver, events=events)
            self._pool_classes = _guarded_pool_classes(self.guard)
            super().__init__(**kwargs)

        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = dict(self._pool_classes)

        def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
            detail = f"the guarded adapter connects directly, not through {proxy}"
            raise NetworkDenied(Decision(action="deny", rule="guard:proxy", detail=detail))

        def send(self, request: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            proxies = kwargs.get("proxies") or {}
            if select_proxy(request.url, proxies):
                self.proxy_manager_for(str(select_proxy(request.url, proxies)))
            parsed = _split_url(request.url)
            if isinstance(parsed, Decision):
                self.guard._report(parsed, "requests")
                raise NetworkDenied(parsed)
            return super().send(request, **kwargs)

    return GuardedAdapterImpl


def GuardedAdapter(  # noqa: N802 (a class, built on first use so that requests is imported lazily)
    *, network: Network | None = None, resolver: Resolver | None = None, events: EventSink | None = None,
    **kwargs: Any,
) -> requests.adapters.HTTPAdapter:  # fmt: skip
    """A `requests.adapters.HTTPAdapter` that checks each connection: mount it for http:// and https://."""
    adapter: requests.adapters.HTTPAdapter = _adapter_class()(network=network, resolver=resolver, events=events,
                                                               **kwargs)  # fmt: skip
    return adapter


def requests_session(
    *, network: Network | None = None, resolver: Resolver | None = None, events: EventSink | None = None
) -> requests.Session:
    """A `requests.Session` whose every connection (redirects included) is checked.

    It ignores proxy variables from the environment (`trust_env = False`): a connection through a
    proxy would be a connection to the proxy, which the guard cannot judge for its destination.
    """
    import requests

    session = requests.Session()
    session.trust_env = False
    adapter = GuardedAdapter(network=network, resolver=resolver, events=events)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


# ---------------------------------------------------------------------- httpx
def _sync_backend(inner: httpcore.NetworkBackend, guard: Guard) -> httpcore.NetworkBackend:
    import httpcore

    class GuardedBackend(httpcore.NetworkBackend):
        def connect_tcp(
            self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
            socket_options: Iterable[Any] | None = None,
        ) -> httpcore.NetworkStream:  # fmt: skip
            decision = guard.check(host, port, via="httpx")
            error: Exception | None = None
            for address in decision.addresses:
                try:
                    return inner.connect_tcp(address, port, timeout, local_address, socket_options)
                except httpcore.ConnectError as exc:
                    error = exc
            raise httpcore.ConnectError(f"cannot connect to {host}:{port}: {error}")

        def connect_unix_socket(
            self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
        ) -> httpcore.NetworkStream:
            raise NetworkDenied(Decision(action="deny", rule="guard:unix", detail=f"unix socket {path}"))

        def sleep(self, seconds: float) -> None:
            inner.sleep(seconds)

    return GuardedBackend()


def _async_backend(inner: httpcore.AsyncNetworkBackend, guard: Guard) -> httpcore.AsyncNetworkBackend:
    import anyio
    import httpcore

    class AsyncGuardedBackend(httpcore.AsyncNetworkBackend):
        async def connect_tcp(
            self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
            socket_options: Iterable[Any] | None = None,
        ) -> httpcore.AsyncNetworkStream:  # fmt: skip
            decision = await anyio.to_thread.run_sync(lambda: guard.check(host, port, via="httpx"))
            error: Exception | None = None
            for address in decision.addresses:
                try:
                    return await inner.connect_tcp(address, port, timeout, local_address, socket_options)
                except httpcore.ConnectError as exc:
                    error = exc
            raise httpcore.ConnectError(f"cannot connect to {host}:{port}: {error}")

        async def connect_unix_socket(
            self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
        ) -> httpcore.AsyncNetworkStream:
            raise NetworkDenied(Decision(action="deny", rule="guard:unix", detail=f"unix socket {path}"))

        async def sleep(self, seconds: float) -> None:
            await inner.sleep(seconds)

    return AsyncGuardedBackend()


def _install(pool: object, wrap: Callable[[Any], Any]) -> None:
    """Put the guard between an httpcore pool and its network backend; refuse a pool we do not know."""
    if not hasattr(pool, "_network_backend") or type(pool).__name__ not in ("ConnectionPool", "AsyncConnectionPool"):
        raise TypeError(
            "corral's guard transport needs a direct httpcore connection pool (no proxy=, no uds=); "
            f"got {type(pool).__name__}"
        )
    pool._network_backend = wrap(pool._network_backend)


@functools.cache
def _transport_classes() -> tuple[type, type]:
    import httpx

    class GuardTransportImpl(httpx.HTTPTransport):
        """An httpx transport that checks each connection against the network rules (redirects included)."""

        def __init__(
            self, *, network: Network | None = None, resolver: Resolver | None = None,
            events: EventSink | None = None, **kwargs: Any,
        ) -> None:  # fmt: skip
            super().__init__(**kwargs)
            self.guard = Guard(network, resolver=resolver, events=events)
            _install(self._pool, lambda inner: _sync_backend(inner, self.guard))

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            parsed = _split_url(str(request.url))
            if isinstance(parsed, Decision):
                self.guard._report(parsed, "httpx")
                raise NetworkDenied(parsed)
            return super().handle_request(request)

    class AsyncGuardTransportImpl(httpx.AsyncHTTPTransport):
        """The asynchronous `GuardTransport`."""

        def __init__(
            self, *, network: Network | None = None, resolver: Resolver | None = None,
            events: EventSink | None = None, **kwargs: Any,
        ) -> None:  # fmt: skip
            super().__init__(**kwargs)
            self.guard = Guard(network, resolver=resolver, events=events)
            _install(self._pool, lambda inner: _async_backend(inner, self.guard))

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            parsed = _split_url(str(request.url))
            if isinstance(parsed, Decision):
                self.guard._report(parsed, "httpx")
                raise NetworkDenied(parsed)
            return await super().handle_async_request(request)

    return GuardTransportImpl, AsyncGuardTransportImpl


def GuardTransport(  # noqa: N802 (a class, built on first use so that httpx is imported lazily)
    *, network: Network | None = None, resolver: Resolver | None = None, events: EventSink | None = None,
    **kwargs: Any,
) -> Any:  # fmt: skip
    """An `httpx.HTTPTransport` that checks each connection: `httpx.Client(transport=GuardTransport(...))`.
    Other keyword arguments (verify, retries, limits, ...) go to `httpx.HTTPTransport`."""
    return _transport_classes()[0](network=network, resolver=resolver, events=events, **kwargs)


def AsyncGuardTransport(  # noqa: N802
    *, network: Network | None = None, resolver: Resolver | None = None, events: EventSink | None = None,
    **kwargs: Any,
) -> Any:  # fmt: skip
    """An `httpx.AsyncHTTPTransport` that checks each connection: `httpx.AsyncClient(transport=...)`."""
    return _transport_classes()[1](network=network, resolver=resolver, events=events, **kwargs)
