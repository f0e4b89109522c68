"""corral's network policy: decisions, the proxy, and the in-process guard.

    from corral.net import check_url, decide, Rules
    check_url("http://169.254.169.254/")                 # raises NetworkDenied: blocked-address:metadata
    session = corral.net.requests_session(network=corral.Network(mode="allow", allow=["pypi.org"]))
    client = httpx.Client(transport=corral.net.GuardTransport())

Layers: `decide` (pure decisions), `proxy` (the HTTP/CONNECT/SOCKS5 server taking a decide callback),
`service` (the proxy a sandbox owns), `guard` (the same rules in-process). Names are imported on
first use, so importing this package costs nothing.
"""

from __future__ import annotations

_EXPORTS = {
    "Decision": "corral.net.decide",
    "Rules": "corral.net.decide",
    "decide": "corral.net.decide",
    "classify_address": "corral.net.decide",
    "parse_host": "corral.net.decide",
    "ProxyServer": "corral.net.proxy",
    "ProxyThread": "corral.net.proxy",
    "SandboxProxy": "corral.net.service",
    "Guard": "corral.net.guard",
    "NetworkDenied": "corral.net.guard",
    "check_url": "corral.net.guard",
    "decide_url": "corral.net.guard",
    "requests_session": "corral.net.guard",
    "GuardedAdapter": "corral.net.guard",
    "GuardTransport": "corral.net.guard",
    "AsyncGuardTransport": "corral.net.guard",
}

__all__ = [
    "AsyncGuardTransport", "Decision", "Guard", "GuardTransport", "GuardedAdapter", "NetworkDenied", "ProxyServer",
    "ProxyThread", "Rules", "SandboxProxy", "check_url", "classify_address", "decide", "decide_url", "parse_host",
    "requests_session",
]  # fmt: skip

TYPE_CHECKING = False
if TYPE_CHECKING:
    from corral.net.decide import Decision, Rules, classify_address, decide, parse_host
    from corral.net.guard import (
        AsyncGuardTransport,
        Guard,
        GuardedAdapter,
        GuardTransport,
        NetworkDenied,
        check_url,
        decide_url,
        requests_session,
    )
    from corral.net.proxy import ProxyServer, ProxyThread
    from corral.net.service import SandboxProxy


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'corral.net' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
