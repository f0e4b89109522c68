from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

import corral
from corral.audit import AuditLog, read_events, redact_argv, redact_env
from corral.errors import ConfigError
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


def test_redaction_of_assignments() -> None:
    assert redact_argv(["env", "GITHUB_TOKEN=ghp_xyz", "true"]) == ["env", "GITHUB_TOKEN=***", "true"]
    assert redact_argv(["true", "--password=hunter2", "API_KEY=abc", "-Ddb.password=p", "--env=AWS_SECRET=s"]) == [
        "true",
        "--password=***",
        "API_KEY=***",
        "-Ddb.password=***",
        "--env=AWS_SECRET=***",
    ]
    assert redact_argv(["curl", "-H", "Authorization: Bearer ghp_1", "https://h/x?a=1&access_token=t"]) == [
        "curl",
        "-H",
        "Authorization: ***",
        "https://h/x?a=1&access_token=***",
    ]


def test_redaction_inside_shell_scripts() -> None:
    script = (
        "export API_KEY='a b'; x --password=hunter2 GITHUB_TOKEN=ghp_1 https://u:p@h/ ; "
        "curl --token abc -H \"Authorization: Bearer z\" 'https://h/?x=1' && echo 'it --secret s9' done"
    )
    assert redact_argv(["bash", "-lc", script]) == [
        "bash",
        "-lc",
        "export API_KEY=***; x --password=*** GITHUB_TOKEN=*** https://u:***@h/ ; "
        "curl --token *** -H \"Authorization: ***\" 'https://h/?x=1' && echo 'it --secret ***' done",
    ]
    assert (
        redact_argv(["ssh", "host", "mysql --password hunter2 -e 'select 1'"])[2]
        == "mysql --password *** -e 'select 1'"
    )


def test_redaction_keeps_ordinary_values() -> None:
    """Names that only say where a secret is, switches, references and look-alikes are kept."""
    argv = [
        "x", "PATH=/usr/bin:$PATH", "--password-file=/run/secrets/db", "GITHUB_TOKEN_FILE=/t", "GIT_AUTHOR_NAME=Al",
        "TOKENIZERS_PARALLELISM=false", "--password-stdin", "-u", "me", "--no-auth", "plain", "https://h/a:b@c",
    ]  # fmt: skip
    assert redact_argv(argv) == argv
    script = 'TOKEN=$(cat /run/t) make; API_KEY="$KEY" make; ls -la | grep -v x=1'
    assert redact_argv(["sh", "-c", script])[2] == "TOKEN=$(cat /run/t) make; API_KEY=*** make; ls -la | grep -v x=1"


def test_write_after_close_is_not_lost(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    log = AuditLog(str(path))
    log.write("exec", n=1)
    log.close()
    log.write("exec", n=2)  # a late writer (a backend's thread): appended, not dropped, nothing left open
    assert [e["n"] for e in read_events(str(path))] == [1, 2]


def test_read_events_names_a_line_that_is_not_an_event(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"time": "t", "event": "exec"}\n\n[1]\n')
    assert len(list(read_events(str(path)))) == 1
    with pytest.raises(ConfigError, match=r"a.jsonl:3: not an audit event"):
        list(read_events(str(path), strict=True))


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


def _events(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.usefixtures("namespace_ok")
def test_one_shot_run_logs_start_and_stop(policy: corral.Policy, tmp_path: Path, workdir: Path) -> None:
    path = tmp_path / "audit.jsonl"
    assert corral.run(["true"], policy=policy, audit=str(path)).ok
    events = _events(path)
    assert [e["event"] for e in events] == ["sandbox.start", "exec", "sandbox.stop"]
    start = events[0]
    assert {"backend", "duration", "weaker", "network", "zones"} <= start.keys() and start["weaker"] == []
    assert len({e["sandbox"] for e in events}) == 1
    # the command line too, and a denied command starts no sandbox
    path.unlink()
    r = corral_cli("run", "--audit", str(path), "--", "env", "GITHUB_TOKEN=ghp_xyz", "true", cwd=workdir)
    assert r.returncode == 0, r.stderr
    r = corral_cli("run", "--deny-command", "rm", "--audit", str(path), "--", "rm", "x", cwd=workdir)
    assert r.returncode == 122, r.stderr
    events = _events(path)
    kinds = [e["event"] for e in events]
    assert kinds == ["sandbox.start", "exec", "sandbox.stop", "decision", "exec"], kinds
    assert events[1]["argv"] == ["env", "GITHUB_TOKEN=***", "true"]
    assert events[0]["sandbox"] == events[2]["sandbox"] != events[3]["sandbox"]


@pytest.mark.usefixtures("namespace_ok")
def test_an_audit_log_in_a_writable_zone_is_refused(workdir: Path, tmp_path: Path) -> None:
    """The sandboxed command could rewrite a log in its own read-write zone: erase the earlier events, forge others."""
    policy = corral.Policy.workspace(str(workdir))
    inside = workdir / "logs"
    inside.mkdir()
    link = tmp_path / "link.jsonl"
    link.symlink_to(inside / "a.jsonl")  # outside by its name, inside by where it leads
    for path in (workdir / "a.jsonl", inside / "a.jsonl", str(workdir), link):
        with pytest.raises(ConfigError, match=rf"^audit: {path} is inside the read-write zone {workdir}: .*rewrite"):
            corral.run(["true"], policy=policy, audit=path)
        with pytest.raises(ConfigError, match=rf"^audit: {path} is inside the read-write zone {workdir}"):
            corral.Sandbox(policy, audit=path)
    assert sorted(p.name for p in workdir.iterdir()) == ["logs"] and not list(inside.iterdir())
    # A read-only zone, a zone mounted elsewhere and an AuditLog the caller opened are fine.
    data = tmp_path / "data"
    data.mkdir()
    ro = policy.with_zones(corral.Zone.ro(str(data), "/data"))
    assert corral.run(["true"], policy=ro, audit=data / "a.jsonl").ok
    rw = policy.with_zones(corral.Zone.rw(str(data), "/data"))
    with pytest.raises(ConfigError, match=rf"inside the read-write zone {data} \(mounted at /data\)"):
        corral.run(["true"], policy=rw, audit=str(data / "b.jsonl"))
    with AuditLog(str(workdir / "mine.jsonl")) as log:
        assert corral.run(["true"], policy=policy, audit=log).ok


def test_an_audit_path_that_cannot_be_opened_is_a_config_error(tmp_path: Path) -> None:
    """It was an OSError (a traceback at the command line), and a missing directory was created."""
    missing = tmp_path / "no" / "such" / "dir" / "a.jsonl"
    long = tmp_path / ("x" * 300)
    (tmp_path / "project").mkdir()
    policy = corral.Policy.workspace(str(tmp_path / "project"))
    for path, reason in ((tmp_path, "Is a directory"), (missing, "No such file or directory"),
                         (long, "File name too long"), (f"{tmp_path}/a\0b", "embedded null byte")):  # fmt: skip
        with pytest.raises(ConfigError) as info:
            AuditLog(str(path))
        assert str(info.value) == f"audit: cannot open {path}: {reason}"
        with pytest.raises(ConfigError, match="^audit: cannot open "):
            corral.run(["true"], policy=policy, backend="process", allow_weaker=True, audit=path)
    assert not (tmp_path / "no").exists()
