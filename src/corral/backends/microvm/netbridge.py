"""The host end of a VM's `corral.net` port (network mode 'allow').

The guest agent sends each connection a command opens to 127.0.0.1:3128 over the port
(`corral.agent.netmux`); here each one becomes a new connection to the sandbox's proxy on its unix
socket, the same proxy (and so the same decisions and audit events) as the namespace backend's.
One thread per VM, one poll loop, no thread per connection.

The guest is not trusted: everything it sends is bounded by the mux (a window per connection, at
most `MAX_CONNECTIONS` of them, frames of a fixed shape), and it can only ever reach the proxy.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading

from corral.agent import netmux

log = logging.getLogger(__name__)


class NetBridge:
    """Connections from the VM's port to the proxy's unix socket `proxy_socket`. `start()`, then `stop()`."""

    def __init__(self, port: socket.socket, proxy_socket: str) -> None:
        self.port = port
        self.proxy_socket = proxy_socket
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.mux = netmux.Mux(port.fileno(), select.poll(), connect=self._connect)
        self._thread = threading.Thread(target=self._run, name="corral-microvm-net", daemon=True)

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            sock.connect(self.proxy_socket)  # a unix socket connects at once, or refuses (backlog full)
        except OSError:
            sock.close()
            raise
        return sock

    def _run(self) -> None:
        try:
            netmux.run(self.mux, self._stop_r)
        except Exception:
            log.exception("the microVM's network bridge failed")
            self.mux.close()
        if self.mux.violations:
            log.warning("the guest broke the network flow control on %d connections", self.mux.violations)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the bridge and every connection through it (idempotent)."""
        if self._stop_w < 0:
            return
        try:
            os.write(self._stop_w, b"x")
        except OSError:
            pass
        if self._thread.is_alive():
            self._thread.join(10)
        if not self._thread.is_alive():
            self.mux.close()
        for fd in (self._stop_r, self._stop_w):
            os.close(fd)
        self._stop_r = self._stop_w = -1
        self.port.close()
