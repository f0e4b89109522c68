"""Turn what the host observed about a finished command into a `Result` with the reason it ended."""

from __future__ import annotations

import os

from corral.backends.base import Result
from corral.units import format_duration, format_size

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Collection, Sequence

    from corral.backends.base import Reason
    from corral.kernel.cgroups import Cgroup
    from corral.kernel.pump import Pumped
    from corral.policy.model import Limits

SIGKILL = 9
SIGXFSZ = 25
EAGAIN = 11


def classify(
    argv: Sequence[str],
    returncode: int,
    pumped: Pumped,
    *,
    limits: Limits,
    timeout: float | None,
    wall_time: float,
    cgroup: Cgroup | None = None,
    maxrss: int | None = None,
    cgroup_peak: bool = True,
    rlimits: Collection[str] = (),
) -> Result:
    """`returncode` follows subprocess: negative for a signal. `rlimits`: the names of the rlimits
    the sandbox's commands run under (RLIMIT_DATA, RLIMIT_NPROC stand in for missing cgroups)."""
    signal = -returncode if returncode < 0 else None
    # A shell reports its child's death by signal N as exit status 128+N.
    child_signal = returncode - 128 if 128 < returncode <= 128 + 64 else None
    # Event counters are read only when they could explain the ending: it keeps a normal exit cheap.
    abnormal = returncode != 0 or pumped.timed_out or pumped.output_exceeded
    killed = SIGKILL in (signal, child_signal)
    oom = cgroup.oom_kills() if cgroup is not None and killed else 0
    pids_hit = cgroup.pids_hits() if cgroup is not None and abnormal else 0
    peak = cgroup.peak_memory() if cgroup is not None and cgroup_peak else None
    if peak is None:
        peak = maxrss
    if pumped.timed_out:
        reason, detail = "timeout", f"timed out after {format_duration(timeout or 0)}"
        if pids_hit:
            detail += f"; the pids limit ({limits.pids}) was reached"
    elif pumped.output_exceeded:
        reason, detail = "output", f"killed: output limit {format_size(limits.output or 0)} exceeded"
    elif oom and killed:
        reason, detail = "memory", f"killed: memory limit {format_size(limits.memory or 0)}"
    elif signal == SIGXFSZ or (child_signal == SIGXFSZ and limits.file_size is not None):
        reason, detail = "file_size", f"killed: file size limit {format_size(limits.file_size or 0)} exceeded"
    elif pids_hit and returncode != 0:
        reason, detail = "pids", f"the pids limit ({limits.pids}) was reached"
    elif signal is not None:
        reason, detail = "signal", f"killed by signal {signal}"
    else:
        reason, detail = "exited", "" if returncode == 0 else f"exit status {returncode}"
    failed = reason in ("exited", "signal") and returncode != 0
    note = _rlimit_note(limits, rlimits, pumped.get("stderr")) if failed else ""
    return Result(
        argv=argv,
        returncode=returncode,
        reason=reason,  # type: ignore[arg-type]
        detail=detail,
        signal=signal,
        stdout=pumped.get("stdout"),
        stderr=pumped.get("stderr"),
        stdout_truncated=pumped.truncated.get("stdout", False),
        stderr_truncated=pumped.truncated.get("stderr", False),
        wall_time=wall_time,
        peak_memory=peak,
        note=note,
    )


def _rlimit_note(limits: Limits, rlimits: Collection[str], stderr: bytes) -> str:
    """What an rlimit may have done: it makes an allocation, a fork or an open fail inside the
    command, which then ends as it chooses, and nothing counts it. So the note names the memory
    limit standing in for a cgroup on any failure (only a caller sets one), the pids limit (every
    profile has one) only when the command's captured stderr says a fork or a thread failed, the
    open files limit when it says a descriptor could not be had."""
    notes = []
    if limits.memory is not None and "RLIMIT_DATA" in rlimits:
        notes.append(f"the memory limit {format_size(limits.memory)} is a per-process RLIMIT_DATA here (no memory "
                     "cgroup): an allocation over it fails inside the command instead of ending it")  # fmt: skip
    if limits.pids is not None and "RLIMIT_NPROC" in rlimits and any(sign in stderr for sign in _FORK_FAILED):
        notes.append(f"the pids limit ({limits.pids}) is an RLIMIT_NPROC here: a fork over it fails inside the command")
    # The open files limit is an RLIMIT_NOFILE on every backend: EMFILE, as libc and the loader say it.
    if limits.open_files is not None and (b"Too many open files" in stderr or b"Error 24" in stderr):
        notes.append(
            f"the open files limit ({limits.open_files}) is per process: opening more fails inside the command"
        )
    return "; ".join(notes)


# How shells and runtimes report a refused fork or thread (EAGAIN): sh, bash, Python, glibc's strerror.
_FORK_FAILED = (b"fork", b"Resource temporarily unavailable", b"can't start new thread", b"Cannot create thread")


def not_started(
    argv: Sequence[str],
    errno_: int,
    error: str,
    *,
    what: str,
    subject: str,
    pids_limit: int | None = None,
    output: tuple[int, int] | None = None,
) -> Result:
    """A command the sandbox could not start: 127 when missing, 126 otherwise (as shells do).
    EAGAIN under a pids limit means the sandbox is full: the Result names the limit. With `output`
    (the host descriptors the command would have written to) the message is written to its stderr
    too, where a shell's would appear."""
    code = 127 if errno_ == 2 and what == "command" else 126
    reason: Reason = "exited"
    # A name that is not UTF-8 (bytes kept as surrogates, as os.fsdecode does) is shown escaped: ech\xffo.
    subject = subject.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if what == "command" and errno_ == EAGAIN and pids_limit is not None:
        message = f"corral: {subject}: not started, the pids limit ({pids_limit}) was reached"
        reason = "pids"
    elif what == "command":
        message = f"corral: {subject}: command not found" if code == 127 else f"corral: {subject}: {error}"
    else:
        message = f"corral: cannot use {what} {subject}: {error}"
    stderr = (message + "\n").encode()
    if output is not None:
        try:
            os.write(output[1], stderr)
        except OSError:
            pass
    return Result(argv=argv, returncode=code, reason=reason, detail=message[len("corral: ") :], stderr=stderr)
