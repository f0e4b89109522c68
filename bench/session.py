"""Sessions: copy-in of a large tree, the cost of a recorded tool call over a bare exec, review and sync.

    PYTHONPATH=src python bench/session.py [--files 10000] [--mb 200] [--calls 50] [--keep DIR]

Builds a synthetic project (FILES source-like files, MB megabytes in all, 100 files per directory,
a git repository with .gitignore), then measures, on the real namespace backend and real git:

- copy-in: `corral.Session(project)` (list, copy, hash and store every file, step 0), against the
  naive way (`cp -a` then `git add -A && git commit`);
- a tool call: the median of `session.bash("echo N > f")` against the median of the same command
  through a plain `corral.Sandbox` over a copy of the same tree (the bare exec), and the medians of
  `write_file` / `edit_file` of a small file; the target is a median overhead <= 20 ms;
- a full scan (what review, rollback and sync do first), `changes()`, a rollback and a sync of 100
  and of 1000 changed files.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import corral
from corral.session import Session


def make_project(root: Path, files: int, total_mb: int) -> None:
    """A git repository of `files` text files (100 per directory) adding up to `total_mb` megabytes."""
    rng = random.Random(7)
    size = total_mb * 1_000_000 // files
    words = ["def", "return", "self", "value", "import", "class", "for", "in", "if", "else", "None", "data"]
    for i in range(files):
        directory = root / f"pkg{i // 1000}" / f"mod{i // 100}"
        directory.mkdir(parents=True, exist_ok=True)
        lines, length = [], 0
        while length < size:
            line = " ".join(rng.choice(words) for _ in range(8)) + f" {rng.getrandbits(48)}\n"
            lines.append(line)
            length += len(line)
        (directory / f"file{i}.py").write_text("".join(lines))
    (root / ".gitignore").write_text("build/\n*.o\n")
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "x"]):
        subprocess.run(["git", *args], cwd=root, env=env, check=True)


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def median_ms(fn: Callable[[int], object], n: int) -> float:
    samples = []
    for i in range(n):
        started = time.perf_counter()
        fn(i)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1000


def drop_caches() -> None:
    subprocess.run(["sync"], check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--keep", help="build the project here and keep it (default: a temporary directory)")
    opts = parser.parse_args()

    base = Path(opts.keep) if opts.keep else Path(tempfile.mkdtemp(prefix="corral-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o755)
    os.environ["XDG_DATA_HOME"] = str(base / "xdg")
    project = base / "project"
    results: list[tuple[str, str]] = []
    try:
        if not project.exists():
            print(f"building a {opts.files}-file, {opts.mb} MB project in {project} ...", flush=True)
            make_project(project, opts.files, opts.mb)
        size = sum(p.stat().st_size for p in project.rglob("*") if p.is_file() and ".git" not in p.parts)
        print(f"project: {opts.files} files, {size / 1e6:.0f} MB", flush=True)

        # ---- naive copy-in, for reference
        naive = base / "naive"
        shutil.rmtree(naive, ignore_errors=True)
        drop_caches()
        cp = timed(lambda: subprocess.run(["cp", "-a", str(project), str(naive)], check=True))
        git_env = {**os.environ, "GIT_DIR": str(base / "naive.git"), "GIT_WORK_TREE": str(naive),
                   "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}  # fmt: skip
        shutil.rmtree(base / "naive.git", ignore_errors=True)
        subprocess.run(["git", "init", "-q", "--bare", str(base / "naive.git")], check=True)
        add = timed(lambda: subprocess.run(["git", "add", "-A"], check=True, env=git_env))
        commit_argv = ["git", "-c", "gc.auto=0", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "x"]
        commit = timed(lambda: subprocess.run(commit_argv, check=True, env=git_env))
        results.append(("naive copy-in: cp -a + git add -A + git commit", f"{cp + add + commit:.2f} s "
                        f"(cp {cp:.2f}, add {add:.2f}, commit {commit:.2f})"))  # fmt: skip

        # ---- corral copy-in
        drop_caches()
        started = time.perf_counter()
        session = Session(str(project), name="bench", backend="namespace")
        total = time.perf_counter() - started
        report = session.copy_report
        assert report is not None
        results.append(("corral copy-in: Session(project) until ready", f"{total:.2f} s (copy + hash + store "
                        f"{report.seconds:.2f} s, {report.files} files, {report.bytes / 1e6:.0f} MB)"))  # fmt: skip
        first = timed(lambda: session.bash("true"))
        results.append(("first tool call (starts the sandbox)", f"{first * 1000:.0f} ms"))

        # ---- tool calls vs the bare exec
        bare_sandbox = corral.Sandbox(corral.Policy.workspace(str(naive)), backend="namespace").start()
        bare = median_ms(lambda i: bare_sandbox.exec(["bash", "-c", f"echo {i} > bench.txt"], cwd=str(naive)),
                         opts.calls)  # fmt: skip
        bash = median_ms(lambda i: session.bash(f"echo {i} > bench.txt"), opts.calls)
        results.append(("bare exec: bash -c 'echo N > bench.txt' (plain Sandbox)", f"{bare:.2f} ms"))
        results.append(("session.bash, same command, recorded + committed", f"{bash:.2f} ms (overhead "
                        f"{bash - bare:+.2f} ms; target <= 20)"))  # fmt: skip
        deep = "pkg3/mod35/file3550.py"
        write = median_ms(lambda i: session.write_file("notes.txt", f"{i}\n"), opts.calls)
        results.append(("session.write_file (small file, new content)", f"{write:.2f} ms"))
        session.write_file("edit.txt", "value = 0\n")
        edit = median_ms(lambda i: session.edit_file("edit.txt", f"value = {i}", f"value = {i + 1}"), opts.calls)
        results.append(("session.edit_file (small file)", f"{edit:.2f} ms"))
        read = median_ms(lambda i: session.read_file(deep), opts.calls)
        results.append(("session.read_file (20 KB file, not recorded)", f"{read:.2f} ms"))
        bare_sandbox.stop()

        # ---- review, rollback, sync
        steps_before = session.step
        scan = timed(lambda: session.changes(patch=False))
        results.append(("full scan + changes() summary", f"{scan * 1000:.0f} ms"))
        session.bash("for f in pkg1/mod1*/file1*.py; do echo '# edited' >> $f; done")
        changed = len(session.changes(session.step, patch=False).files)
        took = float(session.log()[-1].details["duration"])  # type: ignore[arg-type]
        results.append((f"a bash call that changes {changed} files", f"{took * 1000:.0f} ms in all"))
        rollback = timed(lambda: session.rollback(steps_before))
        results.append((f"rollback over {changed} files", f"{rollback * 1000:.0f} ms"))
        session.rollback(session.step - 1)
        first_100 = [f"pkg1/mod10/file{1000 + n}.py" for n in range(100)]
        sync_100 = timed(lambda: session.sync(first_100))
        results.append(("sync of 100 changed files", f"{sync_100 * 1000:.0f} ms"))
        sync_rest = timed(lambda: session.sync())
        results.append((f"sync of the other {changed - 100} files", f"{sync_rest * 1000:.0f} ms"))
        session.close()
        Session.remove("bench")
    finally:
        if not opts.keep:
            shutil.rmtree(base, ignore_errors=True)
    width = max(len(name) for name, _ in results)
    print()
    for name, value in results:
        print(f"{name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
