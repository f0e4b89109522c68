"""The host side of the byte-stream agent protocol (corral.agent.stream) for one VM."""

from __future__ import annotations

import os
import select
import socket
import threading
import time

from corral.agent import stream
from corral.errors import LaunchError, SandboxLost
from corral.kernel.pump import DEFAULT_CAPTURE, Pumped

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

_KILL_GRACE = 30.0  # seconds for the guest to report a killed command's end (emulated guests are slow)


class StreamClient:
    """One VM's agent channel. Requests are serialized: one command at a time per sandbox."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = stream.Reader()
        self.lock = threading.Lock()
        self._next_id = 0
        self._pending: list[tuple[int, int, bytes]] = []

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise SandboxLost(f"the VM is gone ({exc.strerror})") from exc

    def _frames(
        self, timeout: float | None, *, extra: int | None = None, outgoing: Outbox | None = None
    ) -> list[tuple[int, int, bytes]]:
        """The next frames, waiting at most `timeout` seconds. Meanwhile `outgoing` is sent as far as the
        channel takes it (never blocking: the guest may be busy sending us output). [] when nothing came
        or when `extra` (a descriptor to forward) became readable."""
        if self._pending:
            out, self._pending = self._pending, []
            return out
        readers: list[int] = [self.sock.fileno(), *([extra] if extra is not None else [])]
        writers: list[int] = [self.sock.fileno()] if outgoing else []
        ready, writable, _ = select.select(readers, writers, [], timeout)
        if writable and outgoing:
            try:
                outgoing.send_some(self.sock)
            except OSError as exc:
                raise SandboxLost(f"the VM is gone ({exc.strerror})") from exc
        if self.sock.fileno() not in ready:
            return []
        try:
            chunk = self.sock.recv(1 << 18)
        except OSError as exc:
            raise SandboxLost(f"the VM is gone ({exc.strerror})") from exc
        if not chunk:
            raise SandboxLost("the VM exited")
        self.reader.feed(chunk)
        try:
            frames: list[tuple[int, int, bytes]] = self.reader.frames()
        except stream.StreamError as exc:
            raise SandboxLost(f"the guest agent sent garbage: {exc}") from exc
        return frames

    def wait_message(self, key: str, *, timeout: float) -> dict[str, object]:
        """The next message carrying `key` (e.g. "booted", "ready")."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LaunchError(f"the guest agent did not say {key!r} within {timeout:g}s")
            for kind, _ident, payload in self._frames(remaining):
                if kind == stream.MSG:
                    body: dict[str, object] = stream.decode(payload)
                    if key in body:
                        return body

    def hello(self, body: dict[str, object], *, timeout: float) -> dict[str, object]:
        with self.lock:
            self._send(stream.message(0, {"op": "hello", **body}))
            reply = self.wait_message("ready", timeout=timeout)
        if not reply.get("ready"):
            raise LaunchError(f"the guest agent could not set up the sandbox: {reply.get('error')}")
        return reply

    def exec(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        stdin: bytes | int | None,
        rlimits: Mapping[str, int],
        deadline: float | None,
        output_limit: int | None,
        on_output: Callable[[str, bytes], None] | None,
        output: tuple[int, int] | None = None,
    ) -> tuple[dict[str, object], Pumped]:
        """Run one bubblewrap command line in the guest; stream its output; return its exit message."""
        with self.lock:
            self._next_id += 1
            ident = self._next_id
            request = {"op": "exec", "argv": list(argv), "env": dict(env), "stdin": stdin is not None,
                       "rlimits": dict(rlimits)}  # fmt: skip
            self._send(stream.message(ident, request))
            outgoing = Outbox([])
            if isinstance(stdin, bytes):
                outgoing.frames = [*stream.data_frames(stream.STDIN, ident, stdin), stream.frame(stream.STDIN, ident)]
            stdin_fd = stdin if isinstance(stdin, int) else None
            return self._collect(ident, deadline, output_limit, on_output, output, stdin_fd, outgoing)

    def _collect(
        self,
        ident: int,
        deadline: float | None,
        output_limit: int | None,
        on_output: Callable[[str, bytes], None] | None,
        output: tuple[int, int] | None,
        stdin_fd: int | None = None,
        outgoing: Outbox | None = None,
    ) -> tuple[dict[str, object], Pumped]:
        """Output and the end of exec `ident`; a host `stdin_fd` is forwarded as it becomes readable
        (a pipe or a terminal may never reach end-of-file: the command's end ends the forwarding)."""
        out = Pumped()
        for stream_name in ("stdout", "stderr"):
            out.data[stream_name] = bytearray()
            out.truncated[stream_name] = False
        capture = output_limit if output_limit is not None else DEFAULT_CAPTURE
        killed_at: float | None = None

        def kill() -> None:
            nonlocal killed_at
            if killed_at is None:
                killed_at = time.monotonic()
                if outgoing is not None:  # stdin not sent yet is dropped (after the frame in flight)
                    try:
                        outgoing.drop(self.sock)
                    except OSError as exc:
                        raise SandboxLost(f"the VM is gone ({exc.strerror})") from exc
                self._send(stream.message(ident, {"op": "signal", "signal": 9}))

        while True:
            now = time.monotonic()
            if deadline is not None and killed_at is None and now >= deadline:
                out.timed_out = True
                kill()
            if killed_at is not None and now - killed_at > _KILL_GRACE:
                raise SandboxLost("the guest did not stop a killed command")
            wait_until = deadline if killed_at is None else killed_at + _KILL_GRACE
            timeout = None if wait_until is None else max(0.0, wait_until - now)
            if stdin_fd is not None and not outgoing and self._forward(ident, stdin_fd):
                stdin_fd = None
            frames = self._frames(timeout, extra=stdin_fd if not outgoing else None, outgoing=outgoing)
            for kind, frame_id, payload in frames:
                if frame_id != ident:
                    continue
                if kind == stream.MSG:
                    body: dict[str, object] = stream.decode(payload)
                    if body.get("exit"):
                        return body, out
                    continue
                found = stream.STREAM_NAMES.get(kind)
                if found is None or (killed_at is not None and out.output_exceeded):
                    continue
                name = found
                if output is not None:
                    stream.write_all(output[0] if name == "stdout" else output[1], payload)
                    continue
                if out.take(name, payload, output_limit=output_limit, capture=capture, on_output=on_output):
                    kill()

    def _forward(self, ident: int, fd: int) -> bool:
        """Send what `fd` has now as stdin; True at its end (an end-of-file frame is sent)."""
        if not select.select([fd], [], [], 0)[0]:
            return False
        try:
            chunk = os.read(fd, stream.CHUNK)
        except BlockingIOError:
            return False
        except OSError:
            chunk = b""
        self._send(stream.frame(stream.STDIN, ident, chunk))
        return not chunk

    def stop(self) -> None:
        try:
            with self.lock:
                self.sock.sendall(stream.message(0, {"op": "stop"}))
        except OSError:
            pass
        self.sock.close()


class Outbox:
    """Frames waiting to go to the guest, sent as far as the channel takes them without blocking."""

    def __init__(self, frames: list[bytes]) -> None:
        self.frames = frames
        self.offset = 0  # bytes of frames[0] already sent

    def __bool__(self) -> bool:
        return bool(self.frames)

    def send_some(self, sock: socket.socket) -> None:
        while self.frames:
            try:
                sent = sock.send(self.frames[0][self.offset :], socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            self.offset += sent
            if self.offset < len(self.frames[0]):
                return
            self.frames.pop(0)
            self.offset = 0

    def drop(self, sock: socket.socket) -> None:
        """Finish the frame in flight (at most one chunk), forget the rest."""
        if self.frames and self.offset:
            sock.sendall(self.frames[0][self.offset :])
        self.frames = []
        self.offset = 0
