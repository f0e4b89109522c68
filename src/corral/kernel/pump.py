"""Drain a command's pipes on the host: bounded capture, streaming, the output limit and the deadline."""

from __future__ import annotations

import os
import select
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

DEFAULT_CAPTURE = 64 << 20  # bytes kept per stream when the policy sets no output limit
_CHUNK = 65536
_GRACE = 5.0  # seconds to wait for pipes to close after a kill


class Pumped:
    """What the pump saw: captured bytes per stream and why it stopped early, if it did."""

    def __init__(self) -> None:
        self.data: dict[str, bytearray] = {}
        self.truncated: dict[str, bool] = {}
        self.timed_out = False
        self.output_exceeded = False
        self.total = 0

    def get(self, name: str) -> bytes:
        return bytes(self.data.get(name, b""))

    def take(
        self,
        name: str,
        chunk: bytes,
        *,
        output_limit: int | None,
        capture: int,
        on_output: Callable[[str, bytes], None] | None,
    ) -> bool:
        """Count, keep (up to `capture` per stream) and pass on a chunk of output. True when this
        chunk crosses `output_limit` for the first time: the caller then kills the command."""
        before = self.total
        self.total += len(chunk)
        # Past the output limit nothing is kept or passed on: the limit is what the caller sees.
        visible = chunk if output_limit is None else chunk[: max(0, output_limit - before)]
        room = capture - len(self.data[name])
        if room > 0:
            self.data[name] += visible[:room]
        if len(chunk) > min(room, len(visible)) or len(visible) < len(chunk):
            self.truncated[name] = True
        if on_output is not None and visible:
            on_output(name, visible)
        if output_limit is not None and self.total > output_limit and not self.output_exceeded:
            self.output_exceeded = True
            return True
        return False


def pump(
    fds: dict[str, int],
    *,
    counted: tuple[str, ...] = ("stdout", "stderr"),
    deadline: float | None = None,
    output_limit: int | None = None,
    on_output: Callable[[str, bytes], None] | None = None,
    kill: Callable[[], None],
    watch: int | None = None,
    lost: Callable[[], None] | None = None,
) -> Pumped:
    """Read every fd in `fds` to EOF (closing them). Streams named in `counted` count toward
    `output_limit` and are passed to `on_output`; crossing the limit or `deadline` calls `kill` once.
    `watch` (e.g. a pidfd) is waited for too, until readable; it is neither read nor closed. With
    `lost`, `watch` readable means what runs the command is gone: `lost()` is called and the streams
    are not waited for (what is left of the command may hold them open).
    """
    out = Pumped()
    names = {fd: name for name, fd in fds.items()}
    for name in fds:
        out.data[name] = bytearray()
        out.truncated[name] = False
    capture = output_limit if output_limit is not None else DEFAULT_CAPTURE
    poller = select.poll()
    for fd in names:
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    if watch is not None:
        names[watch] = "<watch>"
        poller.register(watch, select.POLLIN)
    killed_at: float | None = None

    def stop() -> None:
        nonlocal killed_at
        if killed_at is None:
            killed_at = time.monotonic()
            kill()

    try:
        # Without `lost`, the watched fd is waited for too (a pidfd: the sandbox's end); with it, only
        # the streams are (the agent's socket stays quiet for as long as the agent lives).
        while len(names) > (1 if lost is not None and watch in names else 0):
            now = time.monotonic()
            if deadline is not None and killed_at is None and now >= deadline:
                out.timed_out = True
                stop()
            if killed_at is not None and now - killed_at > _GRACE:
                break  # something still holds a pipe open; give up on it
            wait_until = deadline if killed_at is None else (killed_at + _GRACE)
            timeout_ms = -1 if wait_until is None else max(0, int((wait_until - now) * 1000) + 1)
            for fd, _event in poller.poll(timeout_ms):
                name = names[fd]
                if fd == watch:
                    poller.unregister(fd)
                    del names[fd]
                    if lost is not None:
                        lost()
                        return out
                    continue
                try:
                    chunk = os.read(fd, _CHUNK)
                except BlockingIOError:
                    continue
                if not chunk:
                    poller.unregister(fd)
                    del names[fd]
                    os.close(fd)
                    continue
                if name not in counted:
                    out.data[name] += chunk
                    continue
                if out.take(name, chunk, output_limit=output_limit, capture=capture, on_output=on_output):
                    stop()
    except BaseException:  # on_output failed, or the caller was interrupted: the command must not run on unwatched
        if killed_at is None:
            kill()
        raise
    finally:
        for fd in names:
            if fd != watch:
                os.close(fd)
    return out
