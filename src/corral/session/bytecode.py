"""Cached Python bytecode that would hide a tool's edit.

CPython (and pytest's assertion rewriter, which writes the same header) takes a `.pyc` in
`__pycache__` as fresh when the source's mtime in whole seconds and its size match what the header
records. An agent's edit that keeps the size (`a - b` to `a * b`) within the second the bytecode
was written from leaves a `.pyc` that matches the new source, and the next run executes the old
code. So after a tool writes a `.py` file, the cached bytecode whose header matches the new file is
removed and Python compiles the source again; bytecode that does not match is left alone.
"""

from __future__ import annotations

import os
import stat
import struct

from corral.session.fsafe import Root, Unsafe, join

_HEADER = 16  # magic, flags, source mtime, source size (PEP 552)


def drop_stale(root: Root, rel: bytes) -> list[bytes]:
    """Remove the timestamp-checked bytecode of the source `rel` that names its current mtime and
    size; return the removed paths. Best effort: the source is written already, so what cannot be
    read or removed (a `__pycache__` the agent made read-only) is left, never an error."""
    if not rel.endswith(b".py"):
        return []
    st = root.lstat(rel)
    if st is None or not stat.S_ISREG(st.st_mode):
        return []
    head, _, name = rel.rpartition(b"/")
    cache = join(head, b"__pycache__")
    prefix = name[:-3] + b"."
    # flags 0: checked by timestamp, the only kind a same-second edit can fool.
    fooled = struct.pack("<III", 0, int(st.st_mtime) & 0xFFFFFFFF, st.st_size & 0xFFFFFFFF)
    try:
        entries = root.listdir(cache)
    except (OSError, Unsafe):
        return []
    removed = []
    for entry, est in entries:
        if not (entry.startswith(prefix) and entry.endswith(b".pyc") and stat.S_ISREG(est.st_mode)):
            continue
        path = join(cache, entry)
        try:
            fd, _ = root.open_file(path)
        except (OSError, Unsafe):
            continue
        try:
            header = os.read(fd, _HEADER)
        except OSError:
            header = b""
        finally:
            os.close(fd)
        if header[4:] != fooled:
            continue
        try:
            if root.unlink(path):
                removed.append(path)
        except OSError:
            continue
    return removed
