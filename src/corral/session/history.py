"""Steps: one commit per tool call on the session's branch, and what changed between two of them.

Step 0 is the copy-in. Each later step is a commit whose message names the tool and its arguments
(first line for people, a `Corral-Step:` JSON line for programs). A rollback is a step too (its tree
is the earlier step's), so history only grows and every state stays reachable.
"""

from __future__ import annotations

import json
import os

from corral._record import Record
from corral.errors import SessionNameError
from corral.session.gitstore import BRANCH, GitStore

TRAILER = "Corral-Step: "
MAX_DIFF_BYTES = 16 << 20


class Step(Record):
    """One step of a session."""

    __slots__ = ("commit", "details", "number", "summary", "time", "tool", "tree")
    number: int
    commit: str
    tree: str
    time: int  # seconds since the epoch
    tool: str  # copy-in, bash, exec, write_file, edit_file, rollback, scan, recover
    summary: str  # the commit's first line
    details: dict[str, object]  # the tool's arguments and outcome

    def __init__(
        self, *, number: int, commit: str, tree: str, time: int, tool: str, summary: str, details: dict[str, object]
    ) -> None:
        self._set(number=number, commit=commit, tree=tree, time=time, tool=tool, summary=summary, details=details)

    def __hash__(self) -> int:
        return hash(self.commit)

    def as_json(self) -> dict[str, object]:
        return {
            "step": self.number,
            "commit": self.commit,
            "tree": self.tree,
            "time": self.time,
            "tool": self.tool,
            "summary": self.summary,
            **{k: v for k, v in self.details.items() if k not in ("step", "tool")},
        }


class FileChange(Record):
    """One path that differs between two steps."""

    __slots__ = ("binary", "deletions", "insertions", "new_mode", "old_mode", "path", "status")
    path: str
    status: str  # added | modified | deleted | type-changed
    insertions: int  # lines (0 for binary files)
    deletions: int
    binary: bool
    old_mode: str | None  # e.g. "100644"; None when added
    new_mode: str | None  # None when deleted

    def __init__(
        self,
        *,
        path: str,
        status: str,
        insertions: int = 0,
        deletions: int = 0,
        binary: bool = False,
        old_mode: str | None = None,
        new_mode: str | None = None,
    ) -> None:
        self._set(
            path=path,
            status=status,
            insertions=insertions,
            deletions=deletions,
            binary=binary,
            old_mode=old_mode,
            new_mode=new_mode,
        )

    def as_json(self) -> dict[str, object]:
        return self.as_dict()


class Changes(Record):
    """What changed from step `since` to step `until`: a summary per file and the unified diff."""

    __slots__ = ("diff", "diff_truncated", "files", "since", "until")
    since: int
    until: int
    files: tuple[FileChange, ...]
    diff: str
    diff_truncated: bool  # the diff was cut at MAX_DIFF_BYTES (the summary is always whole)

    def __init__(self, *, since: int, until: int, files: tuple[FileChange, ...], diff: str,
                 diff_truncated: bool = False) -> None:  # fmt: skip
        self._set(since=since, until=until, files=files, diff=diff, diff_truncated=diff_truncated)

    def count(self, status: str) -> int:
        return sum(1 for f in self.files if f.status == status)

    @property
    def insertions(self) -> int:
        return sum(f.insertions for f in self.files)

    @property
    def deletions(self) -> int:
        return sum(f.deletions for f in self.files)

    def summary(self) -> str:
        if not self.files:
            return "no changes"
        parts = [f"{self.count(s)} {s}" for s in ("added", "modified", "deleted", "type-changed") if self.count(s)]
        return f"{', '.join(parts)} (+{self.insertions} -{self.deletions} lines)"

    def as_json(self) -> dict[str, object]:
        return {
            "since": self.since,
            "until": self.until,
            "summary": self.summary(),
            "added": self.count("added"),
            "modified": self.count("modified"),
            "deleted": self.count("deleted"),
            "insertions": self.insertions,
            "deletions": self.deletions,
            "files": [f.as_json() for f in self.files],
            "diff": self.diff,
            "diff_truncated": self.diff_truncated,
        }


class History:
    """The chain of steps on the session branch."""

    def __init__(self, store: GitStore) -> None:
        self.store = store
        self.commits: list[str] = []  # index = step number
        head = store.read_ref(BRANCH)
        while head is not None:
            self.commits.append(head)
            parents = store.read_commit(head).parents
            head = parents[0] if parents else None
        self.commits.reverse()

    @property
    def head(self) -> str | None:
        return self.commits[-1] if self.commits else None

    @property
    def last(self) -> int:
        return len(self.commits) - 1

    def commit(self, tree: str, *, tool: str, summary: str, details: dict[str, object]) -> int:
        """Record a step with root tree `tree`; returns its number."""
        number = len(self.commits)
        payload = json.dumps({"step": number, "tool": tool, **details}, default=str, sort_keys=True)
        subject = " ".join(summary.split())[:200] or tool
        message = f"{subject}\n\n{TRAILER}{payload}\n"
        parents = [self.commits[-1]] if self.commits else []
        sha = self.store.write_commit(tree, parents, message)
        self.store.update_ref(BRANCH, sha, old=self.head)
        self.commits.append(sha)
        return number

    def commit_of(self, number: int) -> str:
        if not 0 <= number < len(self.commits):
            raise SessionNameError(f"no step {number}: this session has steps 0 to {self.last}")
        return self.commits[number]

    def tree_of(self, number: int) -> str:
        return self.store.read_commit(self.commit_of(number)).tree

    def step(self, number: int) -> Step:
        commit = self.store.read_commit(self.commit_of(number))
        subject, _, body = commit.message.partition("\n")
        details: dict[str, object] = {}
        for line in body.splitlines():
            if line.startswith(TRAILER):
                try:
                    loaded = json.loads(line[len(TRAILER) :])
                except ValueError:
                    continue
                if isinstance(loaded, dict):
                    details = loaded
        tool = str(details.get("tool", "copy-in" if number == 0 else "?"))
        return Step(
            number=number,
            commit=commit.sha,
            tree=commit.tree,
            time=commit.time,
            tool=tool,
            summary=subject,
            details=details,
        )

    def steps(self) -> list[Step]:
        return [self.step(n) for n in range(len(self.commits))]

    def diff(self, old_tree: str, new_tree: str, *, since: int, until: int, patch: bool = True) -> Changes:
        """The changes between two trees, from `git diff-tree` (no renames, no external diff or textconv)."""
        if old_tree == new_tree:
            return Changes(since=since, until=until, files=(), diff="")
        raw = self.store.git("diff-tree", "-r", "-z", "--no-renames", "--raw", "--numstat", old_tree, new_tree)
        files = _parse_raw_numstat(raw)
        text, cut = "", False
        if patch:
            argv = ["diff-tree", "-r", "-p", "--no-renames", "--no-ext-diff", "--no-textconv", "--no-color"]
            out, cut = self.store.git_head(*argv, old_tree, new_tree, limit=MAX_DIFF_BYTES)
            text = out.decode("utf-8", "replace")
            if cut:
                text += f"\n[... the diff goes on past {MAX_DIFF_BYTES >> 20} MiB; the summary above is complete]\n"
        return Changes(since=since, until=until, files=tuple(files), diff=text, diff_truncated=cut)


_STATUS = {"A": "added", "M": "modified", "D": "deleted", "T": "type-changed"}


def _parse_raw_numstat(raw: bytes) -> list[FileChange]:
    fields = raw.split(b"\0")
    entries: dict[bytes, dict[str, object]] = {}
    order: list[bytes] = []
    i = 0
    while i < len(fields):
        field = fields[i]
        if field.startswith(b":"):
            meta = field[1:].split(b" ")
            path = fields[i + 1]
            old_mode, new_mode, status = meta[0].decode(), meta[1].decode(), meta[4].decode()[:1]
            entries[path] = {
                "status": _STATUS.get(status, "modified"),
                "old_mode": None if old_mode == "000000" else old_mode,
                "new_mode": None if new_mode == "000000" else new_mode,
            }
            order.append(path)
            i += 2
        elif field.count(b"\t") >= 2:
            added, deleted, path = field.split(b"\t", 2)
            entry = entries.setdefault(path, {"status": "modified"})
            if added == b"-":
                entry["binary"] = True
            else:
                entry["insertions"] = int(added)
                entry["deletions"] = int(deleted)
            i += 1
        else:
            i += 1
    return [FileChange(path=os.fsdecode(path), **entries[path]) for path in order]  # type: ignore[arg-type]
