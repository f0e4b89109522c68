"""Recording the workspace as git trees: the in-memory snapshot, the stat cache and the recorder.

`Tree` holds the current snapshot as {directory: {name: (mode, id)}} and writes only the trees a
change touched (a step that edits one file writes one blob and the trees above it). `Recorder`
brings the snapshot up to date with the workspace, either for the entries inotify named (a tool
call's usual path) or for the whole tree (a full scan), with the rules of `git add -A`:

- tracked entries are always recorded; untracked ones unless a .gitignore pattern (or a session
  exclude) ignores them, as git itself answers (`corral.session.ignore`);
- regular files (mode 100644, or 100755 when the owner may execute) and symbolic links (as links,
  never followed) are recorded; empty directories, fifos, sockets and devices are not;
- no path component named `.git` (in any case) is ever recorded, as git refuses them: a nested
  repository's files are recorded as plain files, its `.git` never;
- no path of `PATH_MAX` (4096) bytes or more is recorded (a warning names it): git names work tree
  files by their path, and neither it nor the agent's own tools can open such a path. This bound
  also keeps a pathological tree (a directory nested a million deep) from costing time without end.

One pass (`update` or `scan`) costs time linear in what it walks, whatever the depth: directories
are opened from their parent's open descriptor (`Root.cached`) and what git is asked about a
directory's ancestors is remembered for the pass (`IgnoreChecker.checking`), instead of walking
from the workspace root again for every path.

`StatCache` remembers each file's blob id by (mode, size, mtime, ctime, inode), as git's index does;
an entry is trusted only if the file's last change is well before the moment it was hashed, so a
change in the same clock tick is never missed (git's "racy" problem).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import struct
import time
from collections.abc import Iterator

from corral.session.fsafe import PATH_MAX, Root, Unsafe, join
from corral.session.gitstore import BLOB, EMPTY_TREE, EXEC, LINK, TREE, GitStore
from corral.session.ignore import IgnoreChecker
from corral.session.watch import Changes

log = logging.getLogger(__name__)

Entry = tuple[int, str]  # (mode, object id)
RACY_NS = 50_000_000  # a change this close to the moment a file was looked at is not trusted


def is_git_name(name: bytes) -> bool:
    """True for `.git` in any case (git refuses such a component everywhere in a tree)."""
    return len(name) == 4 and name.lower() == b".git"


def has_git_component(path: bytes) -> bool:
    return any(is_git_name(part) for part in path.split(b"/"))


def _split(path: bytes) -> tuple[bytes, bytes]:
    parent, _, name = path.rpartition(b"/")
    return parent, name


def _depth(path: bytes) -> int:
    return path.count(b"/") + 1 if path else 0


class Tree:
    """A snapshot of the workspace as git would record it, written to objects incrementally."""

    def __init__(self) -> None:
        self.dirs: dict[bytes, dict[bytes, Entry]] = {b"": {}}
        self.dirty: set[bytes] = {b""}
        self.sha = EMPTY_TREE
        self.touched: set[bytes] = set()  # paths whose entry changed since the last reset

    @classmethod
    def load(cls, store: GitStore, sha: str) -> Tree:
        tree = cls()
        stack = [(b"", sha)]
        while stack:
            path, tree_sha = stack.pop()
            entries: dict[bytes, Entry] = {}
            for name, mode, child in store.read_tree(tree_sha):
                entries[name] = (mode, child)
                if mode == TREE:
                    stack.append((join(path, name), child))
            tree.dirs[path] = entries
        tree.dirty.clear()
        tree.sha = sha
        return tree

    def get(self, path: bytes) -> Entry | None:
        parent, name = _split(path)
        entries = self.dirs.get(parent)
        return None if entries is None else entries.get(name)

    def is_file(self, path: bytes) -> bool:
        entry = self.get(path)
        return entry is not None and entry[0] != TREE

    def _mark(self, directory: bytes) -> None:
        # `dirty` holds the ancestors of all it holds: stop at the first directory already marked
        # (marking every directory of a deep new path would otherwise cost the square of its depth).
        dirty = self.dirty
        while directory not in dirty:
            dirty.add(directory)
            if not directory:
                return
            directory = _split(directory)[0]

    def set_file(self, path: bytes, mode: int, sha: str) -> bool:
        parts = path.split(b"/")
        current = b""
        for part in parts[:-1]:
            child = join(current, part)
            entry = self.dirs[current].get(part)
            if entry is None or entry[0] != TREE:
                if entry is not None:
                    self.touched.add(child)
                self.dirs[current][part] = (TREE, EMPTY_TREE)
                self.dirs[child] = {}
                self._mark(current)
            current = child
        name = parts[-1]
        old = self.dirs[current].get(name)
        if old == (mode, sha):
            return False
        if old is not None and old[0] == TREE:
            self._drop_dir(path)
        self.dirs[current][name] = (mode, sha)
        self._mark(current)
        self.touched.add(path)
        return True

    def remove(self, path: bytes) -> bool:
        parent, name = _split(path)
        entries = self.dirs.get(parent)
        if entries is None or name not in entries:
            return False
        mode, _ = entries.pop(name)
        if mode == TREE:
            self._drop_dir(path)
        else:
            self.touched.add(path)
        self._mark(parent)
        return True

    def _drop_dir(self, path: bytes) -> None:
        stack = [path]
        while stack:
            directory = stack.pop()
            for name, (mode, _) in self.dirs.pop(directory, {}).items():
                child = join(directory, name)
                if mode == TREE:
                    stack.append(child)
                else:
                    self.touched.add(child)

    def files(self, prefix: bytes = b"") -> Iterator[tuple[bytes, int, str]]:
        """(path, mode, id) of every recorded file and link at or below `prefix`."""
        entry = self.get(prefix) if prefix else (TREE, "")
        if entry is None:
            return
        if entry[0] != TREE:
            yield prefix, entry[0], entry[1]
            return
        stack = [prefix]
        while stack:
            directory = stack.pop()
            for name, (mode, sha) in self.dirs.get(directory, {}).items():
                child = join(directory, name)
                if mode == TREE:
                    stack.append(child)
                else:
                    yield child, mode, sha

    def flat(self) -> dict[bytes, Entry]:
        return {path: (mode, sha) for path, mode, sha in self.files()}

    def write(self, store: GitStore) -> str:
        """Write the trees changed since the last write; return the root tree's id."""
        for directory in sorted(self.dirty, key=_depth, reverse=True):
            entries = self.dirs.get(directory)
            if entries is None:
                continue
            if not entries and directory:
                parent, name = _split(directory)
                del self.dirs[directory]
                parent_entries = self.dirs.get(parent)
                if parent_entries is not None:
                    parent_entries.pop(name, None)
                continue
            sha = store.write_tree(entries)
            if directory:
                parent, name = _split(directory)
                self.dirs[parent][name] = (TREE, sha)
            else:
                self.sha = sha
        self.dirty.clear()
        return self.sha


_CACHE_MAGIC = b"corral-statcache 1\n"
_CACHE_REC = struct.Struct("<IQqqQq20sI")


HostStat = tuple[int, int, int, int]  # (size, mtime_ns, ctime_ns, inode) of a host file


def host_stat(st: os.stat_result) -> HostStat:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def racy(st: os.stat_result) -> bool:
    """True when the file changed so recently that a change in the same clock tick could hide behind
    an identical stat: such a file is later compared by content, not by stat."""
    return time.time_ns() - st.st_ctime_ns < RACY_NS


class StatCache:
    """Blob ids of workspace files by their stat, so unchanged files are not read again."""

    def __init__(self) -> None:
        self.entries: dict[bytes, tuple[int, int, int, int, int, int, str]] = {}

    @staticmethod
    def _key(st: os.stat_result) -> tuple[int, int, int, int, int]:
        return (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)

    def lookup(self, path: bytes, st: os.stat_result) -> str | None:
        entry = self.entries.get(path)
        if entry is None or entry[:5] != self._key(st):
            return None
        if st.st_ctime_ns >= entry[5] - RACY_NS:
            return None
        return entry[6]

    def put(self, path: bytes, st: os.stat_result, sha: str, checked_ns: int | None = None) -> None:
        checked = time.time_ns() if checked_ns is None else checked_ns
        self.entries[path] = (*self._key(st), checked, sha)

    def save(self, path: str, keep: Tree) -> None:
        parts = [_CACHE_MAGIC]
        for name, (mode, size, mtime, ctime, ino, checked, sha) in self.entries.items():
            if not keep.is_file(name):
                continue
            parts.append(_CACHE_REC.pack(mode, size, mtime, ctime, ino, checked, bytes.fromhex(sha), len(name)))
            parts.append(name)
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as f:
            f.write(b"".join(parts))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> StatCache:
        cache = cls()
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return cache
        if not data.startswith(_CACHE_MAGIC):
            return cache
        offset = len(_CACHE_MAGIC)
        try:
            while offset < len(data):
                mode, size, mtime, ctime, ino, checked, sha, length = _CACHE_REC.unpack_from(data, offset)
                offset += _CACHE_REC.size
                name = data[offset : offset + length]
                offset += length
                cache.entries[name] = (mode, size, mtime, ctime, ino, checked, sha.hex())
        except struct.error:
            log.warning("stat cache %s is truncated; files will be re-read", path)
        return cache


class Recorder:
    """Brings a `Tree` up to date with the workspace."""

    def __init__(self, store: GitStore, root: Root, tree: Tree, cache: StatCache, ignore: IgnoreChecker) -> None:
        self.store = store
        self.root = root
        self.tree = tree
        self.cache = cache
        self.ignore = ignore
        self._too_long: list[bytes] = []  # paths of PATH_MAX bytes or more seen in this pass (the first)
        self._too_long_count = 0

    @contextlib.contextmanager
    def _pass(self) -> Iterator[None]:
        """One recording pass: directory descriptors and ignore verdicts are kept while it lasts."""
        self._too_long, self._too_long_count = [], 0
        with self.root.cached(), self.ignore.checking():
            yield
        if self._too_long:
            log.warning(
                "%d path(s) of %d bytes or more are not recorded (git cannot name them), e.g. %r",
                self._too_long_count,
                PATH_MAX,
                self._too_long[0][:200] + b"...",
            )

    def _skip_too_long(self, path: bytes) -> None:
        self._too_long_count += 1
        if not self._too_long:
            self._too_long.append(path)

    def update(self, changes: Changes) -> bool:
        """Record the entries `changes` names. False when that cannot be trusted (a changed file has
        other hard links) and the caller must scan everything."""
        with self._pass():
            return self._update(changes)

    def _update(self, changes: Changes) -> bool:
        names = changes.paths | changes.dirs
        rules = [p for p in names if _split(p)[1] == b".gitignore"]
        if rules:
            # New rules may un-ignore (or ignore) anything below them: read those directories again.
            self.ignore.restart()
            names |= {_split(p)[0] for p in rules}
        trusted = True
        candidates: list[tuple[bytes, os.stat_result]] = []
        for path in sorted(names):
            if has_git_component(path):
                continue
            if len(path) >= PATH_MAX:
                self._skip_too_long(path)
                self.tree.remove(path)
                continue
            st = self.root.lstat(path)
            if st is None:
                self.tree.remove(path)
                continue
            if stat.S_ISDIR(st.st_mode):
                if path:
                    self._walk_changed_dir(path)
                else:
                    self._walk(b"")
                continue
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                trusted = False
            self._file(path, st, candidates)
        self._flush(candidates)
        return trusted

    def scan(self) -> None:
        """Record the whole workspace."""
        with self._pass():
            self.ignore.restart()
            self._walk(b"")

    def _walk_changed_dir(self, path: bytes) -> None:
        entry = self.tree.get(path)
        if entry is not None and entry[0] != TREE:
            self.tree.remove(path)
            entry = None
        if entry is None and self.ignore.ignored([path])[0]:
            return
        self._walk(path)

    def _file(self, path: bytes, st: os.stat_result, candidates: list[tuple[bytes, os.stat_result]]) -> None:
        """A non-directory entry: record it now if tracked, else after asking about ignores."""
        entry = self.tree.get(path)
        if entry is not None and entry[0] == TREE:
            self.tree.remove(path)
            entry = None
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            self.tree.remove(path)
            return
        if entry is not None:
            self._record(path, st)
        else:
            candidates.append((path, st))

    def _flush(self, candidates: list[tuple[bytes, os.stat_result]]) -> None:
        if not candidates:
            return
        answers = self.ignore.ignored([path for path, _ in candidates])
        for (path, st), ignored in zip(candidates, answers, strict=True):
            if not ignored:
                self._record(path, st)
        candidates.clear()

    def _record(self, path: bytes, st: os.stat_result) -> None:
        if stat.S_ISLNK(st.st_mode):
            try:
                target = self.root.readlink(path)
            except (OSError, Unsafe):
                self.tree.remove(path)
                return
            self.tree.set_file(path, LINK, self.store.write(b"blob", target))
            return
        sha = self.cache.lookup(path, st)
        if sha is None:
            try:
                fd, st = self.root.open_file(path)
            except (FileNotFoundError, Unsafe, IsADirectoryError):
                self.tree.remove(path)
                return
            except PermissionError:
                log.warning("cannot read %r in the workspace; its last recorded state is kept", path)
                return
            try:
                checked = time.time_ns()
                sha = self.store.write_file(fd, st.st_size)
            finally:
                os.close(fd)
            self.cache.put(path, st, sha, checked)
        self.tree.set_file(path, EXEC if st.st_mode & 0o100 else BLOB, sha)

    def _walk(self, top: bytes) -> None:
        cache = self.cache
        stack = [top]
        while stack:
            directory = stack.pop()
            try:
                listing = self.root.listdir(directory)
            except (FileNotFoundError, NotADirectoryError, Unsafe):
                self.tree.remove(directory)
                continue
            except PermissionError:
                log.warning("cannot list %r in the workspace; its last recorded state is kept", directory)
                continue
            recorded = dict(self.tree.dirs.get(directory, {}))
            candidates: list[tuple[bytes, os.stat_result]] = []
            new_dirs: list[bytes] = []
            for name, st in listing:
                if is_git_name(name):
                    continue
                path = join(directory, name)
                if len(path) >= PATH_MAX:  # left in `recorded`: removed below if it was recorded
                    self._skip_too_long(path)
                    continue
                entry = recorded.pop(name, None)
                if stat.S_ISDIR(st.st_mode):
                    if entry is not None and entry[0] != TREE:
                        self.tree.remove(path)
                        entry = None
                    if entry is not None:
                        stack.append(path)
                    else:
                        new_dirs.append(path)
                    continue
                if entry is not None and stat.S_ISREG(st.st_mode):
                    # The common case, kept cheap: a recorded file whose stat says it is unchanged.
                    sha = cache.lookup(path, st)
                    if sha is not None and entry == (EXEC if st.st_mode & 0o100 else BLOB, sha):
                        continue
                self._file(path, st, candidates)
            for name in recorded:  # recorded but gone
                self.tree.remove(join(directory, name))
            if new_dirs:
                answers = self.ignore.ignored(new_dirs)
                stack.extend(path for path, skip in zip(new_dirs, answers, strict=True) if not skip)
            self._flush(candidates)
