"""Sync back to the host project: exactly the accepted files, atomically, and never anything unsafe."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from corral.errors import ConfigError
from corral.session import Session, SyncReport
from corral.session.sync import link_problem, path_problem
from tests.conftest import corral_cli
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
    for fine in (b".", b"./x/", b"x/y", b"../../b", b"..", b"../x/./y"):  # the link sits two levels down
        assert link_problem(b"p/q/l", fine) is None, fine
    for bad in (b"dot/..", b"x/../y", b"x/./../y", b".git/config", b"../.GIT", b"", b"a\0b", b"..", b"../"):
        assert link_problem(b"l" if bad != b"../.GIT" else b"a/l", bad) is not None, bad


def resolves_inside(project: Path) -> None:
    """Every link in the project leads inside it (or nowhere)."""
    for path in project.rglob("*"):
        if path.is_symlink() and ".git" not in path.parts:
            real = Path(os.path.realpath(path))
            assert real == project or project in real.parents, f"{path} -> {real}"


def test_a_link_through_a_link_to_the_project_cannot_climb_out(session: Session, project: Path,
                                                               tmp_path: Path) -> None:  # fmt: skip
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "file.txt").write_text("orig\n")
    # "dot/.." is "." on paper, but the kernel follows dot (the project) first, then climbs out of it.
    session.bash("ln -s . dot && ln -s dot/.. esc && ln -s esc/victim/file.txt vlink && ln -s dot/calc.c via-dot")
    report = session.sync()
    got = {i.path: (i.status, i.reason) for i in report.items}
    assert got["dot"][0] == "written"  # a link to its own directory is inside
    assert got["esc"][0] == "skipped" and "climbs (..) after a name" in got["esc"][1]
    assert got["vlink"][0] == "skipped" and "through another link (esc)" in got["vlink"][1]
    assert got["via-dot"][0] == "skipped" and "through another link (dot)" in got["via-dot"][1]
    assert not os.path.lexists(project / "esc") and not os.path.lexists(project / "vlink")
    resolves_inside(project)
    assert (victim / "file.txt").read_text() == "orig\n"


def test_dotdot_after_a_link_to_a_shallower_directory(session: Session, project: Path, tmp_path: Path) -> None:
    # a/b/top is the project's root; a/b/top/.. is its parent, though on paper it is a/b.
    (tmp_path / "outside").mkdir()
    session.bash("mkdir -p a/b && echo x > a/b/f && ln -s ../.. a/b/top && ln -s a/b/top/.. x"
                 " && ln -s x/outside/secret y && ln -s ../f a/b/sib")  # fmt: skip
    report = session.sync()
    got = {i.path: (i.status, i.reason) for i in report.items}
    assert got["a/b/top"][0] == "written" and got["a/b/f"][0] == "written"
    assert got["a/b/sib"][0] == "written"  # climbing first, within the link's own depth, is fine (dangling here)
    assert got["x"][0] == "skipped" and got["y"][0] == "skipped"
    assert "climbs (..) after a name" in got["x"][1] and "through another link (x)" in got["y"][1]
    resolves_inside(project)


def test_chains_of_links_are_judged_link_by_link(session: Session, project: Path) -> None:
    session.bash(
        "ln -s . dot && ln -s dot/.. c && ln -s c b && ln -s b a"  # a -> b -> c, and c climbs out
        " && echo lib > libx.so.1.2 && ln -s libx.so.1.2 libx.so.1 && ln -s libx.so.1 libx.so"  # a fine chain
        " && ln -s loop2 loop1 && ln -s loop1 loop2 && ln -s scripts/run.sh run && ln -s scripts dir-link"
    )
    report = session.sync()
    got = {i.path: (i.status, i.reason) for i in report.items}
    assert got["c"][0] == "skipped"
    assert got["b"][0] == "skipped" and "points to the link c, which is refused" in got["b"][1]
    assert got["a"][0] == "skipped" and "points to the link b" in got["a"][1]
    assert {got[k][0] for k in ("libx.so", "libx.so.1", "libx.so.1.2", "run", "dir-link", "dot")} == {"written"}
    assert (project / "libx.so").read_text() == "lib\n"
    assert got["loop1"][0] == "skipped" and "loop" in got["loop1"][1]
    resolves_inside(project)


def test_links_to_the_users_links_out_of_the_project(project: Path, data_dir: Path, tmp_path: Path,
                                                      namespace_ok: None) -> None:  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "lib.c").write_text("original\n")
    os.symlink(elsewhere, project / "vendor")  # the user's link out, recorded at copy-in
    os.symlink(elsewhere, project / "build")  # another, ignored (.gitignore has build/): never recorded
    with Session(str(project), name="userlinks", backend="namespace") as s:
        s.bash("ln -s vendor l1 && ln -s vendor/lib.c l2 && ln -s build/lib.c l3 && ln -s build l4"
               " && mkdir sub && ln -s ../vendor sub/l5")  # fmt: skip
        report = s.sync()
    got = {i.path: (i.status, i.reason) for i in report.items}
    assert got["l1"][0] == "skipped" and "points to the link vendor, which is refused" in got["l1"][1]
    assert got["l2"][0] == "skipped" and "through another link (vendor)" in got["l2"][1]
    assert got["l3"][0] == "skipped" and "through another link (build)" in got["l3"][1]
    assert got["l4"][0] == "skipped" and "points to the link build" in got["l4"][1]
    assert got["sub/l5"][0] == "skipped"
    for name in ("l1", "l2", "l3", "l4", "sub/l5"):
        assert not os.path.lexists(project / name)
    assert (elsewhere / "lib.c").read_text() == "original\n"


def test_a_link_may_not_change_where_a_users_link_leads(project: Path, data_dir: Path, tmp_path: Path,
                                                         namespace_ok: None) -> None:  # fmt: skip
    (project / "d").mkdir()
    (project / "d" / "keep").write_text("k\n")
    os.symlink("d/../README.md", project / "u")  # the user's link: climbs after a name, fine while d is a directory
    (tmp_path / "README.md").write_text("outside\n")
    with Session(str(project), name="cross", backend="namespace") as s:
        s.bash("rm -r d && ln -s . d")  # d -> . is inside, but u would become ./../README.md: out
        report = s.sync(delete=True)
    got = {i.path: (i.status, i.reason) for i in report.items}
    assert got["d"][0] == "skipped" and "the link u passes through this path" in got["d"][1]
    assert os.path.realpath(project / "u") == str(project / "README.md")


def test_sync_paths_on_the_command_line(project: Path, data_dir: Path, tmp_path: Path, namespace_ok: None) -> None:
    with Session(str(project), name="cli-sync", excludes=[".env"], backend="namespace") as s:
        s.bash("echo '#!/bin/sh' > scripts/run.sh && echo new > README.md")

    def sync(*args: str, cwd: Path, code: int = 0) -> dict[str, object]:
        r = corral_cli("session", "sync", "cli-sync", *args, "--json", cwd=cwd)
        assert r.returncode == code, r.stderr.decode()
        return json.loads(r.stdout) if code == 0 else {"stderr": r.stderr.decode()}

    def paths(report: dict[str, object]) -> list[object]:
        return [i["path"] for i in report["items"]]  # type: ignore[attr-defined, index]

    scripts = project / "scripts"
    # Relative paths are taken from the current directory inside the project ...
    assert paths(sync("--dry-run", ".", cwd=scripts)) == ["scripts/run.sh"]
    assert paths(sync("--dry-run", "run.sh", cwd=scripts)) == ["scripts/run.sh"]
    assert paths(sync("--dry-run", "../README.md", cwd=scripts)) == ["README.md"]
    assert paths(sync("--dry-run", str(project / "README.md"), cwd=tmp_path)) == ["README.md"]
    # ... and from the project's root outside it.
    assert paths(sync("--dry-run", "scripts", cwd=tmp_path)) == ["scripts/run.sh"]
    # A path that names nothing is an error; one naming an unchanged file just has nothing to sync.
    bad = sync("--dry-run", "run.sh", "nope.sh", cwd=scripts, code=2)
    assert "corral: session sync: nope.sh matches no change" in str(bad["stderr"])
    assert paths(sync("--dry-run", "calc.c", cwd=project)) == []
    assert "not in the project" in str(sync("--dry-run", "../..", cwd=scripts, code=2)["stderr"])
    assert "empty PATH" in str(sync("--dry-run", "", cwd=project, code=2)["stderr"])
    assert "matches no change" in str(sync("--yes", "nope.sh", cwd=scripts, code=2)["stderr"])
    assert (project / "scripts" / "run.sh").read_text() == "#!/bin/sh\n./app\n"  # nothing written on an error

    done = sync("--yes", "run.sh", cwd=scripts)
    assert done["dry_run"] is False and paths(done) == ["scripts/run.sh"]
    # Nothing left there: a real sync says so honestly (not a dry run).
    again = sync("--yes", "run.sh", cwd=scripts)
    assert again["dry_run"] is False and again["items"] == []
    r = corral_cli("session", "sync", "cli-sync", "--yes", "run.sh", cwd=scripts)
    assert r.returncode == 0 and b"nothing synced" in r.stdout and b"would sync" not in r.stdout


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


def test_judging_links_is_bounded(session: Session, project: Path) -> None:
    # Each link exists twice (the host's version and the session's): the search must not double at each.
    session.bash("echo end > l30 && for i in $(seq 0 29); do ln -s l$((i + 1)) l$i; done")
    assert set(statuses(session.sync()).values()) == {"written"}
    session.bash("for i in $(seq 0 29); do ln -sfn ./l$((i + 1)) l$i; done")
    report = session.sync()
    got = {i.path: (i.status, i.reason) for i in report.items}
    assert got["l29"][0] == "written" and got["l0"][0] == "skipped" and "links to follow" in got["l0"][1]
    resolves_inside(project)


def test_python_sync_and_rollback_arguments_are_checked(session: Session, project: Path) -> None:
    from corral.errors import ConfigError

    session.write_file("new.txt", "x")
    with pytest.raises(TypeError, match="not one path"):
        session.sync("new.txt")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="an empty path names nothing"):
        session.sync([""])
    with pytest.raises(TypeError, match="step must be an int"):
        session.rollback("1")  # type: ignore[arg-type]
    assert not (project / "new.txt").exists()
