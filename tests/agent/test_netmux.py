"""The microVM's connection multiplexer (corral.agent.netmux), on the host with real sockets.

A guest-side `Mux` listens on 127.0.0.1 (as the guest agent does inside a command's namespace), a
host-side `Mux` or `NetBridge` connects each connection to a unix-socket server (as it does to the
proxy); a socketpair stands in for the virtio-serial port between them.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.agent import netmux
from corral.backends.microvm.netbridge import NetBridge


class Server:
    """A unix-socket server: echoes, answers `SEND n` with n bytes, or after `HOLD` reads nothing more; then
    closes its side."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1024)
        self.accepted = 0
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                first = conn.recv(65536)
                if first.startswith(b"HOLD"):
                    self.held.append(conn)
                    time.sleep(30)
                    return
                if first.startswith(b"SEND "):
                    size = int(first.split()[1])
                    block = b"s" * 65536
                    while size > 0:
                        conn.sendall(block[: min(size, len(block))])
                        size -= len(block)
                    return
                data = first
                while data:
                    conn.sendall(data)
                    data = conn.recv(65536)
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()


class Guest:
    """The guest side: a Mux serving a listener on 127.0.0.1, run in a thread."""

    def __init__(self, port: socket.socket, **options: int) -> None:
        self.port = port
        self.mux = netmux.Mux(port.fileno(), select.poll(), **options)
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.address = self.listener.getsockname()
        self.mux.listen(self.listener, "exec-1")
        self._stop_r, self._stop_w = os.pipe()
        self.thread = threading.Thread(target=netmux.run, args=(self.mux, self._stop_r), daemon=True)
        self.thread.start()

    def halt(self) -> None:
        """Stop the loop: the mux is the caller's from here on."""
        if self.thread.is_alive():
            os.write(self._stop_w, b"x")
            self.thread.join(10)

    def stop(self) -> None:
        self.halt()
        self.mux.close()
        if self._stop_r >= 0:
            os.close(self._stop_r)
            os.close(self._stop_w)
            self._stop_r = self._stop_w = -1
        self.port.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(str(tmp_path / "proxy.sock"))
    yield s
    s.close()


@pytest.fixture
def linked(server: Server) -> Iterator[tuple[Guest, NetBridge]]:
    guest_end, host_end = socket.socketpair()
    bridge = NetBridge(host_end, server.path)
    bridge.start()
    guest = Guest(guest_end)
    yield guest, bridge
    guest.stop()
    bridge.stop()


def _read_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while chunk := sock.recv(1 << 16):
        out += chunk
    return bytes(out)


def test_bulk_data_and_half_close_both_ways(linked: tuple[Guest, NetBridge]) -> None:
    guest, bridge = linked
    payload = os.urandom(3 << 20)
    with socket.create_connection(guest.address, timeout=20) as client:
        sender = threading.Thread(target=lambda: (client.sendall(payload), client.shutdown(socket.SHUT_WR)))
        sender.start()
        echoed = _read_all(client)  # ends only when the server's EOF came back through both muxes
        sender.join()
    assert echoed == payload
    deadline = time.monotonic() + 5
    while (guest.mux.conns or bridge.mux.conns) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not guest.mux.conns and not bridge.mux.conns  # both ends forgot the finished connection


def test_many_concurrent_connections(linked: tuple[Guest, NetBridge], server: Server) -> None:
    guest, _bridge = linked
    host, port = guest.address

    async def one(i: int, opened: list[asyncio.StreamWriter]) -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        opened.append(writer)
        writer.write(b"ping %d\n" % i)
        return await reader.readline()

    async def main() -> list[bytes | BaseException]:
        opened: list[asyncio.StreamWriter] = []
        answers = await asyncio.wait_for(asyncio.gather(*(one(i, opened) for i in range(500)),
                                                        return_exceptions=True), 60)  # fmt: skip
        for writer in opened:  # all 500 were open at once
            writer.close()
        return answers

    answers = asyncio.run(main())
    assert answers == [b"ping %d\n" % i for i in range(500)]
    assert server.accepted == 500


def test_a_stalled_connection_stops_only_itself(linked: tuple[Guest, NetBridge]) -> None:
    guest, bridge = linked
    stalled = socket.create_connection(guest.address, timeout=20)
    stalled.sendall(b"SEND %d" % (16 << 20))  # and do not read it yet
    time.sleep(0.5)
    started = time.monotonic()
    for i in range(20):
        with socket.create_connection(guest.address, timeout=10) as other:
            other.sendall(b"hello %d" % i)
            other.shutdown(socket.SHUT_WR)
            assert _read_all(other) == b"hello %d" % i
    assert time.monotonic() - started < 10
    # Each side holds at most a window of the stalled connection's data (the rest waits in the server).
    assert all(len(c.inbuf) <= netmux.DEFAULT_WINDOW for c in list(guest.mux.conns.values()))
    assert all(len(c.inbuf) <= netmux.DEFAULT_WINDOW for c in list(bridge.mux.conns.values()))
    assert len(bridge.mux.out) < netmux.HARD_LIMIT and len(guest.mux.out) < netmux.HARD_LIMIT
    assert len(_read_all(stalled)) == 16 << 20
    stalled.close()


def test_unlisten_resets_the_connections_of_that_listener(linked: tuple[Guest, NetBridge]) -> None:
    guest, bridge = linked
    client = socket.create_connection(guest.address, timeout=10)
    client.sendall(b"x")
    assert client.recv(1) == b"x"
    guest.halt()  # as the guest agent does when a command ends, from its own loop
    guest.mux.unlisten("exec-1")
    assert not guest.mux.conns and not guest.mux.listeners
    try:
        assert client.recv(10) == b""
    except ConnectionResetError:
        pass
    client.close()
    with pytest.raises(OSError):
        socket.create_connection(guest.address, timeout=2)
    deadline = time.monotonic() + 5
    while bridge.mux.conns and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not bridge.mux.conns  # the host dropped its side (and its proxy connection) on the CLOSE


# ---------------------------------------------------------------------------- an untrusted peer
class RawPeer:
    """Frames written by hand to a host-side mux: a guest that may break the rules."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(5)
        self.buf = b""

    def send(self, kind: int, ident: int, payload: bytes = b"") -> None:
        self.sock.sendall(netmux.HEADER.pack(kind, ident, len(payload)) + payload)

    def frame(self) -> tuple[int, int, bytes]:
        while True:
            if len(self.buf) >= netmux.HEADER.size:
                kind, ident, length = netmux.HEADER.unpack_from(self.buf)
                if len(self.buf) >= netmux.HEADER.size + length:
                    payload = self.buf[netmux.HEADER.size : netmux.HEADER.size + length]
                    self.buf = self.buf[netmux.HEADER.size + length :]
                    return kind, ident, payload
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk

    def until(self, kind: int, ident: int) -> bytes:
        data = b""
        while True:
            k, i, payload = self.frame()
            if i == ident and k == DATA:
                data += payload
            if (k, i) == (kind, ident):
                return data


DATA = netmux.DATA


def test_the_host_bounds_an_untrusted_guest(server: Server) -> None:
    guest_end, host_end = socket.socketpair()
    host = netmux.Mux(host_end.fileno(), select.poll(), connect=lambda: _unix(server.path), max_connections=2)
    stop_r, stop_w = os.pipe()
    thread = threading.Thread(target=netmux.run, args=(host, stop_r), daemon=True)
    thread.start()
    peer = RawPeer(guest_end)
    try:
        # A connection that works: data, then a half close; the echo and its end come back.
        peer.send(netmux.OPEN, 1)
        peer.send(netmux.DATA, 1, b"hello")
        peer.send(netmux.EOF, 1)
        assert peer.until(netmux.EOF, 1) == b"hello"
        # More connections than allowed: the third is refused at once.
        peer.send(netmux.OPEN, 2)
        peer.send(netmux.OPEN, 3)
        peer.send(netmux.OPEN, 4)
        assert peer.until(netmux.CLOSE, 4) == b""
        # Data beyond the window to a server that stopped reading (the WINDOW frames that stopped coming
        # ignored): that connection is reset, the others live.
        peer.send(netmux.DATA, 2, b"HOLD")
        deadline = time.monotonic() + 5
        while not server.held and time.monotonic() < deadline:
            time.sleep(0.01)
        for _ in range((4 << 20) // netmux.CHUNK):
            peer.send(netmux.DATA, 2, b"y" * netmux.CHUNK)
        peer.until(netmux.CLOSE, 2)
        assert host.violations == 1
        peer.send(netmux.DATA, 3, b"still here")
        peer.send(netmux.EOF, 3)
        assert peer.until(netmux.EOF, 3) == b"still here"
        # A malformed frame ends the whole mux: the port is dropped and every connection with it.
        peer.send(9, 5, b"")
        thread.join(5)
        assert host.dead and not host.conns and not thread.is_alive()
    finally:
        os.write(stop_w, b"x")
        thread.join(5)
        for fd in (stop_r, stop_w):
            os.close(fd)
        guest_end.close()
        host_end.close()


def test_the_guest_waits_at_its_connection_limit(server: Server) -> None:
    guest_end, host_end = socket.socketpair()
    bridge = NetBridge(host_end, server.path)
    bridge.start()
    guest = Guest(guest_end, max_connections=2)
    try:
        a = socket.create_connection(guest.address, timeout=10)
        b = socket.create_connection(guest.address, timeout=10)
        for s in (a, b):
            s.sendall(b"1")
            assert s.recv(1) == b"1"
        c = socket.create_connection(guest.address, timeout=10)  # in the backlog, not accepted yet
        c.sendall(b"3")
        c.settimeout(0.5)
        with pytest.raises(TimeoutError):
            c.recv(1)
        a.close()
        c.settimeout(10)
        assert c.recv(1) == b"3"  # accepted once a slot was free
        for s in (b, c):
            s.close()
    finally:
        guest.stop()
        bridge.stop()


def _unix(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.connect(path)
    return sock
