"""The gvisor backend: runsc directly with corral's OCI bundle, and runsc as an engine runtime for
named images (against the private dockerd of conftest.py, which registers runsc)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import corral
from corral.backends.base import Capabilities
from corral.backends.engine import Engine, connect
from corral.errors import BackendUnavailable

from ..conftest import ROOT, corral_cli
from .conftest import DockerDaemon, container_backend

SRC = str(ROOT / "src")


@pytest.fixture
def gvisor() -> Capabilities:
    return container_backend("gvisor")[1]


def test_walls_inside(gvisor: Capabilities, workdir: Path) -> None:
    script = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None)\n"
        "print('nnp', libc.prctl(39, 0, 0, 0, 0))\n"  # PR_GET_NO_NEW_PRIVS
        "status = dict(l.split(':', 1) for l in open('/proc/self/status') if ':' in l)\n"
        "print('seccomp', status['Seccomp'].strip(), 'capeff', status['CapEff'].strip())\n"
        "print('pids', len([p for p in os.listdir('/proc') if p.isdigit()]))\n"
        "print('kernel', os.uname().release)\n"
    )
    r = corral.run(["python3", "-c", script], policy=corral.Policy.workspace(str(workdir)), backend="gvisor")
    assert r.ok, r
    seen = dict(line.split(" ", 1) for line in r.stdout_text.splitlines())
    assert seen["nnp"] == "1"
    assert seen["seccomp"].startswith("2") and seen["seccomp"].endswith("capeff 0000000000000000")
    assert int(seen["pids"]) < 6, "only the agent and this command"
    assert seen["kernel"] != os.uname().release, "gVisor's kernel answers, not the host's"


def test_platform_is_reported(gvisor: Capabilities) -> None:
    assert any("platform" in note for note in gvisor.notes), gvisor.notes
    assert "limits.pids" in gvisor.enforces and "net.allow" in gvisor.enforces


def test_cli_run(gvisor: Capabilities, workdir: Path) -> None:
    done = corral_cli("run", "--backend", "gvisor", "--", "sh", "-c", "echo in-gvisor > g.txt; cat g.txt", cwd=workdir)
    assert done.returncode == 0 and done.stdout == b"in-gvisor\n", done.stderr
    assert (workdir / "g.txt").read_text() == "in-gvisor\n"


def test_memory_limit_ends_the_sandbox(gvisor: Capabilities, workdir: Path) -> None:
    policy = corral.Policy.workspace(str(workdir)).with_limits(memory=96 << 20)
    with corral.Sandbox(policy, backend="gvisor") as sb:
        assert sb.exec(["python3", "-c", "b = bytearray(16 * 2**20)"]).ok
        r = sb.exec(["python3", "-c", "b = bytearray(512 * 2**20)"], timeout=60)
        assert r.reason == "memory" and r.returncode == -9, r
        assert "whole gVisor sandbox" in r.detail
        with pytest.raises(corral.SandboxLost):
            sb.exec(["true"])


def test_pids_limit_counts_sandbox_processes(gvisor: Capabilities, workdir: Path) -> None:
    code = "import os\nn = 0\ntry:\n    while True:\n        if os.fork() == 0: os.pause()\n        n += 1\n"
    code += "except OSError: print(n)"
    r = corral.run(
        ["python3", "-c", code],
        policy=corral.Policy.workspace(str(workdir)).with_limits(pids=16),
        backend="gvisor",
        timeout=30,
    )
    assert r.ok and 5 <= int(r.stdout_text) < 16, r


CRASHER = """
import os, sys, corral
sb = corral.Sandbox(corral.Policy.workspace(sys.argv[1]).with_limits(memory=256 << 20), backend="gvisor").start()
print(sb.id, flush=True)
sys.stdin.read(1)
os.kill(os.getpid(), 9)
"""


def test_a_crash_is_reaped_by_the_next_start(gvisor: Capabilities, workdir: Path) -> None:
    from corral.backends.gvisor import find_runsc

    base = os.path.join(find_runsc().root, "sandboxes")
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHER, str(workdir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert proc.stdout is not None and proc.stdin is not None
    sandbox_id = proc.stdout.readline().decode().strip()
    [left] = [n for n in os.listdir(base) if n.startswith(f"corral-{sandbox_id}-")]
    container_id = Path(base, left, "owner").read_text().split()[0]
    proc.stdin.write(b"x")
    proc.stdin.close()
    assert proc.wait(timeout=30) == -9
    assert os.path.isdir(os.path.join(base, left))
    with corral.Sandbox(corral.Policy.workspace(str(workdir)), backend="gvisor") as sb:
        assert sb.exec(["true"]).ok
    assert not os.path.exists(os.path.join(base, left))
    assert not any(os.path.exists(f"/sys/fs/cgroup/{c}/corral-gvisor/{container_id}") for c in ("memory", "cpu"))
    time.sleep(0.5)
    listed = subprocess.run(
        [find_runsc().path, "--root", find_runsc().root, "list", "-q"], capture_output=True, text=True, check=False
    ).stdout.split()
    assert container_id not in listed


# ------------------------------------------------------------------ through the engine
def test_named_image_through_the_engine_runtime(docker_host: DockerDaemon, workdir: Path) -> None:
    from corral.backends.images import host_rootfs_tar, import_image

    caps = container_backend("gvisor")[1]
    if not any(n.startswith("named images through") for n in caps.notes):
        pytest.skip(f"the engine's runsc runtime does not work here: {caps.notes}")
    engine = connect("gvisor")
    tag = import_image(engine, host_rootfs_tar(("sh", "cat", "python3")), "corral-test-gvisor:1")
    policy = corral.Policy.workspace(str(workdir)).replace(container=corral.Container(image=tag))
    r = corral.run(
        ["python3", "-c", "import os; print(os.uname().release); open('made', 'w').write('x')"],
        policy=policy,
        backend="gvisor",
    )
    assert r.ok, r
    assert r.stdout_text.strip() != os.uname().release
    assert (workdir / "made").read_text() == "x"
    found = engine.api.containers(all=True, filters={"label": "corral.backend=gvisor"})
    assert found == [], "removed after the run"


def test_engine_runtime_problems_are_explained(docker_host: DockerDaemon) -> None:
    from corral.backends.gvisor import GVisorBackend

    real = connect("gvisor")
    backend = GVisorBackend().engine_backend
    without = Engine(
        real.api, url=real.url, info={**real.info, "Runtimes": {"runc": {"path": "runc"}}}, version=real.version
    )
    with pytest.raises(BackendUnavailable, match="no 'runsc' runtime registered") as missing:
        backend.check_runtime(without)
    assert "runsc install" in missing.value.fix
    no_uds = Engine(
        real.api,
        url=real.url,
        info={**real.info, "Runtimes": {"runsc": {"path": "/usr/bin/runsc"}}},
        version=real.version,
    )
    with pytest.raises(BackendUnavailable, match="host socket") as closed:
        backend.check_runtime(no_uds)
    assert "--host-uds=open" in closed.value.fix


def test_doctor_reports_gvisor(gvisor: Capabilities) -> None:
    done = corral_cli("doctor", "--json")
    report = json.loads(done.stdout)
    entry = next(b for b in report["backends"] if b["name"] == "gvisor")
    assert entry["available"] is True and entry["strength"] == 50
    assert any("platform" in n for n in entry["notes"])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run corral as another user")
def test_rootless_runsc(gvisor: Capabilities) -> None:
    """As an ordinary user runsc runs rootless: it works, and refuses the limits it cannot hold."""
    import shutil
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="corral-nobody-", dir="/tmp"))
    os.chown(work, 65534, 65534)
    try:
        _rootless(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _rootless(work: Path) -> None:
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": SRC, "HOME": "/nonexistent", "XDG_CACHE_HOME": str(work / "c")}

    def as_nobody(*args: str) -> subprocess.CompletedProcess[bytes]:
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "corral", *args]
        return subprocess.run(argv, cwd=work, env=env, capture_output=True, timeout=120, check=False)

    done = as_nobody("run", "--backend", "gvisor", "--", "sh", "-c", "id -u; echo made > f; cat f")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [b"0", b"made"], "root inside runsc's user namespace: nobody outside"
    assert (work / "f").stat().st_uid == 65534
    refused = as_nobody("run", "--backend", "gvisor", "--memory", "100M", "--", "true")
    assert refused.returncode == 125 and b"cannot enforce" in refused.stderr and b"limits.memory" in refused.stderr
