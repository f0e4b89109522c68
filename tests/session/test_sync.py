"""Sync back to the host project: exactly the accepted files, atomically, and never anything unsafe."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from corral.errors import ConfigError
from corral.session import Session, SyncReport
from corral.session.sync import link_problem, path_problem
from tests.session.conftest import tree_state


def statuses(report: SyncReport) -> dict[str, str]:
    return {i.path: i.status for i in report.items}


def no_temporaries(root: Path) -> None:
    leftovers = [p for p in root.rglob("*") if ".corral-tmp-" in p.name]
    assert leftovers == []


def test_sync_writes_exactly_the_accepted_files(session: Session, project: Path) -> None:
    session.edit_file("calc.c", "a + b", "b + a")
    session.write_file("docs/new.md", "new\n")
    session.write_file("README.md", "rewritten\n")
    session.bash("chmod -x scripts/run.sh && rm calc.h")
    before = tree_state(project)

    plan = session.sync(dry_run=True)
    assert statuses(plan) == {
        "calc.c": "pending",
        "docs/new.md": "pending",
        "README.md": "pending",
        "scripts/run.sh": "pending",
        "calc.h": "skipped",
    }
    assert tree_state(project) == before  # a dry run writes nothing

    report = session.sync(["calc.c", "docs"])
    assert statuses(report) == {"calc.c": "written", "docs/new.md": "written"}
    after = tree_state(project)
    assert after["calc.c"][1] == Path(session.workspace, "calc.c").read_bytes()
    assert after["docs/new.md"] == ("0o644", b"new\n")
    assert {k: v for k, v in after.items() if k not in ("calc.c", "docs/new.md")} == {
        k: v for k, v in before.items() if k != "calc.c"
    }

    report = session.sync()
    assert statuses(report) == {"README.md": "written", "scripts/run.sh": "written", "calc.h": "skipped"}
    assert "deletions are synced only when asked" in next(i.reason for i in report.items if i.path == "calc.h")
    assert os.stat(project / "scripts/run.sh").st_mode & 0o777 == 0o644  # the mode change is synced
    assert (project / "calc.h").exists()
    report = session.sync(delete=True)
    assert statuses(report) == {"calc.h": "deleted"} and not (project / "calc.h").exists()
    assert session.sync().items == ()  # nothing left to do
    no_temporaries(project)


def test_conflicts_are_reported_not_overwritten(session: Session, project: Path) -> None:
    session.edit_file("calc.c", "a + b", "b + a")
    session.edit_file("README.md", "Adds numbers.", "Adds numbers fast.")
    session.write_file("NEW.txt", "from the agent\n")
    session.bash("rm main.c")
    # Meanwhile the user edits calc.c, creates NEW.txt, only touches README.md, deletes main.c.
    (project / "calc.c").write_text("// the user's version\n")
    (project / "NEW.txt").write_text("from the user\n")
    os.utime(project / "README.md", (1, 1))
    os.unlink(project / "main.c")
    report = session.sync(delete=True)
    got = {i.path: (i.status, i.reason) for i in report.items}
    assert got["calc.c"][0] == "conflict" and "changed on the host" in got["calc.c"][1]
    assert got["NEW.txt"][0] == "conflict" and "created on the host" in got["NEW.txt"][1]
    assert got["README.md"][0] == "written"  # touched, same content: not a conflict
    assert got["main.c"][0] == "unchanged"  # already gone on the host
    assert (project / "calc.c").read_text() == "// the user's version\n"
    assert (project / "NEW.txt").read_text() == "from the user\n"
    assert not report.ok
    # The user resolves by taking the session's version by hand: the next sync agrees.
    (project / "calc.c").write_bytes(Path(session.workspace, "calc.c").read_bytes())
    assert statuses(session.sync(["calc.c"])) == {"calc.c": "unchanged"}


def test_links_planted_by_the_agent_never_lead_outside(session: Session, project: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    session.bash(
        "ln -s /etc/passwd abs-link && ln -s ../../outside/x up-link && ln -s calc.c ok-link"
        " && rm -r scripts && ln -s " + str(outside) + " scripts && ln calc.c hard.c"
    )
    report = session.sync(delete=True)
    got = {i.path: (i.status, i.reason) for i in report.items}
    assert got["abs-link"][0] == "skipped" and "outside the project" in got["abs-link"][1]
    assert got["up-link"][0] == "skipped"
    assert got["scripts"][0] == "skipped"  # a link to a directory outside
    assert got["ok-link"][0] == "written" and os.readlink(project / "ok-link") == "calc.c"
    assert got["scripts/run.sh"][0] == "deleted"
    assert got["hard.c"][0] == "written"
    assert os.stat(project / "hard.c").st_nlink == 1 and os.stat(project / "calc.c").st_nlink == 1
    assert list(outside.iterdir()) == [] and not (project / "abs-link").exists()


def test_host_links_are_never_written_through(project: Path, data_dir: Path, tmp_path: Path,
                                              namespace_ok: None) -> None:  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "lib.c").write_text("original\n")
    os.symlink(elsewhere, project / "vendor")  # the user's own link to a directory outside the project
    shared = tmp_path / "shared.txt"
    shared.write_text("shared\n")
    os.link(shared, project / "shared.txt")  # a hard link out of the project
    with Session(str(project), name="links", backend="namespace") as s:
        s.bash("rm vendor && mkdir vendor && echo agent > vendor/lib.c && echo agent > shared.txt")
        report = s.sync()
    got = {i.path: (i.status, i.reason) for i in report.items}
    assert got["vendor/lib.c"][0] == "skipped" and "link" in got["vendor/lib.c"][1]
    assert (elsewhere / "lib.c").read_text() == "original\n"
    assert got["shared.txt"][0] == "written"
    assert (project / "shared.txt").read_text() == "agent\n" and shared.read_text() == "shared\n"


def test_git_files_and_odd_names(session: Session, project: Path) -> None:
    session.bash(
        "mkdir -p .git/hooks sub/.Git && echo 'rm -rf ~' > .git/hooks/pre-commit && echo x > sub/.Git/config"
        " && printf nl > \"$(printf 'new\\nline.txt')\" && printf hi > \"$(printf 'caf\\351.txt')\""
        " && mkdir -p 'dir with space' && echo s > 'dir with space/f'"
    )
    report = session.sync()
    names = set(statuses(report))
    assert names == {"new\nline.txt", "caf\udce9.txt", "dir with space/f"}
    assert (project / "new\nline.txt").read_bytes() == b"nl"
    assert os.path.exists(os.fsencode(project) + b"/caf\xe9.txt")
    assert not (project / ".git" / "hooks" / "pre-commit").exists() and not (project / "sub").exists()
    # Paths asked for must be in the project.
    with pytest.raises(ConfigError, match="not in the project"):
        session.sync(["../outside"])
    with pytest.raises(ConfigError, match="not in the project"):
        session.sync(["/etc"])


def test_path_and_link_rules() -> None:
    assert path_problem(b"a/b.txt") is None
    for bad in (b"../x", b"/abs", b"a/../b", b"a//b", b".git/config", b"x/.GIT/hooks/y", b"a\0b", b"",
                b"d/.x.corral-tmp-0011"):  # fmt: skip
        assert path_problem(bad) is not None, bad
    assert link_problem(b"a/l", b"../b") is None
    assert link_problem(b"a/l", b"../../b") is not None
    assert link_problem(b"l", b"/etc/passwd") is not None


def test_sync_then_more_work_then_sync(session: Session, project: Path) -> None:
    session.write_file("a.txt", "1\n")
    assert statuses(session.sync()) == {"a.txt": "written"}
    session.write_file("a.txt", "2\n")  # the baseline moved with the sync: no false conflict
    assert statuses(session.sync()) == {"a.txt": "written"}
    assert (project / "a.txt").read_text() == "2\n"
    session.rollback(0)
    report = session.sync(delete=True)
    assert statuses(report) == {"a.txt": "deleted"}
    no_temporaries(project)
