"""The host <-> agent wire format, shared by both sides (stdlib only; runs inside sandboxes too).

A message is a 4-byte big-endian length and a UTF-8 JSON object on a stream socket; file
descriptors ride along with the length header as SCM_RIGHTS. Replies to an exec or a file
transfer never use the socket: they go to a per-request status pipe the host sends with it, so
concurrent requests need no dispatcher.
"""

from __future__ import annotations

import array
import json
import os
import socket
import struct

MAX_MESSAGE = 16 << 20
MAX_FDS = 8
_HEADER = struct.Struct(">I")


class ProtocolError(Exception):
    pass


def send(sock: socket.socket, message: dict, fds: list = ()) -> None:  # type: ignore[type-arg,assignment]
    body = json.dumps(message, separators=(",", ":")).encode()
    data = _HEADER.pack(len(body)) + body
    if fds:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = sock.sendmsg([data], ancillary)
    else:
        sent = sock.send(data)
    if sent < len(data):
        sock.sendall(data[sent:])


def recv(sock: socket.socket) -> tuple[dict | None, list]:  # type: ignore[type-arg]
    """The next message and its fds (close-on-exec), or (None, []) at EOF."""
    fds = array.array("i")
    data, ancdata, _flags, _addr = sock.recvmsg(
        _HEADER.size, socket.CMSG_SPACE(MAX_FDS * fds.itemsize), socket.MSG_CMSG_CLOEXEC
    )
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    if not data:
        return None, list(fds)
    while len(data) < _HEADER.size:
        more = sock.recv(_HEADER.size - len(data))
        if not more:
            raise ProtocolError("connection closed inside a header")
        data += more
    (length,) = _HEADER.unpack(data)
    if length > MAX_MESSAGE:
        raise ProtocolError(f"message of {length} bytes is too large")
    body = bytearray()
    while len(body) < length:
        more = sock.recv(min(length - len(body), 1 << 20))
        if not more:
            raise ProtocolError("connection closed inside a message")
        body += more
    message = json.loads(body)
    if not isinstance(message, dict):
        raise ProtocolError("a message must be a JSON object")
    return message, list(fds)


def write_status(fd: int, message: dict) -> None:  # type: ignore[type-arg]
    """One JSON line on a status pipe."""
    data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
    while data:
        data = data[os.write(fd, data) :]
