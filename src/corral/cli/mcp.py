"""`corral mcp --project DIR [policy flags] [--session NAME] [--http HOST:PORT] [--allow-sync]`."""

from __future__ import annotations

import os
import sys

from corral.errors import ConfigError, CorralError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from corral.session import Session

USAGE = """usage: corral mcp [--project DIR] [--session NAME] [--http HOST:PORT [--allow-remote --token T]]
                  [--allow-sync] [--exclude PATTERN] [corral run's policy flags]

Serve a sandboxed workspace session's tools (read_file, write_file, edit_file, list_dir, search, bash,
changes, log, rollback, and sync with --allow-sync) to an MCP client, over stdio by default.

  --project DIR        the project to copy into the session (default: the current directory)
  --session NAME       a persistent session: resumed if it exists, created otherwise
  --http HOST:PORT     serve streamable HTTP instead of stdio (loopback only, unless --allow-remote)
  --allow-remote       accept a non-loopback address (needs --token or CORRAL_MCP_TOKEN)
  --token TOKEN        the bearer token HTTP clients must send
  --allow-sync         offer the sync tool (by default the human syncs with `corral session sync`)
  --exclude PATTERN    leave matching files out of the copy (repeatable)
Policy flags (--profile, --config, --zone, --net, --memory, --timeout, --deny-command, ...) are
those of `corral run --help`."""

_FLAGS = {"--project": True, "--session": True, "--http": True, "--allow-remote": False, "--token": True,
          "--allow-sync": False, "--exclude": True}  # fmt: skip


def mcp_command(args: list[str]) -> int:
    from corral.cli.main import build_policy, parse_run_args, split_own_flags

    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    values, switches, run_args = split_own_flags(args, _FLAGS, repeatable=("--exclude",))
    try:
        opts, command = parse_run_args(run_args)
    except ConfigError as exc:  # the policy flags are corral run's, the mistake is in this command line
        message = str(exc).removeprefix(f"{exc.where}: ").replace("corral run --help", "corral mcp --help")
        raise ConfigError(message, where="corral mcp" if exc.where == "corral run" else exc.where) from None
    if command:
        raise ConfigError(f"unexpected argument {command[0]!r}", where="corral mcp")
    project = os.path.realpath(str(values.get("--project") or "."))
    token = str(values.get("--token") or os.environ.get("CORRAL_MCP_TOKEN") or "") or None
    bind = None
    if values.get("--http"):
        from corral.mcp.serve import check_bind, parse_bind

        bind = parse_bind(str(values["--http"]))
        check_bind(bind[0], allow_remote="--allow-remote" in switches, token=token)
    policy, backend, min_backend, audit = build_policy(opts, workspace=project)

    try:
        from corral.mcp.server import CorralMCP
    except ImportError as exc:
        raise ConfigError(f"the MCP server needs the mcp package ({exc}): pip install 'corral[mcp]'",
                          where="corral mcp") from None  # fmt: skip
    from corral.session import Session

    holder: list[CorralMCP] = []

    def approver(request):  # type: ignore[no-untyped-def]
        return holder[0].approve(request) if holder else False

    name = values.get("--session")
    existing = {s.name: s for s in Session.list()}.get(str(name)) if name else None
    if existing is not None:
        # A resumed session keeps its project and the policy it was started with: flags that would
        # change them (a tighter policy in the client's config, say) must not be dropped in silence.
        moved = values.get("--project") and project != existing.project
        if run_args or values.get("--exclude") or moved:
            given = "--project" if moved else ("--exclude" if values.get("--exclude") else "policy flags")
            raise ConfigError(f"session {name!r} exists, for {existing.project} with the policy it was started "
                              f"with; {given} cannot change it: drop them, or name a new session (corral session "
                              f"rm {name} removes this one)", where="corral mcp")  # fmt: skip
        session = Session.open(str(name), approver=approver)
    else:
        session = Session(
            project,
            name=str(name) if name else None,
            policy=policy,  # type: ignore[arg-type]
            backend=backend or "auto",
            min_backend=min_backend,
            allow_weaker=bool(opts.get("--allow-weaker")),
            excludes=_strings(values.get("--exclude")),
            audit=audit,
            approver=approver,
        )
    server = CorralMCP(session, allow_sync="--allow-sync" in switches)
    holder.append(server)
    received = _close_on_signals(session)  # uvicorn, serving http, hands them on once it has stopped
    sys.stderr.write(f"corral mcp: session {session.name}, workspace {session.workspace}, "
                     f"backend {session.sandbox.backend}\n")  # fmt: skip
    try:
        if bind is None:
            import anyio

            from corral.mcp.serve import serve_stdio

            anyio.run(serve_stdio, server)
        else:
            from corral.mcp.serve import serve_http

            sys.stderr.write(f"corral mcp: serving http://{bind[0]}:{bind[1]}/mcp\n")
            serve_http(server, host=bind[0], port=bind[1], token=token)
    except KeyboardInterrupt:
        pass
    finally:
        session.close()
    return 128 + received[0] if received else 0


def _close_on_signals(session: Session) -> list[int]:
    """SIGTERM or SIGHUP close the session (a temporary one is deleted) and end the process with
    128 + the signal's number. The work is done in a thread: the stdin reader sits in a thread no
    exception reaches, and a tool call may hold the session, which stopping its sandbox releases."""
    import signal
    import threading

    def close(signum: int) -> None:
        def work() -> None:
            try:  # a command running now ends with its sandbox: the close need not wait for it
                session.sandbox.stop()
            except CorralError:
                pass  # closed already
            session.close()

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        worker.join(10)
        os._exit(128 + signum)

    received: list[int] = []

    def handler(signum: int, frame: object) -> None:
        received.append(signum)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # once is enough
        threading.Thread(target=close, args=(signum,), daemon=True).start()

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)
    return received


def _strings(value: object) -> list[str]:
    return [str(x) for x in value] if isinstance(value, list) else []
