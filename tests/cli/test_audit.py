"""`corral audit FILE`: reading an audit log, and refusing a file that is not one."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import corral_cli


def test_a_file_that_is_not_an_audit_log_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"time": "t", "event": "exec", "argv": ["x"]}\n\ngarbage\n')
    for flags in ((), ("--json",), ("--denied",)):
        r = corral_cli("audit", str(bad), *flags)
        assert r.returncode == 2 and r.stdout == b"", r
        assert (
            r.stderr.decode() == f'corral: {bad}:3: not an audit event (expected a JSON object with an "event" field)\n'
        )


def test_events_are_shown(tmp_path: Path) -> None:
    good = tmp_path / "a.jsonl"
    good.write_text('{"time": "t", "event": "exec", "sandbox": "s1", "argv": ["make"], "returncode": 0}\n')
    r = corral_cli("audit", str(good))
    assert r.returncode == 0 and r.stdout == b"t s1 exec: make returncode=0\n", r


def test_an_audit_log_in_the_project_is_refused(workdir: Path) -> None:
    """`cd proj; corral run --audit ./a.jsonl -- sh -c '... > a.jsonl'` let the command erase the
    earlier events and forge its own."""
    log = workdir / "a.jsonl"
    log.write_text('{"event": "exec", "time": "t", "sandbox": "s0"}\n')
    r = corral_cli("run", "--audit", "./a.jsonl", "--", "sh", "-c", 'echo "{\\"event\\":\\"fake\\"}" > a.jsonl',
                   cwd=workdir)  # fmt: skip
    assert r.returncode == 2 and r.stdout == b"", r
    assert r.stderr.decode() == (f"corral: --audit: ./a.jsonl is inside the read-write zone {workdir}: the sandboxed "
                                 "command could rewrite the log; put it outside every writable zone\n")  # fmt: skip
    assert log.read_text() == '{"event": "exec", "time": "t", "sandbox": "s0"}\n'
    # from a config file too, said at its key
    (workdir / "corral.toml").write_text('audit = "logs.jsonl"\n')
    r = corral_cli("run", "--", "true", cwd=workdir)
    assert r.returncode == 2 and r.stderr.startswith(f"corral: audit: {workdir}/logs.jsonl is inside".encode()), r
    assert not (workdir / "logs.jsonl").exists()


def test_an_audit_file_that_cannot_be_opened_is_one_line(workdir: Path, tmp_path: Path) -> None:
    """They were tracebacks; and a missing directory was created (as root anywhere: /nonexistent/dir)."""
    missing = tmp_path / "nonexistent" / "dir" / "a.jsonl"
    long = "/tmp/" + "x" * 300
    for path, reason in ((str(tmp_path), "Is a directory"), (str(missing), "No such file or directory"),
                         (long, "File name too long")):  # fmt: skip
        r = corral_cli("run", "--audit", path, "--", "true", cwd=workdir)
        assert r.returncode == 2 and r.stderr.decode() == f"corral: --audit: cannot open {path}: {reason}\n", r
        r = corral_cli("run", "--json", "--audit", path, "--", "true", cwd=workdir)
        assert json.loads(r.stdout) == {"error": f"--audit: cannot open {path}: {reason}", "exit": 2}, r
    assert not (tmp_path / "nonexistent").exists()
    assert corral_cli("run", "--audit=", "--", "true", cwd=workdir).stderr == b"corral: --audit: needs a file name\n"
    # A file that opens but refuses writes (as root), or will not open (as anyone else): one line, no traceback.
    r = corral_cli("run", "--audit", "/proc/version", "--", "true", cwd=workdir)
    lines = r.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith(("corral: --audit: cannot open /proc/version: ",
                                                    "corral: --audit: cannot write /proc/version: ")), r  # fmt: skip
    assert r.returncode in (2, 125)
