"""Persistent sessions: reopen, one user at a time, list and remove, and SIGKILL at the worst moments."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import corral
from corral.errors import ConfigError, SessionError
from corral.session import Session, list_sessions, remove_session

SRC = os.path.dirname(os.path.dirname(corral.__file__))


def child(code: str) -> subprocess.Popen[bytes]:
    """A separate Python process running `code` (with `corral` importable as in this test run)."""
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip


def wait_for(predicate: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.005)
    raise AssertionError("timed out waiting")


def test_sigkill_during_a_tool_call_loses_nothing(project: Path, data_dir: Path, namespace_ok: None) -> None:
    with Session(str(project), name="k", backend="namespace") as s:
        s.write_file("before.txt", "kept\n")
        workspace = Path(s.workspace)
    proc = child("""
        from corral.session import Session
        s = Session.open("k")
        s.write_file("second.txt", "also kept\\n")
        s.bash("echo partial > during.txt; sleep 60")
    """)
    try:
        wait_for(lambda: (workspace / "during.txt").exists())
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    with Session.open("k") as s:  # the lock died with the process; the sandbox with it
        steps = s.log()
        assert [x.tool for x in steps] == ["copy-in", "write_file", "write_file", "recover"]
        assert steps[-1].details["interrupted"]["tool"] == "bash"  # type: ignore[index]
        assert [f.path for f in s.changes(s.step).files] == ["during.txt"]
        assert not os.path.exists(os.path.join(s.path, "inflight.json"))
        assert s.bash("cat before.txt second.txt during.txt").stdout == "kept\nalso kept\npartial\n"
    assert not (project / "during.txt").exists()  # the host project never saw any of it


def test_sigkill_during_sync_leaves_no_half_written_file(project: Path, data_dir: Path, namespace_ok: None) -> None:
    count, size = 120, 1 << 20
    for i in range(count):
        (project / f"f{i:03}.bin").write_bytes(b"o" * size)
    with Session(str(project), name="ks", backend="namespace") as s:
        s.bash(f"for i in $(seq -f %03g 0 {count - 1}); do head -c {size} /dev/zero | tr '\\0' n > f$i.bin; done")
    proc = child("""
        from corral.session import Session
        Session.open("ks").sync()
    """)
    try:
        # Kill it once some files are written and (most likely) one is being written.
        wait_for(lambda: any((project / f"f{i:03}.bin").read_bytes()[:1] == b"n" for i in range(0, count, 8)))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    for i in range(count):
        assert (project / f"f{i:03}.bin").read_bytes() in (b"o" * size, b"n" * size)  # old or new, never half
    with Session.open("ks") as s:  # opening removes the killed sync's temporary file, if any
        assert not [p for p in project.iterdir() if ".corral-tmp-" in p.name]
        report = s.sync()
        assert report.ok and {i.status for i in report.items} <= {"written", "unchanged"}
        assert len(report.items) == count
    assert all((project / f"f{i:03}.bin").read_bytes()[:1] == b"n" for i in range(count))


def test_one_process_at_a_time(project: Path, data_dir: Path, namespace_ok: None) -> None:
    with Session(str(project), name="busy", backend="namespace"):
        with pytest.raises(SessionError, match="in use"):
            Session.open("busy")
        with pytest.raises(SessionError, match="in use"):
            remove_session("busy")
        assert [(i.name, i.in_use) for i in list_sessions()] == [("busy", True)]
    with pytest.raises(SessionError, match="exists already"):
        Session(str(project), name="busy")
    info = list_sessions()[0]
    assert (info.project, info.steps, info.in_use) == (str(project), 0, False)
    remove_session("busy")
    assert list_sessions() == [] and not (data_dir / "busy").exists()
    with pytest.raises(SessionError, match="no session named"):
        Session.open("busy")


def test_unnamed_sessions_are_removed_on_close(project: Path, data_dir: Path, namespace_ok: None) -> None:
    with Session(str(project), backend="namespace") as s:
        s.bash("chmod 000 scripts")  # even what the agent locked up goes
        path = s.path
    assert not os.path.exists(path)


def test_an_unnamed_session_left_by_a_killed_process_is_removed_later(
    project: Path, data_dir: Path, namespace_ok: None
) -> None:
    import json

    with Session(str(project), name="kept", backend="namespace"):
        pass
    proc = child(f"""
        import time
        from corral.session import Session
        s = Session({str(project)!r}, backend="namespace")
        print(s.path, flush=True)
        time.sleep(60)
    """)
    try:
        assert proc.stdout is not None
        orphan = Path(proc.stdout.readline().decode().strip())
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert orphan.is_dir()
    with Session(str(project), backend="namespace"):  # made less than a minute ago: it may be one being made
        assert orphan.is_dir()
    state = json.loads((orphan / "state.json").read_text())
    (orphan / "state.json").write_text(json.dumps({**state, "created": "2026-01-01T00:00:00Z"}))
    with Session(str(project), backend="namespace") as s:
        assert not orphan.exists() and [i.name for i in list_sessions()] == sorted(["kept", s.name])


def test_zones_that_would_defeat_the_session_are_refused(project: Path, data_dir: Path, tmp_path: Path,
                                                         namespace_ok: None) -> None:  # fmt: skip
    base = corral.Policy.workspace(str(project))
    with pytest.raises(ConfigError, match="session's own files"):
        Session(str(project), name="z1", policy=base.with_zones(corral.Zone.ro(str(data_dir.parent.parent))))
    with pytest.raises(ConfigError, match="overlaps the project"):
        Session(str(project), name="z2", policy=base.with_zones(corral.Zone.rw(str(project / "scripts"), "/s")))
    assert list_sessions() == []  # nothing half-made is left behind
    # A read-only view of something else is fine, and so is a tmpfs inside the workspace (file tools refuse it).
    data = tmp_path / "data"
    data.mkdir()
    (data / "d.txt").write_text("data\n")
    policy = base.with_zones(corral.Zone.ro(str(data), "/data"), corral.Zone.tmpfs(f"{project}/cache"))
    with Session(str(project), name="z3", policy=policy) as s:
        assert s.bash("cat /data/d.txt && echo c > cache/c && cat cache/c").stdout == "data\nc\n"
        with pytest.raises(corral.PolicyDenied, match="another zone"):
            s.read_file("cache/c")
        assert s.changes().files == ()  # the tmpfs is not the workspace


def test_the_workspace_appears_at_the_project_path(session: Session, project: Path) -> None:
    assert session.mount == str(project)
    r = session.bash("pwd; ls")
    assert r.stdout.startswith(f"{project}\n") and "main.c" in r.stdout
    assert not os.path.exists(project / "app")
    session.bash("make app")
    assert not (project / "app").exists() and (Path(session.workspace) / "app").exists()


def test_a_policy_the_backend_cannot_enforce_is_refused_before_copying(project: Path, data_dir: Path) -> None:
    with pytest.raises(corral.UnsupportedPolicy, match="cannot enforce"):
        Session(str(project), name="weak", backend="process")
    assert list_sessions() == [] and not any(data_dir.iterdir())


def test_sessions_kept_inside_the_project_are_not_copied(project: Path, monkeypatch: pytest.MonkeyPatch,
                                                         namespace_ok: None) -> None:  # fmt: skip
    monkeypatch.setenv("XDG_DATA_HOME", str(project / "data"))
    with Session(str(project), name="inner", backend="namespace") as s:
        assert not (Path(s.workspace) / "data").exists()
        assert not any(f.path.startswith("data/") for f in s.changes(0).files)


def test_the_workspace_takes_the_project_zone_mount_point(project: Path, data_dir: Path, namespace_ok: None) -> None:
    policy = corral.Policy(zones=[corral.Zone.rw(str(project), "/work"), corral.Zone.tmpfs("/tmp")])
    with Session(str(project), name="work", policy=policy) as s:
        assert s.mount == "/work"
        assert s.bash("pwd && ls /work/main.c").stdout == "/work\n/work/main.c\n"
        assert s.read_file("/work/calc.h").text == "int add(int a, int b);\n"
