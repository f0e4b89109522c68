"""Copy-in: the project's files into a fresh workspace, recorded as the session's first step.

Which files: what git would call the project's files. In a git repository, the tracked files plus
the untracked ones no .gitignore ignores (`git ls-files --cached --others --exclude-standard`);
elsewhere the files no .gitignore ignores. The user's own patterns (gitignore syntax) are excluded
too, and `.git` is never copied unless asked.

How: each file is read once, and that one read feeds the copy, the blob's hash and the blob's
compressed object (threads: reads, writes, hashing and zlib release the GIL). Copies are real copies,
never hard links (a hard link would let the agent write to the user's file). Modes and modification
times are kept; symbolic links are copied as links; fifos, sockets and devices are skipped.

The stat of each source file is kept (the manifest), so sync can tell whether the user changed a
file after copy-in (a conflict) without reading it.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

from corral._record import Record
from corral.errors import ConfigError
from corral.session.fsafe import Root, walk_dirs
from corral.session.gitstore import BLOB, EXEC, LINK, GitStore, git_program
from corral.session.record import StatCache, Tree, has_git_component, is_git_name

log = logging.getLogger(__name__)
_WORKERS = 4

HostStat = tuple[int, int, int, int]  # (size, mtime_ns, ctime_ns, inode) of a host file


def host_stat(st: os.stat_result) -> HostStat:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def racy(st: os.stat_result) -> bool:
    """True when the file changed so recently that a change in the same clock tick could hide behind
    an identical stat: such a file is later compared by content, not by stat."""
    return time.time_ns() - st.st_ctime_ns < StatCache.RACY_NS


class CopyReport(Record):
    """What copy-in did."""

    __slots__ = ("bytes", "files", "seconds", "skipped", "source")
    files: int
    bytes: int
    seconds: float
    skipped: tuple[str, ...]  # files that could not be copied, with the reason
    source: str  # "git ls-files" or "walk"

    def __init__(self, *, files: int, bytes: int, seconds: float, skipped: tuple[str, ...], source: str) -> None:
        self._set(files=files, bytes=bytes, seconds=seconds, skipped=skipped, source=source)

    def as_json(self) -> dict[str, object]:
        return {
            "files": self.files,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "skipped": list(self.skipped),
            "source": self.source,
        }


def _git_env(extra: dict[str, str]) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH") or "/usr/bin:/bin",
        "LC_ALL": "C",
        "HOME": "/nonexistent",
        "XDG_CONFIG_HOME": "/nonexistent",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_OPTIONAL_LOCKS": "0",
    }
    env.update(extra)
    return env


def _ls_files(project: str, args: Sequence[str], env: dict[str, str]) -> list[bytes] | None:
    import subprocess

    # core.fsmonitor would run a command named by the repository's config: never.
    argv = [git_program(), "-c", "core.fsmonitor=false", "ls-files", "-z", *args]
    try:
        done = subprocess.run(argv, cwd=project, env=_git_env(env), capture_output=True, timeout=600, check=False)
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0:
        log.info("git ls-files in %s failed: %s", project, done.stderr.decode("utf-8", "replace").strip())
        return None
    return [p for p in done.stdout.split(b"\0") if p]


def list_project(project: str, *, excludes: Sequence[str], include_git: bool, scratch: str) -> tuple[list[bytes], str]:
    """The project's files to copy (relative paths) and how they were found. `scratch` is an empty
    directory usable as a throw-away GIT_DIR for projects that are not git repositories."""
    patterns = [arg for pattern in excludes for arg in ("--exclude", pattern)]
    paths: list[bytes] | None = None
    how = "git ls-files"
    if os.path.isdir(os.path.join(project, ".git")) or os.path.isfile(os.path.join(project, ".git")):
        # Only the project's own repository: never one found in a directory above it.
        ceiling = {"GIT_CEILING_DIRECTORIES": os.path.dirname(project)}
        paths = _ls_files(project, ["--cached", "--others", "--exclude-standard", *patterns], ceiling)
        if paths is not None and patterns:
            excluded = _ls_files(project, ["--cached", "--ignored", *patterns], ceiling)
            if excluded:
                drop = set(excluded)
                paths = [p for p in paths if p not in drop]
    if paths is None:
        import subprocess

        subprocess.run(
            [git_program(), "init", "-q", "--bare", scratch],
            env=_git_env({}),
            capture_output=True,
            check=True,
            timeout=60,
        )
        env = {"GIT_DIR": scratch, "GIT_WORK_TREE": project}
        paths = _ls_files(project, ["--others", "--exclude-standard", *patterns], env)
        how = "walk (.gitignore honoured)"
        if paths is None:
            raise ConfigError(f"cannot list the files of {project} (git ls-files failed)", where="project")
    out: list[bytes] = []
    seen: set[bytes] = set()
    for path in paths:
        path = path.rstrip(b"/")
        if not path or has_git_component(path) or path in seen:
            continue
        seen.add(path)
        out.append(path)
    if include_git and os.path.isdir(os.path.join(project, ".git")):
        out.extend(_walk_files(project, b".git"))
    return out, how


def _walk_files(project: str, top: bytes) -> Iterable[bytes]:
    root = Root(project)
    try:
        for directory in walk_dirs(root, top, lambda name: False):
            for name, st in root.listdir(directory):
                if not stat.S_ISDIR(st.st_mode):
                    yield directory + b"/" + name
    finally:
        root.close()


class _Copied:
    __slots__ = ("dst", "host", "mode", "path", "racy", "sha", "size")

    def __init__(
        self, path: bytes, mode: int, sha: str, host: os.stat_result, dst: os.stat_result | None, size: int
    ) -> None:
        self.racy = racy(host)
        self.path = path
        self.mode = mode
        self.sha = sha
        self.host = host_stat(host)
        self.dst = dst
        self.size = size


def copy_in(
    project: str, workspace: str, paths: list[bytes], store: GitStore
) -> tuple[Tree, StatCache, dict[bytes, HostStat], list[str], int]:
    """Copy `paths` from `project` into the (empty) `workspace` and store their blobs.

    Returns the snapshot tree, the workspace stat cache, the host manifest, what was skipped and
    the number of bytes copied. Directories (including those of nested repositories listed as a
    whole) are expanded here.
    """
    src = Root(project)
    dst = Root(workspace)
    skipped: list[str] = []
    try:
        files = _expand(src, paths, skipped)
        for directory in sorted({p.rpartition(b"/")[0] for p in files if b"/" in p}):
            dst.makedirs(directory)
        with ThreadPoolExecutor(_WORKERS) as pool:
            results = list(pool.map(lambda p: _copy_one(src, dst, p, store, skipped), files, chunksize=32))
    finally:
        src.close()
        dst.close()
    tree = Tree()
    cache = StatCache()
    manifest: dict[bytes, HostStat] = {}
    checked = time.time_ns()
    total = 0
    for copied in results:
        if copied is None:
            continue
        tree.set_file(copied.path, copied.mode, copied.sha)
        if not copied.racy:
            manifest[copied.path] = copied.host
        if copied.dst is not None:
            cache.put(copied.path, copied.dst, copied.sha, checked)
        total += copied.size
    tree.write(store)
    tree.touched.clear()
    return tree, cache, manifest, skipped, total


def _expand(src: Root, paths: list[bytes], skipped: list[str]) -> list[bytes]:
    files: list[bytes] = []
    for path in paths:
        st = src.lstat(path)
        if st is None:
            continue  # listed by git but gone (deleted in the worktree, or behind a link)
        if stat.S_ISDIR(st.st_mode):  # a nested repository or a submodule: its files, never its .git
            for directory in walk_dirs(src, path, is_git_name):
                for name, entry in src.listdir(directory):
                    if not stat.S_ISDIR(entry.st_mode) and not is_git_name(name):
                        files.append(directory + b"/" + name)
            continue
        files.append(path)
    return files


def _copy_one(src: Root, dst: Root, path: bytes, store: GitStore, skipped: list[str]) -> _Copied | None:
    try:
        st = src.lstat(path)
        if st is None:
            return None
        if stat.S_ISLNK(st.st_mode):
            target = src.readlink(path)
            dst_parent = dst.open_dir(path.split(b"/")[:-1])
            try:
                os.symlink(target, path.rpartition(b"/")[2], dir_fd=dst_parent)
            finally:
                os.close(dst_parent)
            return _Copied(path, LINK, store.write(b"blob", target), st, None, 0)
        if not stat.S_ISREG(st.st_mode):
            skipped.append(f"{os.fsdecode(path)}: not a regular file or a link")
            return None
        fd, st = src.open_file(path)
    except OSError as exc:
        skipped.append(f"{os.fsdecode(path)}: {exc.strerror or exc}")
        return None
    try:
        return _copy_file(fd, st, dst, path, store)
    except OSError as exc:
        skipped.append(f"{os.fsdecode(path)}: {exc.strerror or exc}")
        return None
    finally:
        os.close(fd)


def _copy_file(fd: int, st: os.stat_result, dst: Root, path: bytes, store: GitStore) -> _Copied:
    import hashlib
    import zlib

    from corral.session.gitstore import LEVEL

    parts = path.split(b"/")
    parent = dst.open_dir(parts[:-1])
    try:
        out = os.open(
            parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent
        )
    finally:
        os.close(parent)
    try:
        header = b"blob %d\0" % st.st_size
        digest = hashlib.sha1(header)
        compressor = zlib.compressobj(LEVEL)
        chunks = [compressor.compress(header)]
        size = 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            size += len(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(out, view) :]
            digest.update(chunk)
            chunks.append(compressor.compress(chunk))
        os.fchmod(out, stat.S_IMODE(st.st_mode))
        os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
        dst_st = os.fstat(out)
    finally:
        os.close(out)
    if size != st.st_size:  # the file changed while we copied it: store what we copied
        os.lseek(fd, 0, os.SEEK_SET)
        sha = store.write(b"blob", dst.read_bytes(path))
    else:
        chunks.append(compressor.flush())
        sha = digest.hexdigest()
        if not store.has(sha):
            store.store_compressed(sha, chunks)
    mode = EXEC if st.st_mode & 0o100 else BLOB
    return _Copied(path, mode, sha, st, dst_st, size)
