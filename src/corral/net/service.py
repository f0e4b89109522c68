"""The proxy a sandbox owns: started with it, stopped with it, reporting to its audit log.

With network mode 'allow', a backend starts one `SandboxProxy` per sandbox (or per one-shot run):

- the `namespace` backend on a unix socket in a private directory, bind-mounted into the sandbox,
  where a forwarder (`corral.agent.forward`) listens on 127.0.0.1:3128 of the sandbox's own
  loopback and passes each connection to the socket;
- the `landlock` and `process` backends on a TCP port of the host's loopback (Landlock then allows
  connect() to that port only).

Inside, `proxy_env` points HTTP_PROXY, HTTPS_PROXY and ALL_PROXY (socks5h: names are resolved by
the proxy) at it, and sets NO_PROXY empty, so that loopback addresses go through the proxy too.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from corral.errors import ConfigError
from corral.net.decide import Decision, Rules, decide
from corral.net.proxy import ProxyServer, ProxyThread, system_resolver

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from corral.backends.base import EventSink
    from corral.net.proxy import Resolver
    from corral.policy.model import Network

__all__ = ["SOCKET_NAME", "SandboxProxy", "proxy_env"]

SOCKET_NAME = "proxy.sock"
_MIN_OPEN_FILES = 16384


def proxy_env(port: int) -> dict[str, str]:
    """The variables that send a sandbox's traffic to the proxy at 127.0.0.1:`port` (both spellings)."""
    http = f"http://127.0.0.1:{port}"
    env: dict[str, str] = {}
    for name, value in (
        ("HTTP_PROXY", http), ("HTTPS_PROXY", http), ("ALL_PROXY", f"socks5h://127.0.0.1:{port}"), ("NO_PROXY", ""),
    ):  # fmt: skip
        env[name] = value
        env[name.lower()] = value
    return env


def compile_rules(network: Network) -> Rules:
    try:
        return Rules.from_network(network)
    except ValueError as exc:
        raise ConfigError(str(exc), where="network.allow") from None


class SandboxProxy:
    """A running proxy for one sandbox. Use `start_unix` or `start_tcp`; `stop()` ends it (idempotent)."""

    def __init__(self, network: Network, *, events: EventSink | None = None, resolver: Resolver | None = None) -> None:
        self.network = network
        self.rules = compile_rules(network)
        self.socket_path: str | None = None
        self.port: int | None = None
        self._dir: str | None = None
        rules = self.rules

        def judge(host: str, port: int, addresses: Sequence[str] | None) -> Decision:
            return decide(rules, host, port, addresses)

        self.server = ProxyServer(decide=judge, resolver=resolver or system_resolver, events=events,
                                  upstream=network.upstream)  # fmt: skip
        _raise_open_files_limit()
        self._thread = ProxyThread(self.server)

    @classmethod
    def start_unix(
        cls, network: Network, *, events: EventSink | None = None, resolver: Resolver | None = None
    ) -> SandboxProxy:
        """Listen on a unix socket in a new private directory (`socket_path`)."""
        proxy = cls(network, events=events, resolver=resolver)
        try:
            from corral.backends.hostagent import reap_stale_private_dirs

            # Named for this process, as the backends' private directories are: the next start
            # removes those of a corral that was killed before it could.
            reap_stale_private_dirs()
            proxy._dir = tempfile.mkdtemp(prefix=f"corral-{os.getpid()}-private-net-")
            proxy.socket_path = os.path.join(proxy._dir, SOCKET_NAME)
            proxy._thread.start_unix(proxy.socket_path)
        except BaseException:
            proxy.stop()
            raise
        return proxy

    @classmethod
    def start_tcp(
        cls, network: Network, *, events: EventSink | None = None, resolver: Resolver | None = None
    ) -> SandboxProxy:
        """Listen on an ephemeral port of the host's loopback (`port`)."""
        proxy = cls(network, events=events, resolver=resolver)
        try:
            proxy.port = proxy._thread.start_tcp("127.0.0.1", 0)
        except BaseException:
            proxy.stop()
            raise
        return proxy

    def stop(self) -> None:
        self._thread.stop()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def _raise_open_files_limit() -> None:
    """Each proxied connection holds two descriptors in this process: make room for thousands."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = _MIN_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, _MIN_OPEN_FILES)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass
