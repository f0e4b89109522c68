""".gitignore answers from git itself: one long-lived `git check-ignore --stdin` per session.

The history records what `git add -A` would: every tracked file, and every untracked file no
.gitignore, session exclude or `info/exclude` pattern ignores. Rather than re-implement gitignore
matching, corral asks git, through a process kept running for the session (about 20 microseconds a
question). git caches .gitignore files while it runs, so the process is restarted when one changes.

A path is asked about only when every .gitignore git would read for it (one per directory above it)
is a regular file or a link, or missing: git would block on a fifo. Within one recording pass
(`checking()`) that verdict is kept per directory, so a pass costs one look per directory rather
than one per ancestor of every path (quadratic, or worse, in the depth of the tree).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import stat
import subprocess
import threading
from collections.abc import Iterator, Sequence

from corral.session.fsafe import Root
from corral.session.gitstore import GitStore

log = logging.getLogger(__name__)
_BATCH = 512
TIMEOUT = 20.0  # seconds git may take to answer one batch


class IgnoreChecker:
    def __init__(self, store: GitStore, root: Root) -> None:
        self.store = store
        self.root = root
        self._proc: subprocess.Popen[bytes] | None = None
        self._buffer = b""
        self._safe: dict[bytes, bool] | None = None  # directory -> its .gitignore files are fine, in a pass

    def _start(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            env = self.store.env(work_tree=True)
            env["GIT_FLUSH"] = "1"
            self._proc = subprocess.Popen(
                [self.store.program, "check-ignore", "--stdin", "-z", "-v", "-n", "--no-index"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env=env,
                cwd=self.store.work_tree,
            )
            self._buffer = b""
        return self._proc

    def restart(self) -> None:
        """Forget what git has cached (call after a .gitignore changed)."""
        self.close()
        if self._safe is not None:
            self._safe.clear()

    @contextlib.contextmanager
    def checking(self) -> Iterator[None]:
        """One pass over the workspace: what is learnt about .gitignore files is kept until it ends."""
        if self._safe is not None:
            yield
            return
        self._safe = {}
        try:
            yield
        finally:
            self._safe = None

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                assert proc.stdin is not None
                proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            assert proc.stdout is not None
            proc.stdout.close()

    def ignored(self, paths: Sequence[bytes]) -> list[bool]:
        """Whether each path (relative to the workspace) is ignored."""
        safe: dict[bytes, bool] = {} if self._safe is None else self._safe
        askable = [p for p in paths if self._askable(p, safe)]
        answers = dict(zip(askable, self._ignored(askable), strict=True))
        return [answers.get(p, False) for p in paths]

    def _askable(self, path: bytes, safe: dict[bytes, bool]) -> bool:
        """False when a .gitignore git would read for `path` is not a regular file (or a link).

        `safe[d]` is the answer for every directory from `d` up to the top, so the walk up stops at
        the first directory already known: each directory is looked at once per `safe`."""
        directory = path.rpartition(b"/")[0]
        unknown: list[bytes] = []
        while True:
            ok = safe.get(directory)
            if ok is not None:
                break
            st = self.root.lstat(directory + b"/.gitignore" if directory else b".gitignore")
            ok = st is None or stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)
            if not ok:
                log.warning("%r/.gitignore is not a regular file: what lies below it is recorded", directory)
                break
            unknown.append(directory)
            if not directory:
                break
            directory = directory.rpartition(b"/")[0]
        # Every directory below the one that decided shares its answer.
        for below in unknown:
            safe[below] = ok
        if not ok:
            safe[directory] = False
        return ok

    def _ignored(self, paths: Sequence[bytes]) -> list[bool]:
        out: list[bool] = []
        for i in range(0, len(paths), _BATCH):
            batch = paths[i : i + _BATCH]
            try:
                out.extend(self._ask(batch))
            except TimeoutError as exc:  # never hide what cannot be asked about: record it
                log.warning("%s; recording %d path(s) as not ignored", exc, len(batch))
                self.close()
                out.extend([False] * len(batch))
            except (OSError, ValueError):
                # git gave up on one of them (it refuses some odd paths): ask one at a time, and
                # record (never hide) any path it cannot answer for.
                self.close()
                for path in batch:
                    try:
                        out.extend(self._ask([path]))
                    except (OSError, ValueError):
                        log.warning("git check-ignore failed on %r; recording it", path)
                        self.close()
                        out.append(False)
        return out

    def _ask(self, paths: Sequence[bytes]) -> list[bool]:
        proc = self._start()
        assert proc.stdin is not None and proc.stdout is not None
        data = b"".join(p + b"\0" for p in paths)
        # Write from a thread: git answers while we write, and both pipes are bounded. A batch of at
        # most PIPE_BUF bytes is written here: git has read all it was sent before (it answered it),
        # so the pipe is empty and takes it whole (a thread costs more than git's answer, on a walk
        # that asks about one directory at a time).
        error: list[BaseException] = []

        def feed() -> None:
            try:
                assert proc.stdin is not None
                proc.stdin.write(data)
                proc.stdin.flush()
            except BaseException as exc:  # reported below
                error.append(exc)

        if len(data) <= select.PIPE_BUF:
            feed()
            writer = None
        else:
            writer = threading.Thread(target=feed, daemon=True)
            writer.start()
        results: list[bool] = []
        fields: list[bytes] = []
        buffer = self._buffer
        poller = select.poll()
        poller.register(proc.stdout.fileno(), select.POLLIN)
        while len(results) < len(paths):
            nul = buffer.find(b"\0")
            if nul < 0:
                if not poller.poll(TIMEOUT * 1000):
                    proc.kill()
                    _join(writer)
                    raise TimeoutError(f"git check-ignore did not answer in {TIMEOUT:g}s")
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    _join(writer)
                    raise ValueError("git check-ignore stopped answering")
                buffer += chunk
                continue
            fields.append(buffer[:nul])
            buffer = buffer[nul + 1 :]
            if len(fields) == 4:
                pattern = fields[2]
                results.append(bool(pattern) and not pattern.startswith(b"!"))
                fields = []
        self._buffer = buffer
        _join(writer)
        if error:
            raise OSError(f"git check-ignore: {error[0]}")
        return results


def _join(writer: threading.Thread | None) -> None:
    if writer is not None:
        writer.join()
