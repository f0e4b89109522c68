"""Serving a `CorralMCP` over stdio or streamable HTTP (loopback unless asked, with a bearer token)."""

from __future__ import annotations

import hmac
import ipaddress
from typing import Any

import anyio

from corral.errors import ConfigError
from corral.mcp.server import CorralMCP


def parse_bind(spec: str) -> tuple[str, int]:
    """`HOST:PORT` (or `[v6]:PORT`) as given to --http."""
    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ConfigError(f"expected HOST:PORT, got {spec!r}", where="--http")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, *, allow_remote: bool, token: str | None) -> None:
    if is_loopback(host):
        return
    if not allow_remote or not token:
        missing = " and ".join(
            ["--allow-remote"] * (not allow_remote) + ["a bearer token (--token or CORRAL_MCP_TOKEN)"] * (not token)
        )
        raise ConfigError(
            f"refusing to serve on {host}, which is not a loopback address: remote clients need {missing}",
            where="--http",
        )


async def serve_stdio(mcp: CorralMCP) -> None:
    from mcp.server.stdio import stdio_server

    async with stdio_server() as (read_stream, write_stream):
        await mcp.server.run(read_stream, write_stream, mcp.server.create_initialization_options())


def http_app(mcp: CorralMCP, *, host: str, token: str | None) -> Any:
    from mcp.server.transport_security import TransportSecuritySettings

    security = None
    if not is_loopback(host):
        # Remote clients name the server however they reach it; the bearer token is the guard.
        security = TransportSecuritySettings(enable_dns_rebinding_protection=False)
    app = mcp.server.streamable_http_app(host=host, transport_security=security)
    return BearerGuard(app, token) if token else app


class BearerGuard:
    """ASGI middleware: HTTP requests need `Authorization: Bearer <token>` (compared in constant time)."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                headers = [(b"content-type", b"text/plain"), (b"www-authenticate", b"Bearer")]
                await send({"type": "http.response.start", "status": 401, "headers": headers})
                await send({"type": "http.response.body", "body": b"corral: a valid bearer token is required\n"})
                return
        await self.app(scope, receive, send)


def serve_http(mcp: CorralMCP, *, host: str, port: int, token: str | None) -> None:
    import uvicorn

    app = http_app(mcp, host=host, token=token)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
    anyio.run(uvicorn.Server(config).serve)
