from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

import corral
from corral.audit import AuditLog, redact_argv, redact_env
from tests.conftest import corral_cli


def test_redaction() -> None:
    assert redact_argv(["curl", "--password=hunter2", "--token", "abc", "https://u:p@h/x", "plain"]) == [
        "curl",
        "--password=***",
        "--token",
        "***",
        "https://u:***@h/x",
        "plain",
    ]
    assert redact_env({"GITHUB_TOKEN": "x", "HOME": "/h"}) == {"GITHUB_TOKEN": "***", "HOME": "/h"}


def test_lines_never_interleave(tmp_path: Path) -> None:
    log = AuditLog(str(tmp_path / "a.jsonl"))
    threads = [
        threading.Thread(target=lambda: [log.write("exec", n=i, pad="x" * 5000) for i in range(200)]) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    assert len(lines) == 800 and all(json.loads(line)["event"] == "exec" for line in lines)
    assert oct((tmp_path / "a.jsonl").stat().st_mode & 0o777) == "0o600"


@pytest.mark.usefixtures("namespace_ok")
def test_every_exec_and_decision_is_logged(policy: corral.Policy, tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    p = policy.replace(commands=corral.Commands(deny=["rm"]))
    with corral.Sandbox(p, audit=str(path)) as sb:
        sb.exec(["echo", "--token=abc"])
        sb.exec(["rm", "-rf", "x"])
    events = [json.loads(line) for line in path.read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "sandbox.start" and kinds[-1] == "sandbox.stop"
    execs = [e for e in events if e["event"] == "exec"]
    assert execs[0]["argv"] == ["echo", "--token=***"] and execs[0]["returncode"] == 0
    assert execs[1]["reason"] == "denied" and execs[1]["rule"] == "deny: rm"
    assert all(e["sandbox"] == events[0]["sandbox"] for e in events)
    r = corral_cli("audit", str(path), "--denied")
    assert b"deny: rm" in r.stdout and b"echo" not in r.stdout
