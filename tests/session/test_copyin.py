"""Copy-in: which files, copied how."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from corral.session import Session
from tests.session.conftest import git, tree_state

pytestmark = pytest.mark.usefixtures("namespace_ok")


def test_a_plain_directory_honours_gitignore_and_excludes(tmp_path: Path, data_dir: Path) -> None:
    project = tmp_path / "plain"
    (project / "src").mkdir(parents=True)
    (project / "src" / "a.py").write_text("a = 1\n")
    (project / "node_modules" / "dep").mkdir(parents=True)
    (project / "node_modules" / "dep" / "index.js").write_text("x\n")
    (project / ".gitignore").write_text("node_modules/\n")
    (project / "secret.key").write_text("k\n")
    (project / "notes.log").write_text("l\n")
    os.symlink("src/a.py", project / "link.py")
    os.mkfifo(project / "fifo")
    with Session(str(project), name="plain", excludes=["*.key", "/notes.log"]) as s:
        assert s.copy_report is not None and s.copy_report.source.startswith("walk")
        assert sorted(tree_state(Path(s.workspace))) == [".gitignore", "link.py", "src/a.py"]
        assert os.readlink(Path(s.workspace, "link.py")) == "src/a.py"
        # The excludes apply to the history too: the agent's new secret.key is not recorded.
        r = s.bash("echo k2 > other.key && echo x > kept.txt")
        assert r.changed == ("kept.txt",)


def test_tracked_files_nested_repositories_and_the_git_directory(project: Path, data_dir: Path) -> None:
    # A tracked file that .gitignore would ignore is still copied (git tracks it).
    (project / "build").mkdir()
    (project / "build" / "keep.txt").write_text("tracked\n")
    git(project, "add", "-f", "build/keep.txt")
    git(project, "commit", "-qm", "keep")
    # A nested repository: its files are copied, its .git is not.
    nested = project / "vendor" / "lib"
    nested.mkdir(parents=True)
    (nested / "lib.c").write_text("int lib;\n")
    git(nested, "init", "-q")
    # A file deleted in the worktree but still in the index is simply not there.
    os.unlink(project / "README.md")
    with Session(str(project), name="nested", excludes=[".env"]) as s:
        ws = Path(s.workspace)
        assert (ws / "build" / "keep.txt").read_text() == "tracked\n"
        assert (ws / "vendor" / "lib" / "lib.c").exists() and not (ws / "vendor" / "lib" / ".git").exists()
        assert not (ws / ".git").exists() and not (ws / "README.md").exists() and not (ws / ".env").exists()
        assert (ws / "scripts" / "run.sh").stat().st_mode & 0o777 == 0o755
        assert (ws / "main.c").stat().st_mtime_ns == (project / "main.c").stat().st_mtime_ns
        assert {f.path for f in s.changes(0).files} >= {"build/keep.txt", "vendor/lib/lib.c"}
        assert os.stat(ws / "main.c").st_ino != os.stat(project / "main.c").st_ino  # a copy, not a link


def test_include_git_gives_the_agent_a_repository_that_is_never_recorded(project: Path, data_dir: Path) -> None:
    with Session(str(project), name="withgit", include_git=True, excludes=[".env"]) as s:
        r = s.bash("git status --porcelain && git log --oneline | wc -l && git -c user.name=a -c user.email=a@a "
                   "commit -qam change --allow-empty && echo ok")  # fmt: skip
        assert r.ok and r.stdout.endswith("1\nok\n"), r.stderr
        assert r.changed == ()  # .git changed, but it is never recorded
        assert not any(".git/" in f.path for f in s.changes(0).files)
        report = s.sync()
        assert report.items == ()
    assert git(project, "log", "--oneline").count("\n") == 1  # the user's repository is untouched
