"""The agent's file tools: read_file, write_file, edit_file, list_dir, search.

Plain functions over a `ToolContext` (the workspace and what the policy says about it), with typed
arguments and typed results; failures the agent should read are `ToolError`s, refusals by the policy
`PolicyDenied`. `corral.Session` wraps them with recording, commits and the audit log; the CLI and
the MCP server call them through the session.

Paths are relative to the workspace (an absolute path inside the sandbox's view of the workspace is
accepted too). They are resolved on the host without ever leaving the workspace: `..` may not climb
out, a symbolic link is followed only when its target stays inside (as the sandbox would see it),
and the final I/O walks the resolved path with O_NOFOLLOW (`corral.session.fsafe`). Paths inside
another zone mounted within the workspace are refused (their content is not the workspace's).
A name longer than NAME_MAX (255 bytes) or a path of PATH_MAX (4096) bytes or more is refused with a
ToolError (as the kernel refuses it inside the sandbox; the history would not record it), and so is
any other failure the system reports (`cannot write X: No space left on device`), in one line.
Each call walks the workspace from directory descriptors it keeps while it runs (`Root.cached`), so
its cost grows with the path's depth, not with its square.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import stat
from collections.abc import Callable, Iterator, Sequence

from corral._record import Record
from corral.backends.base import Result
from corral.errors import PolicyDenied, ToolError
from corral.session import bytecode
from corral.session.fsafe import NAME_MAX, PATH_MAX, Root, Unsafe, join

MAX_READ_BYTES = 8 << 20  # read_file and edit_file refuse larger files
DEFAULT_READ_LINES = 2000
MAX_LINE_CHARS = 4000
MAX_LIST_ENTRIES = 2000
MAX_SEARCH_MATCHES = 200
MAX_MATCH_CHARS = 500
_BINARY_SNIFF = 8192
_MAX_LINK_HOPS = 40
_VERB = {"read_file": "read", "write_file": "write", "edit_file": "edit", "list_dir": "list", "search": "search"}
_SHOWN_CHARS = 200  # a longer path is shortened in error messages


def show(path: bytes | str) -> str:
    """A path as text for messages and results (undecodable bytes kept as surrogate escapes)."""
    return os.fsdecode(path) if isinstance(path, bytes) else path


def brief(path: bytes | str) -> str:
    """`show(path)`, its middle left out when it is too long for a one-line message."""
    text = show(path)
    if len(text) <= _SHOWN_CHARS:
        return text
    half = _SHOWN_CHARS // 2
    return f"{text[:half]}...[{len(text) - 2 * half} characters]...{text[-half:]}"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


class ToolContext:
    """What the tools need to know about the workspace."""

    def __init__(
        self,
        *,
        root: Root,
        mount: str,
        writable: bool,
        nested: Sequence[str] = (),
        file_size: int | None = None,
        exec_internal: Callable[[list[str], bytes | None, float | None], Result] | None = None,
        recorded: Callable[[bytes], Iterator[bytes]] | None = None,
    ) -> None:
        self.root = root
        self.mount = mount  # where the workspace appears inside the sandbox
        self.writable = writable
        self.nested = tuple(os.fsencode(n) for n in nested)  # other zones inside it, relative
        self.file_size = file_size
        self.exec_internal = exec_internal  # runs corral's helpers inside the sandbox (search)
        self.recorded = recorded  # recorded files under a relative directory (search's file list)


# ---------------------------------------------------------------------------------------- results
class ReadResult(Record):
    __slots__ = ("end_line", "path", "start_line", "text", "total_lines", "truncated")
    path: str
    text: str
    start_line: int  # 1-based number of the first line returned
    end_line: int  # number of the last line returned (start_line - 1 when none)
    total_lines: int
    truncated: bool  # lines were left out (after end_line) or cut (longer than MAX_LINE_CHARS)

    def __init__(
        self, *, path: str, text: str, start_line: int, end_line: int, total_lines: int, truncated: bool
    ) -> None:
        self._set(
            path=path, text=text, start_line=start_line, end_line=end_line, total_lines=total_lines, truncated=truncated
        )

    def as_json(self) -> dict[str, object]:
        return self.as_dict()


class WriteResult(Record):
    __slots__ = ("changed", "created", "path", "size", "step")
    path: str
    size: int
    created: bool
    step: int | None  # the step that recorded the call
    changed: tuple[str, ...]  # paths the step changed

    def __init__(
        self, *, path: str, size: int, created: bool, step: int | None = None, changed: tuple[str, ...] = ()
    ) -> None:
        self._set(path=path, size=size, created=created, step=step, changed=changed)

    def as_json(self) -> dict[str, object]:
        return {**self.as_dict(), "changed": list(self.changed)}


class EditResult(Record):
    __slots__ = ("changed", "line", "path", "replacements", "size", "step")
    path: str
    replacements: int
    line: int  # 1-based line of the first replacement
    size: int
    step: int | None
    changed: tuple[str, ...]

    def __init__(
        self,
        *,
        path: str,
        replacements: int,
        line: int,
        size: int,
        step: int | None = None,
        changed: tuple[str, ...] = (),
    ) -> None:
        self._set(path=path, replacements=replacements, line=line, size=size, step=step, changed=changed)

    def as_json(self) -> dict[str, object]:
        return {**self.as_dict(), "changed": list(self.changed)}


class DirEntry(Record):
    __slots__ = ("kind", "path", "size", "target")
    path: str  # relative to the workspace
    kind: str  # file | dir | link | other
    size: int | None
    target: str | None  # a link's target

    def __init__(self, *, path: str, kind: str, size: int | None = None, target: str | None = None) -> None:
        self._set(path=path, kind=kind, size=size, target=target)

    def as_json(self) -> dict[str, object]:
        return self.as_dict()


class ListResult(Record):
    __slots__ = ("entries", "path", "truncated")
    path: str
    entries: tuple[DirEntry, ...]
    truncated: bool

    def __init__(self, *, path: str, entries: tuple[DirEntry, ...], truncated: bool) -> None:
        self._set(path=path, entries=entries, truncated=truncated)

    def as_json(self) -> dict[str, object]:
        return {"path": self.path, "entries": [e.as_json() for e in self.entries], "truncated": self.truncated}


class Match(Record):
    __slots__ = ("line", "path", "text")
    path: str
    line: int
    text: str

    def __init__(self, *, path: str, line: int, text: str) -> None:
        self._set(path=path, line=line, text=text)

    def as_json(self) -> dict[str, object]:
        return self.as_dict()


class SearchResult(Record):
    __slots__ = ("files", "matches", "pattern", "truncated")
    pattern: str
    matches: tuple[Match, ...]
    files: int  # files searched
    truncated: bool  # more matches exist than returned

    def __init__(self, *, pattern: str, matches: tuple[Match, ...], files: int, truncated: bool) -> None:
        self._set(pattern=pattern, matches=matches, files=files, truncated=truncated)

    def as_json(self) -> dict[str, object]:
        return {
            "pattern": self.pattern,
            "matches": [m.as_json() for m in self.matches],
            "files": self.files,
            "truncated": self.truncated,
        }


class BashResult(Record):
    """How a command run by the `bash` (or `exec`) tool ended, and the step that recorded it."""

    __slots__ = (
        "changed",
        "command",
        "detail",
        "reason",
        "result",
        "returncode",
        "stderr",
        "stdout",
        "step",
        "truncated",
        "wall_time",
    )
    command: str
    returncode: int | None
    reason: str  # exited | timeout | memory | ... | denied (see corral.Result)
    detail: str
    stdout: str  # at most MAX_OUTPUT_CHARS of each stream, for the agent (the full bytes are in `result`)
    stderr: str
    truncated: bool
    wall_time: float
    result: Result
    step: int | None  # None when the command did not run (denied)
    changed: tuple[str, ...]

    def __init__(self, *, command: str, result: Result, step: int | None = None, changed: tuple[str, ...] = ()) -> None:
        stdout, cut_out = _clip(result.stdout_text)
        stderr, cut_err = _clip(result.stderr_text)
        self._set(
            command=command,
            returncode=result.returncode,
            reason=result.reason,
            detail=result.detail,
            stdout=stdout,
            stderr=stderr,
            wall_time=result.wall_time,
            result=result,
            step=step,
            changed=changed,
            truncated=cut_out or cut_err or result.stdout_truncated or result.stderr_truncated,
        )

    @property
    def ok(self) -> bool:
        return self.result.ok

    def as_json(self) -> dict[str, object]:
        return {
            "command": self.command,
            "returncode": self.returncode,
            "reason": self.reason,
            "detail": self.detail,
            "note": self.result.note,  # a limit that may explain a failure (see corral.Result.note)
            "stdout": self.stdout,
            "stderr": self.stderr,
            "truncated": self.truncated,
            "wall_time": round(self.wall_time, 6),
            "step": self.step,
            "changed": list(self.changed),
        }


MAX_OUTPUT_CHARS = 100_000


def _clip(text: str) -> tuple[str, bool]:
    if len(text) <= MAX_OUTPUT_CHARS:
        return text, False
    half = MAX_OUTPUT_CHARS // 2
    return f"{text[:half]}\n... [{len(text) - 2 * half} characters left out] ...\n{text[-half:]}", True


# ---------------------------------------------------------------------------------------- paths
def resolve(ctx: ToolContext, path: str | bytes, *, tool: str, follow_final: bool = True) -> bytes:
    """The workspace-relative path (no links left in it) that `path` names, or a ToolError."""
    raw = os.fsencode(path)
    if not raw:
        raise ToolError("the path is empty", tool=tool)
    if b"\0" in raw:
        raise ToolError("the path contains a NUL byte", tool=tool)
    mount = os.fsencode(ctx.mount)
    if raw.startswith(b"/"):
        rel = _under(posixpath.normpath(raw), mount)
        if rel is None:
            raise ToolError(f"{show(raw)} is outside the workspace ({ctx.mount}); use a path relative to it", tool=tool)
    else:
        rel = _relative(posixpath.normpath(raw))
        if rel is None:
            raise ToolError(f"{show(raw)} leaves the workspace", tool=tool)
    parts = rel.split(b"/") if rel else []
    _check_length(raw, rel, parts, tool)
    done: list[bytes] = []
    hops = 0
    i = 0
    while i < len(parts):
        current = b"/".join([*done, parts[i]])
        st = ctx.root.lstat(current)
        last = i == len(parts) - 1
        if st is not None and stat.S_ISLNK(st.st_mode) and (follow_final or not last):
            hops += 1
            if hops > _MAX_LINK_HOPS:
                raise ToolError(f"{show(raw)}: too many levels of symbolic links", tool=tool)
            target = ctx.root.readlink(current)
            if target.startswith(b"/"):
                new = _under(posixpath.normpath(target), mount)
            else:
                new = _relative(posixpath.normpath(b"/".join([*done, target])))
            if new is None:
                raise ToolError(
                    f"{show(raw)}: {show(current)} is a symbolic link to {show(target)}, outside the workspace",
                    tool=tool,
                )
            parts = (new.split(b"/") if new else []) + parts[i + 1 :]
            _check_length(raw, b"/".join(parts), parts, tool)
            done = []
            i = 0
            continue
        done.append(parts[i])
        i += 1
    resolved = b"/".join(done)
    for zone in ctx.nested:
        if resolved == zone or resolved.startswith(zone + b"/"):
            raise PolicyDenied(
                f"{show(raw)} lies in another zone mounted at {ctx.mount}/{show(zone)}, not in "
                "the workspace: use bash for it",
                rule="zones",
            )
    return resolved


def _check_length(raw: bytes, rel: bytes, parts: list[bytes], tool: str) -> None:
    """A ToolError for a path the kernel would refuse: a name over NAME_MAX bytes, a path of PATH_MAX."""
    if len(rel) >= PATH_MAX or any(len(part) > NAME_MAX for part in parts):
        raise ToolError(f"cannot {_VERB.get(tool, 'use')} {brief(raw)}: {os.strerror(errno.ENAMETOOLONG)}", tool=tool)


@contextlib.contextmanager
def _working(ctx: ToolContext, path: str | bytes, tool: str) -> Iterator[None]:
    """A tool's call: directories opened once (see `Root.cached`), and what the system refuses (a
    full disk, an I/O error) said in one line, as a ToolError, rather than as an OSError."""
    with ctx.root.cached():
        try:
            yield
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise ToolError(
                f"cannot {_VERB.get(tool, 'use')} {brief(os.fsencode(path))}: {reason}", tool=tool
            ) from None


def _under(path: bytes, mount: bytes) -> bytes | None:
    if path == mount:
        return b""
    if path.startswith(mount.rstrip(b"/") + b"/"):
        return path[len(mount.rstrip(b"/")) + 1 :]
    return None


def _relative(path: bytes) -> bytes | None:
    if path == b".":
        return b""
    if path == b".." or path.startswith(b"../") or path.startswith(b"/"):
        return None
    return path


def _read_text(ctx: ToolContext, rel: bytes, shown: str, tool: str) -> tuple[str, os.stat_result]:
    try:
        fd, st = ctx.root.open_file(rel)
    except FileNotFoundError:
        raise ToolError(f"{shown} does not exist", tool=tool) from None
    except IsADirectoryError:
        raise ToolError(f"{shown} is a directory (use list_dir)", tool=tool) from None
    except NotADirectoryError:
        raise ToolError(f"{shown}: a part of the path is not a directory", tool=tool) from None
    except Unsafe:
        raise ToolError(f"{shown} is not a regular file", tool=tool) from None
    except PermissionError:
        raise ToolError(f"{shown} is not readable", tool=tool) from None
    try:
        if st.st_size > MAX_READ_BYTES:
            raise ToolError(
                f"{shown} is {_size(st.st_size)}, more than {tool} handles ({_size(MAX_READ_BYTES)}); "
                "use bash (head, tail, sed -n 'A,Bp', grep) to look at parts of it",
                tool=tool,
            )
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if b"\0" in data[:_BINARY_SNIFF]:
        raise ToolError(f"{shown} is a binary file ({_size(len(data))}); {tool} works on text only", tool=tool)
    try:
        return data.decode("utf-8"), st
    except UnicodeDecodeError as exc:
        raise ToolError(
            f"{shown} is not UTF-8 text (invalid byte at offset {exc.start}); {tool} works on text only", tool=tool
        ) from None


# ---------------------------------------------------------------------------------------- tools
def read_file(ctx: ToolContext, path: str | bytes, *, offset: int = 0, limit: int | None = None) -> ReadResult:
    """Up to `limit` lines (default 2000) of a text file, starting after `offset` lines."""
    with _working(ctx, path, "read_file"):
        if offset < 0 or (limit is not None and limit < 1):
            raise ToolError("offset must be >= 0 and limit >= 1", tool="read_file")
        rel = resolve(ctx, path, tool="read_file")
        shown = show(rel)
        text, _ = _read_text(ctx, rel, shown, "read_file")
        lines = text.splitlines(keepends=True)
        count = DEFAULT_READ_LINES if limit is None else limit
        if offset and offset >= len(lines):
            raise ToolError(
                f"offset {offset} is past the end of {shown}, which has {len(lines)} lines", tool="read_file"
            )
        chosen = lines[offset : offset + count]
        truncated = offset + count < len(lines)
        out = []
        for line in chosen:
            if len(line) > MAX_LINE_CHARS:
                out.append(line[:MAX_LINE_CHARS] + f"... [{len(line) - MAX_LINE_CHARS} more characters]\n")
                truncated = True
            else:
                out.append(line)
        return ReadResult(
            path=shown,
            text="".join(out),
            start_line=offset + 1,
            end_line=offset + len(chosen),
            total_lines=len(lines),
            truncated=truncated,
        )


def _check_writable(ctx: ToolContext, size: int, shown: str) -> None:
    if not ctx.writable:
        raise PolicyDenied(f"cannot write {shown}: the policy makes the workspace read-only", rule="zones")
    if ctx.file_size is not None and size > ctx.file_size:
        raise PolicyDenied(
            f"cannot write {shown}: {_size(size)} is over the file size limit ({_size(ctx.file_size)})",
            rule="limits.file_size",
        )


def _write(ctx: ToolContext, rel: bytes, data: bytes, shown: str, tool: str) -> bool:
    """Replace or create the file; True when it was created."""
    if not rel:
        raise ToolError("the workspace itself is a directory", tool=tool)
    if any(len(part) == 4 and part.lower() == b".git" for part in rel.split(b"/")):
        # The history records no .git path, a review shows none, a rollback would not undo it.
        raise ToolError(f"cannot write {shown}: a session does not change .git (it keeps its own history)", tool=tool)
    st = ctx.root.lstat(rel)
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise ToolError(f"{shown} is a directory", tool=tool)
    mode = stat.S_IMODE(st.st_mode) if st is not None and stat.S_ISREG(st.st_mode) else 0o644
    try:
        ctx.root.write_atomic(rel, [data], mode=mode)
    except (Unsafe, NotADirectoryError, FileExistsError):
        raise ToolError(
            f"cannot write {shown}: a part of the path is a file or a link, not a directory", tool=tool
        ) from None
    except PermissionError:
        raise ToolError(f"cannot write {shown}: permission denied", tool=tool) from None
    bytecode.drop_stale(ctx.root, rel)
    return st is None


def write_file(ctx: ToolContext, path: str | bytes, content: str | bytes) -> WriteResult:
    """Create or replace a file with `content` (text is written as UTF-8); missing directories are made."""
    with _working(ctx, path, "write_file"):
        rel = resolve(ctx, path, tool="write_file")
        shown = show(rel)
        data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
        _check_writable(ctx, len(data), shown)
        created = _write(ctx, rel, data, shown, "write_file")
        return WriteResult(path=shown, size=len(data), created=created)


def edit_file(ctx: ToolContext, path: str | bytes, old: str, new: str, *, count: int = 1) -> EditResult:
    """Replace `old` (exact text, which must occur exactly `count` times) by `new`."""
    with _working(ctx, path, "edit_file"):
        rel = resolve(ctx, path, tool="edit_file")
        shown = show(rel)
        if not old:
            raise ToolError("old text is empty; use write_file to create or replace a whole file", tool="edit_file")
        if count < 1:
            raise ToolError("count must be at least 1", tool="edit_file")
        text, _ = _read_text(ctx, rel, shown, "edit_file")
        found = text.count(old)
        if found == 0:
            hint = ""
            if old.strip() and old.strip() in text:
                hint = " (it occurs with different leading or trailing whitespace)"
            raise ToolError(
                f"old text not found in {shown}{hint}; read the file and copy the text exactly", tool="edit_file"
            )
        if found != count:
            raise ToolError(
                f"old text occurs {found} times in {shown}, expected {count}: include more surrounding "
                f"lines to make it unique, or pass count={found} to replace every one",
                tool="edit_file",
            )
        line = text[: text.index(old)].count("\n") + 1
        data = text.replace(old, new).encode("utf-8")
        _check_writable(ctx, len(data), shown)
        _write(ctx, rel, data, shown, "edit_file")
        return EditResult(path=shown, replacements=found, line=line, size=len(data))


def list_dir(ctx: ToolContext, path: str | bytes = ".", *, depth: int = 1) -> ListResult:
    """The entries of a directory, `depth` levels down (a `.git` directory is listed, not entered)."""
    with _working(ctx, path, "list_dir"):
        if depth < 1:
            raise ToolError("depth must be at least 1", tool="list_dir")
        rel = resolve(ctx, path, tool="list_dir")
        shown = show(rel) or "."
        entries: list[DirEntry] = []
        truncated = False
        stack: list[tuple[bytes, int]] = [(rel, 1)]
        first = True
        while stack:
            directory, level = stack.pop()
            try:
                listing = sorted(ctx.root.listdir(directory), reverse=True)
            except FileNotFoundError:
                if first:
                    raise ToolError(f"{shown} does not exist", tool="list_dir") from None
                continue
            except (NotADirectoryError, Unsafe):
                if first:
                    raise ToolError(f"{shown} is not a directory", tool="list_dir") from None
                continue
            except PermissionError:
                if first:
                    raise ToolError(f"{shown} is not readable", tool="list_dir") from None
                continue
            first = False
            children = []
            for name, st in listing:
                child = join(directory, name)
                nested = any(child == z or child.startswith(z + b"/") for z in ctx.nested)
                if stat.S_ISDIR(st.st_mode):
                    entry = DirEntry(path=show(child), kind="dir")
                    if level < depth and name.lower() != b".git" and not nested:
                        children.append((child, level + 1))
                elif stat.S_ISLNK(st.st_mode):
                    try:
                        target: str | None = show(ctx.root.readlink(child))
                    except OSError:
                        target = None
                    entry = DirEntry(path=show(child), kind="link", target=target)
                elif stat.S_ISREG(st.st_mode):
                    entry = DirEntry(path=show(child), kind="file", size=st.st_size)
                else:
                    entry = DirEntry(path=show(child), kind="other")
                entries.append(entry)
            stack.extend(children)
            if len(entries) >= MAX_LIST_ENTRIES:
                truncated = True
                break
        entries.sort(key=lambda e: os.fsencode(e.path))
        return ListResult(path=shown, entries=tuple(entries[:MAX_LIST_ENTRIES]), truncated=truncated)


def search(
    ctx: ToolContext,
    pattern: str,
    path: str | bytes = ".",
    *,
    glob: str | None = None,
    ignore_case: bool = False,
    max_matches: int = MAX_SEARCH_MATCHES,
    timeout: float = 60.0,
) -> SearchResult:
    """Lines matching the regular expression `pattern` (Perl syntax) in the recorded text files under
    `path` (so .gitignore'd files are skipped, as ripgrep does), optionally only files matching `glob`.

    The search runs inside the sandbox (grep), with the sandbox's limits: a pathological pattern
    costs the sandbox's CPU, never the host's.
    """
    if not pattern:
        raise ToolError("the pattern is empty", tool="search")
    if ctx.exec_internal is None or ctx.recorded is None:
        raise ToolError("search needs a live sandbox", tool="search")
    rel = resolve(ctx, path, tool="search")
    import fnmatch

    files = []
    for file in ctx.recorded(rel):
        if glob is not None:
            name = show(file) if "/" in glob else show(file.rpartition(b"/")[2])
            if not fnmatch.fnmatchcase(name, glob):
                continue
        files.append(file)
    if not files:
        return SearchResult(pattern=pattern, matches=(), files=0, truncated=False)
    listing = b"".join(f + b"\0" for f in sorted(files))
    flags = ["-n", "-H", "-I", "-Z", "-s", "-m", "50"] + (["-i"] if ignore_case else [])
    result = ctx.exec_internal(["xargs", "-0", "grep", *flags, "-P", "-e", pattern, "--"], listing, timeout)
    if b"-P" in result.stderr and b"support" in result.stderr:  # a grep built without PCRE
        result = ctx.exec_internal(["xargs", "-0", "grep", *flags, "-E", "-e", pattern, "--"], listing, timeout)
    if result.reason == "timeout":
        raise ToolError(f"search timed out after {timeout:g}s; narrow the path or the pattern", tool="search")
    if not result.stdout and result.returncode not in (0, 1, 123):
        message = result.stderr_text.strip().splitlines()
        raise ToolError(f"search failed: {message[-1] if message else result.detail}", tool="search")
    if not result.stdout and result.stderr and result.returncode == 123 and b"grep:" in result.stderr:
        message = result.stderr_text.strip().splitlines()
        raise ToolError(f"search failed: {message[-1]}", tool="search")
    matches: list[Match] = []
    truncated = False
    data = result.stdout
    i = 0
    while i < len(data):
        nul = data.find(b"\0", i)
        end = data.find(b"\n", nul + 1) if nul >= 0 else -1
        if nul < 0 or end < 0:
            break
        number, _, text = data[nul + 1 : end].partition(b":")
        if len(matches) >= max_matches:
            truncated = True
            break
        line = text.decode("utf-8", "replace")
        if len(line) > MAX_MATCH_CHARS:
            line = line[:MAX_MATCH_CHARS] + "..."
        matches.append(Match(path=show(data[i:nul]), line=int(number or b"0"), text=line))
        i = end + 1
    return SearchResult(
        pattern=pattern, matches=tuple(matches), files=len(files), truncated=truncated or result.stdout_truncated
    )


ToolResult = ReadResult | WriteResult | EditResult | ListResult | SearchResult | BashResult


# ---------------------------------------------------------------------------------------- specs
class Param(Record):
    __slots__ = ("default", "description", "kind", "name", "required")
    name: str
    kind: str  # JSON schema type: string | integer | number | boolean | array
    required: bool
    description: str
    default: object

    def __init__(
        self, name: str, kind: str, description: str, *, required: bool = False, default: object = None
    ) -> None:
        self._set(name=name, kind=kind, required=required, description=description, default=default)


class ToolSpec(Record):
    __slots__ = ("description", "mutating", "name", "params")
    name: str
    description: str
    params: tuple[Param, ...]
    mutating: bool  # recorded as a step

    def __init__(self, name: str, description: str, params: tuple[Param, ...], *, mutating: bool) -> None:
        self._set(name=name, description=description, params=params, mutating=mutating)

    def json_schema(self) -> dict[str, object]:
        """The parameters as a JSON schema object (as MCP and function-calling APIs take them)."""
        properties: dict[str, object] = {}
        for p in self.params:
            prop: dict[str, object] = {"type": p.kind, "description": p.description}
            if p.kind == "array":
                prop["items"] = {"type": "string"}
            if p.default is not None:
                prop["default"] = p.default
            properties[p.name] = prop
        return {
            "type": "object",
            "properties": properties,
            "required": [p.name for p in self.params if p.required],
            "additionalProperties": False,
        }


_PATH = "a path relative to the workspace"
SPECS: dict[str, ToolSpec] = {
    spec.name: spec
    for spec in (
        ToolSpec(
            "read_file",
            "Read a UTF-8 text file (at most 8 MiB), a range of lines at a time.",
            (
                Param("path", "string", _PATH, required=True),
                Param("offset", "integer", "lines to skip from the start", default=0),
                Param("limit", "integer", f"lines to return (default {DEFAULT_READ_LINES})"),
            ),
            mutating=False,
        ),
        ToolSpec(
            "write_file",
            "Create or replace a file with the given text; missing directories are created.",
            (
                Param("path", "string", _PATH, required=True),
                Param("content", "string", "the whole new content", required=True),
            ),
            mutating=True,
        ),
        ToolSpec(
            "edit_file",
            "Replace an exact piece of text in a file; it must occur exactly `count` times.",
            (
                Param("path", "string", _PATH, required=True),
                Param("old", "string", "the exact text to replace (with enough context to be unique)", required=True),
                Param("new", "string", "the replacement text", required=True),
                Param("count", "integer", "how many times `old` occurs (all are replaced)", default=1),
            ),
            mutating=True,
        ),
        ToolSpec(
            "list_dir",
            "List a directory's entries (kind, size, link target), some levels deep.",
            (
                Param("path", "string", _PATH, default="."),
                Param("depth", "integer", "levels to descend", default=1),
            ),
            mutating=False,
        ),
        ToolSpec(
            "search",
            "Search the project's text files (.gitignore'd files skipped) for a regular expression.",
            (
                Param("pattern", "string", "a regular expression (Perl syntax)", required=True),
                Param("path", "string", "the directory (or file) to search", default="."),
                Param("glob", "string", "only files whose name matches this glob, e.g. *.py"),
                Param("ignore_case", "boolean", "match without regard to case", default=False),
            ),
            mutating=False,
        ),
        ToolSpec(
            "bash",
            "Run a shell command in the sandbox, from the workspace's top directory.",
            (
                Param("command", "string", "the command (bash syntax)", required=True),
                Param("timeout", "number", "seconds before the command is killed"),
            ),
            mutating=True,
        ),
        ToolSpec(
            "exec",
            "Run a program with arguments (no shell) in the sandbox.",
            (
                Param("argv", "array", "the program and its arguments", required=True),
                Param("timeout", "number", "seconds before the command is killed"),
            ),
            mutating=True,
        ),
    )
}


def check_args(tool: str, args: object) -> dict[str, object]:
    """`args` checked against the tool's parameters (names, types, required ones): a ToolError otherwise."""
    spec = SPECS[tool]
    if not isinstance(args, dict):
        raise ToolError(f"{tool} takes an object of arguments", tool=tool)
    known = {p.name: p for p in spec.params}
    out: dict[str, object] = {}
    for name, value in args.items():
        param = known.get(name)
        if param is None:
            raise ToolError(f"{tool} has no argument {name!r} (it takes {', '.join(known)})", tool=tool)
        if value is None and not param.required:
            continue
        ok = {
            "string": isinstance(value, str),
            "integer": isinstance(value, int) and not isinstance(value, bool),
            "number": isinstance(value, int | float) and not isinstance(value, bool),
            "boolean": isinstance(value, bool),
            "array": isinstance(value, list) and all(isinstance(v, str) for v in value),
        }[param.kind]
        if not ok:
            raise ToolError(
                f"{tool}: {name} must be a{'n' if param.kind[0] in 'aei' else ''} {param.kind}, not {value!r}",
                tool=tool,
            )
        out[name] = value
    missing = [p.name for p in spec.params if p.required and p.name not in out]
    if missing:
        raise ToolError(f"{tool} needs {', '.join(missing)}", tool=tool)
    return out
