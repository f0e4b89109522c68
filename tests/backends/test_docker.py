"""The docker backend against a real engine (a private dockerd started by conftest.py): labels and
clean-up (normal stop, crash, Ctrl-C), images without a registry, the engine's socket never inside,
limits named, and what the doctor says when the engine is missing, stopped or not ours to use."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import corral
from corral.backends import registry
from corral.backends.containers import LABEL_OWNER, LABEL_SANDBOX, LABEL_STATE
from corral.backends.engine import Engine, connect, no_engine_found
from corral.errors import ConfigError, UnsupportedPolicy

from ..conftest import ROOT, corral_cli
from .conftest import DockerDaemon

pytestmark = pytest.mark.usefixtures("docker_ok")
SRC = str(ROOT / "src")


@pytest.fixture
def engine(docker_host: DockerDaemon) -> Iterator[Engine]:
    e = connect("docker")
    yield e
    e.close()


@pytest.fixture
def host_image(engine: Engine) -> str:
    """A standalone image copied from this host's files (`corral image build`), imported once."""
    from corral.backends.images import has_image, host_rootfs_tar, import_image

    tag = "corral-test-host:1"
    if not has_image(engine, tag):
        import_image(engine, host_rootfs_tar(("sh", "cat", "ls", "id", "touch", "python3")), tag)
    return tag


def ours(engine: Engine, sandbox_id: str | None = None) -> list[dict[str, object]]:
    label = f"{LABEL_SANDBOX}={sandbox_id}" if sandbox_id else LABEL_SANDBOX
    found: list[dict[str, object]] = engine.api.containers(all=True, filters={"label": label})
    return found


def wait_for(condition, timeout: float = 30.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_cli_run(workdir: Path) -> None:
    done = corral_cli(
        "run", "--backend", "docker", "--", "sh", "-c", "echo hello > f.txt; cat f.txt; id -u", cwd=workdir
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().split() == ["hello", str(os.getuid())]
    assert (workdir / "f.txt").read_text() == "hello\n"
    assert corral_cli("run", "--backend", "docker", "--", "sh", "-c", "exit 3", cwd=workdir).returncode == 3


def test_config_file_selects_docker_and_image(workdir: Path, host_image: str) -> None:
    (workdir / "corral.toml").write_text(f'backend = "docker"\n[container]\nimage = "{host_image}"\n')
    done = corral_cli("run", "--json", "--", "ls", "/usr/bin", cwd=workdir)
    result = json.loads(done.stdout)
    assert result["backend"] == "docker" and result["returncode"] == 0, done.stderr
    programs = result["stdout"].split()
    assert "python3" in programs and "dockerd" not in programs, "the image, not the host, provides /usr"


def test_labelled_and_removed(engine: Engine, workdir: Path) -> None:
    with corral.Sandbox(corral.Policy.workspace(str(workdir)), backend="docker") as sb:
        [container] = ours(engine, sb.id)
        labels = container["Labels"]
        assert isinstance(labels, dict)
        assert labels[LABEL_OWNER].split(":")[2] == str(os.getpid())
        state = str(labels[LABEL_STATE])
        assert os.path.isdir(state) and (os.stat(state).st_mode & 0o777) == 0o700
        assert sb.exec(["true"]).ok
    assert ours(engine, sb.id) == []
    assert not os.path.exists(state)


CRASHER = """
import os, sys, corral
sb = corral.Sandbox(corral.Policy.workspace(sys.argv[1]), backend=sys.argv[2]).start()
print(sb.id, flush=True)
sys.stdin.read(1)
os.kill(os.getpid(), 9)
"""


def test_a_crash_is_reaped_by_the_next_start(engine: Engine, workdir: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHER, str(workdir), "docker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert proc.stdout is not None and proc.stdin is not None
    sandbox_id = proc.stdout.readline().decode().strip()
    [container] = ours(engine, sandbox_id)
    state = container["Labels"][LABEL_STATE]  # type: ignore[index]
    proc.stdin.write(b"x")
    proc.stdin.close()
    assert proc.wait(timeout=30) == -9
    # The agent saw its socket close and exited: the container stopped by itself...
    assert wait_for(lambda: all(c["State"] == "exited" for c in ours(engine, sandbox_id)))
    assert os.path.isdir(state)
    # ...and the next sandbox reaps it and its directory.
    with corral.Sandbox(corral.Policy.workspace(str(workdir)), backend="docker") as sb:
        assert sb.exec(["true"]).ok
    assert ours(engine, sandbox_id) == []
    assert not os.path.exists(state)


def test_ctrl_c_removes_the_container(engine: Engine, workdir: Path) -> None:
    before = {c["Id"] for c in ours(engine)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral", "run", "--backend", "docker", "--", "sleep", "60"],
        cwd=workdir,
        env={**os.environ, "PYTHONPATH": SRC},
        start_new_session=True,
    )
    try:
        assert wait_for(lambda: any(c["Id"] not in before and c["State"] == "running" for c in ours(engine)))
        time.sleep(0.3)  # the command is running inside
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=30) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    assert {c["Id"] for c in ours(engine)} <= before


def test_the_engine_socket_is_never_inside(docker_host: DockerDaemon, workdir: Path) -> None:
    policy = corral.Policy.workspace(str(workdir)).with_zones(corral.Zone.ro(os.path.dirname(docker_host.socket_path)))
    with pytest.raises(UnsupportedPolicy, match="engine's socket"):
        corral.run(["true"], policy=policy, backend="docker")


def test_named_image(workdir: Path, host_image: str) -> None:
    policy = corral.Policy.workspace(str(workdir)).replace(container=corral.Container(image=host_image))
    r = corral.run(
        ["sh", "-c", "cat /etc/passwd; ls /usr/bin; touch made; python3 -c 'print(6 * 7)'"],
        policy=policy,
        backend="docker",
    )
    assert r.ok, r
    out = r.stdout_text
    assert "corral sandbox:/home/sandbox" in out, "corral's passwd over the image's /etc"
    assert "42" in out and "dockerd" not in out
    assert (workdir / "made").exists()


def test_missing_image_is_a_config_error(workdir: Path) -> None:
    policy = corral.Policy.workspace(str(workdir)).replace(container=corral.Container(image="corral-no-such:1"))
    with pytest.raises(ConfigError, match=r"container\.image.*not in the engine.*auto_pull"):
        corral.run(["true"], policy=policy, backend="docker")
    done = corral_cli("run", "--backend", "docker", "--image", "corral-no-such:1", "--", "true", cwd=workdir)
    assert done.returncode == 2 and b"docker pull corral-no-such:1" in done.stderr


def test_image_without_python_says_so(engine: Engine, workdir: Path) -> None:
    from corral.backends.images import host_rootfs_tar, import_image
    from corral.errors import LaunchError

    tag = import_image(engine, host_rootfs_tar(("sh", "cat")), "corral-test-nopython:1")
    policy = corral.Policy.workspace(str(workdir)).replace(container=corral.Container(image=tag))
    with pytest.raises(LaunchError, match="no python3"):
        corral.run(["true"], policy=policy, backend="docker")


def test_limits_are_named(workdir: Path) -> None:
    policy = corral.Policy.workspace(str(workdir))
    r = corral.run(
        ["python3", "-c", "b = bytearray(512 * 2**20)"],
        policy=policy.with_limits(memory=64 << 20),
        backend="docker",
        timeout=60,
    )
    assert r.reason == "memory" and r.returncode == -9, r
    r = corral.run(
        ["python3", "-c", "import os\nwhile True: os.fork() or os.pause()"],
        policy=policy.with_limits(pids=20),
        backend="docker",
        timeout=30,
    )
    assert r.reason == "pids", r
    r = corral.run(
        ["sh", "-c", "head -c 2000000 /dev/zero > big"], policy=policy.with_limits(file_size=1 << 20), backend="docker"
    )
    assert r.reason in ("file_size", "exited") and r.returncode != 0, r
    assert (workdir / "big").stat().st_size <= 1 << 20


def test_what_a_sandbox_sees(workdir: Path) -> None:
    r = corral.run(
        ["sh", "-c", "cat /proc/net/dev; ls -A /sys | wc -l; cat /etc/hostname; grep -c . /proc/mounts"],
        policy=corral.Policy.workspace(str(workdir)),
        backend="docker",
    )
    assert r.ok, r
    lines = r.stdout_text.splitlines()
    interfaces = [ln.split(":")[0].strip() for ln in lines if ":" in ln and "|" not in ln]
    assert interfaces == ["lo"], "network none: loopback only"
    assert lines[-3] == "0", "/sys is masked, as the namespace backend shows none"
    assert lines[-2] == "corral"


# ------------------------------------------------------------------ the doctor's explanations
def test_doctor_lists_docker(docker_host: DockerDaemon) -> None:
    done = corral_cli("doctor", "--json")
    report = json.loads(done.stdout)
    docker = next(b for b in report["backends"] if b["name"] == "docker")
    assert docker["available"] is True, docker
    assert any("docker 20" in n or "docker " in n for n in docker["notes"])
    assert "limits.memory" in docker["enforces"] and "net.allow" in docker["enforces"]


def _probe_with(env: dict[str, str], *, user: int | None = None) -> dict[str, object]:
    code = textwrap.dedent("""
        import json
        from corral.backends import registry
        print(json.dumps(registry.probe(registry.create("docker"), fresh=True).as_json()))
    """)
    argv = [sys.executable, "-c", code]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    full = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": SRC,
        "HOME": "/nonexistent",
        "XDG_CACHE_HOME": "/nonexistent",
        **env,
    }
    done = subprocess.run(argv, capture_output=True, env=full, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    caps: dict[str, object] = json.loads(done.stdout)
    return caps


def test_doctor_daemon_not_running(tmp_path: Path) -> None:
    caps = _probe_with({"DOCKER_HOST": f"unix://{tmp_path}/docker.sock"})
    assert caps["available"] is False
    assert "no engine socket" in str(caps["reason"]) and "dockerd" in str(caps["fix"])


def test_doctor_stale_socket(tmp_path: Path) -> None:
    path = tmp_path / "docker.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))  # bound, never listening: what a crashed daemon leaves
    try:
        caps = _probe_with({"DOCKER_HOST": f"unix://{path}"})
    finally:
        s.close()
    assert caps["available"] is False
    assert "nothing is listening" in str(caps["reason"]) and "start the Docker daemon" in str(caps["fix"])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to probe as another user")
def test_doctor_no_permission(docker_host: DockerDaemon) -> None:
    dockerd = docker_host
    os.chmod(os.path.dirname(dockerd.socket_path), 0o755)
    caps = _probe_with({"DOCKER_HOST": dockerd.url}, user=65534)
    assert caps["available"] is False
    assert "no permission to use the engine socket" in str(caps["reason"]), caps
    assert "usermod -aG" in str(caps["fix"])


def test_doctor_remote_engine_refused() -> None:
    caps = _probe_with({"DOCKER_HOST": "tcp://192.0.2.1:2375"})
    assert caps["available"] is False and "not local" in str(caps["reason"])


def test_doctor_without_the_docker_package() -> None:
    code = (
        "import sys, json; sys.modules['docker'] = None\nfrom corral.backends import registry\n"
        "print(json.dumps(registry.create('docker').probe().as_json()))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        env={**os.environ, "PYTHONPATH": SRC},
        timeout=60,
        check=False,
    )
    caps = json.loads(done.stdout)
    assert caps["available"] is False and "pip install" in caps["fix"]


def test_doctor_nothing_installed_or_stopped() -> None:
    reason, fix = no_engine_found(search="/nonexistent")
    assert reason.startswith("no container engine is installed") and "apt-get install docker.io" in fix
    reason, fix = no_engine_found()  # this machine has dockerd (docker.io)
    assert "not running" in reason and "systemctl start docker" in fix


def test_orphan_check_is_about_the_owner() -> None:
    from corral.backends.containers import owner_gone, owner_label

    mine = owner_label()
    assert not owner_gone(mine)
    boot, ns, _pid, _start = mine.split(":")
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert owner_gone(f"{boot}:{ns}:{dead.pid}:1")
    assert not owner_gone(f"{boot}:pid[1]:{dead.pid}:1"), "another pid namespace is not ours to judge"
    assert owner_gone(f"other-boot:{ns}:{os.getpid()}:{_start}"), "a reboot ends every owner"


def test_registry_strengths() -> None:
    assert registry.strength_of("docker") == 40 and registry.strength_of("gvisor") == 50
    assert "docker" not in registry.AUTO_ORDER and "gvisor" not in registry.AUTO_ORDER
