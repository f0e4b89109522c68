"""The backend contract: the one seam between corral and an isolation technology.

A `Backend` probes what it can enforce on this host (`probe() -> Capabilities`), starts live
sandboxes (`start(resolved) -> LiveSandbox`) and may offer a faster one-shot `run`. A `LiveSandbox`
runs commands (`exec`), moves files in and out (`put_file`, `get_file`) and stops. Every command
ends in a `Result`; only corral's own failures raise (see `corral.errors`).

Anyone can check a backend against this contract with `corral.testing.check_backend(factory)`.
"""

from __future__ import annotations

from corral._record import Record
from corral.errors import PolicyDenied, SandboxFileError, SandboxLost, UnsupportedPolicy

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from typing import ClassVar, Literal

    from corral.policy.resolve import ResolvedPolicy

    Reason = Literal["exited", "timeout", "memory", "pids", "output", "file_size", "signal", "denied", "trap"]
    OutputCallback = Callable[[str, bytes], None]
    # Where a backend reports events for the audit log: events(name, fields), e.g.
    # events("net.decision", {"host": ..., "action": "deny", "rule": ...}). Never raises.
    EventSink = Callable[[str, dict[str, object]], None]

# "trap": a WebAssembly module trapped (unreachable, out-of-bounds access, ...): the wasm backend's crash.
REASONS = ("exited", "timeout", "memory", "pids", "output", "file_size", "signal", "denied", "trap")

# The policy's limits, each a feature "limits.NAME" below.
LIMITS = ("memory", "pids", "cpus", "timeout", "output", "file_size", "open_files")

# Everything a policy can ask of a backend. A backend lists the ones it enforces.
FEATURES = {
    "fs.isolation": "filesystem zones (only the zones and a read-only system view are visible)",
    "fs.remap": "a zone mounted at a path other than its host path",
    "fs.tmpfs": "tmpfs zones",
    "proc.isolation": "host processes hidden",
    "net.none": "network mode 'none'",
    "net.host": "network mode 'host'",
    "net.allow": "network mode 'allow' (allowlist proxy)",
    "syscall.filter": "the seccomp system-call filter",
    "limits.memory": "the memory limit",
    "limits.pids": "the pids limit",
    "limits.cpus": "the cpus limit",
    "limits.timeout": "the time limit",
    "limits.output": "the output limit",
    "limits.file_size": "the file size limit",
    "limits.open_files": "the open files limit",
    "exec.commands": "runs programs of the system view (a shell, python3), not only WebAssembly modules",
}


class Capabilities(Record):
    """What a backend can do on this host, and why not when it cannot."""

    __slots__ = ("available", "enforces", "fix", "limits_via", "name", "notes", "reason", "strength")
    name: str
    available: bool
    reason: str  # why it is unavailable ("" when it works)
    fix: str  # what the user can do about it
    strength: int  # higher isolates more; `auto` picks the highest that works
    enforces: frozenset[str]
    limits_via: str  # "cgroup v2", "cgroup v1", "rlimits", ...
    notes: tuple[str, ...]

    def __init__(
        self,
        *,
        name: str,
        available: bool,
        strength: int,
        enforces: frozenset[str] = frozenset(),
        reason: str = "",
        fix: str = "",
        limits_via: str = "",
        notes: tuple[str, ...] = (),
    ) -> None:
        self._set(
            name=name, available=available, reason=reason, fix=fix, strength=strength,
            enforces=frozenset(enforces), limits_via=limits_via, notes=tuple(notes),
        )  # fmt: skip

    def as_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "available": self.available,
            "reason": self.reason,
            "fix": self.fix,
            "strength": self.strength,
            "enforces": sorted(self.enforces),
            "limits_via": self.limits_via,
            "notes": list(self.notes),
        }


def required_features(rp: ResolvedPolicy) -> dict[str, str]:
    """The features `rp` needs, each with the policy part that needs it."""
    # Only what the policy asks for. Process hiding and the syscall filter are properties of a
    # backend (listed in its capabilities), not parts of a policy.
    need: dict[str, str] = {
        "fs.isolation": "zones",
        f"net.{rp.network.mode}": f"network mode '{rp.network.mode}'",
    }
    for zone in rp.zones:
        if zone.mode == "tmpfs":
            need["fs.tmpfs"] = f"tmpfs zone {zone.mount}"
        elif zone.host != zone.mount:
            need["fs.remap"] = f"zone {zone.host} mounted at {zone.mount}"
    limits = rp.limits
    for name in LIMITS:
        if getattr(limits, name) is not None:
            need[f"limits.{name}"] = f"limits.{name}"
    return need


def check_supported(caps: Capabilities, rp: ResolvedPolicy, *, allow_weaker: bool) -> tuple[str, ...]:
    """The policy parts `caps` cannot enforce; raises `UnsupportedPolicy` unless `allow_weaker`."""
    missing = tuple(
        part if part == FEATURES[feature] else f"{part} ({FEATURES[feature]})"
        for feature, part in required_features(rp).items()
        if feature not in caps.enforces
    )
    if missing and not allow_weaker:
        raise UnsupportedPolicy(caps.name, missing)
    return missing


def without_unenforced_limits(caps: Capabilities, rp: ResolvedPolicy) -> ResolvedPolicy:
    """`rp` without the limits `caps` cannot enforce: what accepting a weaker backend means for them
    (the backend would otherwise refuse to start what the caller accepted)."""
    dropped = {n: None for n in LIMITS if getattr(rp.limits, n) is not None and f"limits.{n}" not in caps.enforces}
    return rp.replace(limits=rp.limits.replace(**dropped)) if dropped else rp


class Result(Record):
    """How one command ended. Shaped like `subprocess.CompletedProcess`.

    `returncode` is the exit status, negative for a signal (as in subprocess), None when the
    command never ran (denied). `reason` says why it ended; `detail` says it in words.
    `peak_memory` is the most memory, in bytes, the command (with what it waited for) held at
    once; None when it is not known: a command that never ran, or in a live sandbox a command
    that stayed below the sandbox agent's own resident size (~13 MB), which the kernel counts into
    every command the agent starts.
    """

    __slots__ = (
        "argv", "detail", "note", "peak_memory", "reason", "returncode", "rule", "signal",
        "stderr", "stderr_truncated", "stdout", "stdout_truncated", "wall_time",
    )  # fmt: skip
    argv: tuple[str, ...]
    returncode: int | None
    stdout: bytes
    stderr: bytes
    reason: Reason
    detail: str
    signal: int | None
    wall_time: float
    peak_memory: int | None
    stdout_truncated: bool
    stderr_truncated: bool
    rule: str | None
    note: str  # a limit that may explain a failure corral cannot attribute for sure ("" otherwise)

    def __init__(
        self,
        *,
        argv: Sequence[str],
        returncode: int | None,
        reason: Reason = "exited",
        stdout: bytes = b"",
        stderr: bytes = b"",
        detail: str = "",
        signal: int | None = None,
        wall_time: float = 0.0,
        peak_memory: int | None = None,
        stdout_truncated: bool = False,
        stderr_truncated: bool = False,
        rule: str | None = None,
        note: str = "",
    ) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown reason {reason!r}")
        self._set(
            argv=tuple(argv), returncode=returncode, stdout=stdout, stderr=stderr, reason=reason,
            detail=detail, signal=signal, wall_time=wall_time, peak_memory=peak_memory,
            stdout_truncated=stdout_truncated, stderr_truncated=stderr_truncated, rule=rule, note=note,
        )  # fmt: skip

    @property
    def ok(self) -> bool:
        return self.reason == "exited" and self.returncode == 0

    @property
    def stdout_text(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", "replace")

    def check(self) -> Result:
        """Raise `CommandFailed` unless the command exited 0."""
        if not self.ok:
            raise CommandFailed(self)
        return self

    def as_json(self) -> dict[str, object]:
        return {
            "argv": list(self.argv),
            "returncode": self.returncode,
            "reason": self.reason,
            "detail": self.detail,
            "signal": self.signal,
            "wall_time": round(self.wall_time, 6),
            "peak_memory": self.peak_memory,
            "stdout": self.stdout_text,
            "stderr": self.stderr_text,
            "stdout_truncated": self.stdout_truncated,
            "stderr_truncated": self.stderr_truncated,
            "rule": self.rule,
            "note": self.note,
        }


class CommandFailed(Exception):
    """Raised by `Result.check()`: the command did not exit 0 (not a `CorralError`: corral worked)."""

    def __init__(self, result: Result) -> None:
        self.result = result
        what = result.detail or f"exit status {result.returncode}"
        super().__init__(f"{' '.join(result.argv)!r} failed: {what}")


class LiveSandbox:
    """One running sandbox: commands share its files, tmpfs and limits."""

    backend: str
    id: str
    rp: ResolvedPolicy
    _stopped = False  # set by stop(): the sandbox takes no more commands

    def exec(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | int | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
        output: tuple[int, int] | None = None,
    ) -> Result:
        """Run `argv` inside.

        `stdin` is bytes, or a host file descriptor the command reads directly. `env` adds to the
        policy's environment. Output is captured (bounded) and streamed to `on_output(stream, chunk)`,
        unless `output` names two host descriptors the command writes to directly (then the
        output limit cannot apply and the Result holds no output).
        """
        raise NotImplementedError

    def put_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        """Write a file inside the sandbox, as the sandbox user, whole or not at all. Read-only zones,
        paths outside every zone and symbolic links raise `PolicyDenied`; other failures (a missing
        directory, over the file size limit, a full disk) raise `SandboxFileError`."""
        raise NotImplementedError

    def get_file(self, path: str, *, max_bytes: int = 64 << 20) -> bytes:
        """Read a file from inside the sandbox, as the sandbox user. A file the policy hides raises
        `PolicyDenied`; a missing one, a directory or one over `max_bytes` raises `SandboxFileError`."""
        raise NotImplementedError

    def interrupt(self, thread: int | None = None) -> None:
        """Kill the commands running now, or only those whose exec `thread` (an ident) waits for;
        their execs return as killed. A backend that cannot leaves them to their end or timeout."""

    def stop(self) -> None:
        """Kill everything inside and release every host resource. Idempotent."""
        raise NotImplementedError

    def _check_exec(self, argv: Sequence[str]) -> None:
        """What every exec checks first: a stopped sandbox is lost; an empty argv is the caller's mistake."""
        if self._stopped:
            raise SandboxLost(f"sandbox {self.id} was stopped")
        if not argv:
            raise ValueError("argv is empty")

    def _command_env(self, env: Mapping[str, str] | None) -> dict[str, str]:
        """The policy's environment with the caller's additions (theirs win)."""
        full = self.rp.env_dict
        if env:
            full.update(env)
        return full


def effective_timeout(timeout: float | None, limit: float | None) -> float | None:
    """A per-call timeout may shorten the policy's time limit, never lift it."""
    if timeout is None or limit is None:
        return limit if timeout is None else timeout
    return min(timeout, limit)


# What the sandbox refusing a file means: the policy (read-only zone, outside every zone, a link).
_REFUSALS = frozenset({1, 13, 30, 40})  # EPERM, EACCES, EROFS, ELOOP


def file_error(verb: str, path: str, errno: int, reason: str) -> PolicyDenied | SandboxFileError:
    """The error for a put_file (`verb` "write") or get_file ("read") the sandbox answered with `errno`."""
    message = f"cannot {verb} {path} in the sandbox: {reason}"
    if errno in _REFUSALS:
        return PolicyDenied(message, rule="zones")
    return SandboxFileError(errno, message, path=path)


class Backend:
    """An isolation technology. Subclasses set `name` and `strength` and implement probe and start."""

    name: ClassVar[str]
    strength: ClassVar[int]

    def probe(self) -> Capabilities:
        raise NotImplementedError

    def start(self, rp: ResolvedPolicy, *, sandbox_id: str, events: EventSink | None = None) -> LiveSandbox:
        """A live sandbox for `rp`. `events` receives what the backend decides on its own (network
        decisions, for example) for the audit log."""
        raise NotImplementedError

    def run(
        self,
        rp: ResolvedPolicy,
        argv: Sequence[str],
        *,
        sandbox_id: str,
        stdin: bytes | int | None = None,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
        output: tuple[int, int] | None = None,
        events: EventSink | None = None,
    ) -> Result:
        """One command in a fresh sandbox (see `LiveSandbox.exec`). Backends may override this with a faster path."""
        live = self.start(rp, sandbox_id=sandbox_id, events=events)
        try:
            return live.exec(argv, stdin=stdin, timeout=timeout, on_output=on_output, output=output)
        finally:
            live.stop()
