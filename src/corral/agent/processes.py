"""Processes seen from outside, for whoever starts sandboxes (stdlib only, Python >= 3.8).

The host's launcher (namespace backend), corral's agent and the microVM's guest agent share these.
The launcher and the guest agent run commands under bubblewrap with --json-status-fd and
--block-fd: bubblewrap reports the sandbox's pid, builds the sandbox, then waits on the block fd
before it execs the command. In that pause its parent moves the sandbox into its cgroup and lowers
its rlimits. If either fails the parent kills the sandbox (`kill_unreleased`) *before* closing the
block fd: at that end of file bubblewrap would go on and run the command without them.
"""

from __future__ import annotations

import os
import time

_SIGKILL = 9  # Linux; `import signal` would load enum, 2-4 ms of every `corral run`
_READ_SYSCALL = {"x86_64": "0", "aarch64": "63"}
_CHILD_PID_KEY = b'"child-pid":'


def children_of(pid: int) -> list[int] | None:
    """`pid`'s children (its main thread's), or None when the kernel cannot say (gVisor, kernels
    without CONFIG_PROC_CHILDREN) and the caller must look through /proc itself."""
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid), "rb") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return None


def set_rlimits(pid: int, limits: dict[str, int]) -> None:
    """Lower `pid`'s soft and hard limits (0: this process), e.g. {"RLIMIT_FSIZE": 1048576}.
    Never raises a limit: a hard limit already lower stays."""
    import resource

    for name, value in limits.items():
        which = getattr(resource, name)
        _soft, hard = resource.prlimit(pid, which)
        value = int(value)
        new_hard = value if hard == resource.RLIM_INFINITY else min(hard, value)
        resource.prlimit(pid, which, (min(value, new_hard), new_hard))


def bwrap_child_pid(status: bytes) -> int | None:
    """The sandbox's pid from the start of bubblewrap's --json-status-fd output; None until its
    first object is complete, ValueError if that object names no pid."""
    if b"}" not in status:
        return None
    start = status.find(_CHILD_PID_KEY)
    if start < 0:
        raise ValueError("unexpected bubblewrap status: %r" % status[:200])
    return int(status[start + len(_CHILD_PID_KEY) :].split(b",")[0].split(b"}")[0].strip())


def wait_until_blocked(pid: int, block_fd: int, timeout: float = 5.0) -> bool:
    """True once `pid` sits in read(`block_fd`); False if /proc cannot say or `timeout` passes.

    A limit that must not bind bubblewrap's own set-up (an open-files limit would fail its opens
    with EMFILE) is set on the sandbox only once it waits there, every mount done.
    """
    read_nr = _READ_SYSCALL.get(os.uname().machine)
    want = hex(block_fd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open("/proc/%d/syscall" % pid, "rb") as f:
                fields = f.read().decode().split()
        except OSError:
            return False
        if len(fields) > 1 and fields[1] == want and (read_nr is None or fields[0] == read_nr):
            return True
        time.sleep(0.0002)
    return False


def kill_unreleased(bwrap_pid: int, sandbox_pid: int | None) -> None:
    """SIGKILL a sandbox whose block fd must not be released: its pid (when bubblewrap reported
    one) and everything bubblewrap started. bubblewrap itself is the caller's to kill and reap."""
    victims = set(children_of(bwrap_pid) or ())
    if sandbox_pid:
        victims.add(sandbox_pid)
    for pid in victims:
        try:
            os.kill(pid, _SIGKILL)
        except OSError:
            pass
