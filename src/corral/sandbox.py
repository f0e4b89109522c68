"""`Sandbox`: one live sandbox = a backend + a resolved policy + command rules + the audit log.

    with corral.Sandbox(corral.Policy.workspace("."), backend="auto") as sb:
        sb.exec(["make"]).check()
        print(sb.exec(["./a.out"]).stdout_text)

and `corral.run(argv, policy=...)`, the one-shot form shaped like `subprocess.run`.
"""

from __future__ import annotations

import errno
import os
import time

from corral.backends.base import Result, check_supported, without_unenforced_limits
from corral.errors import ConfigError, CorralError, PolicyDenied, SandboxFileError, SandboxLost

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from corral.audit import AuditLog
    from corral.backends.base import Backend, LiveSandbox, OutputCallback
    from corral.policy.commands import Decision
    from corral.policy.model import Policy
    from corral.policy.resolve import ResolvedPolicy

    Approver = Callable[["AskRequest"], bool]


class AskRequest:
    """What an approver is asked: may `argv` run, given the rule that asked?"""

    def __init__(self, *, argv: Sequence[str], rule: str, sandbox: str, cwd: str) -> None:
        self.argv = tuple(argv)
        self.rule = rule
        self.sandbox = sandbox
        self.cwd = cwd

    def as_json(self) -> dict[str, object]:
        return {"argv": list(self.argv), "rule": self.rule, "sandbox": self.sandbox, "cwd": self.cwd}


def new_id() -> str:
    return os.urandom(6).hex()


def _resolve(policy: Policy | ResolvedPolicy | None) -> ResolvedPolicy:
    from corral.policy.model import Policy
    from corral.policy.resolve import ResolvedPolicy, resolve

    if policy is None:
        policy = Policy.workspace(".")
    if isinstance(policy, ResolvedPolicy):
        return policy
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a corral.Policy, not {type(policy).__name__}")
    return resolve(policy)


def _open_audit(
    audit: AuditLog | str | os.PathLike[str] | None, rp: ResolvedPolicy | None = None
) -> tuple[AuditLog | None, bool]:
    """(the log, whether we opened it). A path is refused (ConfigError at "audit") when it lies in a
    read-write zone of `rp`, where the command could rewrite the log, or cannot be opened; an
    AuditLog the caller opened is the caller's business."""
    from corral.audit import AuditLog, check_outside_zones

    if audit is None or isinstance(audit, AuditLog):
        return audit, False
    if not isinstance(audit, str | os.PathLike):
        raise TypeError(f"audit must be an AuditLog or a file path, not {type(audit).__name__}")
    if rp is not None:
        check_outside_zones(audit, rp.zones, where="audit")
    return AuditLog(audit, where="audit"), True


class _Guard:
    """Command rules, approval and the audit trail, shared by `Sandbox` and the one-shot runs.

    A one-shot guard (`live=False`) also writes its sandbox's sandbox.start (when its one command is
    admitted) and sandbox.stop (with the command's exec event, or from `finish()`); a live
    `Sandbox` writes its own. `weaker` (the policy parts the backend does not enforce) is worked
    out when the log needs it and no caller said.
    """

    def __init__(self, rp: ResolvedPolicy, *, sandbox_id: str, backend: str, audit: AuditLog | None,
                 approver: Approver | None, weaker: Sequence[str] | None = None,
                 live: bool = False) -> None:  # fmt: skip
        from corral.policy.commands import CommandRules

        self.rules = CommandRules(rp.commands)
        self.rp = rp
        self.id = sandbox_id
        self.backend = backend
        self.audit = audit
        self.approver = approver
        self.weaker = weaker
        self.live = live
        self._started = False  # a one-shot's sandbox.start is written and its sandbox.stop not yet

    def admit(self, argv: Sequence[str], cwd: str) -> Result | None:
        """None when `argv` may run; otherwise the denial as a Result."""
        decision = self.rules.decide(argv)
        if decision.action == "ask":
            decision = self._ask(argv, decision, cwd)
        if self.audit is not None and not self.rules.empty:
            from corral.audit import redact_argv

            self.audit.write("decision", sandbox=self.id, backend=self.backend, argv=redact_argv(argv),
                             cwd=cwd, action=decision.action, rule=decision.rule)  # fmt: skip
        if decision.action == "allow":
            if self.audit is not None and not self.live:
                self.write_start(duration=None)
            return None
        message = f"corral: denied by policy ({decision.rule}): {' '.join(argv)}"
        return Result(argv=argv, returncode=None, reason="denied", rule=decision.rule,
                      detail=f"denied by policy ({decision.rule})", stderr=(message + "\n").encode())  # fmt: skip

    def _ask(self, argv: Sequence[str], decision: Decision, cwd: str) -> Decision:
        from corral.policy.commands import Decision

        request = AskRequest(argv=argv, rule=decision.rule, sandbox=self.id, cwd=cwd)
        try:
            if self.approver is not None:
                allowed = bool(self.approver(request))
                how = "approver callback"
            elif self.rp.commands.approver is not None:
                allowed = _external_approval(self.rp.commands.approver, request, self.rp.commands.ask_timeout)
                how = "approver command"
            else:
                return Decision(action="deny", rule=f"{decision.rule} (no approver configured)")
        except CorralError as exc:  # the approver command could not answer: that means no, saying why
            return Decision(action="deny", rule=f"{decision.rule} ({exc})")
        except Exception as exc:  # an approver that fails means no
            return Decision(action="deny", rule=f"{decision.rule} (approver failed: {exc})")
        return Decision(
            action="allow" if allowed else "deny", rule=f"{decision.rule} ({how} said {'yes' if allowed else 'no'})"
        )

    def write_start(self, *, duration: float | None) -> None:
        """The sandbox.start event (`duration` None for a one-shot: its start is timed with its command)."""
        if self.audit is None:
            return
        if self.weaker is None:  # a caller that did not say (`corral run`): ask the (cached) probe
            from corral.backends import registry

            caps = registry.probe(registry.create(self.backend))
            self.weaker = check_supported(caps, self.rp, allow_weaker=True)
        zones = [{"mount": z.mount, "mode": z.mode, "host": z.host} for z in self.rp.zones]
        self.audit.write("sandbox.start", sandbox=self.id, backend=self.backend, duration=duration,
                         weaker=list(self.weaker), network=self.rp.network.mode, zones=zones)  # fmt: skip
        self._started = not self.live

    def finish(self) -> None:
        """A one-shot's sandbox.stop, once, if its sandbox.start was written (idempotent)."""
        if self._started and self.audit is not None:
            self._started = False
            self.audit.write("sandbox.stop", sandbox=self.id, backend=self.backend)

    def emit(self, event: str, fields: dict[str, object]) -> None:
        """The backend's own events (network decisions, ...) into the audit log."""
        if self.audit is not None:
            self.audit.write(event, sandbox=self.id, backend=self.backend, **fields)

    def record_lost(self, argv: Sequence[str], cwd: str, error: SandboxLost) -> None:
        """An exec during which the sandbox died: no Result, but the log says what ran and how it ended."""
        if self.audit is None:
            return
        from corral.audit import redact_argv

        self.audit.write("exec", sandbox=self.id, backend=self.backend, argv=redact_argv(argv), cwd=cwd,
                         returncode=None, reason="lost", detail=str(error), network=self.rp.network.mode)  # fmt: skip

    def record_exec(self, argv: Sequence[str], cwd: str, result: Result) -> None:
        if self.audit is None:
            return
        from corral.audit import redact_argv

        self.audit.write("exec", sandbox=self.id, backend=self.backend, argv=redact_argv(argv), cwd=cwd,
                         returncode=result.returncode, reason=result.reason, detail=result.detail,
                         duration=round(result.wall_time, 6), peak_memory=result.peak_memory,
                         rule=result.rule, network=self.rp.network.mode)  # fmt: skip
        self.finish()


def _command(argv: Sequence[str]) -> list[str]:
    """`argv` as strings; refused when it is one string, or holds a NUL byte (no program can
    receive one: the kernel would cut the argument there)."""
    if isinstance(argv, str | bytes):
        raise TypeError("argv must be a list of strings; use ['sh', '-c', cmd] for a shell command")
    command = []
    for i, arg in enumerate(argv):
        if isinstance(arg, os.PathLike):
            arg = os.fspath(arg)
        if not isinstance(arg, str):  # str() of bytes or None would run something nobody asked for
            raise TypeError(f"argv[{i}] must be a str, not {type(arg).__name__} ({arg!r:.40})")
        command.append(arg)
    for i, arg in enumerate(command):
        if "\0" in arg:
            raise ConfigError(f"argument {i} ({arg[:40]!r}) contains a NUL byte", where="argv")
    return command


def _bytes(data: object, name: str) -> bytes | None:
    """Bytes-like input as bytes; a str (which encoding?) or anything else is the caller's mistake."""
    if data is None or isinstance(data, bytes):
        return data
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    raise TypeError(f"{name} must be bytes (or bytearray, memoryview), not {type(data).__name__}; "
                    "encode a str first")  # fmt: skip


def _timeout(timeout: float | None) -> float | None:
    """A per-call timeout, checked as the policy's is: a finite number of seconds above zero."""
    if timeout is None:
        return None
    from corral.policy.model import MAX_SECONDS

    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < MAX_SECONDS:
        raise ConfigError(f"must be a number of seconds above 0 and below 24 days, got {timeout!r}", where="timeout")
    return float(timeout)


def _stdin(data: object) -> bytes | int | None:
    """Bytes-like input, or a host file descriptor the command reads directly."""
    if isinstance(data, int) and not isinstance(data, bool):
        if data < 0:
            raise ConfigError(f"not a file descriptor: {data}", where="stdin")
        return data
    return _bytes(data, "stdin")


def _count(value: object, name: str, *, most: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= most:
        raise ConfigError(f"must be a whole number from 0 to {most:#o}, got {value!r}" if name == "mode"
                          else f"must be a whole number from 0 to {most}, got {value!r}", where=name)  # fmt: skip
    return value


def _check_path(path: str) -> None:
    if not isinstance(path, str) or not path or "\0" in path:
        raise ConfigError(f"not a file path: {path!r}", where="path")


def _external_approval(command: Sequence[str], request: AskRequest, timeout: float) -> bool:
    """Run the approver with the request as JSON on stdin; exit status 0 means yes, anything else no.
    Raises `CorralError` when it gives no answer (cannot be run, or too slow): the caller denies."""
    import json
    import subprocess

    try:
        done = subprocess.run(list(command), input=json.dumps(request.as_json()).encode(), capture_output=True,
                              timeout=timeout, check=False)  # fmt: skip
    except OSError as exc:
        raise CorralError(f"approver command could not be run: {command[0]}: {exc.strerror or exc}") from None
    except subprocess.TimeoutExpired:
        raise CorralError(f"approver command did not answer within {timeout:g}s") from None
    return done.returncode == 0


class Sandbox:
    """A live sandbox. Commands share its files, its tmpfs and its limits; start it once, exec many times.

    `backend` is "auto" (the strongest that works here) or a name; `min_backend` refuses anything
    weaker; `allow_weaker` accepts a backend that cannot enforce every part of the policy (the
    missing parts are in `.weaker`). `approver` answers `ask` rules (else the policy's approver
    command; with neither, asking means no). `audit` is an `AuditLog` or a path.
    """

    def __init__(
        self,
        policy: Policy | ResolvedPolicy | None = None,
        *,
        backend: str = "auto",
        min_backend: str | None = None,
        allow_weaker: bool = False,
        audit: AuditLog | str | os.PathLike[str] | None = None,
        approver: Approver | None = None,
        sandbox_id: str | None = None,
    ) -> None:
        import threading

        from corral.backends import registry

        self.rp = _resolve(policy)
        self.id = sandbox_id or new_id()
        self._backend: Backend
        self._backend, self.capabilities = registry.choose(backend, min_backend=min_backend)
        self.weaker = check_supported(self.capabilities, self.rp, allow_weaker=allow_weaker)
        if self.weaker:
            self.rp = without_unenforced_limits(self.capabilities, self.rp)
        self.audit, self._own_audit = _open_audit(audit, self.rp)
        self._guard = _Guard(self.rp, sandbox_id=self.id, backend=self.backend, audit=self.audit, approver=approver,
                             weaker=self.weaker, live=True)  # fmt: skip
        self._live: LiveSandbox | None = None
        self._stopped = False
        self._starting = threading.Lock()  # threads that first use it at once start one sandbox
        self._finalizer: Callable[[], object] | None = None

    @property
    def backend(self) -> str:
        return self._backend.name

    def start(self) -> Sandbox:
        """Start it (once; `exec` and the file methods start it too). A stopped Sandbox stays stopped."""
        self._check_not_stopped()
        if self._live is None:
            with self._starting:
                self._check_not_stopped()
                if self._live is None:
                    import weakref

                    started = time.monotonic()
                    live = self._backend.start(self.rp, sandbox_id=self.id, events=self._guard.emit)
                    # A Sandbox never stopped is stopped when it is collected or the interpreter exits:
                    # its processes, cgroups and private directories do not outlive the program.
                    self._finalizer = weakref.finalize(self, live.stop)
                    self._live = live
                    self._guard.write_start(duration=round(time.monotonic() - started, 6))
        return self

    def _check_not_stopped(self) -> None:
        # Starting afresh would silently lose the sandbox's state, and its audit log may be closed.
        if self._stopped:
            raise SandboxLost(f"sandbox {self.id} was stopped; make a new Sandbox")

    def exec(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | int | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
    ) -> Result:
        """Run `argv` (a list, never a shell string) inside. Denials and limits come back as a Result.
        `stdin` is bytes or a host file descriptor; `cwd` a directory inside (a relative one is
        below the sandbox's working directory); `timeout` may shorten the policy's, not lift it."""
        argv = _command(argv)
        data, timeout = _stdin(stdin), _timeout(timeout)
        self._check_not_stopped()
        if cwd is not None:
            if isinstance(cwd, os.PathLike):
                cwd = os.fspath(cwd)
            if not isinstance(cwd, str):
                raise TypeError(f"cwd must be a str, not {type(cwd).__name__}")
            if "\0" in cwd:
                raise ConfigError(f"{cwd[:40]!r} contains a NUL byte", where="cwd")
            cwd = os.path.normpath(os.path.join(self.rp.cwd, cwd))  # a relative one is below the working directory
        if env is not None:
            from collections.abc import Mapping

            from corral.policy.model import check_env_variable

            if not isinstance(env, Mapping):
                raise TypeError(f"env must be a mapping of names to values, not {type(env).__name__}")
            for name, value in env.items():
                check_env_variable(name, value, where="env")
        cwd = cwd or self.rp.cwd
        denied = self._guard.admit(argv, cwd)
        if denied is not None:
            self._guard.record_exec(argv, cwd, denied)
            return denied
        live = self.start()._live
        assert live is not None
        try:
            result = live.exec(argv, stdin=data, env=env, cwd=cwd, timeout=timeout, on_output=on_output)
        except SandboxLost as exc:
            self._guard.record_lost(argv, cwd, exc)
            raise
        self._guard.record_exec(argv, cwd, result)
        return result

    def put_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        """Write `data` to `path` (relative to the working directory) inside, whole or not at all.
        The policy's refusals raise `PolicyDenied`; a missing directory, data over the file size
        limit or a full disk raise `SandboxFileError`."""
        _check_path(path)
        data = _bytes(data, "data") or b""
        mode = _count(mode, "mode", most=0o7777)
        try:
            limit = self.rp.limits.file_size
            if limit is not None and len(data) > limit:
                from corral.units import format_size

                raise SandboxFileError(errno.EFBIG, f"cannot write {path} in the sandbox: {len(data)} bytes is "
                                       f"over the file size limit ({format_size(limit)})", path=path)  # fmt: skip
            live = self.start()._live
            assert live is not None
            live.put_file(path, data, mode=mode)
        except (PolicyDenied, SandboxFileError) as exc:
            self._record_file("file.put", path, len(data), exc)
            raise
        self._record_file("file.put", path, len(data))

    def get_file(self, path: str, *, max_bytes: int = 64 << 20) -> bytes:
        """The bytes of `path` inside. A file the policy hides raises `PolicyDenied`; a missing one,
        a directory or one over `max_bytes` raises `SandboxFileError`."""
        _check_path(path)
        max_bytes = _count(max_bytes, "max_bytes", most=2**63 - 1)
        try:
            live = self.start()._live
            assert live is not None
            data = live.get_file(path, max_bytes=max_bytes)
        except (PolicyDenied, SandboxFileError) as exc:
            self._record_file("file.get", path, None, exc)
            raise
        self._record_file("file.get", path, len(data))
        return data

    def _record_file(self, event: str, path: str, size: int | None, error: CorralError | None = None) -> None:
        if self.audit is None:
            return
        fields: dict[str, object] = {"path": path, "size": size}
        if isinstance(error, PolicyDenied):
            fields.update(decision="deny", rule=error.rule, error=str(error))
        elif error is not None:
            fields["error"] = str(error)
        self.audit.write(event, sandbox=self.id, backend=self.backend, **fields)

    def interrupt(self, thread: int | None = None) -> None:
        """Kill the commands running in it now (from any thread), or only those whose `exec` the
        thread with ident `thread` is in; each such `exec` returns a Result killed by signal 9."""
        live = self._live
        if live is not None:
            live.interrupt(thread)

    def stop(self) -> None:
        """Stop it for good (idempotent): it takes no more commands."""
        self._stopped = True
        live, self._live = self._live, None
        if live is not None:
            (self._finalizer or live.stop)()  # the finalizer stops it once, and never again at exit
            if self.audit is not None:
                self.audit.write("sandbox.stop", sandbox=self.id, backend=self.backend)
        if self._own_audit and self.audit is not None:
            self.audit.close()

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run(
    argv: Sequence[str],
    *,
    policy: Policy | ResolvedPolicy | None = None,
    backend: str = "auto",
    input: bytes | None = None,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    check: bool = False,
    min_backend: str | None = None,
    allow_weaker: bool = False,
    audit: AuditLog | str | os.PathLike[str] | None = None,
    approver: Approver | None = None,
    on_output: OutputCallback | None = None,
) -> Result:
    """Run one command in a fresh sandbox and return its `Result` (stdout and stderr captured, bounded).

    Shaped like `subprocess.run`: `input`, `timeout`, `env` (added to the policy's clean
    environment), `cwd` (inside the sandbox), `check` (raise `CommandFailed` unless it exits 0).
    """
    from corral.backends import registry

    argv = _command(argv)
    if not argv:
        raise ValueError("argv is empty")
    input, timeout = _bytes(input, "input"), _timeout(timeout)
    rp = _resolve(policy)
    if env:
        rp = rp.replace(env=tuple(sorted({**rp.env_dict, **env}.items())))
    if cwd:
        from corral.policy.model import normalize_mount

        rp = rp.replace(cwd=normalize_mount(cwd, where="cwd"))
    chosen, caps = registry.choose(backend, min_backend=min_backend)
    weaker = check_supported(caps, rp, allow_weaker=allow_weaker)
    if weaker:
        rp = without_unenforced_limits(caps, rp)
    log, own = _open_audit(audit, rp)
    sandbox_id = new_id()
    guard = _Guard(rp, sandbox_id=sandbox_id, backend=chosen.name, audit=log, approver=approver, weaker=weaker)
    try:
        result = guard.admit(argv, rp.cwd)
        if result is None:
            result = chosen.run(
                rp, argv, sandbox_id=sandbox_id, stdin=input, timeout=timeout, on_output=on_output, events=guard.emit
            )
        guard.record_exec(argv, rp.cwd, result)
    finally:
        guard.finish()  # the sandbox.stop of a run that raised
        if own and log is not None:
            log.close()
    if check:
        result.check()
    return result


def raise_if_denied(result: Result) -> Result:
    """Turn a policy denial into a `PolicyDenied` exception (for callers that prefer raising)."""
    if result.reason == "denied":
        raise PolicyDenied(result.detail, rule=result.rule or "")
    return result
