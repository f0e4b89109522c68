"""The cgroup filesystem as found here, and the early start of a cgroup attach's kernel wait.

Light on purpose: `corral run` loads it first thing as root, to start the attach prefetch before
anything else; the rest of the cgroup code (corral.kernel.cgroups) loads while bubblewrap builds
the sandbox.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    import _thread

V1_CONTROLLERS = ("memory", "pids", "cpu", "freezer")


def cgroup_mounts() -> dict[str, str]:
    """controller -> mount point for v1 hierarchies; "unified" -> the cgroup2 mount."""
    with open("/proc/self/mountinfo", "rb") as f:
        data = f.read()
    found: dict[str, str] = {}
    for line in data.split(b"\n"):
        if b" - cgroup" not in line:  # most lines: a cheap test before any parsing
            continue
        left, _, right = line.decode(errors="replace").partition(" - ")
        fields = left.split()
        fstype, _source, *opts = right.split()
        mount = fields[4].replace("\\040", " ")
        if fstype == "cgroup2":
            found.setdefault("unified", mount)
        elif fstype == "cgroup":
            for option in (opts[-1] if opts else "").split(","):
                if option in V1_CONTROLLERS:
                    found.setdefault(option, mount)
    return found


def own_cgroups(source: str = "/proc/self/cgroup") -> dict[str, str]:
    """controller -> this process's (or `source`'s) cgroup path; "" for the unified hierarchy."""
    own: dict[str, str] = {}
    with open(source, encoding="utf-8") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                own[controller] = path
    return own


def join_path(mount: str, *parts: str) -> str:
    path = mount
    for part in parts:
        path = os.path.join(path, part.lstrip("/"))
    return os.path.normpath(path)


def read_text(path: str) -> str:
    """A small cgroup file's content, "" when it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        return os.read(fd, 65536).decode()
    except OSError:
        return ""
    finally:
        os.close(fd)


_prefetch_in_flight = False


def start_attach_prefetch(*, unless_v1: bool = False) -> None:
    """Start now, in the background, the wait the next cgroup attach would otherwise pay.

    Moving a task into a cgroup takes a kernel-wide lock whose first writer waits for an RCU grace
    period (6-20 ms on the development VM); writers that follow within about a grace period pass
    at once (0.1 ms). A thread of ours moving itself into the cgroup it is already in moves
    nothing but starts that wait, while corral is still building the sandbox. Only that thread
    is named (a thread id in `tasks` or `cgroup.threads`), so a caller's own placement of its
    threads is never touched. Best effort: a failure only loses the head start.

    `unless_v1`: not on a host with v1 hierarchies, where a sandbox without memory or cpu limits
    needs no attach (its launching thread joins the cgroup, see corral.kernel.cgroups), and a
    prefetch in flight would hold the cgroup mutex that making that cgroup needs.
    """
    global _prefetch_in_flight
    if _prefetch_in_flight:
        return
    try:
        # The new thread starts in its creator's cgroups: this thread's, not the process leader's.
        mounts, own = cgroup_mounts(), own_cgroups("/proc/thread-self/cgroup")
    except OSError:
        return
    if unless_v1 and any(c in mounts for c in V1_CONTROLLERS):
        return
    for hierarchy, key in (("pids", "pids"), ("memory", "memory"), ("unified", "")):
        if hierarchy in mounts and key in own:
            directory = join_path(mounts[hierarchy], own[key])
            name = "tasks"
            if hierarchy == "unified":
                threaded = read_text(os.path.join(directory, "cgroup.type")).strip() in ("threaded", "domain threaded")
                # Outside a threaded subtree a process's threads share one cgroup: naming one moves
                # the process, into the cgroup it is in.
                name = "cgroup.threads" if threaded else "cgroup.procs"
            target = os.path.join(directory, name)
            if os.access(target, os.W_OK):
                break
    else:
        return
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return
    import _thread

    _prefetch_in_flight = True
    running = _thread.allocate_lock()
    running.acquire()
    _thread.start_new_thread(_move_this_thread, (fd, running))
    # Wait until the thread is in its write: left to the GIL it could wait up to 5 ms to start.
    running.acquire()


def _move_this_thread(fd: int, running: _thread.LockType) -> None:
    global _prefetch_in_flight
    import _thread

    tid = str(_thread.get_native_id()).encode()
    running.release()
    try:
        os.write(fd, tid)
    except OSError:
        pass
    finally:
        os.close(fd)
        _prefetch_in_flight = False
