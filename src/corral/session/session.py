"""`corral.Session`: a project copied into a workspace, one live sandbox over it, a git commit per tool call.

    with corral.Session("path/to/project", name="fix-tests") as s:
        s.bash("make test")
        s.edit_file("src/app.py", "retries = 1", "retries = 3")
        print(s.changes().summary())
        s.sync(["src/app.py"])                       # the host project changes only now

    s = corral.Session.open("fix-tests")              # later, in another process, after a reboot

A session owns: the workspace (the sandbox's read-write zone, mounted where the project is, so
paths look the same to the agent), the history (a git repository in no zone), one live `Sandbox`,
an inotify watcher (what each command changed) and the audit log. Tool calls are serialized; each
one that may change files is recorded as a step. Everything is on disk before a call returns, so a
process killed at any moment loses nothing: the next `open` records what the interrupted call did.
"""

from __future__ import annotations

import builtins
import errno
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, TypeVar

from corral.audit import AuditLog, redact_text
from corral.backends.base import Result
from corral.errors import ConfigError, CorralError, SessionError, SessionNameError, ToolError
from corral.policy.model import Policy
from corral.sandbox import Sandbox, new_id
from corral.session import bytecode, tools
from corral.session import store as st
from corral.session.fsafe import Root, Unsafe, remove_tree, split
from corral.session.gitstore import EMPTY_TREE, EXEC, LINK, GitStore
from corral.session.history import Changes, History, Step
from corral.session.ignore import IgnoreChecker
from corral.session.record import Recorder, StatCache, Tree, is_git_name
from corral.session.sync import Journal, SyncReport, load_manifest, save_manifest, sync_tree
from corral.session.watch import Watcher
from corral.session.workspace import CopyReport, build, inside, session_policy_for

if TYPE_CHECKING:
    from corral.sandbox import Approver

log = logging.getLogger(__name__)
T = TypeVar("T")
BASE_REF = "refs/corral/base"
HOST_REF = "refs/corral/host"


class Session:
    """A project's workspace, its history and a live sandbox. See the module docstring.

    Creating one copies `project` into a new workspace. `name` makes it persistent (reopen it with
    `Session.open(name)`); without one it is removed on `close()`. `policy` is any corral policy for
    the project (default `Policy.workspace(project)`): its zone for the project is replaced by the
    workspace, with the same mode. `excludes` are gitignore-style patterns left out of the copy and
    of the history; `include_git` copies the project's `.git` too (never recorded, never synced).
    `mount` is where the workspace appears inside the sandbox (default: the project's own path).
    """

    copy_report: CopyReport | None  # what copy-in did (None for a session opened again)

    def __init__(
        self,
        project: str = ".",
        *,
        name: str | None = None,
        policy: Policy | None = None,
        backend: str = "auto",
        min_backend: str | None = None,
        allow_weaker: bool = False,
        excludes: Sequence[str] = (),
        include_git: bool = False,
        mount: str | None = None,
        audit: str | None = None,
        approver: Approver | None = None,
        data_dir: str | None = None,
    ) -> None:
        ephemeral = name is None
        name = st.check_name(name or f"tmp-{new_id()}")
        project = os.path.realpath(os.path.expanduser(project))
        if not os.path.isdir(project):
            raise ConfigError(f"{project} is not a directory", where="project")
        final = st.session_path(name, data_dir)
        if ephemeral:  # those a killed process could not delete: nothing else ever would
            try:
                st.reap_orphaned_temporaries(data_dir)
            except (OSError, CorralError) as exc:
                log.warning("cannot remove orphaned temporary sessions: %s", exc)
        if os.path.exists(final):
            raise SessionNameError(f"a session named {name!r} exists already: open it, or remove it first")
        from corral.backends import registry

        chosen, caps = registry.choose(backend, min_backend=min_backend)
        remap = "fs.remap" in caps.enforces
        base = os.path.dirname(final)
        if inside(project, base):
            raise ConfigError(f"{project} is inside corral's own session directory", where="project")
        excludes = list(excludes)
        if inside(base, project):  # never copy the sessions (this one included) into themselves
            excludes.append("/" + os.path.relpath(base, project) + "/")
        import tempfile

        try:
            os.makedirs(base, mode=0o700, exist_ok=True)
            building = tempfile.mkdtemp(prefix=f".{name}.new-", dir=base)
        except OSError as exc:
            raise SessionError(f"cannot make a session in {base}: {exc.strerror}") from None
        try:
            workspace = os.path.join(building, "workspace")
            os.mkdir(workspace, 0o755)
            session_policy, sandbox_mount = session_policy_for(
                policy or Policy.workspace(project),
                project=project,
                workspace=os.path.join(final, "workspace"),
                mount=mount,
                remap=remap,
                state_dir=final,
            )
            # Refuse a backend that cannot enforce the policy before copying anything (the check
            # resolves the zones, so the workspace zone names the directory being built).
            ws_zone = session_policy.zones[-1]
            ws_zone = ws_zone.replace(
                host=workspace, mount=workspace if ws_zone.host == ws_zone.mount else ws_zone.mount
            )
            Sandbox(
                session_policy.replace(zones=(*session_policy.zones[:-1], ws_zone)),
                backend=chosen.name,
                min_backend=min_backend,
                allow_weaker=allow_weaker,
            )
            report = build(
                building, project, excludes=excludes, include_git=include_git, base_ref=BASE_REF, host_ref=HOST_REF
            )
            st.write_json(
                os.path.join(building, "state.json"),
                {
                    "version": st.STATE_VERSION,
                    "name": name,
                    "project": project,
                    "mount": sandbox_mount,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "backend": chosen.name,
                    "min_backend": min_backend,
                    "allow_weaker": allow_weaker,
                    "excludes": list(excludes),
                    "include_git": include_git,
                    "ephemeral": ephemeral,
                    "audit": os.path.abspath(audit) if audit else None,
                    "policy": st.policy_to_json(session_policy),
                    "copy": report.as_json(),
                },
            )
            try:
                os.rename(building, final)
            except OSError:
                raise SessionNameError(f"a session named {name!r} was created meanwhile") from None
        except BaseException:
            remove_tree(building)
            raise
        self.copy_report = report
        self._open(final, approver=approver)
        self._event(
            "session.create",
            project=project,
            workspace=self.workspace,
            mount=self.mount,
            backend=chosen.name,
            copy=report.as_json(),
        )

    @classmethod
    def open(cls, name: str, *, approver: Approver | None = None, data_dir: str | None = None) -> Session:
        """Resume a persistent session: a new live sandbox over its workspace and history.

        Changes found in the workspace that no step recorded (an interrupted tool call, an edit by
        hand) are recorded first, as a step of their own.
        """
        directory = st.session_path(name, data_dir)
        if not os.path.isdir(directory):
            raise SessionNameError(f"no session named {name!r} (corral session list shows them)")
        self = cls.__new__(cls)
        self.copy_report = None
        self._open(directory, approver=approver)
        return self

    # ------------------------------------------------------------------------------ life cycle
    def _open(self, directory: str, *, approver: Approver | None) -> None:
        self.path = directory
        self._lock = st.Lock(directory, os.path.basename(directory))
        self._closed = False
        self._mutex = threading.RLock()
        self._sandbox: Sandbox | None = None
        self._opened: list[Callable[[], None]] = [self._lock.release]
        try:
            self._load(approver)
        except BaseException:
            self._release()
            raise

    def _load(self, approver: Approver | None) -> None:
        state = st.read_state(self.path)
        self.name = str(state["name"])
        self.project = str(state["project"])
        self.mount = str(state["mount"])
        self.ephemeral = bool(state.get("ephemeral"))
        self.workspace = os.path.join(self.path, "workspace")
        self.policy = st.policy_from_json(state["policy"])
        audit_path = state.get("audit") or os.path.join(self.path, "audit.jsonl")
        self.audit = AuditLog(str(audit_path))
        self._opened.append(self.audit.close)
        self.store = GitStore(os.path.join(self.path, "history.git"), self.workspace)
        self.history = History(self.store)
        if self.history.head is None:
            raise SessionError(f"session {self.name!r} has no history: it is damaged")
        self.tree = Tree.load(self.store, self.history.tree_of(self.history.last))
        self.cache = StatCache.load(os.path.join(self.path, "statcache"))
        self.root = Root(self.workspace)
        self._opened.append(self.root.close)
        self.ignore = IgnoreChecker(self.store, self.root)
        self._opened.append(self.ignore.close)
        self.recorder = Recorder(self.store, self.root, self.tree, self.cache, self.ignore)
        self.watcher = Watcher(self.root, skip=is_git_name)
        import shutil

        # The sandbox shows the host's /usr: bash if the host has it, else the POSIX shell.
        self._shell = "bash" if shutil.which("bash", path="/usr/bin:/bin") else "sh"
        self._opened.append(self.watcher.close)
        removed = Journal.recover(os.path.join(self.path, "sync-journal"), self.project)
        self.watcher.start()
        self._sandbox = Sandbox(
            self.policy,
            backend=str(state.get("backend") or "auto"),
            min_backend=_opt_str(state.get("min_backend")),
            allow_weaker=bool(state.get("allow_weaker")),
            audit=self.audit,
            approver=approver,
            sandbox_id=f"{self.name}-{new_id()[:6]}",
        )
        self._opened.append(self._sandbox.stop)
        writable = [z for z in self.policy.zones if z.mount == self.mount]
        self._tools = tools.ToolContext(
            root=self.root,
            mount=self.mount,
            writable=bool(writable) and writable[0].mode == "rw",
            nested=[
                z.mount[len(self.mount.rstrip("/")) + 1 :]
                for z in self.policy.zones
                if z.mount.startswith(self.mount.rstrip("/") + "/")
            ],
            file_size=self.policy.limits.file_size,
            exec_internal=self._exec_internal,
            recorded=self._recorded,
        )
        self._event(
            "session.open",
            workspace=self.workspace,
            mount=self.mount,
            project=self.project,
            steps=self.history.last,
            sync_temporaries_removed=removed,
        )
        self._catch_up()

    def _catch_up(self) -> None:
        """Record what the workspace holds that no step has (an interrupted call, an edit by hand)."""
        inflight = os.path.join(self.path, "inflight.json")
        interrupted: dict[str, object] | None = None
        try:
            with open(inflight, encoding="utf-8") as f:
                loaded = json.load(f)
            interrupted = loaded if isinstance(loaded, dict) else {"tool": "?"}
        except FileNotFoundError:
            pass
        except (OSError, ValueError):
            interrupted = {"tool": "?"}
        self.recorder.scan()
        if self.tree.write(self.store) != self.history.tree_of(self.history.last):
            if interrupted is not None:
                self._commit_tree(
                    "recover",
                    f"recover: what an interrupted {interrupted.get('tool')} call changed",
                    {"interrupted": interrupted},
                )
            else:
                self._commit_tree("scan", "scan: changes made outside tool calls", {})
        self.tree.touched.clear()
        if interrupted is not None:
            os.unlink(inflight)
        self.cache.save(os.path.join(self.path, "statcache"), self.tree)

    def close(self) -> None:
        """Stop the sandbox and release the session (a session without a name is deleted)."""
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            try:
                self.cache.save(os.path.join(self.path, "statcache"), self.tree)
            except OSError as exc:
                log.warning("cannot save the stat cache: %s", exc)
            self._event("session.close", steps=self.history.last)
            self._release()
            if self.ephemeral:
                remove_tree(self.path)

    def _release(self) -> None:
        while self._opened:
            undo = self._opened.pop()
            try:
                undo()
            except Exception as exc:  # keep releasing the rest
                log.warning("while closing the session: %s", exc)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def interrupt(self, thread: int | None = None) -> None:
        """Kill the commands running in the session's sandbox now (or those `thread` waits for)."""
        if self._sandbox is not None:
            self._sandbox.interrupt(thread)

    @property
    def sandbox(self) -> Sandbox:
        if self._sandbox is None or self._closed:
            raise SessionError("the session is closed")
        return self._sandbox

    @property
    def step(self) -> int:
        """The number of the last step."""
        return self.history.last

    # ------------------------------------------------------------------------------ recording
    def _event(self, event: str, **fields: object) -> None:
        sandbox = self._sandbox.id if self._sandbox is not None else None
        self.audit.write(event, session=self.name, sandbox=sandbox, **fields)

    def _commit_tree(self, tool: str, summary: str, details: dict[str, object]) -> int:
        tree = self.tree.write(self.store)
        return self.history.commit(tree, tool=tool, summary=summary, details=details)

    def _record(self, known: Sequence[bytes] = ()) -> str:
        """Bring the snapshot up to date: inotify's changes (plus `known`), or a full scan. Says which."""
        changes = self.watcher.collect()
        if changes is None:
            self.recorder.scan()
            self.watcher.rewatch()
            return "scan"
        changes.paths.update(known)
        if not self.recorder.update(changes):
            self.recorder.scan()
            return "scan (hard links)"
        return "inotify"

    def _pending(self) -> None:
        """A full scan; what it finds that no step recorded becomes a step (before review, sync, rollback)."""
        self.watcher.collect()
        self.recorder.scan()
        if self.tree.write(self.store) != self.history.tree_of(self.history.last):
            self._commit_tree("scan", "scan: changes no tool call recorded", {})
        self.tree.touched.clear()

    def _call(
        self,
        tool: str,
        args: dict[str, object],
        run: Callable[[], T],
        *,
        summary: str,
        mutating: bool,
        outcome: Callable[[T], dict[str, object]] | None = None,
        known: Callable[[T], Sequence[bytes]] | None = None,
    ) -> tuple[T, int | None, tuple[str, ...]]:
        """Run one tool call: serialized, recorded as a step if it may change files, audited."""
        with self._mutex:
            if self._closed:
                raise SessionError("the session is closed")
            started = time.monotonic()
            inflight = os.path.join(self.path, "inflight.json")
            if mutating:
                with open(inflight, "w", encoding="utf-8") as f:
                    f.write(json.dumps({"tool": tool, "args": args, "summary": summary}, default=str))
            try:
                result = run()
            except BaseException as exc:
                step = None
                if mutating:
                    self._record()
                    if self.tree.write(self.store) != self.history.tree_of(self.history.last):
                        step = self._commit_tree(tool, f"{summary} (failed)", {"args": args, "error": str(exc)})
                    self.tree.touched.clear()
                    os.unlink(inflight)
                self._event(
                    "tool",
                    tool=tool,
                    args=args,
                    error=str(exc),
                    error_type=type(exc).__name__,
                    step=step,
                    duration=round(time.monotonic() - started, 6),
                )
                raise
            details = outcome(result) if outcome is not None else {}
            step = None
            changed: tuple[str, ...] = ()
            ran = not (isinstance(result, Result) and result.reason == "denied")
            if mutating and ran:
                how = self._record(known(result) if known is not None else ())
                changed = tuple(sorted(tools.show(p) for p in self.tree.touched))
                self.tree.touched.clear()
                duration = round(time.monotonic() - started, 6)
                step = self._commit_tree(
                    tool,
                    summary,
                    {"args": args, **details, "files": len(changed), "recorded_by": how, "duration": duration},
                )
            if mutating:
                os.unlink(inflight)
            self._event(
                "tool",
                tool=tool,
                args=args,
                step=step,
                changed=list(changed[:100]),
                changed_count=len(changed),
                duration=round(time.monotonic() - started, 6),
                **details,
            )
            return result, step, changed

    def _exec_internal(self, argv: list[str], stdin: bytes | None, timeout: float | None) -> Result:
        # corral's own helper commands (the search tool's grep) run in the sandbox with its zones and
        # limits but are not the agent's commands, so the command rules do not apply to them.
        live = self.sandbox.start()._live
        assert live is not None
        return live.exec(argv, stdin=stdin, cwd=self.mount, timeout=timeout)

    def _recorded(self, rel: bytes) -> Iterator[bytes]:
        return (path for path, _, _ in self.tree.files(rel))

    # ------------------------------------------------------------------------------ tools
    def read_file(self, path: str | bytes, offset: int = 0, limit: int | None = None) -> tools.ReadResult:
        """Up to `limit` lines (default 2000) of a text file, after skipping `offset` lines."""
        args: dict[str, object] = {"path": tools.show(path), "offset": offset, "limit": limit}
        result, _, _ = self._call(
            "read_file",
            args,
            lambda: tools.read_file(self._tools, path, offset=offset, limit=limit),
            summary=f"read_file {tools.show(path)}",
            mutating=False,
        )
        return result

    def write_file(self, path: str | bytes, content: str | bytes) -> tools.WriteResult:
        """Create or replace a file (parents are created)."""
        size = len(content.encode() if isinstance(content, str) else content)
        args: dict[str, object] = {"path": tools.show(path), "size": size}
        result, step, changed = self._call(
            "write_file",
            args,
            lambda: tools.write_file(self._tools, path, content),
            summary=f"write_file {tools.show(path)} ({size} bytes)",
            mutating=True,
            known=lambda r: [os.fsencode(r.path)],
        )
        return result.replace(step=step, changed=changed)

    def edit_file(self, path: str | bytes, old: str, new: str, count: int = 1) -> tools.EditResult:
        """Replace the exact text `old`, which must occur `count` times, by `new`."""
        args: dict[str, object] = {"path": tools.show(path), "old": _clip(old), "new": _clip(new), "count": count}
        result, step, changed = self._call(
            "edit_file",
            args,
            lambda: tools.edit_file(self._tools, path, old, new, count=count),
            summary=f"edit_file {tools.show(path)}",
            mutating=True,
            known=lambda r: [os.fsencode(r.path)],
        )
        return result.replace(step=step, changed=changed)

    def list_dir(self, path: str | bytes = ".", depth: int = 1) -> tools.ListResult:
        """The entries of a directory, `depth` levels down."""
        args: dict[str, object] = {"path": tools.show(path), "depth": depth}
        result, _, _ = self._call(
            "list_dir", args, lambda: tools.list_dir(self._tools, path, depth=depth), summary="list_dir", mutating=False
        )
        return result

    def search(
        self,
        pattern: str,
        path: str | bytes = ".",
        glob: str | None = None,
        *,
        ignore_case: bool = False,
        max_matches: int = tools.MAX_SEARCH_MATCHES,
    ) -> tools.SearchResult:
        """Lines matching a regular expression in the session's (non-ignored) text files."""
        args: dict[str, object] = {
            "pattern": pattern,
            "path": tools.show(path),
            "glob": glob,
            "ignore_case": ignore_case,
        }
        result, _, _ = self._call(
            "search",
            args,
            lambda: tools.search(
                self._tools, pattern, path, glob=glob, ignore_case=ignore_case, max_matches=max_matches
            ),
            summary="search",
            mutating=False,
        )
        return result

    def bash(
        self, command: str, timeout: float | None = None, *, on_output: Callable[[str, bytes], None] | None = None
    ) -> tools.BashResult:
        """Run a shell command in the live sandbox (from the workspace's top directory)."""
        if not isinstance(command, str) or not command.strip():
            raise ToolError("the command is empty", tool="bash")
        return self._run("bash", [self._shell, "-c", command], command, timeout, on_output)

    def exec(
        self,
        argv: Sequence[str],
        timeout: float | None = None,
        *,
        on_output: Callable[[str, bytes], None] | None = None,
    ) -> tools.BashResult:
        """Run a command (an argv list, no shell) in the live sandbox."""
        import shlex

        if isinstance(argv, str) or not argv:
            raise ToolError("argv must be a non-empty list of strings", tool="exec")
        return self._run("exec", [str(a) for a in argv], shlex.join(argv), timeout, on_output)

    def _run(
        self,
        tool: str,
        argv: list[str],
        command: str,
        timeout: float | None,
        on_output: Callable[[str, bytes], None] | None,
    ) -> tools.BashResult:
        shown = _redact_command(command)
        args: dict[str, object] = {"command": shown, "timeout": timeout}

        def outcome(r: Result) -> dict[str, object]:
            return {"exit": r.returncode, "reason": r.reason, "rule": r.rule}

        result, step, changed = self._call(
            tool,
            args,
            lambda: self.sandbox.exec(argv, cwd=self.mount, timeout=timeout, on_output=on_output),
            summary=f"{tool}: {shown}",
            mutating=True,
            outcome=outcome,
        )
        return tools.BashResult(command=command, result=result, step=step, changed=changed)

    def tool_argv(self, tool: str, args: Mapping[str, object]) -> list[str] | None:
        """The command a `bash` or `exec` call would run (for deciding on it ahead, as an MCP server
        asking its client for approval does); None for the file tools."""
        if tool == "bash" and isinstance(args.get("command"), str):
            return [self._shell, "-c", str(args["command"])]
        argv = args.get("argv")
        if tool == "exec" and isinstance(argv, list) and argv:
            return [str(a) for a in argv]
        return None

    def call(self, tool: str, args: Mapping[str, object]) -> tools.ToolResult:
        """Call a tool by name with keyword arguments (as the CLI and an MCP server do)."""
        spec = tools.SPECS.get(tool)
        if spec is None:
            raise ToolError(f"unknown tool {tool!r}; the tools are {', '.join(tools.SPECS)}", tool=tool)
        checked = tools.check_args(tool, args)
        method: Callable[..., tools.ToolResult] = getattr(self, tool)
        return method(**checked)

    # ------------------------------------------------------------------------------ review
    def log(self) -> list[Step]:
        """Every step, from 0 (copy-in) to the last."""
        with self._mutex:
            return self.history.steps()

    def changes(self, step: int | None = None, *, since: int | None = None, patch: bool = True) -> Changes:
        """What step `step` changed; or, without it, everything from step `since` (default 0, the
        copy-in) to the last step. Unrecorded changes are recorded first."""
        with self._mutex:
            self._check_open()
            self._pending()
            return _changes(self.history, step, since=since, patch=patch)

    def rollback(self, step: int) -> int:
        """Return the workspace to what it was at `step`. The rollback is itself a new step (so it
        can be undone too); returns its number. Files .gitignore ignores are left alone."""
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int, not {type(step).__name__}")
        with self._mutex:
            self._check_open()
            started = time.monotonic()
            self._pending()
            target_sha = self.history.tree_of(step)
            target = Tree.load(self.store, target_sha)
            want, have = target.flat(), self.tree.flat()
            failed: list[str] = []
            for path in sorted(have.keys() - want.keys(), key=lambda p: -p.count(b"/")):
                self.root.unlink(path)
                self.root.prune_empty(path)
            for path in sorted(want):
                if have.get(path) != want[path]:
                    try:
                        self._restore(path, want[path])
                    except (OSError, Unsafe) as exc:
                        failed.append(f"{tools.show(path)}: {exc}")
            self._record([*want.keys(), *have.keys()])
            if self.tree.write(self.store) != target_sha and not failed:
                self.recorder.scan()
            changed = len(self.tree.touched)
            self.tree.touched.clear()
            details: dict[str, object] = {
                "to": step,
                "files": changed,
                "duration": round(time.monotonic() - started, 6),
            }
            if failed:
                details["failed"] = failed[:50]
            number = self._commit_tree("rollback", f"rollback to step {step}", details)
            self._event("session.rollback", to=step, step=number, files=changed, failed=failed[:50])
            if failed:
                raise SessionError(
                    f"rollback to step {step} left {len(failed)} file(s) as they were: " + "; ".join(failed[:5])
                )
            return number

    def _restore(self, path: bytes, entry: tuple[int, str]) -> None:
        mode, sha = entry
        data = self.store.read_blob(sha)
        for attempt in (1, 2):
            try:
                if mode == LINK:
                    self.root.symlink_atomic(path, data)
                else:
                    self.root.write_atomic(path, [data], mode=0o755 if mode == EXEC else 0o644)
                    bytecode.drop_stale(self.root, path)
                return
            except (IsADirectoryError, NotADirectoryError, FileExistsError, PermissionError, Unsafe):
                if attempt == 2:
                    raise
                self._clear_way(path)
            except OSError as exc:
                if attempt == 2 or exc.errno not in (errno.EISDIR, errno.ENOTEMPTY):
                    raise
                self._clear_way(path)

    def _clear_way(self, path: bytes) -> None:
        """Remove what stands where `path` must go: a file or link where a directory must be, or a
        directory (of ignored files) where the file must be; and make the directories on the way
        writable again if the agent took that away (directory modes are not part of the history)."""
        top = os.fstat(self.root.fd)
        if top.st_mode & 0o700 != 0o700:
            os.fchmod(self.root.fd, top.st_mode & 0o7777 | 0o700)
        parts = split(path)
        for i in range(1, len(parts)):
            prefix = b"/".join(parts[:i])
            found = self.root.lstat(prefix)
            if found is not None and not _is_dir(found):
                self.root.unlink(prefix)
            elif found is not None and found.st_mode & 0o700 != 0o700:
                fd = self.root.open_dir(parts[: i - 1])
                try:
                    os.chmod(parts[i - 1], found.st_mode & 0o7777 | 0o700, dir_fd=fd)
                finally:
                    os.close(fd)
        found = self.root.lstat(path)
        if found is not None and _is_dir(found):
            self.root.rmtree(path)

    def sync(
        self, paths: Sequence[str | bytes] | None = None, *, delete: bool = False, dry_run: bool = False
    ) -> SyncReport:
        """Write the session's changes (all, or those under `paths`) to the host project.

        Deletions only with `delete=True`; a file the user changed on the host since copy-in (or
        the last sync) is a conflict, reported and left alone. See `corral.session.sync`.
        """
        with self._mutex:
            self._check_open()
            if not os.path.isdir(self.project):
                raise SessionError(f"the project {self.project} is gone: there is nothing to sync to")
            started = time.monotonic()
            self._pending()
            if isinstance(paths, str | bytes):  # one path would be taken a character at a time
                raise TypeError("paths must be a list of paths, not one path (sync([path]))")
            wanted = None if paths is None else [_sync_path(p, self.mount) for p in paths]
            host_commit = self.store.read_ref(HOST_REF)
            if host_commit is None:
                raise SessionError("the session's record of the host project is missing")
            baseline = Tree.load(self.store, self.store.read_commit(host_commit).tree)
            manifest_path = os.path.join(self.path, "manifest")
            manifest = load_manifest(manifest_path)
            items = sync_tree(
                project=self.project,
                store=self.store,
                target=self.tree,
                baseline=baseline,
                manifest=manifest,
                paths=wanted,
                delete=delete,
                dry_run=dry_run,
                journal=Journal(os.path.join(self.path, "sync-journal")),
            )
            report = SyncReport(items=tuple(items), dry_run=dry_run, step=self.history.last)
            if not dry_run:
                tree = baseline.write(self.store)
                if tree != self.store.read_commit(host_commit).tree:
                    done = [i for i in items if i.status in ("written", "deleted", "unchanged")]
                    commit = self.store.write_commit(
                        tree, [host_commit], f"sync of step {report.step}: {len(done)} path(s)"
                    )
                    self.store.update_ref(HOST_REF, commit, old=host_commit)
                save_manifest(manifest_path, manifest)
            counts = report.as_json()["counts"]
            self._event(
                "session.sync",
                step=report.step,
                dry_run=dry_run,
                delete=delete,
                counts=counts,
                paths=[f"{i.status}: {i.path}" for i in items[:200]],
                duration=round(time.monotonic() - started, 6),
            )
            return report

    def _check_open(self) -> None:
        if self._closed:
            raise SessionError("the session is closed")

    # Last in the class body, so that `list` names the builtin in the annotations above.
    @staticmethod
    def list(*, data_dir: str | None = None) -> builtins.list[st.SessionInfo]:
        """Every persistent session on this machine (`corral session list`)."""
        return st.list_sessions(data_dir)

    @staticmethod
    def remove(name: str, *, data_dir: str | None = None) -> None:
        """Delete a session, workspace and history (`corral session rm`); refused while it is open."""
        st.remove_session(name, data_dir)


class RecordedSteps:
    """A session's recorded steps, read without opening it: no lock, no sandbox, nothing written.
    What `corral session log` and `diff` show while an agent holds the session; a tool call still
    running is not in it until its step is recorded."""

    def __init__(self, name: str, *, data_dir: str | None = None) -> None:
        directory = st.session_path(name, data_dir)
        if not os.path.isfile(os.path.join(directory, "state.json")):
            raise SessionNameError(f"no session named {name!r} (corral session list shows them)")
        self.name = name
        self.history = History(GitStore(os.path.join(directory, "history.git"), os.path.join(directory, "workspace")))
        if self.history.head is None:
            raise SessionError(f"session {name!r} has no history: it is damaged")

    def log(self) -> builtins.list[Step]:
        return self.history.steps()

    def changes(self, step: int | None = None, *, since: int | None = None, patch: bool = True) -> Changes:
        return _changes(self.history, step, since=since, patch=patch)


def _changes(history: History, step: int | None, *, since: int | None, patch: bool) -> Changes:
    """What step `step` changed; or everything from step `since` (0: the copy-in) to the last."""
    last = history.last
    if step is not None:
        history.commit_of(step)
        old = history.tree_of(step - 1) if step > 0 else EMPTY_TREE
        return history.diff(old, history.tree_of(step), since=max(step - 1, 0), until=step, patch=patch)
    since = 0 if since is None else since
    return history.diff(history.tree_of(since), history.tree_of(last), since=since, until=last, patch=patch)


# ---------------------------------------------------------------------------------------- helpers
def _is_dir(st_: os.stat_result) -> bool:
    import stat

    return stat.S_ISDIR(st_.st_mode)


def _opt_str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _redact_command(command: str) -> str:
    """The command as the log and the history show it, in its own form, secrets redacted (an
    unbalanced quote included, which splitting it into words would not survive)."""
    return _clip(redact_text(command), 1000)


def _sync_path(path: str | bytes, mount: str) -> bytes:
    raw = os.fsencode(path)
    if not raw:  # an unset variable, more likely than "everything" (that is "." or no paths at all)
        raise ConfigError("an empty path names nothing (use '.' for the whole project)", where="sync paths")
    import posixpath

    mount_b = os.fsencode(mount).rstrip(b"/")
    if raw.startswith(b"/"):
        raw = posixpath.normpath(raw)
        if raw == mount_b:
            return b""
        if not raw.startswith(mount_b + b"/"):
            raise ConfigError(f"{tools.show(path)} is not in the project", where="sync paths")
        raw = raw[len(mount_b) + 1 :]
    normalized = posixpath.normpath(raw) if raw else b"."
    if normalized == b".":
        return b""
    if normalized.startswith(b"../") or normalized == b"..":
        raise ConfigError(f"{tools.show(path)} is not in the project", where="sync paths")
    return normalized
