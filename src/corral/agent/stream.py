"""A byte-stream variant of the agent protocol, for agents across a VM boundary (stdlib only, Python >= 3.8).

The socket protocol (protocol.py) passes pipes and memfds with SCM_RIGHTS; a virtio-serial port
(or vsock) carries bytes only. Here everything is a frame on one stream:

    kind (1 byte) | id (4 bytes, big-endian) | length (4 bytes, big-endian) | payload

- MSG: a UTF-8 JSON object (requests, replies, the exit status); `id` names the exec it concerns.
- STDIN, STDOUT, STDERR: a chunk of a command's standard stream; an empty chunk is end-of-file.

Both sides keep a `Reader`: feed it what the descriptor gave, take whole frames out. The host
uses the same module (corral.backends.microvm), so the two ends cannot drift apart.
"""

from __future__ import annotations

import json
import os
import struct

MSG = 1
STDIN = 2
STDOUT = 3
STDERR = 4
KINDS = (MSG, STDIN, STDOUT, STDERR)
STREAM_NAMES = {STDOUT: "stdout", STDERR: "stderr"}

HEADER = struct.Struct(">BII")
MAX_FRAME = 16 << 20
CHUNK = 32768  # data frames are at most this long: a kill frame never waits behind megabytes


class StreamError(Exception):
    pass


def frame(kind: int, ident: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_FRAME:
        raise StreamError("frame of %d bytes is too large" % len(payload))
    return HEADER.pack(kind, ident, len(payload)) + payload


def message(ident: int, body: dict) -> bytes:  # type: ignore[type-arg]
    return frame(MSG, ident, json.dumps(body, separators=(",", ":")).encode())


def data_frames(kind: int, ident: int, data: bytes) -> list:  # type: ignore[type-arg]
    """`data` cut into frames of at most CHUNK bytes (none for empty data: use frame() for EOF)."""
    view = memoryview(data)
    return [frame(kind, ident, bytes(view[i : i + CHUNK])) for i in range(0, len(view), CHUNK)]


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except InterruptedError:
            continue
        except BlockingIOError:
            import select

            select.select([], [fd], [], 1.0)


class Reader:
    """Reassembles frames from arbitrary chunks of the stream."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> None:
        self.buf += data

    def frames(self) -> list:  # type: ignore[type-arg]
        """Every complete frame buffered so far: (kind, id, payload) tuples."""
        out = []
        while len(self.buf) >= HEADER.size:
            kind, ident, length = HEADER.unpack_from(self.buf)
            if kind not in KINDS or length > MAX_FRAME:
                raise StreamError("corrupt frame header (kind %d, length %d)" % (kind, length))
            end = HEADER.size + length
            if len(self.buf) < end:
                break
            out.append((kind, ident, bytes(self.buf[HEADER.size : end])))
            del self.buf[:end]
        return out


def decode(payload: bytes) -> dict:  # type: ignore[type-arg]
    body = json.loads(payload)
    if not isinstance(body, dict):
        raise StreamError("a message must be a JSON object")
    return body
