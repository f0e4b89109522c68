"""Many TCP connections over one byte stream: how commands in a microVM reach the host's network proxy.

A VM with network mode 'allow' has no network device. Its commands connect to 127.0.0.1:3128 in
their own network namespace, where the guest agent listens; each connection it accepts travels
over one virtio-serial port (`corral.net`) to the host, which connects it to the sandbox's proxy.
Both ends run a `Mux` on their end of the port (stdlib only, Python >= 3.8: the guest runs it too).

Frames have stream.py's header (kind: 1 byte, id: 4 bytes, length: 4 bytes, big-endian), then the payload:

    OPEN id          guest -> host: a new connection
    DATA id bytes    either way, at most CHUNK bytes
    EOF id           either way: nothing more this way (a half close: the receiver shuts down writing)
    CLOSE id         either way: the connection is gone (reset); forget it
    WINDOW id n      either way: the receiver wrote n more bytes out; the sender may send that much more

Flow control is per connection and per direction: a side may have at most `window` bytes of a
connection's data unacknowledged, and the receiver acknowledges (WINDOW) only what it wrote to the
connection's socket. So a connection whose reader stalls stops only itself, and each side buffers
at most `window` bytes per connection and at most `max_connections` connections. Data frames are
queued for the port only while less than HIGH_WATER bytes wait there, so the control frames of the
other connections never wait behind megabytes. A peer that breaks the rules (too much data, data
after its end) loses that connection; a malformed frame ends the whole mux.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

OPEN = 1
DATA = 2
EOF = 3
CLOSE = 4
WINDOW = 5
NAMES = {OPEN: "OPEN", DATA: "DATA", EOF: "EOF", CLOSE: "CLOSE", WINDOW: "WINDOW"}

HEADER = struct.Struct(">BII")
GRANT = struct.Struct(">I")
CHUNK = 32768  # the largest DATA payload
DEFAULT_WINDOW = 65536  # bytes of one connection's data, one way, that may be unacknowledged
MAX_CONNECTIONS = 1024
HIGH_WATER = 256 * 1024  # stop reading connections while this much waits for the port
LOW_WATER = 64 * 1024  # ... and start again below this
HARD_LIMIT = 1 << 20  # stop reading the port itself while this much waits to be written to it
_READ = select.POLLIN | select.POLLHUP | select.POLLERR
_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)


class ProtocolError(Exception):
    pass


class Conn:
    """One connection: our socket, what the peer may still send us, what we may still send it."""

    __slots__ = ("credit", "fd", "grant", "id", "inbuf", "mask", "rd_eof", "sock", "tag", "wr_eof", "wr_shut")

    def __init__(self, ident: int, sock: socket.socket, credit: int, tag: object) -> None:
        self.id = ident
        self.sock = sock
        self.fd = sock.fileno()
        self.credit = credit  # bytes we may still send to the peer
        self.inbuf = bytearray()  # the peer's data waiting for our socket (at most one window)
        self.grant = 0  # bytes written to our socket, not yet acknowledged to the peer
        self.rd_eof = False  # our socket reached its end; EOF sent
        self.wr_eof = False  # the peer sent EOF
        self.wr_shut = False  # ... and we shut our socket down for writing
        self.mask = 0  # the poll events we are registered for (0: not registered)
        self.tag = tag  # what the connection belongs to (the guest: the exec whose listener accepted it)


class Mux:
    """One end of the port. `poller` is the owner's `select.poll()`; the owner calls `handle(fd, events)`
    for every descriptor `owns(fd)` says is ours. The host passes `connect` (a new non-blocking socket to
    the proxy for each OPEN); the guest calls `listen` for each listener whose connections it sends."""

    def __init__(
        self,
        port: int,
        poller: select.poll,
        *,
        connect: Callable[[], socket.socket] | None = None,
        window: int = DEFAULT_WINDOW,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.port = port
        self.poller = poller
        self.connect = connect
        self.window = window
        self.max_connections = max_connections
        self.conns = {}  # type: dict[int, Conn]
        self.by_fd = {}  # type: dict[int, Conn]
        self.listeners = {}  # type: dict[int, tuple[socket.socket, object]]
        self.out = bytearray()  # frames waiting for the port
        self.buf = bytearray()  # bytes read from the port, not yet a whole frame
        self.next_id = 0
        self.throttled = False
        self.dead = False
        self.port_mask = 0
        self.accepting = True
        self.violations = 0  # connections lost to a peer breaking the flow-control rules
        os.set_blocking(port, False)
        self._port_interest()

    # ------------------------------------------------------------------ the owner's side
    def owns(self, fd: int) -> bool:
        return fd == self.port or fd in self.by_fd or fd in self.listeners

    def handle(self, fd: int, events: int) -> None:
        if fd == self.port:
            if events & select.POLLOUT:
                self._flush()
            if events & _READ and not self.dead:
                self._read_port()
        elif fd in self.listeners:
            self._accept(fd)
        else:
            conn = self.by_fd.get(fd)
            if conn is not None:
                if events & select.POLLOUT:
                    self._write_sock(conn)
                if events & _READ and self.conns.get(conn.id) is conn:
                    self._read_sock(conn)
        self._flush()

    def listen(self, sock: socket.socket, tag: object) -> None:
        """Send every connection `sock` (a listening socket) accepts to the peer; `tag` names them."""
        sock.setblocking(False)
        self.listeners[sock.fileno()] = (sock, tag)
        if self.accepting:
            self.poller.register(sock.fileno(), select.POLLIN)

    def unlisten(self, tag: object) -> None:
        """Close the listeners and reset the connections tagged `tag`."""
        for fd, (sock, owner) in list(self.listeners.items()):
            if owner == tag:
                del self.listeners[fd]
                self._unregister(fd)
                sock.close()
        for conn in [c for c in self.conns.values() if c.tag == tag]:
            self._abort(conn)
        self._flush()

    def close(self) -> None:
        """Drop every connection and listener (the port stays open: it is the owner's)."""
        self.dead = True
        for conn in list(self.conns.values()):
            self._drop(conn)
        for fd, (sock, _tag) in list(self.listeners.items()):
            self._unregister(fd)
            sock.close()
        self.listeners.clear()
        self._unregister(self.port)
        self.port_mask = 0

    # ------------------------------------------------------------------ the port
    def _queue(self, kind: int, ident: int, payload: bytes = b"") -> None:
        self.out += HEADER.pack(kind, ident, len(payload))
        self.out += payload
        if not self.throttled and len(self.out) >= HIGH_WATER:
            self.throttled = True
            for conn in list(self.conns.values()):
                self._interest(conn)

    def _flush(self) -> None:
        while self.out and not self.dead:
            try:
                sent = os.write(self.port, self.out[:65536])
            except OSError as exc:
                if exc.errno in _AGAIN:
                    break
                self.close()
                return
            del self.out[:sent]
        if self.throttled and len(self.out) < LOW_WATER:
            self.throttled = False
            for conn in list(self.conns.values()):
                self._interest(conn)
        self._port_interest()

    def _port_interest(self) -> None:
        if self.dead:
            return
        mask = (select.POLLIN if len(self.out) < HARD_LIMIT else 0) | (select.POLLOUT if self.out else 0)
        if mask != self.port_mask:
            if mask:
                self.poller.register(self.port, mask)
            else:
                self._unregister(self.port)
            self.port_mask = mask

    def _read_port(self) -> None:
        # A virtio-serial port gives at most one small buffer (a page) per read: take what is there, then parse.
        for _ in range(64):
            try:
                data = os.read(self.port, 1 << 18)
            except OSError as exc:
                if exc.errno in _AGAIN:
                    break
                data = b""
            if not data:  # the other end is gone
                self.close()
                return
            self.buf += data
            if len(self.buf) >= 1 << 18:
                break
        try:
            self._frames()
        except ProtocolError:
            self.close()

    def _frames(self) -> None:
        buf = self.buf
        pos = 0
        while len(buf) - pos >= HEADER.size:
            kind, ident, length = HEADER.unpack_from(buf, pos)
            if kind not in NAMES or length > (CHUNK if kind == DATA else GRANT.size if kind == WINDOW else 0):
                raise ProtocolError("bad frame: kind %d, length %d" % (kind, length))
            end = pos + HEADER.size + length
            if len(buf) < end:
                break
            payload = bytes(buf[pos + HEADER.size : end])
            pos = end
            self._frame(kind, ident, payload)
            if self.dead:
                return
        del buf[:pos]

    def _frame(self, kind: int, ident: int, payload: bytes) -> None:
        if kind == OPEN:
            self._opened(ident)
            return
        conn = self.conns.get(ident)
        if conn is None:  # a connection we already forgot (reset, or done on our side)
            return
        if kind == DATA:
            # Received and not yet acknowledged: what the peer may have outstanding, at most a window.
            if conn.wr_eof or len(conn.inbuf) + conn.grant + len(payload) > self.window:
                self.violations += 1
                self._abort(conn)
                return
            conn.inbuf += payload
            self._write_sock(conn)
        elif kind == EOF:
            conn.wr_eof = True
            self._write_sock(conn)
        elif kind == CLOSE:
            self._drop(conn)
        elif kind == WINDOW:
            if len(payload) != GRANT.size:
                raise ProtocolError("bad WINDOW frame")
            conn.credit = min(self.window, conn.credit + GRANT.unpack(payload)[0])
            self._interest(conn)

    def _opened(self, ident: int) -> None:
        """The peer opened connection `ident`: connect it (the host's side)."""
        if self.connect is None or ident in self.conns:
            raise ProtocolError("unexpected OPEN %d" % ident)
        if len(self.conns) >= self.max_connections:
            self._queue(CLOSE, ident)
            return
        try:
            sock = self.connect()
        except OSError:
            self._queue(CLOSE, ident)
            return
        self._add(Conn(ident, sock, self.window, None))

    # ------------------------------------------------------------------ connections
    def _accept(self, fd: int) -> None:
        listener = self.listeners[fd]
        while len(self.conns) < self.max_connections:
            try:
                sock, _ = listener[0].accept()
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM) and self.conns:
                    self._accepting(False)  # until a connection ends; meanwhile clients wait in the backlog
                return
            if self.dead:
                sock.close()
                continue
            sock.setblocking(False)
            ident = self._new_id()
            self._queue(OPEN, ident)
            self._add(Conn(ident, sock, self.window, listener[1]))
        self._accepting(False)

    def _accepting(self, on: bool) -> None:
        """Watch the listeners only while there is room for another connection (else clients wait in the backlog)."""
        if on == self.accepting:
            return
        self.accepting = on
        for fd in self.listeners:
            if on:
                self.poller.register(fd, select.POLLIN)
            else:
                self._unregister(fd)

    def _new_id(self) -> int:
        while True:
            self.next_id = self.next_id % 0xFFFFFFFF + 1
            if self.next_id not in self.conns:
                return self.next_id

    def _add(self, conn: Conn) -> None:
        self.conns[conn.id] = conn
        self.by_fd[conn.fd] = conn
        self._interest(conn)

    def _interest(self, conn: Conn) -> None:
        mask = 0
        if not conn.rd_eof and conn.credit > 0 and not self.throttled:
            mask |= select.POLLIN
        if conn.inbuf:
            mask |= select.POLLOUT
        if mask != conn.mask:
            if mask:
                self.poller.register(conn.fd, mask)
            else:
                self._unregister(conn.fd)
            conn.mask = mask

    def _read_sock(self, conn: Conn) -> None:
        if conn.rd_eof or conn.credit <= 0 or self.throttled:
            self._interest(conn)
            return
        try:
            data = conn.sock.recv(min(CHUNK, conn.credit))
        except OSError as exc:
            if exc.errno in _AGAIN:
                return
            self._abort(conn)
            return
        if data:
            conn.credit -= len(data)
            self._queue(DATA, conn.id, data)
        else:
            conn.rd_eof = True
            self._queue(EOF, conn.id)
            if self._done(conn):
                return
        self._interest(conn)

    def _write_sock(self, conn: Conn) -> None:
        while conn.inbuf:
            try:
                sent = conn.sock.send(conn.inbuf)
            except OSError as exc:
                if exc.errno in _AGAIN:
                    break
                self._abort(conn)
                return
            del conn.inbuf[:sent]
            conn.grant += sent
        if conn.grant >= self.window // 4:
            self._queue(WINDOW, conn.id, GRANT.pack(conn.grant))
            conn.grant = 0
        if conn.wr_eof and not conn.inbuf and not conn.wr_shut:
            conn.wr_shut = True
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            if self._done(conn):
                return
        self._interest(conn)

    def _done(self, conn: Conn) -> bool:
        """Both ways ended: forget the connection."""
        if conn.rd_eof and conn.wr_shut:
            self._drop(conn)
            return True
        return False

    def _abort(self, conn: Conn) -> None:
        self._queue(CLOSE, conn.id)
        self._drop(conn)

    def _drop(self, conn: Conn) -> None:
        if self.conns.get(conn.id) is conn:
            del self.conns[conn.id]
        self.by_fd.pop(conn.fd, None)
        if conn.mask:
            self._unregister(conn.fd)
            conn.mask = 0
        conn.sock.close()
        conn.inbuf = bytearray()
        if not self.accepting and len(self.conns) < self.max_connections and not self.dead:
            self._accepting(True)

    def _unregister(self, fd: int) -> None:
        try:
            self.poller.unregister(fd)
        except (KeyError, ValueError):
            pass


def run(mux: Mux, stop: int) -> None:
    """Serve `mux` (with its own poller) until the port closes or `stop` (a descriptor) becomes readable
    (the caller then owns the mux: `close()` it)."""
    mux.poller.register(stop, select.POLLIN)
    while not mux.dead:
        try:
            events = mux.poller.poll()
        except InterruptedError:
            continue
        for fd, mask in events:
            if fd == stop:
                return
            if mux.owns(fd):
                mux.handle(fd, mask)
