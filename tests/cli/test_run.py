"""`corral run` as a user types it: exit codes, messages, limits, bad input."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.conftest import backend_works, corral_cli, needs_memory_cgroup

pytestmark = pytest.mark.usefixtures("namespace_ok")


def test_hello(workdir: Path) -> None:
    r = corral_cli("run", "--", "python3", "-c", "print('hi')", cwd=workdir)
    assert r.returncode == 0 and r.stdout == b"hi\n", r.stderr


def test_exit_code_passes_through(workdir: Path) -> None:
    assert corral_cli("run", "--", "sh", "-c", "exit 7", cwd=workdir).returncode == 7


@needs_memory_cgroup
def test_memory_limit_is_named(workdir: Path) -> None:
    r = corral_cli("run", "--memory", "64M", "--", "python3", "-c", "b = bytearray(512*2**20)", cwd=workdir)
    assert r.returncode == 137
    assert b"killed: memory limit 64M" in r.stderr


def test_timeout_kills_background_children(workdir: Path) -> None:
    started = time.monotonic()
    r = corral_cli(
        "run", "--timeout", "2s", "--", "sh", "-c", f"(sleep 4; touch {workdir}/late) & sleep 100", cwd=workdir
    )
    assert r.returncode == 124 and b"timed out after 2s" in r.stderr
    assert time.monotonic() - started < 10
    time.sleep(3)
    assert not (workdir / "late").exists()


def test_no_shadow(workdir: Path) -> None:
    r = corral_cli("run", "--", "cat", "/etc/shadow", cwd=workdir)
    assert r.returncode != 0 and b"No such file" in r.stderr


def test_write_outside_fails_and_host_is_untouched(workdir: Path) -> None:
    r = corral_cli("run", "--", "sh", "-c", "echo x > /tmp/../../root/corral-x", cwd=workdir)
    assert r.returncode != 0
    assert not os.path.exists("/root/corral-x")


@pytest.mark.parametrize("backend", ["namespace", "landlock", "process"])
def test_not_found_is_127_and_says_so(workdir: Path, backend: str) -> None:
    works, why = backend_works(backend)
    if not works:
        pytest.skip(f"{backend}: {why}")
    # The agent backends (landlock, process) used to exit 127 without a word.
    weaker = ["--allow-weaker"] if backend == "process" else []
    r = corral_cli("run", "--backend", backend, *weaker, "--", "no-such-program", cwd=workdir)
    assert r.returncode == 127 and b"corral: no-such-program: command not found" in r.stderr, r.stderr


def test_stdin_passes_through(workdir: Path) -> None:
    r = corral_cli("run", "--", "sh", cwd=workdir, input=b"echo from-stdin\n")
    assert r.stdout == b"from-stdin\n"


def test_json_result(workdir: Path) -> None:
    r = corral_cli("run", "--json", "--", "sh", "-c", "echo out; echo err >&2; exit 3", cwd=workdir)
    data = json.loads(r.stdout)
    assert r.returncode == 3
    assert data["stdout"] == "out\n" and data["stderr"] == "err\n" and data["backend"] in ("namespace", "landlock")


def test_output_limit(workdir: Path) -> None:
    r = corral_cli("run", "--output", "100K", "--", "yes", cwd=workdir)
    assert r.returncode == 137 and b"output limit" in r.stderr
    assert len(r.stdout) <= 100 * 1024


def test_denied_command_is_audited(workdir: Path, tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    r = corral_cli(
        "run", "--deny-command", "curl", "--audit", str(audit), "--", "sh", "-c", "curl http://x", cwd=workdir
    )
    assert r.returncode == 122 and b"denied by policy (deny: curl)" in r.stderr
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    decision = next(e for e in events if e["event"] == "decision")
    assert decision["action"] == "deny" and decision["rule"] == "deny: curl"


def test_env_flags(workdir: Path) -> None:
    r = corral_cli(
        "run",
        "--env",
        "FROM_HOST",
        "--env",
        "SET=1",
        "--",
        "sh",
        "-c",
        "echo $FROM_HOST-$SET-$HOSTILE",
        cwd=workdir,
        env={"FROM_HOST": "yes", "HOSTILE": "secret"},
    )
    assert r.stdout == b"yes-1-\n"


def test_zone_flags(workdir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "f.txt").write_text("data!")
    os.chmod(tmp_path, 0o755)
    r = corral_cli("run", "--zone", f"{data}:/data", "--", "sh", "-c", "cat /data/f.txt; echo x > /data/g", cwd=workdir)
    assert r.stdout == b"data!" and r.returncode != 0 and not (data / "g").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", "bogus"], b"unknown backend 'bogus'"),
        (["--memory", "-5"], b"--memory"),
        (["--pids", "0"], b"--pids"),
        (["--timeout", "soon"], b"--timeout"),
        (["--zone", "/nonexistent-corral:/x"], b"does not exist"),
        (["--net", "wifi"], b"--net"),
        (["--profile", "lax"], b"unknown profile"),
        (["--frobnicate"], b"unknown flag"),
    ],
)
def test_bad_input_is_a_clear_error(workdir: Path, args: list[str], message: bytes) -> None:
    r = corral_cli("run", *args, "--", "true", cwd=workdir)
    assert r.returncode == 2, r
    assert message in r.stderr and r.stderr.startswith(b"corral: ")


def test_malformed_toml(workdir: Path) -> None:
    (workdir / "corral.toml").write_text("[limits\nmemory=")
    r = corral_cli("run", "--", "true", cwd=workdir)
    assert r.returncode == 2 and b"not valid TOML" in r.stderr


@needs_memory_cgroup
def test_config_file_is_used(workdir: Path) -> None:
    (workdir / "corral.toml").write_text('[limits]\nmemory = "64M"\n')
    r = corral_cli("run", "--", "python3", "-c", "b = bytearray(512*2**20)", cwd=workdir)
    assert r.returncode == 137 and b"memory limit 64M" in r.stderr


def test_process_backend_refuses_without_allow_weaker(workdir: Path) -> None:
    r = corral_cli("run", "--backend", "process", "--", "true", cwd=workdir)
    assert r.returncode == 125 and b"cannot enforce" in r.stderr


def test_min_backend(workdir: Path) -> None:
    r = corral_cli("run", "--backend", "landlock", "--min-backend", "namespace", "--", "true", cwd=workdir)
    assert r.returncode == 2 and b"weaker than the required minimum" in r.stderr


def test_no_command(workdir: Path) -> None:
    assert corral_cli("run", cwd=workdir).returncode == 2


def test_version_and_help() -> None:
    assert corral_cli("--version").stdout.startswith(b"corral ")
    assert b"--memory SIZE" in corral_cli("run", "--help").stdout


def test_a_small_open_files_limit_binds_the_command_not_the_sandbox_set_up(workdir: Path) -> None:
    """Set while bubblewrap still built the sandbox, the limit failed bubblewrap's own opens and the
    sandbox refused to start now and then. Each run must start and see exactly the limit."""
    for _ in range(12):
        r = corral_cli("run", "--open-files", "16", "--", "sh", "-c", "ulimit -n; ulimit -Hn", cwd=workdir)
        assert r.returncode == 0 and r.stdout.split() == [b"16", b"16"], r


def test_a_reader_that_stops_early_gets_no_traceback(workdir: Path) -> None:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as by default
    proc = subprocess.Popen([sys.executable, "-m", "corral", "run", "--json", "--", "sh", "-c", "echo out"],
                            cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before corral prints its JSON: its write meets a closed pipe
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141, err
    assert b"Traceback" not in err, err


# bubblewrap fails building the sandbox after it reported the sandbox's pid, and corral comes late:
# `late` attaches / limits / releases the sandbox only once its process ended (a zombie, or reaped).
_LOST_RACE = """
import sys, time
import corral.backends.namespace.launch as launch
from corral.cli.main import main

mode, real_argv, real_limits = sys.argv[1], launch.bwrap_argv, launch.set_rlimits

def failing_argv(path, *args, **kwargs):
    argv = real_argv(path, *args, **kwargs)
    return [argv[0], "--ro-bind", "/nonexistent-corral-race", "/corral-race", *argv[1:]]

def late(pid, limits):
    while True:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if mode == "zombie" and f.read().rpartition(b")")[2].split()[0] in (b"Z", b"X"):
                    break
        except FileNotFoundError:
            break
        time.sleep(0.001)
    real_limits(pid, limits)

launch.bwrap_argv, launch.set_rlimits = failing_argv, late
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("mode", ["zombie", "reaped"])
@pytest.mark.parametrize("flags", [[], ["--output", "1M"], ["--json"]])
def test_a_start_up_failure_says_bubblewraps_message_once(workdir: Path, mode: str, flags: list[str]) -> None:
    """Releasing a sandbox that had already failed met EPIPE (or, attaching or limiting it, ESRCH):
    `corral: cannot start the sandbox: [Errno 32] Broken pipe`, bubblewrap's message lost when the
    output was captured. With --json stdout was empty."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _LOST_RACE, mode, "run", *flags, "--", "true"], cwd=workdir,
                       capture_output=True, timeout=60, check=False)  # fmt: skip
    said = "bwrap: Can't find source path /nonexistent-corral-race: No such file or directory"
    assert r.returncode == 125, r
    assert b"Errno" not in r.stderr and r.stderr.decode().count(said) == 1, r.stderr
    if flags == ["--json"]:
        assert json.loads(r.stdout) == {"error": f"the sandbox failed to start: {said}", "exit": 125}
        assert r.stderr.decode() == f"corral: the sandbox failed to start: {said}\n"
    else:  # bubblewrap's own stderr reached the terminal (directly, or forwarded)
        assert r.stderr.decode() == f"{said}\ncorral: the sandbox failed to start: see the messages above\n"


def test_a_command_name_that_is_not_utf8_is_not_found(workdir: Path) -> None:
    """It was a UnicodeEncodeError traceback."""
    r = corral_cli("run", "--", os.fsdecode(b"ech\xffo"), "x", cwd=workdir)
    assert r.returncode == 127 and r.stderr == b"corral: ech\\xffo: command not found\n", r
    r = corral_cli("run", "--json", "--", os.fsdecode(b"ech\xffo"), "x", cwd=workdir)
    assert r.returncode == 127 and json.loads(r.stdout)["detail"] == "ech\\xffo: command not found", r
