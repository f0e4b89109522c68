"""The `corral` command line: parse, call the library, render.

`corral run` sits on the start-up path of every sandboxed command, so it parses its own flags and
imports only what it needs; the other subcommands use argparse and rich freely.

Exit codes: the command's own (a signal N as 128+N); 124 timeout; 122 denied by policy;
125 corral could not run it (no backend, launch failure); 126 not executable; 127 not found;
2 bad usage or configuration (one line naming the flag, or the file and key).
"""

from __future__ import annotations

import sys

from corral.errors import EXIT_CORRAL_FAILURE, EXIT_USAGE, ConfigError, CorralError, LaunchError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import TypeVar

    from corral.backends.base import Result

    T = TypeVar("T")

EXIT_TIMEOUT = 124

# flag -> (metavar or None for a switch, repeatable, help). The single source for parsing and --help.
RUN_FLAGS: dict[str, tuple[str | None, bool, str]] = {
    "--backend": ("NAME", False, "auto (default), namespace, landlock, process, wasm, docker, gvisor or microvm"),
    "--min-backend": ("NAME", False, "refuse any backend weaker than NAME (auto picks only namespace or landlock)"),
    "--allow-weaker": (None, False, "accept a backend that cannot enforce every part of the policy"),
    "--profile": ("NAME", False, "strict, workspace (default), fs_safe, net_safe or dev"),
    "--config": ("FILE", False, "a policy file; the workspace stays the current dir (default: nearest corral.toml)"),
    "--no-config": (None, False, "ignore config files"),
    "--zone": ("HOST[:MOUNT][:ro|rw]", True, "add a zone (read-only unless :rw)"),
    "--tmpfs": ("MOUNT[:SIZE]", True, "add a tmpfs zone"),
    "--net": ("MODE", False, "none (default), host, or allow:DOMAIN[:PORT],ADDRESS[:PORT],CIDR,..."),
    "--memory": ("SIZE", False, "memory limit, e.g. 512M (unlimited: none)"),
    "--cpus": ("N", False, "CPU limit, e.g. 1.5"),
    "--pids": ("N", False, "process limit (unlimited: none)"),
    "--timeout": ("DURATION", False, "wall-time limit, e.g. 30s, 2m"),
    "--output": ("SIZE", False, "output limit (stdout + stderr)"),
    "--file-size": ("SIZE", False, "largest file the command may write"),
    "--open-files": ("N", False, "open files limit"),
    "--env": ("NAME[=VALUE]", True, "pass NAME from the host, or set it"),
    "--allow-command": ("PATTERN", True, "allow only commands matching these patterns"),
    "--deny-command": ("PATTERN", True, "deny commands matching PATTERN"),
    "--ask-command": ("PATTERN", True, "ask the approver before commands matching PATTERN"),
    "--cwd": ("DIR", False, "working directory inside the sandbox"),
    "--uid": ("N", False, "uid inside the sandbox (default 1000; 0 for root inside)"),
    "--image": ("NAME", False, "container image (docker and gvisor backends; default: corral's own)"),
    "--audit": ("FILE", False, "append audit events (JSON lines) to FILE"),
    "--json": (None, False, "capture output and print the result as JSON"),
}


class _Terminated(BaseException):
    """SIGTERM or SIGHUP: unwound like Ctrl-C, so every sandbox and scratch directory is removed."""

    def __init__(self, signum: int) -> None:
        self.signum = signum


def _terminate(signum: int, frame: object) -> None:
    raise _Terminated(signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if argv is None and args[:1] in (["run"], ["run-code"]):
        # Only for the commands that run one sandbox synchronously and clean up as they unwind: an
        # exception raised in `corral mcp`'s event loop could be swallowed there, and it would not end.
        import _signal  # type: ignore[import-not-found]  # `signal` would load enum

        for signum in (_signal.SIGTERM, _signal.SIGHUP):
            _signal.signal(signum, _terminate)
    try:
        code = _dispatch(args)
        sys.stdout.flush()  # here, so that a reader gone early is seen below and not at exit
    except CorralError as exc:
        _error(str(exc))
        code = exc.exit_code
    except KeyboardInterrupt:
        code = 130
    except _Terminated as exc:
        code = 128 + exc.signum
    except BrokenPipeError:
        # Whoever reads our output stopped (`corral ... | head`): end quietly, as SIGPIPE would.
        if argv is None:  # our own process's stdout, not a caller's
            _silence_stdout()
        code = 128 + 13
    if argv is None:
        # Leave at once after `run`: everything it opened is closed and waited for, so the
        # interpreter's clean-up (2-4 ms of a 30 ms budget) has nothing to do; and wasmtime's I/O
        # threads can panic while the process runs its exit handlers.
        if (args and args[0] == "run") or "corral.backends.wasm.run" in sys.modules:
            _exit_now(code)
        sys.exit(code)
    return code


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing what is still buffered cannot fail again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _exit_now(code: int) -> None:
    import os

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _dispatch(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help", "help"):
        print(_USAGE)
        return 0 if args else EXIT_USAGE
    if args[0] in ("-V", "--version", "version"):
        from corral import __version__

        print(f"corral {__version__}")
        return 0
    command, rest = args[0], args[1:]
    if command == "run":
        return run_command(rest)
    if command == "run-code":
        from corral.cli.code import run_code_command

        return run_code_command(rest)
    if command == "doctor":
        from corral.cli.doctor import doctor_command

        return doctor_command(rest)
    if command == "audit":
        from corral.cli.audit import audit_command

        return audit_command(rest)
    if command == "session":
        from corral.cli.session import session_command

        return session_command(rest)
    if command == "mcp":
        from corral.cli.mcp import mcp_command

        return mcp_command(rest)
    if command == "selftest":
        from corral.cli.selftest import selftest_command

        return selftest_command(rest)
    if command == "image":
        from corral.cli.image import image_command

        return image_command(rest)
    _error(f"unknown command {command!r}; try 'corral --help'")
    return EXIT_USAGE


_USAGE = """usage: corral COMMAND [ARGS]

Run an AI agent's commands inside a sandbox.

commands:
  run [FLAGS] -- CMD ARGS...   run one command in a fresh sandbox (corral run --help)
  run-code [FLAGS] FILE.py     run Python code in a fresh sandbox (corral run-code --help)
  doctor [BACKEND...] [--json] which backends work here, and why not
  audit FILE [FILTERS]         read an audit log (corral audit --help)
  session COMMAND ...          persistent workspaces: copy-in, tools, diff, rollback, sync (corral session --help)
  mcp [--project DIR] [...]    serve a sandboxed session's tools to an MCP client (corral mcp --help)
  selftest [--backend B]       run the escape battery here: which attacks each backend stops
  image base|build             images for the docker and gvisor backends, no registry needed
  --version                    print the version

Exit codes: the command's own; 124 timeout; 122 denied by policy; 125 corral failed;
126 not executable; 127 not found; 2 usage error."""


def _error(message: str) -> None:
    # Every line starts "corral: "; an error placed at a subcommand ("corral session rm: ...") says it once.
    sys.stderr.write(f"corral: {message.removeprefix('corral ')}\n")
    sys.stderr.flush()


def run_help() -> str:
    lines = ["usage: corral run [FLAGS] [--] CMD ARGS...", "", "flags:"]
    for flag, (metavar, repeat, text) in RUN_FLAGS.items():
        left = f"{flag} {metavar}" if metavar else flag
        lines.append(f"  {left:<34} {text}{' (repeatable)' if repeat else ''}")
    return "\n".join(lines)


def parse_run_args(args: list[str]) -> tuple[dict[str, object], list[str]]:
    """Flags (as {flag: value | [values] | True}) and the command. Raises ConfigError on bad usage."""
    opts: dict[str, object] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return opts, args[i + 1 :]
        if not arg.startswith("-") or arg == "-":
            return opts, args[i:]
        if arg in ("-h", "--help"):
            opts["--help"] = True
            return opts, []
        name, eq, value = arg.partition("=")
        spec = RUN_FLAGS.get(name)
        if spec is None:
            raise ConfigError(f"unknown flag {name!r} (see corral run --help)", where="corral run")
        metavar, repeat, _ = spec
        if metavar is None:
            if eq:
                raise ConfigError("takes no value", where=name)
            opts[name] = True
        else:
            if not eq:
                i += 1
                # `--memory -- cmd` or `--memory --cpus 2`: the value was left out, not given as '--'.
                if i >= len(args) or args[i] in ("--", "-h", "--help") or args[i].partition("=")[0] in RUN_FLAGS:
                    raise ConfigError(f"needs a value ({metavar})", where=name)
                value = args[i]
            if repeat:
                existing = opts.setdefault(name, [])
                assert isinstance(existing, list)
                existing.append(value)
            else:
                opts[name] = value
        i += 1
    return opts, []


def build_policy(
    opts: dict[str, object], *, workspace: str | None = None
) -> tuple[object, str | None, str | None, str | None]:
    """(policy, backend, min_backend, audit path) from config files and flags: flags win.

    `workspace` (default: the current directory) is the project the profile's workspace zone names;
    the config file is then looked for from there. Every error names the flag at fault (the user
    typed `--cpus`, not `limits.cpus`) or, for the config, the file and its key.
    """
    import os

    from corral.policy.load import find_config, load_config
    from corral.policy.model import Commands, Env, Limits, Network, Zone, check_env_name
    from corral.policy.profiles import PROFILES
    from corral.policy.resolve import host_path

    profile = _opt(opts, "--profile")
    if profile is not None and profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; expected one of {', '.join(PROFILES)}", where="--profile")
    for flag in ("--backend", "--min-backend"):
        name = _opt(opts, flag)
        if name is not None and not (flag == "--backend" and name == "auto"):
            from corral.backends.registry import strength_of

            _at(flag, strength_of, name)
    config_path, search = _opt(opts, "--config"), not opts.get("--no-config")
    if config_path is not None and not search:
        raise ConfigError(f"conflicts with --config {config_path} (ignore config files, or use that one?)",
                          where="--no-config")  # fmt: skip
    if workspace is not None and config_path is None and search:
        config_path, search = find_config(workspace), False
    config = load_config(config_path, profile=profile, workspace=workspace, search=search)
    policy = config.policy
    zones: list[Zone] = []
    for spec in _list(opts, "--zone"):
        zone = _at(f"--zone {spec}", Zone.parse, spec)
        # Checked here, not when the policy is resolved: there it would be some zones[N] of the profile's.
        host_path(zone.host or "", base_dir=os.getcwd(), where=f"--zone {spec}")
        zones.append(zone)
    zones += [_at(f"--tmpfs {spec}", Zone.parse_tmpfs, spec) for spec in _list(opts, "--tmpfs")]
    if zones:
        policy = policy.with_zones(*zones)
    if "--net" in opts:
        policy = policy.replace(network=_at("--net", Network.parse, str(opts["--net"])))
    limits: dict[str, object] = {}
    unlimited = [field for flag, field in _LIMIT_FLAGS if _opt(opts, flag) in ("unlimited", "none")]
    if unlimited:
        policy = policy.replace(limits=policy.limits.replace(**dict.fromkeys(unlimited)))
    for flag, field in _LIMIT_FLAGS:
        text = _opt(opts, flag)
        if text is None or text in ("unlimited", "none"):
            continue
        # Limits reads sizes and durations itself; counts and CPUs are numbers first.
        value: object = text if field in _TEXT_LIMITS else _number(text, flag, integer=field != "cpus")
        limits[field] = getattr(_at(flag, Limits, **{field: value}), field)
    if limits:
        policy = policy.replace(limits=policy.limits.merged(Limits(**limits)))  # type: ignore[arg-type]
    env_flags = _list(opts, "--env")
    if env_flags:
        passthrough = list(policy.env.passthrough)
        values = dict(policy.env.values)
        for item in env_flags:
            name, eq, value = item.partition("=")
            check_env_name(name, where="--env")
            if eq:
                values[name] = value
            else:
                if name not in os.environ:
                    _error(f"warning: --env {name}: not set on the host, not passed")
                passthrough.append(name)
        policy = policy.replace(env=_at("--env", Env, passthrough=passthrough, values=values))
    allow, deny, ask = _list(opts, "--allow-command"), _list(opts, "--deny-command"), _list(opts, "--ask-command")
    if allow or deny or ask:
        for flag, key, patterns in (("--allow-command", "allow", allow), ("--deny-command", "deny", deny),
                                    ("--ask-command", "ask", ask)):  # fmt: skip
            _at(flag, Commands, **{key: patterns})
        c = policy.commands
        policy = policy.replace(commands=Commands(allow=(*c.allow, *allow), deny=(*c.deny, *deny), ask=(*c.ask, *ask),
                                                  approver=c.approver, ask_timeout=c.ask_timeout))  # fmt: skip
    if "--cwd" in opts:
        policy = _at("--cwd", policy.replace, cwd=_opt(opts, "--cwd"))
    if "--uid" in opts:
        policy = _at("--uid", policy.replace, uid=int(_number(str(opts["--uid"]), "--uid", integer=True)))
    if "--image" in opts:
        policy = policy.replace(container=_at("--image", policy.container.replace, image=_opt(opts, "--image")))
    backend = _opt(opts, "--backend") or config.backend
    min_backend = _opt(opts, "--min-backend") or config.min_backend
    where = {flag: flag if flag in opts else f"{config.source or 'config'}: {key}"
             for flag, key in (("--backend", "backend"), ("--min-backend", "min_backend"))}  # fmt: skip
    _check_backends(backend, min_backend, where)
    if "--image" in opts and backend not in _CONTAINER_BACKENDS:
        why = f"not {backend}" if backend and backend != "auto" else "which auto never picks"
        raise ConfigError(f"applies only to the docker and gvisor backends, {why} (add --backend docker or gvisor)",
                          where="--image")  # fmt: skip
    if opts.get("--audit") == "":
        raise ConfigError("needs a file name", where="--audit")
    if os.geteuid() == 0:
        _warn_root_only_files(policy)
    return policy, backend, min_backend, _opt(opts, "--audit") or config.audit


_ROOT_ONLY = ("/etc/shadow", "/etc/gshadow", "/root")


def _warn_root_only_files(policy: object) -> None:
    """As root, the sandbox's user is root's own uid mapped: a zone holding files only root may
    read (a zone of / or /etc) shows them to the command. Said, as the user chose the zone."""
    for zone in getattr(policy, "zones", ()):
        host = zone.host
        if host and any(secret == host or secret.startswith(host.rstrip("/") + "/") for secret in _ROOT_ONLY):
            exposed = [secret for secret in _ROOT_ONLY if secret == host or secret.startswith(host.rstrip("/") + "/")]
            _error(f"warning: zone {host}: run as root, the command can read what only root may ({', '.join(exposed)}"
                   "): the sandbox's user is root's own uid, mapped")  # fmt: skip


_CONTAINER_BACKENDS = ("docker", "gvisor")


def _check_backends(backend: str | None, min_backend: str | None, where: dict[str, str]) -> None:
    """--backend against --min-backend, said here at the flags (the registry would say it at "backend")."""
    if not min_backend or not backend or backend == "auto":
        return
    from corral.backends.registry import strength_of

    if _at(where["--backend"], strength_of, backend) < _at(where["--min-backend"], strength_of, min_backend):
        raise ConfigError(f"{backend!r} is weaker than the required minimum {min_backend!r} "
                          f"({where['--min-backend']})", where=where["--backend"])  # fmt: skip


_LIMIT_FLAGS = (
    ("--memory", "memory"), ("--output", "output"), ("--file-size", "file_size"), ("--timeout", "timeout"),
    ("--pids", "pids"), ("--open-files", "open_files"), ("--cpus", "cpus"),
)  # fmt: skip
_TEXT_LIMITS = ("memory", "output", "file_size", "timeout")


def _at(flag: str, make: Callable[..., T], *args: object, **kwargs: object) -> T:
    """`make(...)`, with a ConfigError it raises said at `flag` instead of at the policy's field."""
    from corral.policy.model import relocated

    try:
        return make(*args, **kwargs)
    except ConfigError as exc:
        raise relocated(exc, flag) from None


def split_own_flags(
    args: list[str], own: dict[str, bool], *, repeatable: tuple[str, ...] = ()
) -> tuple[dict[str, object], set[str], list[str]]:
    """Separate a subcommand's own flags (`own`: flag -> takes a value) from `corral run`'s policy
    flags. Returns (values, switches, the remaining arguments for `parse_run_args`)."""
    values: dict[str, object] = {}
    switches: set[str] = set()
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, value = arg.partition("=")
        if flag in own:
            if not own[flag]:
                switches.add(flag)
            else:
                if not eq:
                    i += 1
                    if i >= len(args):
                        raise ConfigError("needs a value", where=flag)
                    value = args[i]
                if flag in repeatable:
                    existing = values.setdefault(flag, [])
                    assert isinstance(existing, list)
                    existing.append(value)
                else:
                    values[flag] = value
        else:
            rest.append(arg)
            spec = RUN_FLAGS.get(flag)
            if spec is not None and spec[0] is not None and not eq and i + 1 < len(args):
                i += 1
                rest.append(args[i])
        i += 1
    return values, switches, rest


def _opt(opts: dict[str, object], name: str) -> str | None:
    value = opts.get(name)
    return value if isinstance(value, str) else None


def _list(opts: dict[str, object], name: str) -> list[str]:
    value = opts.get(name, [])
    return [str(v) for v in value] if isinstance(value, list) else []


def _number(text: str, flag: str, *, integer: bool) -> float:
    from corral.units import parse_number

    value = parse_number(text, where=flag, integer=integer)  # ASCII digits only: a fullwidth zero was uid 0
    if value <= 0 and flag != "--uid":
        raise ConfigError(f"must be positive, got {text}", where=flag)
    return value


def run_command(args: list[str]) -> int:
    try:
        opts, command = parse_run_args(args)
    except CorralError as exc:
        if "--json" in (args[: args.index("--")] if "--" in args else args):
            _json_error(exc)
        raise
    if opts.get("--help"):
        print(run_help())
        return 0
    if not command:
        _error("no command given (corral run [FLAGS] -- CMD ARGS...)")
        return EXIT_USAGE
    try:
        return _run(opts, command)
    except CorralError as exc:
        # Scripts that parse stdout get an answer too; the one line on stderr is main's.
        if opts.get("--json"):
            _json_error(exc)
        raise


def _json_error(exc: CorralError) -> None:
    import json

    print(json.dumps({"error": str(exc).removeprefix("corral "), "exit": exc.exit_code}, indent=2))  # as _error says it


def _run(opts: dict[str, object], command: list[str]) -> int:
    _prefetch_cgroup_attach(opts)
    from corral.backends import registry
    from corral.backends.base import check_supported, without_unenforced_limits
    from corral.policy.resolve import resolve
    from corral.sandbox import _Guard, new_id

    policy, backend_name, min_backend, audit_path = build_policy(opts)
    if min_backend and backend_name in (None, "auto"):  # said at the flag, before the registry says it
        registry.check_auto_reaches(min_backend, where="--min-backend" if "--min-backend" in opts else "min_backend",
                                    option="--backend ")  # fmt: skip
    rp = resolve(policy)  # type: ignore[arg-type]
    backend, caps = registry.choose(backend_name or "auto", min_backend=min_backend)
    weaker = check_supported(caps, rp, allow_weaker=bool(opts.get("--allow-weaker")))
    if weaker:
        _error(f"warning: backend {backend.name} does not enforce: {'; '.join(weaker)}")
        rp = without_unenforced_limits(caps, rp)
    audit = None
    if audit_path:
        from corral.audit import AuditLog, check_outside_zones

        where = "--audit" if "--audit" in opts else "audit"
        check_outside_zones(audit_path, rp.zones, where=where)
        audit = AuditLog(audit_path, where=where)
    sandbox_id = new_id()
    guard = _Guard(rp, sandbox_id=sandbox_id, backend=backend.name, audit=audit, approver=None, weaker=weaker)
    try:
        result = guard.admit(command, rp.cwd)
        if result is None:
            as_json = bool(opts.get("--json"))
            # Output goes straight to our stdout/stderr unless it must be captured or counted.
            output = None if (as_json or rp.limits.output is not None) else (1, 2)
            shown = bytearray()  # the start of the stderr forwarded, which may hold bubblewrap's message
            forward = None if as_json else _forwarder(shown)
            try:
                result = backend.run(
                    rp, command, sandbox_id=sandbox_id, stdin=0, output=output, on_output=forward, events=guard.emit
                )
            except LaunchError as exc:
                raise _said_once(exc, shown) from exc.__cause__
        guard.record_exec(command, rp.cwd, result)
    finally:
        guard.finish()  # the sandbox.stop of a run that raised
        if audit is not None:
            audit.close()
    return _report(result, backend.name, sandbox_id, as_json=bool(opts.get("--json")))


def _prefetch_cgroup_attach(opts: dict[str, object]) -> None:
    """As root, limits go through cgroups: start the attach's kernel wait now, while the rest of
    corral loads (see `start_attach_prefetch`). On a v1 host only a memory or cpu limit needs the
    attach (the flags tell; a config's limits get the later start that launching gives them)."""
    import os

    if os.geteuid() == 0:
        from corral.kernel.cgroupfs import start_attach_prefetch

        start_attach_prefetch(unless_v1=not (opts.get("--memory") or opts.get("--cpus")))


def _forward(stream: str, chunk: bytes) -> None:
    out = sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer
    out.write(chunk)
    out.flush()


def _forwarder(shown: bytearray) -> Callable[[str, bytes], None]:
    """`_forward`, keeping the first 64 KiB of stderr in `shown`."""

    def forward(stream: str, chunk: bytes) -> None:
        if stream == "stderr" and len(shown) < 65536:
            shown.extend(chunk[: 65536 - len(shown)])
        _forward(stream, chunk)

    return forward


def _said_once(exc: LaunchError, shown: bytes | bytearray) -> LaunchError:
    """A start-up failure whose message quotes bubblewrap's stderr, which the user saw already as
    it was forwarded: point at it rather than say it twice (as when stderr is not captured)."""
    said = shown.decode(errors="replace").strip()
    text = str(exc)
    if said and text.endswith(f": {said}"):
        return LaunchError(f"{text[: -len(said)]}see the messages above")
    return exc


def _report(result: Result, backend: str, sandbox_id: str, *, as_json: bool) -> int:
    if as_json:
        import json

        print(json.dumps({**result.as_json(), "backend": backend, "sandbox": sandbox_id}, indent=2))
    elif result.reason == "denied":
        sys.stderr.buffer.write(result.stderr)
    elif result.reason != "exited" and not result.stderr.endswith(f"corral: {result.detail}\n".encode()):
        _error(result.detail)  # unless it is the command's stderr already (one that never started)
    if result.note and not as_json:
        _error(f"note: {result.note}")
    if result.reason == "denied":
        return 122
    if result.reason == "timeout":
        return EXIT_TIMEOUT
    code = result.returncode
    if code is None:
        return EXIT_CORRAL_FAILURE
    return 128 + -code if code < 0 else code
