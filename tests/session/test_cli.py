"""`corral session ...` as a person and as a program use it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import corral_cli

pytestmark = pytest.mark.usefixtures("namespace_ok")


def cli_json(*args: str, cwd: Path | None = None, code: int = 0) -> object:
    r = corral_cli("session", *args, "--json", cwd=cwd)
    assert r.returncode == code, r.stderr.decode()
    return json.loads(r.stdout)


def test_a_whole_session_from_the_command_line(project: Path, data_dir: Path) -> None:
    started = cli_json("start", "--name", "cli", "--project", str(project), "--exclude", ".env",
                       "--deny-command", "git push", "--memory", "512M")  # fmt: skip
    assert started["name"] == "cli" and started["backend"] == "namespace"  # type: ignore[index]
    assert started["copy"]["files"] == 7  # type: ignore[index]

    r = corral_cli("session", "exec", "cli", "--", "sh", "-c", "make app && ./app && echo done > out.txt")
    assert r.returncode == 0 and r.stdout.endswith(b"5\n"), r.stderr
    assert corral_cli("session", "exec", "cli", "--", "sh", "-c", "exit 3").returncode == 3
    denied = corral_cli("session", "exec", "cli", "--", "git", "push")
    assert denied.returncode == 122 and b"denied by policy" in denied.stderr

    edit = cli_json("tool", "cli", "edit_file", "calc.c", "a + b", "a+b")
    assert edit["replacements"] == 1 and edit["tool"] == "edit_file"  # type: ignore[index]
    read = cli_json("tool", "cli", "read_file", "calc.c", "--offset", "2")
    assert read["text"] == "int add(int a, int b) { return a+b; }\n"  # type: ignore[index]
    bad = corral_cli("session", "tool", "cli", "edit_file", "calc.c", "nope", "x")
    assert bad.returncode == 1 and b"old text not found" in bad.stderr
    found = cli_json("tool", "cli", "search", "return", "--glob", "*.c")
    assert {m["path"] for m in found["matches"]} == {"main.c", "calc.c"}  # type: ignore[index]
    r = corral_cli("session", "tool", "cli", "write_file", "notes.txt", "-", input=b"from stdin\n")
    assert r.returncode == 0 and b"wrote notes.txt" in r.stdout

    log = cli_json("log", "cli")
    assert [s["tool"] for s in log] == ["copy-in", "exec", "exec", "edit_file", "write_file"]  # type: ignore[index]
    people = corral_cli("session", "log", "cli")
    assert b"edit_file calc.c" in people.stdout
    diff = cli_json("diff", "cli")
    assert {f["path"] for f in diff["files"]} == {"calc.c", "out.txt", "notes.txt"}  # type: ignore[index]
    assert "+int add(int a, int b) { return a+b; }" in diff["diff"]  # type: ignore[index]
    text = corral_cli("session", "diff", "cli", "--step", "3")
    assert b"calc.c" in text.stdout and b"-int add" in text.stdout

    # sync: refuses without --yes when nobody can be asked; --dry-run shows; --yes writes.
    r = corral_cli("session", "sync", "cli")
    assert r.returncode == 2 and b"--yes" in r.stderr
    plan = cli_json("sync", "cli", "--dry-run")
    assert plan["counts"] == {"pending": 3}  # type: ignore[index]
    done = cli_json("sync", "cli", "--yes", "calc.c")
    assert done["counts"] == {"written": 1}  # type: ignore[index]
    assert (project / "calc.c").read_text().endswith("return a+b; }\n") and not (project / "out.txt").exists()

    rolled = cli_json("rollback", "cli", "0")
    assert rolled == {"rolled_back_to": 0, "step": 5}
    listed = cli_json("list")
    assert [(s["name"], s["steps"]) for s in listed] == [("cli", 5)]  # type: ignore[index]
    # The rollback undid calc.c, which the project has synced: a change the project lacks.
    assert corral_cli("session", "rm", "cli").returncode == 2
    assert cli_json("rm", "cli", "--yes") == {"removed": ["cli"]}
    assert cli_json("list") == []


def test_errors_are_clear(project: Path, data_dir: Path) -> None:
    r = corral_cli("session", "exec", "nope", "--", "true")
    assert r.returncode != 0 and b"no session named 'nope'" in r.stderr
    r = corral_cli("session", "start", "--name", "bad name", "--project", str(project))
    assert r.returncode == 2 and b"session name" in r.stderr
    r = corral_cli("session", "frobnicate")
    assert r.returncode == 2 and b"unknown session command" in r.stderr
    assert corral_cli("session", "--help").returncode == 0


def test_start_uses_the_project_config(project: Path, data_dir: Path, tmp_path: Path) -> None:
    (project / "corral.toml").write_text('[commands]\ndeny = ["rm"]\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cli_json("start", "--name", "cfg", "--project", str(project), cwd=elsewhere)
    r = corral_cli("session", "exec", "cfg", "--", "rm", "README.md")
    assert r.returncode == 122


def test_names_that_do_not_exist_are_usage_errors(project: Path, data_dir: Path) -> None:
    for args in (["exec", "nope", "--", "true"], ["diff", "nope"], ["log", "nope"], ["rm", "nope"],
                 ["rollback", "nope", "0"]):  # fmt: skip
        r = corral_cli("session", *args)
        assert r.returncode == 2 and b"no session named 'nope'" in r.stderr, (args, r.stderr)
    cli_json("start", "--name", "once", "--project", str(project))
    r = corral_cli("session", "start", "--name", "once", "--project", str(project))
    assert r.returncode == 2 and b"exists already" in r.stderr and b"Session.open" not in r.stderr, r.stderr
    for args in (["diff", "once", "--step", "99"], ["rollback", "once", "99"]):
        r = corral_cli("session", *args)
        assert r.returncode == 2 and b"no step 99" in r.stderr, (args, r.stderr)


def test_rm_keeps_work_that_was_not_synced_unless_told(project: Path, data_dir: Path) -> None:
    cli_json("start", "--name", "work", "--project", str(project))
    assert corral_cli("session", "exec", "work", "--", "sh", "-c", "echo new > added.txt").returncode == 0
    r = corral_cli("session", "rm", "work", input=b"")  # no terminal: refuses rather than asks
    assert r.returncode == 2 and b"1 change(s) not synced" in r.stderr and b"--yes" in r.stderr, r.stderr
    assert r.stderr.startswith(b"corral: session rm: session 'work'"), r.stderr  # corral named once
    assert [s["name"] for s in cli_json("list")] == ["work"]  # type: ignore[index]
    cli_json("sync", "work", "--yes")
    assert (project / "added.txt").read_text() == "new\n"
    assert cli_json("rm", "work") == {"removed": ["work"]}  # everything synced: no question
    cli_json("start", "--name", "again", "--project", str(project))
    corral_cli("session", "exec", "again", "--", "sh", "-c", "echo more >> added.txt")
    assert cli_json("rm", "again", "--yes") == {"removed": ["again"]}
    assert (project / "added.txt").read_text() == "new\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any directory (the ordinary user's run checks this)")
def test_a_sessions_directory_it_cannot_use_is_one_line(project: Path, data_dir: Path) -> None:
    xdg = data_dir.parent.parent
    xdg.chmod(0)
    try:
        for args in (["list"], ["start", "--name", "z", "--project", str(project)]):
            r = corral_cli("session", *args)
            assert r.returncode == 125 and r.stderr.count(b"\n") == 1, r.stderr
            assert b"Permission denied" in r.stderr and b"Traceback" not in r.stderr, r.stderr
    finally:
        xdg.chmod(0o755)


def test_session_timeouts_take_durations_as_corral_run_does(project: Path, data_dir: Path) -> None:
    assert corral_cli("session", "start", "--name", "t", "--project", str(project)).returncode == 0
    for args in (
        ["exec", "t", "--timeout", "1s", "--", "sleep", "5"],
        ["tool", "t", "bash", "sleep 5", "--timeout", "1s"],
    ):
        r = corral_cli("session", *args)
        assert r.returncode == 124 and b"timed out after 1s" in r.stderr, r.stderr
    r = corral_cli("session", "exec", "t", "--timeout", "1x", "--", "true")
    assert r.returncode == 2 and b"corral: --timeout: expected a duration" in r.stderr, r.stderr


def test_log_and_diff_work_while_an_agent_holds_the_session(project: Path, data_dir: Path) -> None:
    import corral

    assert corral_cli("session", "start", "--name", "busy", "--project", str(project)).returncode == 0
    with corral.Session.open("busy") as held:  # as an MCP server holds it
        held.write_file("new.txt", "made by the agent\n")
        log = corral_cli("session", "log", "busy", "--json")
        assert log.returncode == 0 and b"is in use: showing its recorded steps" in log.stderr, log.stderr
        assert [s["tool"] for s in json.loads(log.stdout)] == ["copy-in", "write_file"]
        diff = corral_cli("session", "diff", "busy", "--stat")
        assert diff.returncode == 0 and b"new.txt" in diff.stdout, diff.stdout
        sync = corral_cli("session", "sync", "busy", "--yes")  # writing still waits for the session
        assert sync.returncode != 0 and b"in use" in sync.stderr
