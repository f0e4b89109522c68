"""The host <-> agent wire format, shared by both sides (stdlib only; runs inside sandboxes too).

A message is a 4-byte big-endian length and a UTF-8 JSON object on a stream socket; file
descriptors ride along with the length header as SCM_RIGHTS. Replies to an exec or a file
transfer never use the socket: they go to a per-request status pipe the host sends with it, so
concurrent requests need no dispatcher.
"""

from __future__ import annotations

import array
import json
import json.encoder
import os
import socket
import struct

MAX_MESSAGE = 16 << 20
MAX_FDS = 8
_HEADER = struct.Struct(">I")


def _unserializable(value: object) -> object:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# json.dumps and json.loads wrap CPython's C encoder and scanner in several Python frames (a new
# encoder per call, two regex matches per parse). Called directly, they cost a third as much on
# each exec's request and reply, and several times less when the agent has sat idle with its
# caches gone cold. The output and the accepted input are json's own.
_make_encoder = getattr(json.encoder, "c_make_encoder", None)  # None: a Python built without _json
_ENCODER = None
if _make_encoder is not None:
    _ENCODER = _make_encoder(None, _unserializable, json.encoder.encode_basestring_ascii, None, ":", ",", False, False,
                             True)  # fmt: skip
_SCAN = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def encode(message: object) -> bytes:
    """`message` as compact JSON: what json.dumps(message, separators=(",", ":")) gives."""
    if _ENCODER is None:
        return json.dumps(message, separators=(",", ":")).encode()
    return "".join(_ENCODER(message, 0)).encode()


def decode(data: bytes | bytearray | str) -> object:
    """One JSON value, exactly as json.loads reads it (ValueError otherwise)."""
    text = data.decode() if isinstance(data, (bytes, bytearray)) else data
    start = len(text) - len(text.lstrip(" \t\n\r"))
    try:
        value, end = _SCAN(text, start)
    except StopIteration as stop:
        raise json.JSONDecodeError("Expecting value", text, stop.value) from None
    if text[end:].strip(" \t\n\r"):
        raise json.JSONDecodeError("Extra data", text, end)
    return value


class ProtocolError(Exception):
    pass


def send(sock: socket.socket, message: dict | bytes, fds: list = ()) -> None:  # type: ignore[type-arg,assignment]
    """Send a message: a dict, or one already encoded."""
    body = message if isinstance(message, bytes) else encode(message)
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
    message = decode(body)
    if not isinstance(message, dict):
        raise ProtocolError("a message must be a JSON object")
    return message, list(fds)


def write_status(fd: int, message: dict) -> None:  # type: ignore[type-arg]
    """One JSON line on a status pipe."""
    data = encode(message) + b"\n"
    while data:
        data = data[os.write(fd, data) :]
