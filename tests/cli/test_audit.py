"""`corral audit FILE`: reading an audit log, and refusing a file that is not one."""

from __future__ import annotations

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
