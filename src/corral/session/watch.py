"""What a command changed in the workspace, from inotify, so a step need not rescan the whole tree.

Every directory of the workspace is watched (inotify is per inode, so it sees writes made inside the
sandbox's mount namespace too). After a tool call the queued events name the entries that were
created, written, moved, deleted or chmod-ed; new directories are walked. When the watcher cannot
vouch for its answer it says so and the caller scans everything instead:

- the event queue overflowed, or a watch could not be added (the per-user watch limit);
- a changed file has other hard links (a write through another name names only that name);
- inotify is unavailable.

One gap is known and documented: a write through a shared memory mapping made after the file was
closed produces no event. Such a change is still found by the full scan that precedes every
review, rollback and sync, where it is recorded as a step of its own.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
from collections.abc import Callable

from corral.session.fsafe import Root, join, walk_dirs

log = logging.getLogger(__name__)

IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

MASK = (
    IN_MODIFY
    | IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
    | IN_DONT_FOLLOW
    | IN_EXCL_UNLINK
)
_EVENT = struct.Struct("iIII")


class Changes:
    """Entries that may have changed (`paths`) and directories to re-read whole (`dirs`)."""

    __slots__ = ("dirs", "paths")

    def __init__(self) -> None:
        self.paths: set[bytes] = set()
        self.dirs: set[bytes] = set()

    def __bool__(self) -> bool:
        return bool(self.paths or self.dirs)


class Watcher:
    """inotify over a workspace. `collect()` returns the changes since the last call, or None when
    they cannot be known (then scan everything)."""

    def __init__(self, root: Root, *, skip: Callable[[bytes], bool]) -> None:
        self.root = root
        self.skip = skip
        self.fd = -1
        self.broken = False  # True: cannot vouch; every collect() says "scan everything"
        self._wd_path: dict[int, bytes] = {}
        self._libc: ctypes.CDLL | None = None

    def start(self) -> bool:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        except (OSError, AttributeError):
            self.broken = True
            return False
        if fd < 0:
            log.info("inotify unavailable (%s): every step scans the workspace", os.strerror(ctypes.get_errno()))
            self.broken = True
            return False
        self._libc = libc
        self.fd = fd
        self._watch_tree(b"")
        return not self.broken

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _watch_tree(self, rel: bytes) -> None:
        for directory in walk_dirs(self.root, rel, self.skip):
            self._watch(directory)
            if self.broken:
                return

    def _watch(self, rel: bytes) -> None:
        assert self._libc is not None
        path = os.path.join(os.fsencode(self.root.path), rel) if rel else os.fsencode(self.root.path)
        wd = self._libc.inotify_add_watch(self.fd, path, MASK)
        if wd < 0:
            err = ctypes.get_errno()
            if err in (errno.ENOENT, errno.ENOTDIR):  # gone again already: its parent's events say so
                return
            log.warning("cannot watch %r (%s): every step scans the workspace", path, os.strerror(err))
            self.broken = True
            return
        self._wd_path[wd] = rel

    def collect(self) -> Changes | None:
        """The changes since the last call; None when the watcher cannot vouch for them."""
        if self.fd < 0:
            return None
        data = bytearray()
        while True:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                break
            data += chunk
        changes = Changes()
        overflow = False
        new_dirs: list[bytes] = []
        offset = 0
        while offset + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            name = bytes(data[offset + _EVENT.size : offset + _EVENT.size + length]).rstrip(b"\0")
            offset += _EVENT.size + length
            if mask & IN_Q_OVERFLOW:
                overflow = True
                continue
            if mask & IN_IGNORED:
                self._wd_path.pop(wd, None)
                continue
            parent = self._wd_path.get(wd)
            if parent is None:
                continue
            if not name:  # an event on the watched directory itself: its parent's events cover it
                if parent == b"" and mask & (IN_DELETE_SELF | IN_MOVE_SELF):
                    overflow = True
                continue
            path = join(parent, name)
            if mask & IN_ISDIR:
                if self.skip(name):
                    continue
                changes.dirs.add(path)
                if mask & (IN_CREATE | IN_MOVED_TO):
                    new_dirs.append(path)
            else:
                changes.paths.add(path)
        for directory in new_dirs:
            # Watch the new directory and all below it (add_watch on a watched inode returns its
            # existing descriptor, which then maps to the new path).
            self._watch_tree(directory)
        if overflow or self.broken:
            return None
        return changes

    def rewatch(self) -> None:
        """After a full scan: make sure every directory is watched (cheap for those already watched)."""
        if self.fd >= 0 and not self.broken:
            self._watch_tree(b"")
