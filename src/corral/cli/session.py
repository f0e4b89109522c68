"""`corral session ...`: persistent workspaces from the command line.

    corral session start --name fix --project ~/src/app [policy flags as for corral run]
    corral session exec fix -- make test
    corral session tool fix edit_file src/app.py 'retries = 1' 'retries = 3'
    corral session diff fix            corral session log fix
    corral session rollback fix 2      corral session sync fix [--yes] [--delete] [PATHS...]
    corral session list                corral session rm fix

Every subcommand takes `--json` (one JSON document on stdout, for programs); otherwise output is for
people (tables and a coloured diff on a terminal).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

from rich.console import Console

from corral.errors import EXIT_USAGE, ConfigError, SessionError, SessionNameError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator

    from corral.session import Session
    from corral.session.session import RecordedSteps

USAGE = """usage: corral session COMMAND [ARGS]

commands:
  start [--name N] [--project DIR] [--exclude PATTERN]... [--include-git] [--mount PATH] [POLICY FLAGS]
                                      copy a project into a new persistent session (policy flags as for
                                      corral run: --profile, --zone, --net, --memory, --deny-command, ...)
  exec NAME [--timeout T] -- CMD...   run a command in the session's sandbox (a step)
  tool NAME TOOL ARGS...              call an agent tool: read_file, write_file, edit_file, list_dir,
                                      search, bash (corral session tool NAME TOOL --help)
  diff NAME [--step K | --since K] [--stat]
                                      what changed (one step, or since a step; default: since copy-in)
  log NAME                            the steps
  rollback NAME STEP                  return the workspace to STEP (itself a new step)
  sync NAME [--yes] [--delete] [--dry-run] [PATHS...]
                                      write the changes back to the project (asks unless --yes)
  list                                the sessions
  rm NAME [--yes]                     delete a session (asks first when it holds unsynced changes)

Every command takes --json. Sessions live in $XDG_DATA_HOME/corral/sessions (~/.local/share/...)."""

_START_FLAGS = {"--name": True, "--project": True, "--exclude": True, "--mount": True, "--include-git": False,
                "--json": False}  # fmt: skip


def session_command(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if args else EXIT_USAGE
    command, rest = args[0], args[1:]
    handler = _COMMANDS.get(command)
    if handler is None:
        raise ConfigError(f"unknown session command {command!r} (see corral session --help)", where="corral session")
    return handler(rest)


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2, default=str))


def _console() -> Console:
    return Console(highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------------------- start
def _start(args: list[str]) -> int:
    from corral.cli.main import build_policy, parse_run_args, split_own_flags
    from corral.session import Session

    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    own, switches, run_args = split_own_flags(args, _START_FLAGS, repeatable=("--exclude",))
    values = {k: str(v) for k, v in own.items() if not isinstance(v, list)}
    raw_excludes = own.get("--exclude")
    excludes = [str(x) for x in raw_excludes] if isinstance(raw_excludes, list) else []
    opts, command = parse_run_args(run_args)
    if command:
        raise ConfigError(f"unexpected argument {command[0]!r}", where="corral session start")
    project = os.path.realpath(values.get("--project", "."))
    policy, backend, min_backend, audit = build_policy(opts, workspace=project)
    session = Session(
        project,
        name=values.get("--name") or _default_name(project),
        policy=policy,  # type: ignore[arg-type]
        backend=backend or "auto",
        min_backend=min_backend,
        allow_weaker=bool(opts.get("--allow-weaker")),
        excludes=excludes,
        include_git="--include-git" in switches,
        mount=values.get("--mount"),
        audit=audit,
    )
    with session:
        report = session.copy_report
        info = {"name": session.name, "project": session.project, "workspace": session.workspace,
                "mount": session.mount, "backend": session.sandbox.backend, "path": session.path,
                "copy": report.as_json() if report else None}  # fmt: skip
    if "--json" in switches:
        _print_json(info)
    else:
        copied = f"{report.files} files, {report.bytes / 1e6:.1f} MB in {report.seconds:.2f}s" if report else ""
        print(f"session {info['name']}: {copied}")
        print(f"  project   {info['project']}")
        print(f"  workspace {info['workspace']} (seen at {info['mount']} in the sandbox, backend {info['backend']})")
        if report and report.skipped:
            print(f"  skipped   {len(report.skipped)}: {'; '.join(report.skipped[:5])}")
        print(f"next: corral session exec {info['name']} -- CMD   |   corral session diff {info['name']}")
    return 0


def _default_name(project: str) -> str:
    import re

    from corral.session import sessions_dir

    stem = re.sub(r"[^A-Za-z0-9._-]", "-", os.path.basename(project) or "project").lstrip(".-_") or "project"
    stem = stem[:40]
    base = sessions_dir()
    for n in range(1, 1000):
        name = stem if n == 1 else f"{stem}-{n}"
        if not os.path.exists(os.path.join(base, name)):
            return name
    return f"{stem}-{os.urandom(3).hex()}"


# ---------------------------------------------------------------------------------------- exec, tool
def _exec(args: list[str]) -> int:
    from corral.session import Session

    if "--" in args:
        split = args.index("--")
        head, command = args[:split], args[split + 1 :]
    else:
        head, command = args[:1], args[1:]
    parser = argparse.ArgumentParser(prog="corral session exec", description="Run a command in a session.")
    parser.add_argument("name")
    parser.add_argument("--timeout", type=_duration, help="time before the command is killed (30s, 2m, 1h)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON (output captured)")
    opts = parser.parse_args(head)
    if not command:
        raise ConfigError("no command given (corral session exec NAME -- CMD ARGS...)", where="corral session exec")
    with Session.open(opts.name) as session:
        forward = None if opts.json else _forward
        result = session.exec(command, timeout=opts.timeout, on_output=forward)
    if opts.json:
        _print_json(result.as_json())
    elif result.reason == "denied":
        sys.stderr.write(result.stderr + ("\n" if not result.stderr.endswith("\n") else ""))
    elif result.reason != "exited":
        sys.stderr.write(f"corral: {result.detail}\n")
    if result.result.note and not opts.json:
        sys.stderr.write(f"corral: note: {result.result.note}\n")
    return _exit_code(result.reason, result.returncode)


def _forward(stream: str, chunk: bytes) -> None:
    out = sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer
    out.write(chunk)
    out.flush()


def _exit_code(reason: str, code: int | None) -> int:
    if reason == "denied":
        return 122
    if reason == "timeout":
        return 124
    if code is None:
        return 125
    return 128 - code if code < 0 else code


def _duration(text: str) -> float:
    """A --timeout as `corral run` takes it: 30s, 500ms, 2m, 1h, or seconds."""
    from corral.units import parse_duration

    return parse_duration(text, where="--timeout")


def _tool_parser(tool: str) -> argparse.ArgumentParser:
    from corral.session.tools import SPECS

    spec = SPECS[tool]
    parser = argparse.ArgumentParser(prog=f"corral session tool NAME {tool}", description=spec.description)
    for param in spec.params:
        kind = _duration if param.name == "timeout" else {"integer": int, "number": float}.get(param.kind, str)
        if param.required:
            help_text = param.description + (" ('-' reads standard input)" if param.name == "content" else "")
            if param.kind == "array":
                parser.add_argument(param.name, nargs="+", help=help_text)
            else:
                parser.add_argument(param.name, type=kind, help=help_text)
        elif param.kind == "boolean":
            parser.add_argument(f"--{param.name.replace('_', '-')}", dest=param.name, action="store_true",
                                help=param.description)  # fmt: skip
        elif param.name == "path" and tool in ("list_dir", "search"):
            parser.add_argument(param.name, nargs="?", default=None, help=param.description)
        else:
            parser.add_argument(f"--{param.name.replace('_', '-')}", dest=param.name, type=kind,
                                help=param.description)  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def _tool(args: list[str]) -> int:
    from corral.session import Session
    from corral.session.tools import SPECS

    if len(args) < 2 or args[0] in ("-h", "--help"):
        print("usage: corral session tool NAME TOOL ARGS... [--json]\n\ntools: " + ", ".join(
            t for t in SPECS if t != "exec"))  # fmt: skip
        return 0 if args and args[0] in ("-h", "--help") else EXIT_USAGE
    name, tool = args[0], args[1]
    if tool not in SPECS:
        raise ConfigError(f"unknown tool {tool!r}; the tools are {', '.join(SPECS)}", where="corral session tool")
    opts = vars(_tool_parser(tool).parse_args(args[2:]))
    as_json = bool(opts.pop("json"))
    call = {k: v for k, v in opts.items() if v is not None}
    if call.get("content") == "-":
        call["content"] = sys.stdin.buffer.read().decode("utf-8", "surrogateescape")
    with Session.open(name) as session:
        result = session.call(tool, call)
    data = result.as_json()
    if as_json:
        _print_json({"tool": tool, **data})
        return 0 if tool not in ("bash", "exec") else _exit_code(str(data["reason"]), _int(data["returncode"]))
    return _render_tool(tool, data)


def _int(value: object) -> int | None:
    return value if isinstance(value, int) else None


def _render_tool(tool: str, data: dict[str, object]) -> int:
    if tool == "read_file":
        sys.stdout.write(str(data["text"]))
        if data["truncated"]:
            sys.stderr.write(f"corral: lines {data['start_line']}-{data['end_line']} of {data['total_lines']} "
                             "(use --offset/--limit for more)\n")  # fmt: skip
    elif tool in ("write_file", "edit_file"):
        what = "wrote" if tool == "write_file" else f"replaced {data['replacements']} occurrence(s) in"
        print(f"{what} {data['path']} ({data['size']} bytes): step {data['step']}")
    elif tool == "list_dir":
        entries = data["entries"]
        assert isinstance(entries, list)
        for entry in entries:
            size = "" if entry["size"] is None else str(entry["size"])
            target = f" -> {entry['target']}" if entry["target"] else ""
            suffix = "/" if entry["kind"] == "dir" else ""
            print(f"{entry['kind']:<5} {size:>10}  {entry['path']}{suffix}{target}")
        if data["truncated"]:
            print("... (truncated)")
    elif tool == "search":
        matches = data["matches"]
        assert isinstance(matches, list)
        for match in matches:
            print(f"{match['path']}:{match['line']}: {match['text']}")
        if data["truncated"]:
            print("... (more matches)")
    else:  # bash, exec
        sys.stdout.write(str(data["stdout"]))
        sys.stderr.write(str(data["stderr"]))
        if data["reason"] not in ("exited", "denied"):
            sys.stderr.write(f"corral: {data['detail']}\n")
        return _exit_code(str(data["reason"]), _int(data["returncode"]))
    return 0


# ---------------------------------------------------------------------------------------- review
@contextlib.contextmanager
def _for_review(name: str) -> Iterator[Session | RecordedSteps]:
    """The session, opened; or, while another process (an agent) holds it, its recorded steps,
    read without the lock: the user can follow the agent without stopping it."""
    from corral.session import Session
    from corral.session import store as st
    from corral.session.session import RecordedSteps

    if st.in_use(st.session_path(name)):
        sys.stderr.write(f"corral: note: session {name!r} is in use: showing its recorded steps (a call "
                         "still running is not among them yet)\n")  # fmt: skip
        yield RecordedSteps(name)
        return
    with Session.open(name) as session:
        yield session


def _diff(args: list[str]) -> int:

    parser = argparse.ArgumentParser(prog="corral session diff", description="What a session changed.")
    parser.add_argument("name")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--step", type=int, help="only what this step changed")
    group.add_argument("--since", type=int, help="everything after this step (default 0: the copy-in)")
    parser.add_argument("--stat", action="store_true", help="the summary only, no diff")
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args(args)
    with _for_review(opts.name) as session:
        changes = session.changes(opts.step, since=opts.since, patch=not opts.stat)
    if opts.json:
        _print_json(changes.as_json())
        return 0
    from rich.table import Table
    from rich.text import Text

    console = _console()
    title = f"step {changes.until}" if opts.step is not None else f"steps {changes.since}..{changes.until}"
    if not changes.files:
        console.print(f"{title}: no changes")
        return 0
    table = Table(title=f"{title}: {changes.summary()}", title_justify="left")
    table.add_column("file")
    table.add_column("change")
    table.add_column("+", justify="right", style="green")
    table.add_column("-", justify="right", style="red")
    for f in changes.files:
        table.add_row(Text(f.path), f.status, "bin" if f.binary else str(f.insertions), "" if f.binary else
                      str(f.deletions))  # fmt: skip
    console.print(table)
    if changes.diff:
        text = Text()
        for line in changes.diff.splitlines(keepends=True):
            style = ""
            if line.startswith(("diff --git", "index ", "+++", "---", "new file", "deleted file")):
                style = "bold"
            elif line.startswith("+"):
                style = "green"
            elif line.startswith("-"):
                style = "red"
            elif line.startswith("@@"):
                style = "cyan"
            text.append(line, style=style)
        console.print(text, end="")
    return 0


def _log(args: list[str]) -> int:

    parser = argparse.ArgumentParser(prog="corral session log", description="The steps of a session.")
    parser.add_argument("name")
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args(args)
    with _for_review(opts.name) as session:
        steps = session.log()
    if opts.json:
        _print_json([s.as_json() for s in steps])
        return 0
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"session {opts.name}", title_justify="left")
    for column, justify in (("step", "right"), ("time", "left"), ("tool", "left"), ("what", "left"),
                            ("files", "right"), ("exit", "right")):  # fmt: skip
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for step in steps:
        exit_code = step.details.get("exit")
        reason = step.details.get("reason")
        shown_exit = "" if exit_code is None and reason is None else str(exit_code if reason == "exited" else reason)
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(step.time))
        table.add_row(str(step.number), when, step.tool, Text(step.summary), str(step.details.get("files", "")),
                      shown_exit)  # fmt: skip
    _console().print(table)
    return 0


def _rollback(args: list[str]) -> int:
    from corral.session import Session

    parser = argparse.ArgumentParser(prog="corral session rollback", description="Return to an earlier step.")
    parser.add_argument("name")
    parser.add_argument("step", type=int)
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args(args)
    with Session.open(opts.name) as session:
        number = session.rollback(opts.step)
    if opts.json:
        _print_json({"rolled_back_to": opts.step, "step": number})
    else:
        print(f"workspace back at step {opts.step} (recorded as step {number})")
    return 0


def _sync(args: list[str]) -> int:
    from corral.session import Session, SyncReport

    parser = argparse.ArgumentParser(prog="corral session sync", description="Write a session's changes back to "
                                     "its project, after showing them. A relative PATH is taken from the current "
                                     "directory when that is inside the project, else from the project's "
                                     "root.")  # fmt: skip
    parser.add_argument("name")
    parser.add_argument("paths", nargs="*", help="only these files or directories (default: every change)")
    parser.add_argument("--yes", "-y", action="store_true", help="do not ask")
    parser.add_argument("--delete", action="store_true", help="also delete files the session deleted")
    parser.add_argument("--dry-run", action="store_true", help="only show what would be done")
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_intermixed_args(args)
    if any(not p for p in opts.paths):
        raise ConfigError("an empty PATH names nothing (to sync everything, give no PATH, or .)",
                          where="corral session sync")  # fmt: skip
    with Session.open(opts.name) as session:
        paths = _sync_paths(opts.paths, session.project) if opts.paths else None
        plan = session.sync(paths, delete=opts.delete, dry_run=True)
        _check_sync_paths(session, opts.paths, paths or [], plan)
        pending = plan.with_status("pending")
        if opts.dry_run or (not pending and not opts.yes):
            # Nothing written: a dry run, or nothing to write (so nothing to ask about).
            report = plan if opts.dry_run else SyncReport(items=plan.items, dry_run=False, step=plan.step)
            if opts.json:
                _print_json(report.as_json())
            else:
                _show_sync(report, session.project)
            return 0 if not plan.conflicts else 1
        if pending and not opts.yes:
            if opts.json or not sys.stdin.isatty():
                raise ConfigError("sync writes to the project: pass --yes to confirm (or --dry-run to look)",
                                  where="corral session sync")  # fmt: skip
            _show_sync(plan, session.project)
            answer = input(f"write {len(pending)} change(s) to {session.project}? [y/N] ").strip().lower()
            if answer not in ("y", "yes"):
                print("nothing written")
                return 1
        report = session.sync(paths, delete=opts.delete)
    if opts.json:
        _print_json(report.as_json())
    else:
        _show_sync(report, session.project)
    return 1 if report.with_status("conflict", "failed") else 0


def _sync_paths(paths: list[str], project: str) -> list[str]:
    """The PATHS given to `corral session sync`, as `Session.sync` takes them (relative to the project's
    root, or absolute in the sandbox's view): a relative PATH is taken from the current directory when
    that is inside the project, else from the project's root; an absolute one inside the project is
    made relative to it (others are left for `Session.sync`, which reads them in the sandbox's view)."""
    root = os.path.realpath(project)

    def within(path: str) -> bool:
        return path == root or path.startswith(root.rstrip("/") + "/")

    try:
        cwd: str | None = os.getcwd()
    except FileNotFoundError:
        cwd = None
    out = []
    for path in paths:
        if os.path.isabs(path):
            full = os.path.normpath(path)
            if not within(full):
                out.append(path)
                continue
        elif cwd is not None and within(cwd):
            full = os.path.normpath(os.path.join(cwd, path))
            if not within(full):
                raise ConfigError(f"{path} is not in the project", where="sync paths")
        else:
            out.append(path)
            continue
        out.append(os.path.relpath(full, root))
    return out


def _check_sync_paths(session: object, given: list[str], paths: list[str], plan: object) -> None:
    """A PATH that matches no change is an error when it names nothing the session or the project has
    (a typo, say); one that names an unchanged file or directory just has nothing to sync."""
    from corral.session import Session, SyncReport
    from corral.session.session import _sync_path

    assert isinstance(session, Session) and isinstance(plan, SyncReport)
    changed = [os.fsencode(i.path) for i in plan.items]
    recorded: list[bytes] | None = None
    for shown, path in zip(given, paths, strict=True):
        rel = _sync_path(path, session.mount)
        if not rel or any(c == rel or c.startswith(rel + b"/") for c in changed):
            continue
        if recorded is None:
            recorded = list(session.tree.flat())
        known = any(r == rel or r.startswith(rel + b"/") for r in recorded)
        if not known and not os.path.lexists(os.path.join(os.fsencode(session.project), rel)):
            raise ConfigError(f"{shown} matches no change", where="corral session sync")


def _show_sync(report: object, project: str) -> None:
    from rich.table import Table
    from rich.text import Text

    from corral.session import SyncReport

    assert isinstance(report, SyncReport)
    if report.with_status("pending", "written", "deleted"):
        title = f"{'would sync' if report.dry_run else 'synced'} step {report.step} to {project}"
    else:
        title = f"nothing {'to sync' if report.dry_run else 'synced'} from step {report.step} to {project}"
    if not report.items:
        print(title)
        return
    table = Table(title=title, title_justify="left")
    table.add_column("file")
    table.add_column("action")
    table.add_column("status")
    table.add_column("why")
    colours = {"written": "green", "deleted": "green", "pending": "yellow", "conflict": "red", "failed": "red",
               "skipped": "magenta", "unchanged": "dim"}  # fmt: skip
    for item in report.items:
        table.add_row(Text(item.path), item.action, Text(item.status, style=colours.get(item.status, "")),
                      Text(item.reason))  # fmt: skip
    _console().print(table)


# ---------------------------------------------------------------------------------------- list, rm
def _list(args: list[str]) -> int:
    from corral.session import list_sessions

    parser = argparse.ArgumentParser(prog="corral session list", description="The sessions on this machine.")
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args(args)
    sessions = list_sessions()
    if opts.json:
        _print_json([s.as_json() for s in sessions])
        return 0
    if not sessions:
        print("no sessions (corral session start --name NAME --project DIR)")
        return 0
    from rich.table import Table
    from rich.text import Text

    table = Table()
    for column in ("name", "project", "steps", "created", "in use"):
        table.add_column(column)
    for s in sessions:
        table.add_row(s.name, Text(s.project), str(s.steps), s.created, "yes" if s.in_use else "")
    _console().print(table)
    return 0


def _rm(args: list[str]) -> int:
    from corral.session import remove_session

    parser = argparse.ArgumentParser(prog="corral session rm", description="Delete sessions (asks first when one "
                                     "holds changes not synced to its project, unless --yes).")  # fmt: skip
    parser.add_argument("names", nargs="+")
    parser.add_argument("--yes", "-y", action="store_true", help="delete unsynced changes without asking")
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args(args)
    for name in opts.names:
        if not opts.yes:
            _confirm_discard(name, interactive=not opts.json and sys.stdin.isatty())
    for name in opts.names:
        remove_session(name)
    if opts.json:
        _print_json({"removed": opts.names})
    else:
        print("removed " + ", ".join(opts.names))
    return 0


def _confirm_discard(name: str, *, interactive: bool) -> None:
    """Raise unless the session holds no change the project lacks, or the user says to drop them:
    the agent's work in a session is the user's data too."""
    from corral.session import Session

    try:
        with Session.open(name) as session:
            pending = session.sync(None, delete=True, dry_run=True).with_status("pending", "conflict")
            project = session.project
    except SessionNameError:
        raise
    except SessionError as exc:  # its project gone, its history damaged, ...: nothing to compare with
        raise SessionError(f"cannot tell whether session {name!r} holds unsynced changes ({exc}); "
                           "pass --yes to delete it anyway") from None  # fmt: skip
    if not pending:
        return
    what = f"session {name!r} holds {len(pending)} change(s) not synced to {project}"
    if not interactive:
        raise ConfigError(f"{what}: sync them first, or pass --yes to delete them", where="corral session rm")
    answer = input(f"{what}; delete them with the session? [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        raise ConfigError(f"{name!r} kept", where="corral session rm")


_COMMANDS = {
    "start": _start,
    "exec": _exec,
    "tool": _tool,
    "diff": _diff,
    "log": _log,
    "rollback": _rollback,
    "sync": _sync,
    "list": _list,
    "ls": _list,
    "rm": _rm,
}
