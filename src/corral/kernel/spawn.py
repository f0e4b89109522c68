"""Start host processes quickly and without leaking file descriptors.

`subprocess` costs more to import than a whole sandbox launch on a slow host, so corral spawns
with `os.posix_spawn` and closes, in the child, every inherited descriptor it was not asked to pass.
"""

from __future__ import annotations

import _thread
import os
import select

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from concurrent.futures import ThreadPoolExecutor
    from typing import TypeVar

    T = TypeVar("T")

SIGKILL = 9


def _every_signal() -> tuple[int, ...]:
    """Every signal a child can have a handler for. Named as "start at the default", they cost
    glibc's posix_spawn one system call each in the child instead of two (it asks for the handler
    of every signal it is not told about, then resets it), and undo what Python ignores (SIGPIPE).
    From the C module: `import signal` pulls in enum, milliseconds of every `corral run`."""
    import _signal  # type: ignore[import-not-found]

    return tuple(sorted(int(sig) for sig in _signal.valid_signals() if sig not in (_signal.SIGKILL, _signal.SIGSTOP)))


_DEFAULT_SIGNALS = _every_signal()


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    stdio: tuple[int, int, int] = (0, 1, 2),
    pass_fds: Sequence[int] = (),
    new_session: bool = False,
) -> int:
    """Start `argv[0]` (a path) with exactly fds 0-2 from `stdio` plus `pass_fds` (same numbers)."""
    keep = set(pass_fds)
    actions: list[tuple[int, ...]] = []
    for target, source in enumerate(stdio):
        if source != target:
            actions.append((os.POSIX_SPAWN_DUP2, source, target))
    for fd in keep:
        os.set_inheritable(fd, True)
    for fd in _open_fds():
        if fd > 2 and fd not in keep and fd not in stdio and _inheritable(fd):
            actions.append((os.POSIX_SPAWN_CLOSE, fd))
    try:
        return os.posix_spawn(
            argv[0], list(argv), dict(env), file_actions=actions, setsid=new_session,
            setsigdef=_DEFAULT_SIGNALS, setsigmask=(),
        )  # fmt: skip
    finally:
        for fd in keep:
            os.set_inheritable(fd, False)


def _inheritable(fd: int) -> bool:
    try:
        return os.get_inheritable(fd)
    except OSError:  # the directory listing's own descriptor, closed by now
        return False


def _open_fds() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return list(range(3, 256))


class Child:
    """A spawned process, waited for through a pidfd (so timeouts need no signals or threads)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._pidfd: int | None = os.pidfd_open(pid)
        self.status: int | None = None
        self.maxrss: int | None = None

    @property
    def pidfd(self) -> int:
        assert self._pidfd is not None
        return self._pidfd

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit status (as os.waitstatus_to_exitcode) or None if `timeout` passed first."""
        if self.status is not None:
            return self.status
        if timeout is not None:
            poller = select.poll()
            poller.register(self.pidfd, select.POLLIN)
            if not poller.poll(max(0, int(timeout * 1000))):
                return None
        _, raw, usage = os.wait4(self.pid, 0)
        self.status = os.waitstatus_to_exitcode(raw)
        self.maxrss = usage.ru_maxrss * 1024
        self.close()
        return self.status

    def kill(self, sig: int = SIGKILL) -> None:
        # Safe by pid: until we reap it, the pid cannot be reused.
        if self.status is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


def memfd_with(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


_lasting: ThreadPoolExecutor | None = None
_lasting_lock = _thread.allocate_lock()


def on_lasting_thread(start: Callable[[], T]) -> T:
    """`start()`, on a thread that lasts as long as the process.

    A child started with a parent-death signal (bubblewrap's --die-with-parent, setpriv
    --pdeathsig) gets it when the *thread* that started it ends, not the process: a live sandbox
    started from a worker thread (a web server's, an MCP server's) would die with that thread.
    The main thread lasts; other threads hand the start to one thread kept for it.
    """
    import threading

    if threading.current_thread() is threading.main_thread():
        return start()
    global _lasting
    with _lasting_lock:
        if _lasting is None:
            from concurrent.futures import ThreadPoolExecutor

            _lasting = ThreadPoolExecutor(max_workers=1, thread_name_prefix="corral-launcher")
    return _lasting.submit(start).result()
