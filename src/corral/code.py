"""`run_code`: run a piece of model-written code in a fresh sandbox, in one call.

    r = corral.run_code("import json; print(json.dumps({'a': 1}))")            # wasm when it works here
    r = corral.run_code(code, backend="namespace", policy=corral.Policy.workspace("."))  # the system python3

Python only, for now. Under the `wasm` backend the code runs in the pinned WASI build of CPython
(standard library only; no processes, threads or sockets exist there); under any other backend in
the sandbox's own `python3`. Either way the policy, the command rules and the audit log apply as
for `corral.run`: the command is `python3 -c CODE ARGS...`.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from corral.audit import AuditLog
    from corral.backends.base import Backend, Capabilities, OutputCallback, Result
    from corral.policy.model import Policy
    from corral.policy.resolve import ResolvedPolicy
    from corral.sandbox import Approver

LANGUAGES = ("python",)
# Linux refuses a single argument longer than 128 KiB (MAX_ARG_STRLEN); longer code goes through stdin.
MAX_ARG = 100_000


def run_code(
    code: str,
    *,
    language: str = "python",
    policy: Policy | ResolvedPolicy | None = None,
    backend: str = "auto",
    args: Sequence[str] = (),
    input: bytes | None = None,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = False,
    min_backend: str | None = None,
    allow_weaker: bool = False,
    audit: AuditLog | str | None = None,
    approver: Approver | None = None,
    fuel: int | None = None,
    on_output: OutputCallback | None = None,
) -> Result:
    """Run `code` and return its `Result` (output captured, bounded), shaped like `corral.run`.

    `backend`: "wasm" (WASI CPython under wasmtime), a command backend ("namespace", "landlock", ...;
    the sandbox's python3), or "auto": wasm when wasmtime and the WASI CPython are installed here,
    else the strongest command backend. `args` become `sys.argv[1:]`. `fuel` (wasm only) is a
    deterministic budget of executed instructions on top of the time limit.
    """
    return execute_code(code, language=language, policy=policy, backend=backend, args=args, stdin=input,
                        timeout=timeout, env=env, check=check, min_backend=min_backend, allow_weaker=allow_weaker,
                        audit=audit, approver=approver, fuel=fuel, on_output=on_output)[0]  # fmt: skip


def execute_code(
    code: str,
    *,
    language: str = "python",
    policy: Policy | ResolvedPolicy | None = None,
    backend: str = "auto",
    args: Sequence[str] = (),
    stdin: bytes | int | None = None,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = False,
    min_backend: str | None = None,
    allow_weaker: bool = False,
    audit: AuditLog | str | None = None,
    approver: Approver | None = None,
    fuel: int | None = None,
    on_output: OutputCallback | None = None,
    output: tuple[int, int] | None = None,
    warn: Callable[[str], None] | None = None,
) -> tuple[Result, str, str]:
    """`run_code` with stdin as bytes or a host descriptor and `output` descriptors (for the CLI).
    Returns the result, the backend's name and the sandbox id."""
    from corral.backends.base import check_supported, without_unenforced_limits
    from corral.errors import ConfigError
    from corral.sandbox import _Guard, _open_audit, _resolve, new_id

    if language not in LANGUAGES:
        raise ConfigError(f"unsupported language {language!r}; expected one of {', '.join(LANGUAGES)}",
                          where="language")  # fmt: skip
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, not {type(code).__name__}")
    if "\0" in code:
        raise ConfigError("the code contains a NUL byte", where="code")
    args = [str(a) for a in args]
    rp = _resolve(policy)
    if env:
        rp = rp.replace(env=tuple(sorted({**rp.env_dict, **env}.items())))
    chosen, caps = choose_backend(backend, min_backend=min_backend, fuel=fuel)
    weaker = check_supported(caps, rp, allow_weaker=allow_weaker)
    if weaker:
        rp = without_unenforced_limits(caps, rp)
    if weaker and warn is not None:
        warn(f"warning: backend {chosen.name} does not enforce: {'; '.join(weaker)}")
    argv = ["python3", "-c", code, *args]
    if chosen.name != "wasm" and len(code.encode()) > MAX_ARG:
        if stdin is not None:
            raise ConfigError(f"code longer than {MAX_ARG} bytes is passed on stdin, so it cannot take input too",
                              where="code")  # fmt: skip
        argv, stdin = ["python3", "-", *args], code.encode()
    log, own = _open_audit(audit, rp)
    sandbox_id = new_id()
    guard = _Guard(rp, sandbox_id=sandbox_id, backend=chosen.name, audit=log, approver=approver, weaker=weaker)
    try:
        result = guard.admit(argv, rp.cwd)
        if result is None:
            result = chosen.run(rp, argv, sandbox_id=sandbox_id, stdin=stdin, timeout=timeout, on_output=on_output,
                                output=output, events=guard.emit)  # fmt: skip
        guard.record_exec(argv, rp.cwd, result)
    finally:
        guard.finish()  # the sandbox.stop of a run that raised
        if own and log is not None:
            log.close()
    if check:
        result.check()
    return result, chosen.name, sandbox_id


def choose_backend(
    name: str, *, min_backend: str | None = None, fuel: int | None = None
) -> tuple[Backend, Capabilities]:
    """The backend for code: "auto" prefers wasm (with its Python runtime) and falls back to `auto`."""
    from corral.backends import registry
    from corral.errors import BackendUnavailable, ConfigError

    if fuel is not None and name not in ("wasm", "auto"):
        raise ConfigError(f"fuel is a wasm backend limit; backend {name!r} cannot count it", where="fuel")
    if name in ("auto", "wasm"):
        try:
            from corral.backends.wasm import runtime

            backend, caps = registry.choose("wasm", min_backend=min_backend)
            runtime.python_wasm_path()
        except BackendUnavailable:
            if name == "wasm" or fuel is not None:
                raise
        except ConfigError:  # wasm is weaker than min_backend
            if name == "wasm":
                raise
        else:
            if fuel is not None:
                from corral.backends.wasm.backend import WasmBackend

                backend = WasmBackend(fuel=fuel)
            return backend, caps
    return registry.choose(name, min_backend=min_backend)
