"""Inside a sandbox: listen on 127.0.0.1:PORT and pass every connection to the proxy's unix socket.

The sandbox has only its own loopback; the proxy runs on the host and its unix socket is
bind-mounted in. Programs find it through HTTP_PROXY / HTTPS_PROXY / ALL_PROXY = 127.0.0.1:PORT.

Two uses:
- the agent of a live sandbox runs `serve()` in a thread (after confining itself, so the thread
  shares its Landlock domain and seccomp filter);
- a one-shot run starts `python3 forward.py PORT SOCKET -- COMMAND ARGS...`: it binds the port,
  leaves a daemon behind to serve it (reparented to the sandbox's init, so the command never sees
  an extra child), and execs the command in its own place.

One thread, one selector, non-blocking sockets (no thread per connection: the pids limit counts
threads). Stdlib only, Python >= 3.8. A one-shot run waits for this script before its command
starts, so the script binds with `_socket` and leaves `socket` and `selectors` (which import `enum`,
`math`, ...) to the daemon.
"""

from __future__ import annotations

import errno
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket

_CHUNK = 1 << 16
_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)


def listen(port: int) -> socket.socket:
    import socket

    return socket.socket(fileno=_listen_fd(port))


def _listen_fd(port: int) -> int:
    """A listening TCP socket on 127.0.0.1:`port`, as a descriptor (close-on-exec)."""
    import _socket

    listener = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    listener.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(1024)
    return int(listener.detach())


class _Side:
    """One direction of a connection: bytes read from `src`, waiting to be written to `dst`."""

    __slots__ = ("done", "dst", "eof", "pending", "src")

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src = src
        self.dst = dst
        self.pending = b""
        self.eof = False
        self.done = False  # end of file passed on


class _Pair:
    __slots__ = ("a", "b", "sides")

    def __init__(self, a: socket.socket, b: socket.socket) -> None:
        self.a = a
        self.b = b
        self.sides = (_Side(a, b), _Side(b, a))


def serve(listener: socket.socket, target: str) -> None:
    """Relay forever: each connection accepted on `listener` to a new connection to the unix socket `target`."""
    import selectors
    import socket

    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    owner = {}  # type: dict[int, _Pair]

    def close(pair: _Pair) -> None:
        for s in (pair.a, pair.b):
            owner.pop(s.fileno(), None)
            try:
                sel.unregister(s)
            except (KeyError, ValueError):
                pass
            s.close()

    def update(pair: _Pair) -> None:
        """Register each socket for what it is waiting for; close the pair when both directions are done."""
        if all(side.done for side in pair.sides):
            close(pair)
            return
        for sock in (pair.a, pair.b):
            mask = 0
            for side in pair.sides:
                if side.src is sock and not side.eof and not side.pending:
                    mask |= selectors.EVENT_READ
                if side.dst is sock and side.pending:
                    mask |= selectors.EVENT_WRITE
            key = sel.get_map().get(sock.fileno())
            if mask and key is None:
                sel.register(sock, mask, pair)
            elif mask and key is not None and key.events != mask:
                sel.modify(sock, mask, pair)
            elif not mask and key is not None:
                sel.unregister(sock)

    def flush(side: _Side) -> None:
        while side.pending:
            try:
                sent = side.dst.send(side.pending)
            except OSError as exc:
                if exc.errno in _AGAIN:
                    return
                raise
            side.pending = side.pending[sent:]
        if side.eof and not side.done:
            side.done = True
            try:
                side.dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def pump(side: _Side) -> None:
        try:
            data = side.src.recv(_CHUNK)
        except OSError as exc:
            if exc.errno in _AGAIN:
                return
            raise
        if data:
            side.pending = data
        else:
            side.eof = True
        flush(side)

    while True:
        for key, events in sel.select():
            if key.data is None:
                accept(listener, target, owner, update)
                continue
            pair = key.data  # type: _Pair
            sock = key.fileobj
            if pair.a.fileno() < 0 or owner.get(sock.fileno()) is not pair:  # type: ignore[union-attr]
                continue
            try:
                for side in pair.sides:
                    if side.dst is sock and events & selectors.EVENT_WRITE:
                        flush(side)
                    if side.src is sock and events & selectors.EVENT_READ and not side.pending and not side.eof:
                        pump(side)
            except OSError:
                close(pair)
                continue
            update(pair)


def accept(listener: socket.socket, target: str, owner: dict, update) -> None:  # type: ignore[type-arg,no-untyped-def]
    import socket

    while True:
        try:
            client, _ = listener.accept()
        except OSError as exc:
            if exc.errno in _AGAIN or exc.errno == errno.ECONNABORTED:
                return
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                return  # out of descriptors: the client waits in the backlog
            raise
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.settimeout(10)
            upstream.connect(target)
        except OSError:
            upstream.close()
            client.close()
            continue
        client.setblocking(False)
        upstream.setblocking(False)
        try:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        pair = _Pair(client, upstream)
        owner[client.fileno()] = pair
        owner[upstream.fileno()] = pair
        update(pair)


def main(argv: list) -> int:  # type: ignore[type-arg]
    """forward.py PORT SOCKET -- COMMAND ARGS...: serve in a daemon, exec the command here."""
    try:
        split = argv.index("--")
        port, target = int(argv[0]), argv[1]
        command = argv[split + 1 :]
    except (ValueError, IndexError):
        sys.stderr.write("usage: forward.py PORT SOCKET -- COMMAND ARGS...\n")
        return 2
    if not command:
        sys.stderr.write("forward.py: no command\n")
        return 2
    fd = _listen_fd(port)
    child = os.fork()
    if child == 0:
        try:
            if os.fork() != 0:
                os._exit(0)  # the daemon is orphaned and adopted by the sandbox's init
            os.setsid()
            null = os.open(os.devnull, os.O_RDWR)
            for stdio in (0, 1, 2):
                os.dup2(null, stdio)
            import socket

            serve(socket.socket(fileno=fd), target)
        finally:
            os._exit(0)
    os.waitpid(child, 0)
    os.close(fd)
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        sys.stderr.write("%s: %s\n" % (command[0], exc.strerror))
        return 126 if exc.errno == errno.EACCES else 127
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
