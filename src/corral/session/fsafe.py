"""File operations confined to one directory tree that never follow a link out of it.

A path is a relative byte string, walked one component at a time from an open directory with
`O_NOFOLLOW | O_DIRECTORY` (openat-style), so a symbolic link or a non-directory anywhere on the
way stops the walk instead of leading elsewhere. Final components are opened with `O_NOFOLLOW`;
files are replaced atomically (a temporary file in the same directory, then `rename`), which also
means a hard link planted at the target is replaced, never written through.

Used on the workspace (the agent's tools, rollback, recording) and on the host project (sync).

Walking from the root for every operation costs one `open` per component, so a pass that touches
every directory of a deep tree (a recording, a tool call) would cost quadratic time in the depth.
`Root.cached()` keeps, for the duration of one pass and one thread, the descriptors of the
directories it opened (a bounded, least recently used set): a path is then opened from its nearest
cached ancestor, one component at a time with the same `O_NOFOLLOW | O_DIRECTORY`, so no link is
ever followed. A cached descriptor names the directory that was at that path when it was opened, as
if the pass's operation had happened at that moment; removals through the `Root` forget it. Walks
(`walk_dirs`, `rmtree`) use the same set, which also keeps their descriptors bounded at any depth.

Linux refuses a path of `PATH_MAX` (4096) bytes or more and a name of more than `NAME_MAX` (255)
bytes; the walk by descriptors does not need the former, but git does (it names work tree files by
their path), so the recorder and the tools stop there (`corral.session.record`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
TMP_MARK = b".corral-tmp-"
PATH_MAX = 4096  # bytes, the terminating NUL included: a relative path is at most PATH_MAX - 1 bytes
NAME_MAX = 255  # bytes in one path component (every Linux file system corral supports)
_CACHED_DIRS = 128  # directory descriptors one pass keeps open


class Unsafe(Exception):
    """The path cannot be reached without following a link, or goes through something not a directory."""


def split(rel: bytes) -> list[bytes]:
    """The components of a relative path; raises Unsafe on '..', NUL or an absolute path."""
    if rel.startswith(b"/") or b"\0" in rel:
        raise Unsafe(f"not a relative path: {rel!r}")
    if not rel:
        return []
    parts = rel.split(b"/")
    # An empty or "." component, found in the bytes (cheaper than comparing every component).
    empty = b"//" in rel or rel.endswith(b"/")
    dot = rel == b"." or rel.startswith(b"./") or rel.endswith(b"/.") or b"/./" in rel
    if empty or dot:
        parts = [p for p in parts if p and p != b"."]
    if b".." in rel and b".." in parts:
        raise Unsafe(f"path leaves its root: {rel!r}")
    return parts


def join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


def tmp_name(name: bytes) -> bytes:
    """A temporary name beside `name` (hidden, marked, short enough for any file system)."""
    return b"." + name[:100] + TMP_MARK + os.urandom(5).hex().encode()


def _open_sub(fd: int, part: bytes, parts: list[bytes], create: bool) -> int:
    """The directory `part` in the directory `fd`, never through a link (see `Root.open_dir`)."""
    try:
        return os.open(part, _DIR_FLAGS, dir_fd=fd)
    except FileNotFoundError:
        if not create:
            raise
        try:
            os.mkdir(part, 0o755, dir_fd=fd)
        except FileExistsError:
            pass
        return _open_sub(fd, part, parts, False)
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            raise Unsafe(f"{b'/'.join(parts)!r}: {part!r} is a link or not a directory") from None
        raise


class _Dirs:
    """Descriptors of directories below `top` (a descriptor this set does not own), by relative path,
    each opened from its parent's without following links; at most `limit` are kept open."""

    def __init__(self, top: int, limit: int = _CACHED_DIRS) -> None:
        self.top = top
        self.limit = max(limit, 2)
        self.fds: OrderedDict[bytes, int] = OrderedDict()

    def get(self, parts: list[bytes], *, create: bool = False) -> int:
        """The descriptor of the directory `parts` (owned by the set: do not close it). Raises as
        `Root.open_dir` does."""
        if not parts:
            return self.top
        fds = self.fds
        key = b"/".join(parts)
        fd = fds.get(key)
        if fd is not None:
            fds.move_to_end(key)
            return fd
        # The nearest ancestor already open (the parent, on a walk), else the top. The key of the
        # first `i` components is key[:end] (keys are sliced, never joined again: a join costs as
        # much as the path has components).
        start = len(parts) - 1
        end = len(key)
        fd = self.top
        while start > 0:
            end = key.rfind(b"/", 0, end)
            found = fds.get(key[:end])
            if found is not None:
                fds.move_to_end(key[:end])
                fd = found
                break
            start -= 1
        for i in range(start, len(parts)):
            end = end + 1 + len(parts[i]) if i else len(parts[0])
            fd = self._put(key[:end], _open_sub(fd, parts[i], parts, create))
        return fd

    def put(self, parts: list[bytes], fd: int) -> None:
        """Keep `fd`, the directory `parts` (the set owns it from now on)."""
        self._put(b"/".join(parts), fd)

    def _put(self, key: bytes, fd: int) -> int:
        old = self.fds.pop(key, None)
        if old is not None:
            os.close(old)
        self.fds[key] = fd
        while len(self.fds) > self.limit:  # never the entry just added: the parent of the next is kept
            os.close(self.fds.popitem(last=False)[1])
        return fd

    def forget(self, parts: list[bytes]) -> None:
        """Drop the directory `parts` and all below it (removed or moved)."""
        key = b"/".join(parts)
        below = key + b"/"
        for name in [k for k in self.fds if k == key or k.startswith(below) or not key]:
            os.close(self.fds.pop(name))

    def close(self) -> None:
        while self.fds:
            os.close(self.fds.popitem()[1])


class Root:
    """An open directory: every operation stays inside it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._local = threading.local()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @contextlib.contextmanager
    def cached(self) -> Iterator[None]:
        """Within the block, in this thread, directories are opened from their nearest open ancestor
        instead of from the root (see the module's docstring); nested blocks share the outer one's."""
        if getattr(self._local, "dirs", None) is not None:
            yield
            return
        dirs = _Dirs(self.fd)
        self._local.dirs = dirs
        try:
            yield
        finally:
            self._local.dirs = None
            dirs.close()

    def _dirs(self) -> _Dirs | None:
        dirs: _Dirs | None = getattr(self._local, "dirs", None)
        return dirs

    def _forget(self, parts: list[bytes]) -> None:
        dirs = self._dirs()
        if dirs is not None:
            dirs.forget(parts)

    def open_dir(self, parts: list[bytes], *, create: bool = False) -> int:
        """A new descriptor for the directory `parts` (the caller closes it).

        Raises FileNotFoundError when a component is missing (unless `create`), Unsafe when one is
        a link or not a directory.
        """
        dirs = self._dirs()
        if dirs is not None:
            return os.dup(dirs.get(parts, create=create))
        fd = os.dup(self.fd)
        try:
            for part in parts:
                sub = _open_sub(fd, part, parts, create)
                os.close(fd)
                fd = sub
        except BaseException:
            os.close(fd)
            raise
        return fd

    def makedirs(self, rel: bytes) -> None:
        os.close(self.open_dir(split(rel), create=True))

    def lstat(self, rel: bytes) -> os.stat_result | None:
        """The entry itself (a link is not followed); None when it, or a directory above it, is missing
        or when a component above it is a link or not a directory (nothing is there to record)."""
        parts = split(rel)
        if not parts:
            return os.fstat(self.fd)
        try:
            fd = self.open_dir(parts[:-1])
        except (FileNotFoundError, Unsafe):
            return None
        try:
            return os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None
        finally:
            os.close(fd)

    def open_file(self, rel: bytes) -> tuple[int, os.stat_result]:
        """A read-only descriptor for the regular file `rel` and its stat (the caller closes it)."""
        parts = split(rel)
        if not parts:
            raise IsADirectoryError(rel)
        fd = self.open_dir(parts[:-1])
        try:
            try:
                ffd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise Unsafe(f"{rel!r} is a symbolic link") from None
                raise
        finally:
            os.close(fd)
        st = os.fstat(ffd)
        if not stat.S_ISREG(st.st_mode):
            os.close(ffd)
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(rel)
            raise Unsafe(f"{rel!r} is not a regular file")
        return ffd, st

    def read_bytes(self, rel: bytes, *, limit: int | None = None) -> bytes:
        fd, st = self.open_file(rel)
        try:
            if limit is not None and st.st_size > limit:
                raise ValueError(f"{rel!r} is larger than {limit} bytes")
            parts = []
            while True:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    break
                parts.append(chunk)
            return b"".join(parts)
        finally:
            os.close(fd)

    def readlink(self, rel: bytes) -> bytes:
        parts = split(rel)
        fd = self.open_dir(parts[:-1])
        try:
            return os.readlink(parts[-1], dir_fd=fd)
        finally:
            os.close(fd)

    def listdir(self, rel: bytes) -> list[tuple[bytes, os.stat_result]]:
        """(name, lstat) of each entry of the directory `rel`."""
        fd = self.open_dir(split(rel))
        try:
            return _list_at(fd)
        finally:
            os.close(fd)

    def write_temp(
        self,
        rel: bytes,
        chunks: Iterable[bytes] | None,
        *,
        mode: int = 0o644,
        owner: tuple[int, int] | None = None,
        link: bytes | None = None,
        journal: Callable[[bytes, bytes], None] | None = None,
    ) -> bytes:
        """Write a file (or, with `link`, a symbolic link) under a temporary name beside `rel`, creating
        missing directories; return that name (for `replace_with`). `journal(dir, name)` is told the
        name before the file exists, so an interrupted writer's leftovers can be found and removed."""
        parts = split(rel)
        if not parts:
            raise IsADirectoryError(rel)
        dfd = self.open_dir(parts[:-1], create=True)
        try:
            tmp = tmp_name(parts[-1])
            if journal is not None:
                journal(b"/".join(parts[:-1]), tmp)
            if link is not None:
                os.symlink(link, tmp, dir_fd=dfd)
                return tmp
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
            try:
                for chunk in chunks or ():
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
                if owner is not None:
                    os.fchown(fd, *owner)
                os.fchmod(fd, mode)
            except BaseException:
                os.close(fd)
                os.unlink(tmp, dir_fd=dfd)
                raise
            os.close(fd)
            return tmp
        finally:
            os.close(dfd)

    def fsync(self, rel: bytes) -> None:
        """Flush a file, link's directory entry or directory to disk (missing: nothing to do)."""
        parts = split(rel)
        try:
            if not parts:
                os.fsync(self.fd)
                return
            dfd = self.open_dir(parts[:-1])
        except (FileNotFoundError, Unsafe):
            return
        try:
            try:
                fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:  # a link: its directory entry is made durable with the directory
                    os.fsync(dfd)
                    return
                raise
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            os.close(dfd)

    def replace_with(self, rel: bytes, tmp: bytes) -> None:
        """Rename the temporary file `tmp` (beside `rel`) onto `rel`: atomic, and a file or link already
        at `rel` is replaced, never written through."""
        parts = split(rel)
        dfd = self.open_dir(parts[:-1])
        try:
            os.rename(tmp, parts[-1], src_dir_fd=dfd, dst_dir_fd=dfd)
        finally:
            os.close(dfd)

    def write_atomic(self, rel: bytes, chunks: Iterable[bytes], *, mode: int) -> None:
        """Replace (or create) the file `rel`: readers see the old content or the new, never a mix."""
        tmp = self.write_temp(rel, chunks, mode=mode)
        try:
            self.replace_with(rel, tmp)
        except BaseException:
            self.unlink(join(rel.rpartition(b"/")[0], tmp))
            raise

    def symlink_atomic(self, rel: bytes, target: bytes) -> None:
        tmp = self.write_temp(rel, None, link=target)
        try:
            self.replace_with(rel, tmp)
        except BaseException:
            self.unlink(join(rel.rpartition(b"/")[0], tmp))
            raise

    def unlink(self, rel: bytes) -> bool:
        """Remove a file or link; False when it was not there."""
        parts = split(rel)
        try:
            dfd = self.open_dir(parts[:-1])
        except (FileNotFoundError, Unsafe):
            return False
        try:
            os.unlink(parts[-1], dir_fd=dfd)
            return True
        except FileNotFoundError:
            return False
        finally:
            os.close(dfd)

    def prune_empty(self, rel: bytes) -> None:
        """Remove the directories above `rel` that are now empty (as git does after deleting a file)."""
        parts = split(rel)[:-1]
        dirs = self._dirs()
        own = dirs is None
        if dirs is None:
            dirs = _Dirs(self.fd)
        try:
            while parts:
                try:
                    dfd = dirs.get(parts[:-1])
                except (FileNotFoundError, Unsafe):
                    return
                dirs.forget(parts)
                try:
                    os.rmdir(parts[-1], dir_fd=dfd)
                except OSError:
                    return
                parts.pop()
        finally:
            if own:
                dirs.close()

    def rmtree(self, rel: bytes) -> None:
        """Remove `rel` and everything under it, without following links."""
        parts = split(rel)
        if not parts:
            raise Unsafe("refusing to remove the root")
        try:
            dfd = self.open_dir(parts[:-1])
        except (FileNotFoundError, Unsafe):
            return
        try:
            self._forget(parts)
            _rmtree_at(dfd, parts[-1])
        finally:
            os.close(dfd)


def _list_at(fd: int) -> list[tuple[bytes, os.stat_result]]:
    out = []
    with os.scandir(fd) as it:
        for entry in it:
            name = os.fsencode(entry.name)
            try:
                out.append((name, os.stat(name, dir_fd=fd, follow_symlinks=False)))
            except FileNotFoundError:
                continue
    return out


def _rmtree_at(dfd: int, name: bytes) -> None:
    """Remove `name` in `dfd` and all below it, at any depth (no recursion; a bounded set of open
    descriptors, each directory opened from its parent's without following links)."""
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dfd)
        return
    dirs = _Dirs(dfd)
    try:
        stack: list[tuple[list[bytes], bool]] = [([name], False)]
        while stack:
            parts, emptied = stack.pop()
            parent = dirs.get(parts[:-1])
            if emptied:
                dirs.forget(parts)
                os.rmdir(parts[-1], dir_fd=parent)
                continue
            try:
                sub = os.open(parts[-1], _DIR_FLAGS, dir_fd=parent)
            except PermissionError:  # a directory its owner made unreadable: it is a directory (lstat said so)
                os.chmod(parts[-1], 0o700, dir_fd=parent)
                sub = os.open(parts[-1], _DIR_FLAGS, dir_fd=parent)
            dirs.put(parts, sub)
            os.fchmod(sub, 0o700)
            with os.scandir(sub) as it:
                names = [os.fsencode(e.name) for e in it]
            stack.append((parts, True))
            for child in names:
                try:
                    st = os.stat(child, dir_fd=sub, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    stack.append(([*parts, child], False))
                else:
                    os.unlink(child, dir_fd=sub)
    finally:
        dirs.close()


def remove_tree(path: str) -> None:
    """Remove a whole directory tree (a session's directory), whatever modes the agent left in it."""
    parent, name = os.path.split(os.path.abspath(path))
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _rmtree_at(fd, os.fsencode(name))
    finally:
        os.close(fd)


def walk_dirs(root: Root, rel: bytes, skip: Callable[[bytes], bool]) -> Iterator[bytes]:
    """`rel` and every directory below it (links not followed), except those `skip(name)` refuses."""
    dirs = _Dirs(root.fd)  # each directory opened from its parent's: linear in the depth
    try:
        stack = [rel]
        while stack:
            current = stack.pop()
            yield current
            try:
                entries = _list_at(dirs.get(split(current)))
            except (FileNotFoundError, NotADirectoryError, Unsafe, PermissionError):
                continue
            for name, st in entries:
                if stat.S_ISDIR(st.st_mode) and not skip(name):
                    stack.append(join(current, name))
    finally:
        dirs.close()
