"""The session's own git repository: objects and refs written directly, `git` run for the rest.

The repository is a bare GIT_DIR beside the workspace, in no sandbox zone: the agent can neither
rewrite its history nor plant hooks in it. corral writes loose objects and refs itself (a tool
call's commit costs no `git` process); `git` is run, with a hardened environment that reads no
system or user configuration, only to diff trees and to answer .gitignore questions.

Objects are standard git objects, so `GIT_DIR=<session>/history.git git log -p` works for anyone
who wants to look with their own tools.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence

from corral._record import Record
from corral.errors import SessionError

# Git file modes as they appear in trees.
TREE = 0o40000
BLOB = 0o100644
EXEC = 0o100755
LINK = 0o120000
EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
BRANCH = "refs/heads/session"
LEVEL = 1  # zlib level for objects: fast; the store is a cache of steps, not an archive
_CHUNK = 1 << 20
# Every attribute that could change how a file is diffed or converted, reset with the highest
# precedence git has ($GIT_DIR/info/attributes): a `.gitattributes` written by the agent cannot mark
# its changes binary (hiding them from review) or route them through a filter or a textconv.
ATTRIBUTES = b"* !diff !merge -text -filter -ident -working-tree-encoding !eol\n"
CONFIG = b"""[core]
\trepositoryformatversion = 0
\tbare = true
\tfilemode = true
\tsymlinks = true
\tignorecase = false
\tautocrlf = false
\tfsmonitor = false
\thooksPath = /dev/null
\tlogAllRefUpdates = false
\tquotePath = true
[gc]
\tauto = 0
[diff]
\trenames = false
[user]
\tname = corral
\temail = corral@localhost
"""


class Commit(Record):
    """A parsed commit object."""

    __slots__ = ("message", "parents", "sha", "time", "tree")
    sha: str
    tree: str
    parents: tuple[str, ...]
    time: int
    message: str

    def __init__(self, *, sha: str, tree: str, parents: tuple[str, ...], time: int, message: str) -> None:
        self._set(sha=sha, tree=tree, parents=parents, time=time, message=message)


def git_program() -> str:
    import shutil

    found = shutil.which("git")
    if found is None:
        raise SessionError("sessions need git, and it is not installed (apt-get install git)")
    return found


class GitStore:
    """One bare repository: read and write objects and refs, run git commands on it."""

    def __init__(self, git_dir: str, work_tree: str) -> None:
        self.git_dir = git_dir
        self.work_tree = work_tree
        self._objects = os.path.join(git_dir, "objects")
        self._made_dirs: set[str] = set()
        self.program = git_program()

    @classmethod
    def create(cls, git_dir: str, work_tree: str, *, excludes: Iterable[bytes] = ()) -> GitStore:
        """A new empty repository at `git_dir` (which must not exist yet)."""
        store = cls(git_dir, work_tree)
        os.makedirs(git_dir, mode=0o700)
        for sub in ("objects/info", "objects/pack", "refs/heads", "refs/tags", "refs/corral", "info"):
            os.makedirs(os.path.join(git_dir, sub), exist_ok=True)
        _write_new(os.path.join(git_dir, "HEAD"), f"ref: {BRANCH}\n".encode())
        _write_new(os.path.join(git_dir, "config"), CONFIG)
        _write_new(os.path.join(git_dir, "description"), b"corral session history\n")
        _write_new(os.path.join(git_dir, "info", "attributes"), ATTRIBUTES)
        patterns = b"".join(p.rstrip(b"\n") + b"\n" for p in excludes if p.strip())
        _write_new(os.path.join(git_dir, "info", "exclude"), b"# corral session excludes\n" + patterns)
        return store

    # ------------------------------------------------------------------ git processes
    def env(self, *, work_tree: bool = False) -> dict[str, str]:
        """A git environment that reads only this repository's config (never ~/.gitconfig or /etc/gitconfig)."""
        env = {
            "PATH": os.environ.get("PATH") or "/usr/bin:/bin",
            "LC_ALL": "C",
            "GIT_DIR": self.git_dir,
            "HOME": self.git_dir,
            "XDG_CONFIG_HOME": os.path.join(self.git_dir, "no-config"),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_ATTR_NOSYSTEM": "1",
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_NO_REPLACE_OBJECTS": "1",
            "GIT_OPTIONAL_LOCKS": "0",
            "GIT_PAGER": "cat",
            "PAGER": "cat",
        }
        if work_tree:
            env["GIT_WORK_TREE"] = self.work_tree
        return env

    def git(self, *args: str, input: bytes | None = None, timeout: float = 120.0, work_tree: bool = False) -> bytes:
        """Run `git ARGS` on this repository and return its stdout; a failure is a `SessionError`."""
        try:
            done = subprocess.run(
                [self.program, *args],
                input=input,
                capture_output=True,
                env=self.env(work_tree=work_tree),
                cwd=self.work_tree if work_tree else self.git_dir,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise SessionError(f"git {args[0]} took longer than {timeout:g}s") from None
        if done.returncode != 0:
            message = done.stderr.decode("utf-8", "replace").strip()
            raise SessionError(f"git {args[0]} failed: {message}")
        return done.stdout

    def git_head(self, *args: str, limit: int, timeout: float = 120.0) -> tuple[bytes, bool]:
        """The first `limit` bytes git writes for `git ARGS`, and whether it had more to say."""
        import select

        proc = subprocess.Popen([self.program, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=self.env(), cwd=self.git_dir)  # fmt: skip
        assert proc.stdout is not None and proc.stderr is not None
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + timeout
        try:
            while size <= limit:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
                    raise SessionError(f"git {args[0]} took longer than {timeout:g}s")
                chunk = os.read(proc.stdout.fileno(), 1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        finally:
            cut = size > limit
            if cut or proc.poll() is None:
                proc.kill()
            proc.wait()
            error = proc.stderr.read().decode("utf-8", "replace").strip()
            proc.stdout.close()
            proc.stderr.close()
        if not cut and proc.returncode != 0:
            raise SessionError(f"git {args[0]} failed: {error}")
        return b"".join(chunks)[:limit], cut

    # ------------------------------------------------------------------ objects
    def _path(self, sha: str) -> str:
        return os.path.join(self._objects, sha[:2], sha[2:])

    def has(self, sha: str) -> bool:
        return os.path.exists(self._path(sha))

    def write(self, kind: bytes, data: bytes) -> str:
        """Store an object (if new) and return its id."""
        header = b"%s %d\0" % (kind, len(data))
        h = hashlib.sha1(header)
        h.update(data)
        sha = h.hexdigest()
        path = self._path(sha)
        if not os.path.exists(path):
            compressor = zlib.compressobj(LEVEL)
            self.store_compressed(sha, (compressor.compress(header), compressor.compress(data), compressor.flush()))
        return sha

    def write_file(self, fd: int, size: int) -> str:
        """Store the regular file open at `fd` (read to its end) as a blob; return the blob id."""
        if size <= _CHUNK:
            data = _read_all(fd, size)
            return self.write(b"blob", data)
        # Large files are compressed as they are read; the id is known only at the end.
        header = b"blob %d\0" % size
        h = hashlib.sha1(header)
        compressor = zlib.compressobj(LEVEL)
        parts = [compressor.compress(header)]
        seen = 0
        while True:
            chunk = os.read(fd, _CHUNK)
            if not chunk:
                break
            seen += len(chunk)
            h.update(chunk)
            parts.append(compressor.compress(chunk))
        if seen != size:  # changed while we read it: hash what is there now
            os.lseek(fd, 0, os.SEEK_SET)
            return self.write(b"blob", _read_all(fd, seen))
        parts.append(compressor.flush())
        sha = h.hexdigest()
        if not os.path.exists(self._path(sha)):
            self.store_compressed(sha, parts)
        return sha

    def store_compressed(self, sha: str, parts: Sequence[bytes]) -> None:
        """Store an object given as its zlib stream in parts (the caller computed `sha`)."""
        directory = os.path.join(self._objects, sha[:2])
        if directory not in self._made_dirs:
            os.makedirs(directory, exist_ok=True)
            self._made_dirs.add(directory)
        tmp = os.path.join(directory, f"tmp_obj_{os.getpid()}_{os.urandom(4).hex()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        try:
            for part in parts:
                _write_all(fd, part)
        finally:
            os.close(fd)
        os.rename(tmp, self._path(sha))

    def read(self, sha: str) -> tuple[bytes, bytes]:
        """(kind, content) of an object."""
        try:
            with open(self._path(sha), "rb") as f:
                raw = zlib.decompress(f.read())
        except FileNotFoundError:
            return self._read_packed(sha)
        header, _, data = raw.partition(b"\0")
        kind, _, _size = header.partition(b" ")
        return kind, data

    def _read_packed(self, sha: str) -> tuple[bytes, bytes]:
        # corral never packs its own objects; a user who ran `git gc` on the history gets them read by git.
        out = self.git("cat-file", "--batch", input=sha.encode() + b"\n")
        header, _, rest = out.partition(b"\n")
        fields = header.split()
        if len(fields) != 3 or fields[1] == b"missing":
            raise SessionError(f"the session history lacks object {sha}: it is damaged")
        return fields[1], rest[: int(fields[2])]

    def read_blob(self, sha: str) -> bytes:
        kind, data = self.read(sha)
        if kind != b"blob":
            raise SessionError(f"object {sha} is a {kind.decode()}, not a blob")
        return data

    def read_tree(self, sha: str) -> list[tuple[bytes, int, str]]:
        """The entries (name, mode, id) of a tree."""
        if sha == EMPTY_TREE:
            return []
        kind, data = self.read(sha)
        if kind != b"tree":
            raise SessionError(f"object {sha} is a {kind.decode()}, not a tree")
        entries: list[tuple[bytes, int, str]] = []
        i = 0
        while i < len(data):
            space = data.index(b" ", i)
            nul = data.index(b"\0", space)
            entries.append((data[space + 1 : nul], int(data[i:space], 8), data[nul + 1 : nul + 21].hex()))
            i = nul + 21
        return entries

    def write_tree(self, entries: Mapping[bytes, tuple[int, str]]) -> str:
        """Store a tree from {name: (mode, id)}, in git's order (a directory sorts as if named 'name/')."""
        items = sorted(entries.items(), key=lambda kv: kv[0] + b"/" if kv[1][0] == TREE else kv[0])
        return self.write(
            b"tree", b"".join(b"%o %s\0%s" % (mode, name, bytes.fromhex(sha)) for name, (mode, sha) in items)
        )

    def write_commit(self, tree: str, parents: Sequence[str], message: str, *, when: int | None = None) -> str:
        when = int(time.time()) if when is None else when
        lines = [f"tree {tree}", *(f"parent {p}" for p in parents)]
        lines.append(f"author corral <corral@localhost> {when} +0000")
        lines.append(f"committer corral <corral@localhost> {when} +0000")
        body = "\n".join(lines) + "\n\n" + message.rstrip("\n") + "\n"
        return self.write(b"commit", body.encode("utf-8", "surrogateescape"))

    def read_commit(self, sha: str) -> Commit:
        kind, data = self.read(sha)
        if kind != b"commit":
            raise SessionError(f"object {sha} is a {kind.decode()}, not a commit")
        head, _, message = data.partition(b"\n\n")
        tree = ""
        parents: list[str] = []
        when = 0
        for line in head.split(b"\n"):
            key, _, value = line.partition(b" ")
            if key == b"tree":
                tree = value.decode()
            elif key == b"parent":
                parents.append(value.decode())
            elif key == b"committer":
                parts = value.split(b" ")
                if len(parts) >= 2 and parts[-2].isdigit():
                    when = int(parts[-2])
        return Commit(sha=sha, tree=tree, parents=tuple(parents), time=when, message=message.decode("utf-8", "replace"))

    # ------------------------------------------------------------------ refs
    def read_ref(self, name: str) -> str | None:
        try:
            with open(os.path.join(self.git_dir, name), "rb") as f:
                value = f.read().strip().decode()
        except FileNotFoundError:
            return None
        if len(value) != 40:
            raise SessionError(f"ref {name} of the session history is damaged")
        return value

    def update_ref(self, name: str, new: str, *, old: str | None) -> None:
        """Point `name` at `new` (lock file + rename, as git does), if it still points at `old`.

        The session's lock makes us the only writer, so a lock file found here was left by a
        process that died: it is removed and the update retried.
        """
        path = os.path.join(self.git_dir, name)
        lock = path + ".lock"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            os.unlink(lock)
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, new.encode() + b"\n")
        finally:
            os.close(fd)
        current = self.read_ref(name)
        if current != old:
            os.unlink(lock)
            raise SessionError(f"ref {name} moved underneath us ({current} instead of {old})")
        os.rename(lock, path)


def _read_all(fd: int, size: int) -> bytes:
    parts = []
    while True:
        chunk = os.read(fd, max(size + 1, 65536))
        if not chunk:
            break
        parts.append(chunk)
    return b"".join(parts)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _write_new(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)
