"""The agent's tools, as an agent calls them: results, steps, and the clear errors it must be able to read."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from corral.errors import PolicyDenied, ToolError
from corral.session import Session
from corral.session.tools import MAX_READ_BYTES, SPECS


def test_read_file_lines_and_limits(session: Session) -> None:
    session.write_file("lines.txt", "".join(f"line {i}\n" for i in range(1, 101)))
    r = session.read_file("lines.txt", offset=10, limit=5)
    assert r.text == "line 11\nline 12\nline 13\nline 14\nline 15\n"
    assert (r.start_line, r.end_line, r.total_lines, r.truncated) == (11, 15, 100, True)
    whole = session.read_file("lines.txt")
    assert whole.total_lines == 100 and not whole.truncated
    # An absolute path inside the sandbox's view of the workspace is the same file.
    assert session.read_file(f"{session.mount}/lines.txt", limit=1).text == "line 1\n"


def test_read_file_refuses_binary_large_and_odd_paths(session: Session) -> None:
    ws = Path(session.workspace)
    (ws / "blob.bin").write_bytes(b"\x7fELF\x00\x01\x02")
    (ws / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with open(ws / "big.txt", "wb") as f:
        f.truncate(MAX_READ_BYTES + 1)
    cases = {
        "blob.bin": "binary file",
        "latin1.txt": "not UTF-8 text",
        "big.txt": "use bash",
        "missing.txt": "does not exist",
        ".": "is a directory",
        "../outside": "leaves the workspace",
        "/etc/passwd": "outside the workspace",
    }
    for path, message in cases.items():
        with pytest.raises(ToolError, match=message):
            session.read_file(path)


def test_links_are_followed_only_inside_the_workspace(session: Session) -> None:
    ws = Path(session.workspace)
    os.symlink("README.md", ws / "inside-link")
    os.symlink(f"{session.mount}/README.md", ws / "absolute-inside")
    os.symlink("/etc/passwd", ws / "escape")
    os.symlink("../../../../../../etc", ws / "escape-dir")
    assert session.read_file("inside-link").text.startswith("# calc")
    assert session.read_file("absolute-inside").text.startswith("# calc")
    for path in ("escape", "escape-dir/passwd", "escape-dir/../escape-dir/hostname"):
        with pytest.raises(ToolError, match="outside the workspace"):
            session.read_file(path)
    with pytest.raises(ToolError, match="outside the workspace"):
        session.write_file("escape-dir/evil", "x")
    # Writing through an inside link writes its target.
    session.write_file("inside-link", "# replaced\n")
    assert (ws / "README.md").read_text() == "# replaced\n" and os.path.islink(ws / "inside-link")


def test_write_and_edit_are_steps(session: Session) -> None:
    w = session.write_file("src/deep/new.py", "x = 1\n")
    assert (w.created, w.step, w.changed) == (True, 1, ("src/deep/new.py",))
    e = session.edit_file("src/deep/new.py", "x = 1", "x = 2")
    assert (e.replacements, e.line, e.step, e.changed) == (1, 1, 2, ("src/deep/new.py",))
    assert Path(session.workspace, "src/deep/new.py").read_text() == "x = 2\n"
    steps = session.log()
    assert [s.tool for s in steps] == ["copy-in", "write_file", "edit_file"]
    assert steps[1].summary == "write_file src/deep/new.py (6 bytes)"
    assert steps[2].details["args"] == {"path": "src/deep/new.py", "old": "x = 1", "new": "x = 2", "count": 1}
    # An unchanged rewrite is still a step (every tool call that may write is one), with no files.
    again = session.write_file("src/deep/new.py", "x = 2\n")
    assert again.step == 3 and again.changed == ()
    # The mode of an existing file is kept.
    os.chmod(Path(session.workspace, "scripts/run.sh"), 0o755)
    session.edit_file("scripts/run.sh", "./app", "exec ./app")
    assert os.stat(Path(session.workspace, "scripts/run.sh")).st_mode & 0o777 == 0o755


def _at_a_second_start() -> None:
    """Sleep to just past a whole second, so the next few calls share one."""
    time.sleep(1.02 - time.time() % 1)


def test_a_same_size_edit_is_not_hidden_by_cached_bytecode(session: Session) -> None:
    """Python takes a .pyc as fresh when the source's mtime (in whole seconds) and size match: an edit
    that keeps the size within the second must still run the new code, and unrelated bytecode stays."""
    ws = Path(session.workspace)
    run = "python3 -c 'import calcpy; print(calcpy.add(2, 3))'"
    for _ in range(3):
        _at_a_second_start()
        session.write_file("calcpy.py", "def add(a, b):\n    return a - b\n")
        assert session.bash(run).result.stdout.strip() == b"-1"
        # The sandbox's python3 names it by its own version, which need not be ours.
        (compiled,) = [p for p in (ws / "__pycache__").glob("calcpy.cpython-*.pyc") if "pytest" not in p.name]
        # A pytest-rewritten twin of it goes too; bytecode of another module whose name starts alike stays.
        twin = compiled.with_name("calcpy.cpython-311-pytest-8.3.3.pyc")
        other = compiled.with_name("calcpy2.cpython-311.pyc")
        twin.write_bytes(compiled.read_bytes())
        other.write_bytes(compiled.read_bytes())
        before = int(os.stat(ws / "calcpy.py").st_mtime)
        session.edit_file("calcpy.py", "a - b", "a * b")
        if int(os.stat(ws / "calcpy.py").st_mtime) == before:
            break
    else:
        pytest.fail("the edit never landed in the second the bytecode was written")
    assert not twin.exists() and other.exists()
    assert session.bash(run).result.stdout.strip() == b"6"
    # The same through write_file and through a rollback that restores the old text.
    written = session.step
    session.write_file("calcpy.py", "def add(a, b):\n    return a + b\n")
    assert session.bash(run).result.stdout.strip() == b"5"
    session.rollback(written)
    assert session.bash(run).result.stdout.strip() == b"6"


def test_edit_errors_are_clear(session: Session) -> None:
    session.write_file("dup.txt", "a\nb\na\n")
    with pytest.raises(ToolError, match="occurs 2 times.*count=2"):
        session.edit_file("dup.txt", "a", "c")
    assert session.edit_file("dup.txt", "a", "c", count=2).replacements == 2
    with pytest.raises(ToolError, match="not found"):
        session.edit_file("dup.txt", "zzz", "y")
    with pytest.raises(ToolError, match="different leading or trailing whitespace"):
        session.edit_file("dup.txt", "  b  ", "y")
    with pytest.raises(ToolError, match="old text is empty"):
        session.edit_file("dup.txt", "", "y")
    failed_steps = session.step
    with pytest.raises(ToolError):
        session.edit_file("missing.txt", "a", "b")
    assert session.step == failed_steps  # a failed call changes nothing and records no step


def test_list_dir(session: Session) -> None:
    os.symlink("calc.c", Path(session.workspace, "link.c"))
    top = session.list_dir()
    kinds = {e.path: e.kind for e in top.entries}
    assert kinds["scripts"] == "dir" and kinds["main.c"] == "file" and kinds["link.c"] == "link"
    assert "scripts/run.sh" not in kinds
    deep = session.list_dir(".", depth=2)
    assert {e.path for e in deep.entries} >= {"scripts", "scripts/run.sh"}
    assert next(e for e in deep.entries if e.path == "link.c").target == "calc.c"
    with pytest.raises(ToolError, match="not a directory"):
        session.list_dir("main.c")


def test_search_skips_ignored_files_and_runs_in_the_sandbox(session: Session) -> None:
    r = session.bash("make app >/dev/null && mkdir -p build && echo 'int add_more;' > build/gen.c")
    assert r.ok, r.stderr
    found = session.search(r"int add\(")
    assert {(m.path, m.line) for m in found.matches} == {("calc.h", 1), ("calc.c", 3)}
    assert session.search("add", glob="*.h").matches[0].path == "calc.h"
    assert session.search("ADDS", ignore_case=True).matches[0].path == "README.md"
    assert session.search("add_more").matches == ()  # build/ is ignored
    with pytest.raises(ToolError, match="search failed"):
        session.search("(unclosed")


def test_policy_applies_to_tools(project: Path, data_dir: Path, namespace_ok: None) -> None:
    import corral

    ro = corral.Policy.from_profile("strict", workspace=str(project)).replace(
        commands=corral.Commands(deny=["rm -rf *"])
    )
    with Session(str(project), name="strict", policy=ro) as s:
        with pytest.raises(PolicyDenied, match="read-only"):
            s.write_file("x.txt", "no")
        denied = s.bash("rm -rf build")
        assert denied.reason == "denied" and denied.step is None and "deny: rm -rf" in (denied.result.rule or "")
        assert s.bash("touch x.txt").returncode != 0  # the workspace zone is read-only in the sandbox too
        assert s.read_file("README.md").text.startswith("# calc")
    rw = corral.Policy.workspace(str(project)).with_limits(file_size=1 << 20)
    with Session(str(project), name="small", policy=rw) as s, pytest.raises(PolicyDenied, match="file size limit"):
        s.write_file("big.txt", "x" * (2 << 20))


def test_call_by_name_checks_arguments(session: Session) -> None:
    assert session.call("write_file", {"path": "a.txt", "content": "hi"}).step == 1  # type: ignore[union-attr]
    assert session.call("read_file", {"path": "a.txt"}).text == "hi"  # type: ignore[union-attr]
    with pytest.raises(ToolError, match="no argument 'nope'"):
        session.call("read_file", {"path": "a.txt", "nope": 1})
    with pytest.raises(ToolError, match="offset must be an integer"):
        session.call("read_file", {"path": "a.txt", "offset": "1"})
    with pytest.raises(ToolError, match="needs command"):
        session.call("bash", {})
    with pytest.raises(ToolError, match="unknown tool"):
        session.call("rm", {})
    schema = SPECS["edit_file"].json_schema()
    assert schema["required"] == ["path", "old", "new"]


def test_every_tool_call_is_audited(session: Session) -> None:
    from corral.audit import read_events

    session.write_file("a.txt", "1")
    session.read_file("a.txt")
    session.bash("echo hi")
    with pytest.raises(ToolError):
        session.read_file("nope")
    events = [e for e in read_events(os.path.join(session.path, "audit.jsonl")) if e.get("event") == "tool"]
    assert [e["tool"] for e in events] == ["write_file", "read_file", "bash", "read_file"]
    assert events[0]["step"] == 1 and events[0]["changed"] == ["a.txt"]
    assert events[2]["exit"] == 0 and events[3]["error_type"] == "ToolError"
    assert all(e["session"] == "s1" for e in events)


def test_ask_rules_reach_the_approver(project: Path, data_dir: Path, namespace_ok: None) -> None:
    import corral

    asked: list[tuple[str, ...]] = []

    def approve(request: corral.AskRequest) -> bool:
        asked.append(request.argv)
        return "yes" in request.argv[-1]

    policy = corral.Policy.workspace(str(project)).replace(commands=corral.Commands(ask=["touch"]))
    with Session(str(project), name="ask", policy=policy, approver=approve) as s:
        assert s.bash("touch yes.txt").ok
        refused = s.bash("touch no.txt")
        assert refused.reason == "denied" and "approver callback said no" in (refused.result.rule or "")
        assert [step.tool for step in s.log()] == ["copy-in", "bash"]  # a refused command is not a step
    assert len(asked) == 2


def test_names_and_paths_too_long_are_one_line_tool_errors(session: Session) -> None:
    name = "x" * 300  # over NAME_MAX (255 bytes)
    deep = "/".join(["y" * 200] * 21)  # every name fits, the path is over PATH_MAX
    calls = {
        "read": lambda p: session.read_file(p),
        "write": lambda p: session.write_file(p, "hi"),
        "edit": lambda p: session.edit_file(p, "a", "b"),
        "list": lambda p: session.list_dir(p),
    }
    for verb, call in calls.items():
        for path in (name, f"sub/{name}/f", deep):
            with pytest.raises(ToolError, match=f"^cannot {verb} .*: File name too long$") as info:
                call(path)
            assert "\n" not in str(info.value) and len(str(info.value)) < 300
    assert not os.path.exists(os.path.join(session.workspace, "sub"))
    # Just below the limits: fine.
    assert session.write_file("x" * 255, "ok").changed == ("x" * 255,)
    assert session.read_file("x" * 255).text == "ok"


def test_git_paths_and_reading_past_the_end_are_refused(session: Session) -> None:
    for path in (".git/config", "sub/.GIT/hooks/pre-commit"):
        with pytest.raises(ToolError, match="a session does not change .git"):
            session.write_file(path, "[core]\n")
    session.write_file("three.txt", "a\nb\nc\n")
    assert session.read_file("three.txt", offset=2).text == "c\n"
    with pytest.raises(ToolError, match="offset 3 is past the end of three.txt, which has 3 lines"):
        session.read_file("three.txt", offset=3)
