"""`corral run`'s bad input: one line naming the flag (or the file and key), exit 2, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import corral_cli


def one_error(r: subprocess.CompletedProcess[bytes]) -> str:
    """The single `corral: ...` line a usage error prints, after checking it is alone and exit 2."""
    assert r.returncode == 2, r
    lines = r.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("corral: "), lines
    return lines[0]


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--cpus", "inf"], "corral: --cpus: must be a number of CPUs from 0.01 to 8192, got inf"),
        (["--cpus", "nan"], "corral: --cpus: must be a number of CPUs from 0.01 to 8192, got nan"),
        (["--pids", "99999999999999999999"], "corral: --pids: must be at most 4194304"),
        (["--open-files", "2000000"], "corral: --open-files: must be at most 1048576"),
        (["--file-size", "99999999999999999999"], "corral: --file-size: must be at most 2**63 - 1 bytes"),
        (["--timeout", "3000000"], "corral: --timeout: must be at most 24 days"),
        (["--memory"], "corral: --memory: needs a value (SIZE)"),
        (["--memory", "--cpus", "2"], "corral: --memory: needs a value (SIZE)"),
        (["--memory", "1k"], "corral: --memory: must be at least 4M"),
        (["--tmpfs", "relative"], "corral: --tmpfs relative: must be an absolute path inside the sandbox"),
        (["--tmpfs", "/c:lots"], "corral: --tmpfs /c:lots: expected a size"),
        (["--zone", "/nonexistent-corral"],
         "corral: --zone /nonexistent-corral: host path /nonexistent-corral does not exist"),
        (["--env", "1BAD"], "corral: --env: not a valid variable name: '1BAD'"),
        (["--net", "allow:*"], "corral: --net: not a domain pattern"),
        (["--cwd", "rel"], "corral: --cwd: must be an absolute path"),
        (["--deny-command="], "corral: --deny-command: expected a non-empty string"),
        (["--backend", "warp"], "corral: --backend: unknown backend 'warp'"),
        (["--min-backend", "warp"], "corral: --min-backend: unknown backend 'warp'"),
        (["--profile", "lax"], "corral: --profile: unknown profile 'lax'"),
    ],
)  # fmt: skip
def test_a_bad_flag_is_named_as_typed(tmp_path: Path, args: list[str], line: str) -> None:
    """They said `limits.cpus`, `zone.mount`, `zones[2]` (a user's first zone), `got '--'`, or
    ended in a traceback (--cpus inf, --timeout 3000000) or exit 125 (--pids 1e20)."""
    r = corral_cli("run", "--no-config", *args, "--", "true", cwd=tmp_path)
    assert one_error(r).startswith(line)


@pytest.mark.parametrize(
    ("text", "after"),
    [
        ("[[zones]]\nhost = '/nonexistent-corral'\nmount = '/x'\n",
         "zones[0].host: host path /nonexistent-corral does not exist"),
        ("backend = 'warp'\n", "backend: unknown backend 'warp'"),
        ("[limits\n", "not valid TOML: "),
        ("[limits]\nmemory = '1k'\n", "limits.memory: must be at least 4M, got 1024 bytes"),
        ("[limits]\ncpus = inf\n", "limits.cpus: must be a number of CPUs"),
    ],
)  # fmt: skip
def test_a_bad_config_names_the_file_and_its_key_once(tmp_path: Path, text: str, after: str) -> None:
    cfg = tmp_path / "corral.toml"
    cfg.write_text(text)
    for args in ((), ("--config", str(cfg))):  # found by search, and named
        line = one_error(corral_cli("run", *args, "--", "true", cwd=tmp_path))
        assert line.startswith(f"corral: {cfg}: {after}"), line
        assert line.count(str(cfg)) == 1


@pytest.mark.usefixtures("namespace_ok")
def test_a_config_named_outside_the_project_does_not_move_the_workspace(workdir: Path, tmp_path: Path) -> None:
    """`--config /opt/policies/p.toml` made /opt/policies the read-write workspace: the command ran
    there, could not see the project, and wrote into the policy folder on the host."""
    policies = tmp_path / "policies"
    policies.mkdir()
    os.chmod(policies, 0o755)
    (policies / "p.toml").write_text('[limits]\ntimeout = "5s"\n')
    script = f"pwd; ls {workdir}; touch {policies}/planted"
    (workdir / "mine.txt").write_text("x")
    r = corral_cli("run", "--config", str(policies / "p.toml"), "--", "sh", "-c", script, cwd=workdir)
    assert r.stdout.decode().splitlines() == [str(workdir), "mine.txt"], r
    assert r.returncode != 0 and not (policies / "planted").exists()


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--image", "python:3.12"], "corral: --image: applies only to the docker and gvisor backends, which auto "
                                     "never picks (add --backend docker or gvisor)"),
        (["--backend", "landlock", "--image", "python:3.12"],
         "corral: --image: applies only to the docker and gvisor backends, not landlock"),
        (["--min-backend", "landlock", "--backend", "process"],
         "corral: --backend: 'process' is weaker than the required minimum 'landlock' (--min-backend)"),
        (["--min-backend", "microvm"], "corral: --min-backend: auto picks only among namespace, landlock, none as "
                                       "strong as 'microvm'; name one that is: --backend microvm"),
        (["--config", "/nonexistent-corral.toml", "--no-config"],
         "corral: --no-config: conflicts with --config /nonexistent-corral.toml"),
    ],
)  # fmt: skip
def test_flags_that_were_ignored_or_misreported(tmp_path: Path, args: list[str], line: str) -> None:
    """--image was ignored by the namespace and landlock backends, --config beside --no-config used
    anyway; --min-backend said `backend: backend 'process'`, and 'no backend is at least as strong as
    microvm' where microvm works but auto never picks it."""
    r = corral_cli("run", *args, "--", "true", cwd=tmp_path)
    assert one_error(r).startswith(line)


def test_an_env_name_not_set_on_the_host_is_warned_about(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CORRAL_QA_UNSET"}
    r = subprocess.run([sys.executable, "-m", "corral", "run", "--no-config", "--backend", "process", "--allow-weaker",
                        "--env", "CORRAL_QA_UNSET", "--env", "HOME", "--", "true"], cwd=tmp_path, env=env,
                       capture_output=True, check=False)  # fmt: skip
    assert r.returncode == 0, r
    assert b"corral: warning: --env CORRAL_QA_UNSET: not set on the host, not passed\n" in r.stderr
    assert b"--env HOME" not in r.stderr


def test_run_help_names_every_backend() -> None:
    from corral.backends.registry import known_backends

    text = corral_cli("run", "--help").stdout.decode()
    line = next(line for line in text.splitlines() if line.strip().startswith("--backend"))
    assert all(name in line for name in known_backends()), line


def test_json_answers_on_stdout_when_nothing_runs(tmp_path: Path) -> None:
    """Scripts that parse stdout got nothing when corral failed before the command."""
    for args, code in ((["--frobnicate"], 2), (["--memory", "1k"], 2), (["--backend", "warp"], 2)):
        r = corral_cli("run", "--json", *args, "--", "true", cwd=tmp_path)
        data = json.loads(r.stdout)
        assert r.returncode == code == data["exit"] and data["error"] in r.stderr.decode(), r


@pytest.mark.parametrize("flag", ["--uid", "--pids", "--open-files", "--cpus"])
def test_number_flags_take_ascii_digits_only(flag: str, tmp_path: Path) -> None:
    r = corral_cli("run", flag, "\uff10" if flag == "--uid" else "\uff15", "--", "true", cwd=tmp_path)
    assert r.returncode == 2 and f"corral: {flag}: expected a".encode() in r.stderr, r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="only root's own files are at stake")
def test_a_zone_holding_root_only_files_is_warned_about_as_root(tmp_path: Path) -> None:
    r = corral_cli("run", "--zone", "/etc:/hostetc", "--", "true", cwd=tmp_path)
    assert r.returncode == 0 and b"corral: warning: zone /etc: run as root, the command can read" in r.stderr
    quiet = corral_cli("run", "--zone", "/etc/ssl:/ssl", "--", "true", cwd=tmp_path)
    assert quiet.returncode == 0 and b"warning" not in quiet.stderr, quiet.stderr
