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

The workspace's place in the policy (`session_policy_for`): it replaces the project's zone, with the
same mode; a zone that would let the agent write the project itself, or see the session's own
files (its history above all), is refused.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from corral._record import Record
from corral.errors import ConfigError
from corral.policy.model import Policy, Zone
from corral.session.fsafe import Root, Unsafe, remove_tree, walk_dirs
from corral.session.gitstore import BLOB, EXEC, LINK, GitStore, git_program
from corral.session.history import History
from corral.session.record import HostStat, StatCache, Tree, has_git_component, host_stat, is_git_name, racy
from corral.session.sync import save_manifest

log = logging.getLogger(__name__)
_WORKERS = 4
# Blobs stored at copy-in are not compressed (zlib level 0: 3x faster on a large tree, at the price
# of the space): start-up time matters more than disk for the copy. Later steps' blobs are compressed.
COPY_LEVEL = 0


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
        root = Root(project)
        try:
            for directory in walk_dirs(root, b".git", lambda name: False):
                out.extend(directory + b"/" + name for name, st in root.listdir(directory)
                           if not stat.S_ISDIR(st.st_mode))  # fmt: skip
        finally:
            root.close()
    return out, how


class _Copied:
    __slots__ = ("dst", "host", "mode", "path", "racy", "sha", "size")

    def __init__(self, path: bytes, mode: int, sha: str, host: os.stat_result, dst: os.stat_result | None,
                 size: int) -> None:  # fmt: skip
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
    the number of bytes copied. Work is done a directory at a time (each opened once, without
    following links), on a few threads.
    """
    src = Root(project)
    dst = Root(workspace)
    skipped: list[str] = []
    results: list[_Copied] = []
    try:
        while paths:
            by_dir: dict[bytes, list[bytes]] = {}
            for path in paths:
                parent, _, name = path.rpartition(b"/")
                by_dir.setdefault(parent, []).append(name)
            for directory in sorted(by_dir):
                if directory:
                    dst.makedirs(directory)
            tasks = [(d, names[i : i + 256]) for d, names in by_dir.items() for i in range(0, len(names), 256)]
            found_dirs: list[bytes] = []
            with ThreadPoolExecutor(_WORKERS) as pool:
                for done, dirs in pool.map(lambda t: _copy_dir(src, dst, t[0], t[1], store, skipped), tasks):
                    results.extend(done)
                    found_dirs.extend(dirs)
            # Directories listed as a whole (a nested repository, a submodule): their files, never their .git.
            paths = [p for d in found_dirs for p in _walk_files(src, d)]
    finally:
        src.close()
        dst.close()
    tree = Tree()
    cache = StatCache()
    manifest: dict[bytes, HostStat] = {}
    checked = time.time_ns()
    total = 0
    for copied in results:
        total += copied.size
        if has_git_component(copied.path):
            continue  # a .git asked for (include_git): in the workspace, never in the history
        tree.set_file(copied.path, copied.mode, copied.sha)
        if not copied.racy:
            manifest[copied.path] = copied.host
        if copied.dst is not None:
            cache.put(copied.path, copied.dst, copied.sha, checked)
    tree.write(store)
    tree.touched.clear()
    return tree, cache, manifest, skipped, total


def _walk_files(src: Root, top: bytes) -> list[bytes]:
    out: list[bytes] = []
    for directory in walk_dirs(src, top, is_git_name):
        try:
            entries = src.listdir(directory)
        except (OSError, Unsafe):
            continue
        out.extend(directory + b"/" + name for name, st in entries if not stat.S_ISDIR(st.st_mode)
                   and not is_git_name(name))  # fmt: skip
    return out


def _copy_dir(
    src: Root, dst: Root, directory: bytes, names: list[bytes], store: GitStore, skipped: list[str]
) -> tuple[list[_Copied], list[bytes]]:
    out: list[_Copied] = []
    dirs: list[bytes] = []
    parts = directory.split(b"/") if directory else []
    try:
        sfd = src.open_dir(parts)
    except (OSError, Unsafe):
        return out, dirs  # listed by git, but gone or behind a link now
    try:
        dfd = dst.open_dir(parts)
        try:
            for name in names:
                path = directory + b"/" + name if directory else name
                try:
                    copied = _copy_entry(sfd, dfd, name, path, store, dirs)
                except OSError as exc:
                    skipped.append(f"{os.fsdecode(path)}: {exc.strerror or exc}")
                    continue
                if copied is not None:
                    out.append(copied)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
    return out, dirs


def _copy_entry(sfd: int, dfd: int, name: bytes, path: bytes, store: GitStore, dirs: list[bytes]) -> _Copied | None:
    try:
        st = os.stat(name, dir_fd=sfd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(name, dir_fd=sfd)
        os.symlink(target, name, dir_fd=dfd)
        return _Copied(path, LINK, store.write(b"blob", target), st, None, 0)
    if stat.S_ISDIR(st.st_mode):
        dirs.append(path)
        return None
    if not stat.S_ISREG(st.st_mode):
        raise OSError(0, "not a regular file or a link")
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=sfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(0, "not a regular file or a link")
        return _copy_file(fd, st, dfd, name, path, store)
    finally:
        os.close(fd)


def _copy_file(fd: int, st: os.stat_result, dfd: int, name: bytes, path: bytes, store: GitStore) -> _Copied:
    """Copy the open file `fd` to `name` in `dfd`, hashing and compressing its blob from the same reads."""
    import hashlib
    import zlib

    out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
    try:
        header = b"blob %d\0" % st.st_size
        digest = hashlib.sha1(header)
        compressor = zlib.compressobj(COPY_LEVEL)
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
        if size != st.st_size:  # the file changed while we copied it: store what we copied
            os.lseek(out, 0, os.SEEK_SET)
            reopened = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            try:
                sha = store.write_file(reopened, size)
            finally:
                os.close(reopened)
        else:
            chunks.append(compressor.flush())
            sha = digest.hexdigest()
            if not store.has(sha):
                store.store_compressed(sha, chunks)
    finally:
        os.close(out)
    mode = EXEC if st.st_mode & 0o100 else BLOB
    return _Copied(path, mode, sha, st, dst_st, size)


def build(
    directory: str, project: str, *, excludes: Sequence[str], include_git: bool, base_ref: str, host_ref: str
) -> CopyReport:
    """Copy-in and step 0 in a session directory under construction (`base_ref` and `host_ref` are set
    to step 0: the copy-in, and what the host project holds)."""
    started = time.monotonic()
    workspace = os.path.join(directory, "workspace")
    patterns = [p.encode() for p in excludes]
    info_exclude = os.path.join(project, ".git", "info", "exclude")
    if os.path.isfile(info_exclude):
        with open(info_exclude, "rb") as f:
            patterns += f.read().splitlines()
    store = GitStore.create(os.path.join(directory, "history.git"), workspace, excludes=patterns)
    scratch = os.path.join(directory, "scratch.git")
    paths, how = list_project(project, excludes=excludes, include_git=include_git, scratch=scratch)
    if os.path.isdir(scratch):
        remove_tree(scratch)
    tree, cache, manifest, skipped, total = copy_in(project, workspace, paths, store)
    report = CopyReport(
        files=sum(1 for _ in tree.files()),
        bytes=total,
        seconds=time.monotonic() - started,
        skipped=tuple(skipped),
        source=how,
    )
    history = History(store)
    history.commit(
        tree.sha,
        tool="copy-in",
        summary=f"copy-in of {project}",
        details={
            "project": project,
            "files": report.files,
            "bytes": report.bytes,
            "skipped": len(skipped),
            "excludes": list(excludes),
            "include_git": include_git,
            "source": how,
        },
    )
    base = history.head
    assert base is not None
    store.update_ref(base_ref, base, old=None)
    store.update_ref(host_ref, base, old=None)
    cache.save(os.path.join(directory, "statcache"), tree)
    save_manifest(os.path.join(directory, "manifest"), manifest)
    return report.replace(seconds=time.monotonic() - started)


def session_policy_for(
    policy: Policy, *, project: str, workspace: str, mount: str | None, remap: bool, state_dir: str
) -> tuple[Policy, str]:
    """`policy` with its project zone replaced by the workspace, and where the workspace appears.

    The workspace takes the project zone's mode and mount point (default: the project's own path),
    or `mount`; a backend that cannot mount a directory elsewhere (no `remap`) shows it at its real
    path. Zones that would let the agent write the project itself or reach the session's files
    (its history above all) are refused.
    """
    mode = "rw"
    project_mount = project
    for zone in policy.zones:
        if zone.host is not None and os.path.realpath(os.path.expanduser(zone.host)) == project:
            mode, project_mount = zone.mode, zone.mount
    where = mount or (project_mount if remap else workspace)
    zones: list[Zone] = []
    for zone in policy.zones:
        if zone.mount == where:
            continue  # the workspace goes there
        if zone.host is None:
            zones.append(zone)
            continue
        real = os.path.realpath(os.path.expanduser(zone.host))
        if real == project:
            continue
        if inside(state_dir, real) or inside(real, state_dir):
            raise ConfigError(
                f"zone {zone.host} would show the agent the session's own files ({state_dir}), history included",
                where="zones",
            )
        if zone.mode == "rw" and (inside(project, real) or inside(real, project)):
            raise ConfigError(
                f"zone {zone.host} is writable and overlaps the project: a session leaves the "
                "project untouched until sync (make the zone read-only, or leave it out)",
                where="zones",
            )
        zones.append(zone)
    zones.append(Zone(host=workspace, mount=where, mode=mode))  # type: ignore[arg-type]
    return policy.replace(zones=tuple(zones), cwd=where), where


def inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")
