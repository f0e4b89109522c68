"""Steps, changes and rollback: a scripted agent edits, builds and breaks a project; the history is real git."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from corral.session import Session
from corral.session.gitstore import BRANCH
from tests.session.conftest import tree_state


def fsck(session: Session) -> None:
    """The history is a valid git repository (objects, trees in git's order, refs)."""
    env = session.store.env()
    done = subprocess.run(["git", "fsck", "--strict", "--no-dangling"], env=env, capture_output=True, check=False)
    assert done.returncode == 0, done.stderr.decode() + done.stdout.decode()


def test_scripted_agent_edit_build_break_rollback(session: Session, project: Path) -> None:
    host_before = tree_state(project)
    ws = Path(session.workspace)
    assert tree_state(ws) == {k: v for k, v in host_before.items() if k != ".env"}  # copy-in is exact

    # 1. The agent adds a feature and builds it: `make` then `./app` share the sandbox's state.
    session.edit_file("calc.h", "int add(int a, int b);", "int add(int a, int b);\nint mul(int a, int b);")
    session.edit_file("calc.c", "return a + b; }", "return a + b; }\nint mul(int a, int b) { return a * b; }")
    session.edit_file("main.c", 'printf("%d\\n", add(2, 3));', 'printf("%d %d\\n", add(2, 3), mul(2, 3));')
    build = session.bash("make app && ./app")
    assert build.ok and build.stdout.endswith("5 6\n"), build.stderr
    good_step, good_state = session.step, tree_state(ws)

    # 2. It breaks the build, and makes a mess.
    session.write_file("calc.c", "this is not C\n")
    session.bash("rm README.md && mkdir -p docs && echo notes > docs/notes.md && chmod +x calc.h")
    session.bash("echo '# broken' >> scripts/run.sh && chmod 555 scripts")  # and locks a directory
    broken = session.bash("make app")
    assert broken.returncode != 0
    mess = {f.path: f for f in session.changes(session.step - 2).files}
    assert {p: f.status for p, f in mess.items()} == {
        "README.md": "deleted",
        "calc.h": "modified",
        "docs/notes.md": "added",
    }
    assert (mess["calc.h"].old_mode, mess["calc.h"].new_mode) == ("100644", "100755")
    assert tree_state(ws) != good_state

    # 3. Rollback restores the good step byte for byte (modes included), as a new step.
    number = session.rollback(good_step)
    assert number == session.step and session.log()[-1].tool == "rollback"
    assert tree_state(ws) == good_state
    assert not (ws / "docs").exists()  # a directory emptied by the rollback goes too
    assert session.bash("make app && ./app").stdout.endswith("5 6\n")
    # ...and the rollback itself can be rolled back.
    session.rollback(number - 1)
    assert (ws / "calc.c").read_text() == "this is not C\n"

    # The host project was never touched; the history is valid git with one commit per step.
    assert tree_state(project) == host_before
    fsck(session)
    log = subprocess.run(["git", "log", "--format=%s", BRANCH], env=session.store.env(), capture_output=True,
                         check=True).stdout.decode().splitlines()  # fmt: skip
    assert len(log) == session.step + 1 and log[-1].startswith("copy-in of")
    assert "bash: make app && ./app" in log


def test_changes_summary_and_diff(session: Session) -> None:
    session.write_file("new.txt", "a\nb\n")
    session.edit_file("README.md", "Adds numbers.", "Adds and multiplies numbers.")
    session.bash("rm calc.h; printf '\\x00\\x01' > data.bin")
    overall = session.changes()
    by_path = {f.path: f for f in overall.files}
    assert by_path["new.txt"].status == "added" and by_path["new.txt"].insertions == 2
    assert (by_path["README.md"].insertions, by_path["README.md"].deletions) == (1, 1)
    assert by_path["calc.h"].status == "deleted"
    assert by_path["data.bin"].binary
    assert overall.summary() == "2 added, 1 modified, 1 deleted (+3 -2 lines)"
    assert "+Adds and multiplies numbers." in overall.diff and "-Adds numbers." in overall.diff
    one = session.changes(2)
    assert [f.path for f in one.files] == ["README.md"] and (one.since, one.until) == (1, 2)
    assert session.changes(since=2).summary() == "1 added, 1 deleted (+0 -1 lines)"
    assert session.changes(0).count("added") == 7  # step 0: the copy-in itself


def test_recording_matches_git_add(session: Session) -> None:
    """After all sorts of changes, the step's tree is exactly what `git add -A && git write-tree` makes."""
    script = """
        set -e
        mkdir -p a/b/c build deep/er && echo x > a/b/c/f.txt && echo o > x.o && echo gen > build/gen.c
        echo keep > deep/er/k.txt && mv deep moved && ln -s ../README.md a/link && chmod +x a/b/c/f.txt
        printf 'weird' > 'sp ace' && printf 'nl' > "$(printf 'new\\nline')" && printf 'hi' > "$(printf 'caf\\351')"
        mkdir empty && touch empty/.gitkeep && rm calc.h && mkdir calc.h && echo inside > calc.h/now-a-dir
        echo 'moved/' >> .gitignore
        mkfifo fifo
    """
    r = session.bash(script)
    assert r.ok, r.stderr
    session.write_file("moved/er/tracked-despite-ignore.txt", "?")  # ignored directory: not recorded
    ours = session.tree.write(session.store)
    fresh = Path(session.path) / "check.git"
    env = {**session.store.env(work_tree=True), "GIT_DIR": str(fresh), "GIT_INDEX_FILE": str(fresh / "index")}
    subprocess.run(["git", "init", "-q", "--bare", str(fresh)], env={"PATH": os.environ["PATH"]}, check=True)
    (fresh / "info").mkdir(exist_ok=True)
    (fresh / "info" / "exclude").write_bytes(Path(session.store.git_dir, "info", "exclude").read_bytes())
    subprocess.run(["git", "add", "-A"], env=env, cwd=session.workspace, check=True, capture_output=True)
    theirs = subprocess.run(["git", "write-tree"], env=env, check=True, capture_output=True).stdout.decode().strip()
    assert ours == theirs
    names = {f.path for f in session.changes().files}
    assert {"sp ace", "new\nline", "caf\udce9", "a/link", "calc.h/now-a-dir", "empty/.gitkeep"} <= names
    assert not any(n.startswith(("moved/", "build/")) or n in ("x.o", "fifo") for n in names)
    fsck(session)


def test_changes_no_tool_call_recorded_are_found(session: Session) -> None:
    Path(session.workspace, "by-hand.txt").write_text("edited outside any tool call\n")
    changes = session.changes()
    assert [f.path for f in changes.files] == ["by-hand.txt"]
    assert session.log()[-1].tool == "scan"


def test_watcher_fallbacks_are_exact(session: Session) -> None:
    # A hard link: a write through one name must show up under the other too (the step rescans).
    session.bash("ln calc.c twin.c")
    r = session.bash("echo '// via the twin' >> twin.c")
    assert r.changed == ("calc.c", "twin.c")
    assert session.log()[-1].details["recorded_by"] == "scan (hard links)"
    # A directory moved away and back, files created in brand-new directories, deletions.
    session.bash("mkdir -p n1/n2 && echo a > n1/n2/a && mv scripts s2 && mv s2 scripts2")
    assert {f.path for f in session.changes(session.step).files} == {"n1/n2/a", "scripts/run.sh", "scripts2/run.sh"}
    # The watcher follows the moved directory: a change inside it afterwards is recorded.
    r = session.bash("echo more >> scripts2/run.sh")
    assert r.changed == ("scripts2/run.sh",)
    assert session.log()[-1].details["recorded_by"] == "inotify"
    # Queue overflow (more events than the kernel queues): the step falls back to a full scan.
    r = session.bash("cd scripts2 && for i in $(seq 1 7000); do echo $i > f$i; done && rm f1*")
    assert len(r.changed) == 7000 - 1111
    assert session.log()[-1].details["recorded_by"] == "scan"
    # ...and the watcher works again afterwards.
    assert session.bash("echo x > scripts2/new").changed == ("scripts2/new",)
    assert session.log()[-1].details["recorded_by"] == "inotify"


def test_agent_cannot_touch_history_or_hide_changes(session: Session) -> None:
    # The history is in no zone: not visible at its host path, not reachable from the workspace.
    r = session.bash(f"ls {session.store.git_dir} 2>&1; ls -a ..; cat .git/config 2>&1; echo done")
    assert "No such file" in r.stdout and "HEAD" not in r.stdout
    # A .gitattributes marking everything binary (or filtered) does not hide a change from review.
    session.write_file(".gitattributes", "* -diff filter=evil\n")
    session.edit_file("calc.c", "a + b", "a - b")
    assert "+int add(int a, int b) { return a - b; }" in session.changes().diff
    # A planted .git file or directory in the workspace is never recorded.
    session.bash("mkdir -p .git/hooks sub/.GIT && echo evil > .git/hooks/post-commit && echo x > sub/.GIT/config")
    assert not any(".git" in f.path.lower().split("/") for f in session.changes().files)


def test_session_history_survives_reopen(project: Path, data_dir: Path, namespace_ok: None) -> None:
    with Session(str(project), name="again", backend="namespace") as s:
        s.write_file("a.txt", "1\n")
        s.bash("echo 2 >> a.txt")
        state = tree_state(Path(s.workspace))
    with Session.open("again") as s:
        assert s.step == 2 and [x.tool for x in s.log()] == ["copy-in", "write_file", "bash"]
        assert tree_state(Path(s.workspace)) == state
        assert s.bash("cat a.txt").stdout == "1\n2\n"
        s.rollback(0)
        assert not Path(s.workspace, "a.txt").exists()


def test_rollback_of_an_unknown_step_is_an_error(session: Session) -> None:
    from corral.errors import SessionError

    with pytest.raises(SessionError, match="no step 5"):
        session.rollback(5)


def test_a_fifo_gitignore_does_not_hang_the_session(session: Session) -> None:
    import time

    started = time.monotonic()
    r = session.bash("mkdir sub && mkfifo sub/.gitignore && echo x > sub/new.o && echo y > top.o")
    # git would block opening the fifo: what lies below it is recorded rather than asked about.
    assert r.changed == ("sub/new.o",)
    assert {f.path for f in session.changes().files} == {"sub/new.o"}
    assert time.monotonic() - started < 10


def test_gitignore_changes_take_effect_in_the_same_step(session: Session) -> None:
    assert session.bash("make app").changed == ()  # app is ignored
    r = session.bash("sed -i '/^app$/d' .gitignore")  # no longer: the step records it at once
    assert r.changed == (".gitignore", "app")
    r = session.bash("mkdir -p sub && echo 'x.txt' > sub/.gitignore && echo 1 > sub/x.txt && echo 2 > sub/y.txt")
    assert r.changed == ("sub/.gitignore", "sub/y.txt")
    assert session.bash("rm sub/.gitignore").changed == ("sub/.gitignore", "sub/x.txt")


def test_a_huge_diff_is_cut_but_the_summary_is_whole(session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    from corral.session import history

    monkeypatch.setattr(history, "MAX_DIFF_BYTES", 300)
    session.bash("seq 1 1000 > numbers.txt")
    changes = session.changes()
    assert changes.diff_truncated and "the diff goes on past" in changes.diff
    assert changes.files[0].insertions == 1000
    assert session.changes(0).diff_truncated  # step 0 (the whole copy-in) is cut too
