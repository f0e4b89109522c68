"""Sync: write a step's changes back to the host project, file by file, atomically, refusing what is unsafe.

What is compared: the *baseline* (what corral believes the host project holds for each recorded
path: the copy-in, updated by every sync) against the step being synced. Content comes from the
session's object store, i.e. exactly what the review showed, never from the live workspace.

For each path that differs:
- the path must be a plain relative path without a `.git` component (any case) and must reach its
  directory on the host without going through a link (`corral.session.fsafe`): never outside the
  project, never into .git, never through a link;
- the host file must still be what the baseline says (its stat as recorded, or failing that its
  content hash); if the user changed it since, it is a *conflict*, reported and left alone (unless
  it already holds the new content, which is simply noted);
- files are replaced by a temporary file in the same directory and a rename (once every new file
  is fsync'ed), so a reader or a crash sees the old file or the new one, never half of one; a
  journal names every temporary file first, so one left by a killed process is removed when the
  session next opens;
- deletions happen only when asked; a link is written only if it points inside the project, by the
  rule below.

Links. A link's target is judged first by the rule in `link_problem`, which looks at the target and
the link's place only: relative, climbing (`..`) only at its start and no higher than the link's
own directory, then going down by names (never into .git). Sync reaches the link's directory
through real directories only, and `..` of a real directory is its real parent, so the climb stays
in the project; names only go down. A name may itself be a link: if that link obeys the same rule,
the same holds from where it is, so links that obey the rule can only lead inside, in any chain,
whatever sync writes later. What the rule cannot vouch for are links sync did not write (the
user's, on the host). So also: a target may not go *through* a link (a name before the last that is
a link on the host or in the session); a target that *is* a link has that link judged in turn (the
host's version and the session's, at most 40 links, a loop refused); and no link is written at a
path that a recorded link breaking the rule passes on its way (its `..` would then climb from
elsewhere). Links on the host that the session never recorded (ignored or excluded files) are
looked at on the way of a target, but not searched for that last case.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import struct
from collections.abc import Sequence

from corral._record import Record
from corral.session.fsafe import TMP_MARK, Root, Unsafe, split
from corral.session.gitstore import EXEC, LINK, TREE, GitStore
from corral.session.record import HostStat, Tree, host_stat, is_git_name, racy

log = logging.getLogger(__name__)

Entry = tuple[int, str]


class SyncItem(Record):
    """One path of a sync: what it would do and what happened."""

    __slots__ = ("action", "path", "reason", "status")
    path: str
    action: str  # write | link | delete
    status: str  # pending (dry run) | written | deleted | unchanged | conflict | skipped | failed
    reason: str

    def __init__(self, *, path: str, action: str, status: str, reason: str = "") -> None:
        self._set(path=path, action=action, status=status, reason=reason)

    def as_json(self) -> dict[str, object]:
        return self.as_dict()


class SyncReport(Record):
    """The outcome of `Session.sync`."""

    __slots__ = ("dry_run", "items", "step")
    items: tuple[SyncItem, ...]
    dry_run: bool
    step: int  # the step whose state was synced

    def __init__(self, *, items: tuple[SyncItem, ...], dry_run: bool, step: int) -> None:
        self._set(items=items, dry_run=dry_run, step=step)

    def with_status(self, *statuses: str) -> list[SyncItem]:
        return [i for i in self.items if i.status in statuses]

    @property
    def conflicts(self) -> list[SyncItem]:
        return self.with_status("conflict")

    @property
    def ok(self) -> bool:
        """Nothing conflicted or failed (paths skipped on purpose are listed with the reason)."""
        return not any(i.status in ("conflict", "failed") for i in self.items)

    def as_json(self) -> dict[str, object]:
        counts: dict[str, int] = {}
        for item in self.items:
            counts[item.status] = counts.get(item.status, 0) + 1
        return {
            "step": self.step,
            "dry_run": self.dry_run,
            "ok": self.ok,
            "counts": counts,
            "items": [i.as_json() for i in self.items],
        }


# ---------------------------------------------------------------------------------------- manifest
_MAGIC = b"corral-manifest 1\n"
_REC = struct.Struct("<QqqQI")


def save_manifest(path: str, manifest: dict[bytes, HostStat]) -> None:
    parts = [_MAGIC]
    for name, (size, mtime, ctime, ino) in manifest.items():
        parts.append(_REC.pack(size, mtime, ctime, ino, len(name)))
        parts.append(name)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(b"".join(parts))
    os.replace(tmp, path)


def load_manifest(path: str) -> dict[bytes, HostStat]:
    out: dict[bytes, HostStat] = {}
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return out
    offset = len(_MAGIC)
    if not data.startswith(_MAGIC):
        return out
    try:
        while offset < len(data):
            size, mtime, ctime, ino, length = _REC.unpack_from(data, offset)
            offset += _REC.size
            out[data[offset : offset + length]] = (size, mtime, ctime, ino)
            offset += length
    except struct.error:
        log.warning("manifest %s is truncated; host files will be compared by content", path)
    return out


# ---------------------------------------------------------------------------------------- journal
class Journal:
    """Temporary files a sync is about to create in the host project (JSON lines, appended first)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1

    def add(self, directory: bytes, tmp: bytes) -> None:
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        line = json.dumps({"dir": os.fsdecode(directory), "tmp": os.fsdecode(tmp)}) + "\n"
        os.write(self._fd, line.encode())

    def finish(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    @staticmethod
    def recover(path: str, project: str) -> list[str]:
        """Remove the temporary files an interrupted sync left in `project`; returns what was removed."""
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return []
        removed: list[str] = []
        root = Root(project)
        try:
            for line in lines:
                try:
                    record = json.loads(line)
                    directory = os.fsencode(record["dir"])
                    tmp = os.fsencode(record["tmp"])
                except (ValueError, KeyError, TypeError):
                    continue  # the last line of a killed writer may be cut short
                if TMP_MARK not in tmp or b"/" in tmp:
                    continue
                rel = directory + b"/" + tmp if directory else tmp
                st = root.lstat(rel)
                if st is not None and (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)) and root.unlink(rel):
                    removed.append(os.fsdecode(rel))
        finally:
            root.close()
        os.unlink(path)
        return removed


# ---------------------------------------------------------------------------------------- sync
def blob_id(fd: int) -> str:
    import hashlib

    chunks = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    data = b"".join(chunks)
    h = hashlib.sha1(b"blob %d\0" % len(data))
    h.update(data)
    return h.hexdigest()


def path_problem(path: bytes) -> str | None:
    """Why `path` may never be written on the host, or None."""
    try:
        parts = split(path)
    except Unsafe:
        return "not a plain relative path"
    if not parts or b"/".join(parts) != path:
        return "not a plain relative path"
    if any(is_git_name(p) for p in parts):
        return "inside .git"
    if any(TMP_MARK in p for p in parts):
        return "named like corral's temporary files"
    return None


MAX_LINKS = 40  # links followed in a chain when judging a link (the kernel's own bound)


def _target_parts(target: bytes) -> tuple[int, list[bytes]]:
    """How many `..` a relative target starts with, and the components after them ("." and "" dropped)."""
    parts = [p for p in target.split(b"/") if p and p != b"."]
    up = 0
    while up < len(parts) and parts[up] == b"..":
        up += 1
    return up, parts[up:]


def link_problem(path: bytes, target: bytes) -> str | None:
    """Why a link at `path` (a plain relative path) to `target` may never be written, judging the target
    and the link's place alone; None if they obey the rule (see the module's docstring)."""
    shown = os.fsdecode(target)
    if not target or b"\0" in target:
        return "the link's target is empty or holds a NUL byte"
    if target.startswith(b"/"):
        return f"the link points outside the project ({shown}): absolute targets are refused"
    up, names = _target_parts(target)
    if b".." in names:
        return (f"the link's target climbs (..) after a name ({shown}): where that leads depends on the links on "
                "the way, so it is refused")  # fmt: skip
    if up > path.count(b"/"):
        return f"the link points outside the project ({shown})"
    if any(is_git_name(p) for p in names):
        return f"the link points into .git ({shown})"
    return None


class _Links:
    """Judges a link against the project as the sync may leave it: at every path its target passes,
    both what the host has and what the session has (either may be there after the sync)."""

    def __init__(self, root: Root, store: GitStore, want: dict[bytes, Entry], have: dict[bytes, Entry],
                 project: str) -> None:  # fmt: skip
        self.root = root
        self.store = store
        self.want = want
        self.have = have
        self.project = os.fsencode(project).rstrip(b"/") + b"/"
        self._crossed: dict[bytes, bytes] | None = None
        self._steps = 0

    def problem(self, path: bytes, target: bytes) -> str | None:
        """Why the link `path` -> `target` may not be written, or None."""
        self._steps = 0
        problem = self._check(path, target, ())
        if problem is not None:
            return problem
        crosser = self.crossed().get(path)
        if crosser is not None:
            return (f"the link {os.fsdecode(crosser)} passes through this path and then climbs (..): a link here "
                    "would change where it leads")  # fmt: skip
        return None

    def _check(self, path: bytes, target: bytes, chain: tuple[tuple[bytes, bytes], ...]) -> str | None:
        problem = link_problem(path, target)
        if problem is not None:
            return problem
        if (path, target) in chain:
            return "the links form a loop"
        self._steps += 1  # a path may hold two links (the host's, the session's): bound the whole search
        if len(chain) >= MAX_LINKS or self._steps > 4 * MAX_LINKS:
            return f"more than {MAX_LINKS} links to follow"
        up, names = _target_parts(target)
        base = path.split(b"/")[:-1]
        base = base[: len(base) - up]
        if not names:
            return None  # a directory above the link: sync reaches it through real directories only
        for i in range(1, len(names)):
            through = b"/".join(base + names[:i])
            targets, unknown = self._targets(through)
            if targets:
                return f"the link's target goes through another link ({os.fsdecode(through)})"
            if unknown:
                return f"the link's target goes through {os.fsdecode(through)}, which cannot be checked on the host"
        final = b"/".join(base + names)
        targets, unknown = self._targets(final)
        if unknown:
            return f"the link points to {os.fsdecode(final)}, which cannot be checked on the host"
        for found in targets:
            sub = self._check(final, found, (*chain, (path, target)))
            if sub is not None:
                return f"it points to the link {os.fsdecode(final)}, which is refused: {sub}"
        return None

    def _targets(self, path: bytes) -> tuple[list[bytes], bool]:
        """The targets of the links at `path` (the session's and the host's, when links), and whether the
        host's entry could not be looked at (a file or link above it, or no permission)."""
        out: list[bytes] = []
        entry = self.want.get(path)
        if entry is not None and entry[0] == LINK:
            out.append(self.store.read_blob(entry[1]))
        parts = path.split(b"/")
        try:
            fd = self.root.open_dir(parts[:-1])
        except FileNotFoundError:
            return out, False
        except (OSError, Unsafe):
            return out, True
        try:
            st = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                out.append(os.readlink(parts[-1], dir_fd=fd))
        except FileNotFoundError:
            pass
        except OSError:
            return out, True
        finally:
            os.close(fd)
        return out, False

    def crossed(self) -> dict[bytes, bytes]:
        """Paths that a recorded link breaking the rule (one the host holds) passes through before its last
        component, each with one such link."""
        if self._crossed is None:
            self._crossed = {}
            for path, (mode, sha) in sorted(self.have.items()):
                if mode != LINK:
                    continue
                target = self.store.read_blob(sha)
                if link_problem(path, target) is None:
                    continue
                if target.startswith(self.project):
                    stack: list[bytes] = []
                    target = target[len(self.project) :]
                elif target.startswith(b"/"):
                    continue  # elsewhere from the start
                else:
                    stack = path.split(b"/")[:-1]
                for part in target.split(b"/")[:-1]:
                    if part in (b"", b"."):
                        continue
                    if part != b"..":
                        stack.append(part)
                        self._crossed.setdefault(b"/".join(stack), path)
                    elif not stack:
                        break  # out of the project
                    else:
                        stack.pop()
        return self._crossed


class _HostState:
    """What the host has at a path: kind in missing | file | link | dir | other | unsafe."""

    def __init__(self, root: Root, path: bytes) -> None:
        self.kind = "missing"
        self.st: os.stat_result | None = None
        self.reason = ""
        try:
            parts = split(path)
            fd = root.open_dir(parts[:-1])
        except FileNotFoundError:
            return
        except Unsafe:
            self.kind = "unsafe"
            self.reason = "a directory above it is a link (or a file) on the host"
            return
        try:
            self.st = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        finally:
            os.close(fd)
        mode = self.st.st_mode
        self.kind = (
            "file" if stat.S_ISREG(mode) else "link" if stat.S_ISLNK(mode) else "dir" if stat.S_ISDIR(mode) else "other"
        )


def _host_matches(
    root: Root, store: GitStore, path: bytes, host: _HostState, entry: Entry | None, known: HostStat | None
) -> bool:
    """Whether the host holds `entry` (None: nothing) at `path`."""
    if entry is None:
        return host.kind == "missing"
    mode, sha = entry
    if mode == LINK:
        if host.kind != "link":
            return False
        try:
            return root.readlink(path) == store.read_blob(sha)
        except (OSError, Unsafe):
            return False
    if host.kind != "file" or host.st is None:
        return False
    if known is not None and host_stat(host.st) == known:
        return True
    try:
        fd, _ = root.open_file(path)
    except (OSError, Unsafe):
        return False
    try:
        return blob_id(fd) == sha
    finally:
        os.close(fd)


def _mode_for(entry: Entry, host: _HostState, umask: int) -> int:
    base = stat.S_IMODE(host.st.st_mode) if host.kind == "file" and host.st is not None else 0o666 & ~umask
    if entry[0] == EXEC:
        return base | ((base & 0o444) >> 2)
    return base & ~0o111


def _owner(root: Root, path: bytes, host: _HostState) -> tuple[int, int] | None:
    """Keep the owner of the file replaced (or of its directory) when running as root."""
    if os.geteuid() != 0:
        return None
    if host.kind == "file" and host.st is not None:
        return host.st.st_uid, host.st.st_gid
    parent = split(path)[:-1]
    try:
        fd = root.open_dir(parent)
    except (OSError, Unsafe):
        return None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return st.st_uid, st.st_gid


def sync_tree(
    *,
    project: str,
    store: GitStore,
    target: Tree,
    baseline: Tree,
    manifest: dict[bytes, HostStat],
    paths: Sequence[bytes] | None,
    delete: bool,
    dry_run: bool,
    journal: Journal,
) -> list[SyncItem]:
    """Bring the host project from `baseline` to `target` for `paths` (all when None).

    `baseline` and `manifest` are updated for every path the host now holds as `target` says.
    Every new file is first written beside its target and fsync'ed; then each is renamed into place
    (after checking once more that the user did not change the target).
    """
    want = target.flat()
    have = baseline.flat()
    differing = sorted(p for p in want.keys() | have.keys() if want.get(p) != have.get(p))
    if paths is not None:
        prefixes = [p.rstrip(b"/") for p in paths]
        differing = [p for p in differing if any(not q or p == q or p.startswith(q + b"/") for q in prefixes)]
    syncer = _Syncer(project, store, baseline, manifest, journal, delete=delete, dry_run=dry_run,
                     links=(want, have))  # fmt: skip
    items: dict[bytes, SyncItem] = {}
    try:
        # Deletions first (deepest first), so a directory the agent turned into a file (or the
        # reverse) is out of the way before the writes.
        for path in sorted((p for p in differing if p not in want), key=lambda p: -p.count(b"/")):
            items[path] = syncer.prepare(path, None, have.get(path))
        for path in (p for p in differing if p in want):
            items[path] = syncer.prepare(path, want[path], have.get(path))
        items.update(syncer.finish())
    finally:
        syncer.close()
        journal.finish()
    return [items[p] for p in sorted(items)]


class _Prepared:
    __slots__ = ("host", "new", "path", "tmp")

    def __init__(self, path: bytes, tmp: bytes, new: Entry, host: _HostState) -> None:
        self.path = path
        self.tmp = tmp
        self.new = new
        self.host = host


class _Syncer:
    def __init__(self, project: str, store: GitStore, baseline: Tree, manifest: dict[bytes, HostStat],
                 journal: Journal, *, delete: bool, dry_run: bool,
                 links: tuple[dict[bytes, Entry], dict[bytes, Entry]]) -> None:  # fmt: skip
        self.root = Root(project)
        self.links = _Links(self.root, store, *links, project)
        self.store = store
        self.baseline = baseline
        self.manifest = manifest
        self.journal = journal
        self.delete = delete
        self.dry_run = dry_run
        self.umask = os.umask(0o022)
        os.umask(self.umask)
        self.prepared: list[_Prepared] = []

    def close(self) -> None:
        for prepared in self.prepared:  # left over after an error: take the temporary files away
            self.root.unlink(_sibling(prepared.path, prepared.tmp))
        self.root.close()

    def prepare(self, path: bytes, new: Entry | None, old: Entry | None) -> SyncItem:
        """Check one path; delete it now, or write its new content beside it (status pending)."""
        shown = os.fsdecode(path)
        action = "delete" if new is None else "link" if new[0] == LINK else "write"

        def item(status: str, reason: str = "") -> SyncItem:
            return SyncItem(path=shown, action=action, status=status, reason=reason)

        problem = path_problem(path)
        if problem is not None:
            return item("skipped", problem)
        if new is not None and new[0] == TREE:
            return item("skipped", "not a file")
        content = b""
        if new is not None:
            content = self.store.read_blob(new[1])
        host = _HostState(self.root, path)
        if host.kind == "unsafe":
            return item("skipped", host.reason)
        if new is not None and new[0] == LINK:
            problem = self.links.problem(path, content)
            if problem is not None:
                return item("skipped", problem)
        if not _host_matches(self.root, self.store, path, host, old, self.manifest.get(path)):
            if _host_matches(self.root, self.store, path, host, new, None):
                _settle(self.baseline, self.manifest, path, new, host.st)
                return item("unchanged", "the host already has this content")
            what = {"missing": "deleted on the host", "dir": "a directory on the host",
                    "other": "not a regular file on the host"}.get(host.kind, "changed on the host")  # fmt: skip
            if old is None and host.kind != "missing":
                what = "created on the host"
            return item("conflict", f"{what} since copy-in (or the last sync); left as it is")
        if new is None and not self.delete:
            return item("skipped", "deleted in the session; deletions are synced only when asked (--delete)")
        if self.dry_run:
            return item("pending")
        try:
            if new is None:
                self.root.unlink(path)
                self.root.prune_empty(path)
                _settle(self.baseline, self.manifest, path, None, None)
                return item("deleted")
            if new[0] == LINK:
                tmp = self.root.write_temp(path, None, link=content, journal=self.journal.add)
            else:
                tmp = self.root.write_temp(path, [content], mode=_mode_for(new, host, self.umask),
                                           owner=_owner(self.root, path, host), journal=self.journal.add)  # fmt: skip
        except (OSError, Unsafe) as exc:
            return item("failed", exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc))
        self.prepared.append(_Prepared(path, tmp, new, host))
        return item("pending")

    def finish(self) -> dict[bytes, SyncItem]:
        """Make the prepared files durable (fsync, in parallel), then rename each into place."""
        done: dict[bytes, SyncItem] = {}
        if not self.prepared:
            return done
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda p: self.root.fsync(_sibling(p.path, p.tmp)), self.prepared))
        directories: set[bytes] = set()
        while self.prepared:
            prepared = self.prepared.pop(0)
            path, new = prepared.path, prepared.new
            shown = os.fsdecode(path)
            action = "link" if new[0] == LINK else "write"
            now = _HostState(self.root, path)
            before = prepared.host
            same = now.kind == before.kind and (
                now.st is None or before.st is None or host_stat(now.st) == host_stat(before.st)
            )
            if not same:
                self.root.unlink(_sibling(path, prepared.tmp))
                done[path] = SyncItem(path=shown, action=action, status="conflict",
                                      reason="changed on the host during the sync; left as it is")  # fmt: skip
                continue
            try:
                self.root.replace_with(path, prepared.tmp)
            except (OSError, Unsafe) as exc:
                self.root.unlink(_sibling(path, prepared.tmp))
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                done[path] = SyncItem(path=shown, action=action, status="failed", reason=reason)
                continue
            directories.add(path.rpartition(b"/")[0])
            _settle(self.baseline, self.manifest, path, new, self.root.lstat(path))
            done[path] = SyncItem(path=shown, action=action, status="written")
        for directory in directories:  # the renames themselves
            self.root.fsync(directory)
        return done


def _sibling(path: bytes, tmp: bytes) -> bytes:
    parent = path.rpartition(b"/")[0]
    return parent + b"/" + tmp if parent else tmp


def _settle(baseline: Tree, manifest: dict[bytes, HostStat], path: bytes, entry: Entry | None,
            st: os.stat_result | None) -> None:  # fmt: skip
    if entry is None:
        baseline.remove(path)
        manifest.pop(path, None)
        return
    baseline.set_file(path, entry[0], entry[1])
    if st is not None and entry[0] != LINK and not racy(st):
        manifest[path] = host_stat(st)
    else:
        manifest.pop(path, None)  # compared by content next time
