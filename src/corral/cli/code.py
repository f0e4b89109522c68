"""`corral run-code`: run Python code (a file, `-c CODE`, or `-` for stdin) in a fresh sandbox.

Takes every `corral run` flag (zones, limits, --backend, --json, ...) plus `-c CODE`, `--fuel N`
and `--language NAME`. The backend defaults to wasm where it works (see corral.code).
"""

from __future__ import annotations

import sys

from corral.errors import EXIT_USAGE, ConfigError

OWN_FLAGS: dict[str, tuple[str | None, str]] = {
    "-c": ("CODE", "the code to run (instead of a file)"),
    "--fuel": ("N", "wasm only: stop after N units of executed work (deterministic, on top of --timeout)"),
    "--language": ("NAME", "the code's language: python (the default, and the only one for now)"),
}


def run_code_help() -> str:
    from corral.cli.main import RUN_FLAGS

    lines = [
        "usage: corral run-code [FLAGS] (FILE.py | -c CODE | -) [ARGS...]",
        "",
        "Run Python code in a fresh sandbox: under the wasm backend in a WebAssembly build of CPython",
        "(the default where it works), under any other backend in the sandbox's python3.",
        "",
        "flags:",
    ]
    for flag, (metavar, text) in OWN_FLAGS.items():
        lines.append(f"  {flag + ' ' + (metavar or ''):<34} {text}")
    for flag, (metavar, repeat, text) in RUN_FLAGS.items():
        left = f"{flag} {metavar}" if metavar else flag
        lines.append(f"  {left:<34} {text}{' (repeatable)' if repeat else ''}")
    return "\n".join(lines)


def split_args(args: list[str]) -> tuple[dict[str, str], list[str], list[str]]:
    """(our own flags, `corral run` flags, the rest: FILE and its arguments)."""
    from corral.cli.main import RUN_FLAGS

    own: dict[str, str] = {}
    run_flags: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return own, run_flags, args[i + 1 :]
        if not arg.startswith("-") or arg == "-":
            return own, run_flags, args[i:]
        name, eq, value = arg.partition("=")
        if name in OWN_FLAGS:
            if not eq:
                i += 1
                if i >= len(args):
                    raise ConfigError(f"needs a value ({OWN_FLAGS[name][0]})", where=name)
                value = args[i]
            own[name] = value
            if name == "-c":  # like python -c: what follows are the code's arguments
                return own, run_flags, args[i + 1 :]
        else:
            run_flags.append(arg)
            spec = RUN_FLAGS.get(name)
            if spec is not None and spec[0] is not None and not eq and i + 1 < len(args):
                i += 1
                run_flags.append(args[i])
        i += 1
    return own, run_flags, []


def run_code_command(args: list[str]) -> int:
    from corral.cli.main import _error, _forward, _report, build_policy, parse_run_args

    if any(a in ("-h", "--help") for a in args[:1]) or args == []:
        print(run_code_help())
        return 0 if args else EXIT_USAGE
    own, run_flags, rest = split_args(args)
    opts, leftover = parse_run_args(run_flags)
    if opts.get("--help"):
        print(run_code_help())
        return 0
    assert not leftover
    stdin: int | None = 0
    if "-c" in own:
        code, code_args = own["-c"], rest
    elif rest:
        source, code_args = rest[0], rest[1:]
        if source == "-":
            code, stdin = sys.stdin.read(), None
        else:
            try:
                with open(source, encoding="utf-8") as f:
                    code = f.read()
            except OSError as exc:
                raise ConfigError(f"cannot read {source}: {exc.strerror}", where="run-code") from None
            except UnicodeDecodeError:
                raise ConfigError(f"{source} is not UTF-8 text", where="run-code") from None
    else:
        _error("no code given (corral run-code [FLAGS] FILE.py | -c CODE | -)")
        return EXIT_USAGE
    fuel = None
    if "--fuel" in own:
        try:
            fuel = int(own["--fuel"])
        except ValueError:
            raise ConfigError(f"expected a whole number, got {own['--fuel']!r}", where="--fuel") from None
    from corral.code import execute_code

    policy, backend_name, min_backend, audit_path = build_policy(opts)
    as_json = bool(opts.get("--json"))
    output = None if (as_json or policy.limits.output is not None) else (1, 2)  # type: ignore[attr-defined]
    result, backend, sandbox_id = execute_code(
        code, language=own.get("--language", "python"), policy=policy,  # type: ignore[arg-type]
        backend=backend_name or "auto", args=code_args, stdin=stdin, min_backend=min_backend,
        allow_weaker=bool(opts.get("--allow-weaker")), audit=audit_path, fuel=fuel,
        on_output=None if as_json else _forward, output=output, warn=_error,
    )  # fmt: skip
    return _report(result, backend, sandbox_id, as_json=as_json)
