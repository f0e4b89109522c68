"""Container engines for the docker and gvisor tests, started by the tests themselves.

`docker_host` starts a private `dockerd` (its own data root, exec root, socket and containerd
namespace; no bridge, no iptables: sandboxes have no network anyway) with the `runsc` runtime
registered when gVisor is installed, and stops it at the end of the session; `docker_host` points
DOCKER_HOST at it for one test. A test that needs it is skipped, with the reason, when dockerd
cannot start here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

from corral.backends import registry
from corral.backends.base import Backend, Capabilities

DOCKERD_START_TIMEOUT = 60.0


class DockerDaemon:
    def __init__(self, base: str, proc: subprocess.Popen[bytes], socket_path: str, log: str) -> None:
        self.base = base
        self.proc = proc
        self.socket_path = socket_path
        self.url = f"unix://{socket_path}"
        self.log = log

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                return "\n".join(f.read().splitlines()[-lines:])
        except OSError:
            return ""


def _answers(socket_path: str) -> bool:
    import socket

    if not os.path.exists(socket_path):
        return False
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(2)
    try:
        s.connect(socket_path)
        s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
        return b"200 OK" in s.recv(4096)
    except OSError:
        return False
    finally:
        s.close()


def start_dockerd() -> DockerDaemon:
    """A private dockerd, or pytest.skip with the reason it cannot run here."""
    if os.geteuid() != 0:
        pytest.skip("starting a private dockerd needs root (run the suite as root, as .ci/run does)")
    dockerd = shutil.which("dockerd", path="/usr/bin:/usr/sbin:/usr/local/bin")
    if dockerd is None:
        pytest.skip("dockerd is not installed (apt-get install docker.io)")
    base = tempfile.mkdtemp(prefix="corral-dk-", dir="/tmp")  # short: unix socket paths are limited
    config: dict[str, object] = {}
    runsc = shutil.which("runsc", path="/usr/bin:/usr/local/bin:/usr/sbin")
    if runsc is not None:
        # The agent connects to a host socket: runsc must allow it (--host-uds=open).
        config["runtimes"] = {
            "runsc": {"path": runsc, "runtimeArgs": ["--host-uds=open", "--network=none", "--platform=ptrace"]}
        }
    with open(os.path.join(base, "daemon.json"), "w") as f:
        json.dump(config, f)
    socket_path = os.path.join(base, "docker.sock")
    log = os.path.join(base, "dockerd.log")
    argv = [
        dockerd,
        "--config-file",
        os.path.join(base, "daemon.json"),
        "--bridge=none",
        "--iptables=false",
        "--ip6tables=false",
        "--data-root",
        os.path.join(base, "data"),
        "--exec-root",
        os.path.join(base, "x"),
        "-H",
        f"unix://{socket_path}",
        "--pidfile",
        os.path.join(base, "dockerd.pid"),
        "--containerd-namespace",
        f"corral-{os.getpid()}",
        "--containerd-plugins-namespace",
        f"corral-{os.getpid()}-p",
        "--userland-proxy=false",
        "--log-level=warn",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    daemon = DockerDaemon(base, proc, socket_path, log)
    deadline = time.monotonic() + DOCKERD_START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = daemon.log_tail()
            stop_dockerd(daemon)
            pytest.skip(f"dockerd exited at start-up (status {proc.returncode}): {tail}")
        if _answers(socket_path):
            return daemon
        time.sleep(0.1)
    tail = daemon.log_tail()
    stop_dockerd(daemon)
    pytest.skip(f"dockerd did not answer within {DOCKERD_START_TIMEOUT:g}s: {tail}")


def stop_dockerd(daemon: DockerDaemon) -> None:
    if daemon.proc.poll() is None:
        if _answers(daemon.socket_path):
            subprocess.run(
                ["docker", "-H", daemon.url, "rm", "-f", "-v", *_all_containers(daemon)],
                capture_output=True,
                check=False,
                timeout=60,
            )
        daemon.proc.send_signal(signal.SIGTERM)
        try:
            daemon.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.proc.pid, signal.SIGKILL)
            daemon.proc.wait()
    # A runtime that failed half-way (runsc refusing a start) can leave its shim and sandbox behind,
    # outliving dockerd: they are ours (their command lines name our private directories).
    _kill_processes_naming(daemon.base)
    # dockerd unmounts its layers when it stops; anything left is unmounted before removal.
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f if line.split()[4].startswith(daemon.base + "/")]
    for mount in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", mount], capture_output=True, check=False)
    shutil.rmtree(daemon.base, ignore_errors=True)


def _kill_processes_naming(base: str) -> None:
    needle = base.encode() + b"/"
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if needle in f.read():
                    os.kill(int(name), signal.SIGKILL)
        except OSError:
            continue


def _all_containers(daemon: DockerDaemon) -> list[str]:
    if shutil.which("docker") is None:
        return []
    done = subprocess.run(["docker", "-H", daemon.url, "ps", "-aq"], capture_output=True, text=True, check=False)
    return done.stdout.split() if done.returncode == 0 else []


@pytest.fixture(scope="session")
def dockerd() -> Iterator[DockerDaemon]:
    daemon = start_dockerd()
    try:
        yield daemon
    finally:
        stop_dockerd(daemon)


@pytest.fixture
def docker_host(dockerd: DockerDaemon, monkeypatch: pytest.MonkeyPatch) -> DockerDaemon:
    """The private dockerd, as DOCKER_HOST for this test only (other tests see the host's own setting)."""
    monkeypatch.setenv("DOCKER_HOST", dockerd.url)
    return dockerd


_PROBED: dict[str, tuple[Backend, Capabilities]] = {}


def container_backend(name: str) -> tuple[Backend, Capabilities]:
    """The backend and its capabilities (probed afresh once per session and DOCKER_HOST), or a skip
    saying why it does not work here."""
    key = f"{name}|{os.environ.get('DOCKER_HOST', '')}"
    if key not in _PROBED:
        backend = registry.create(name)
        _PROBED[key] = (backend, registry.probe(backend, fresh=True))
    backend, caps = _PROBED[key]
    if not caps.available:
        pytest.skip(f"{name} unavailable here: {caps.reason} (fix: {caps.fix})")
    return backend, caps


@pytest.fixture
def docker_ok(docker_host: DockerDaemon) -> Capabilities:
    return container_backend("docker")[1]


class PodmanService:
    def __init__(self, base: str, proc: subprocess.Popen[bytes], socket_path: str) -> None:
        self.base = base
        self.proc = proc
        self.socket_path = socket_path
        self.url = f"unix://{socket_path}"


@pytest.fixture(scope="session")
def podman() -> Iterator[PodmanService]:
    """Podman's Docker-compatible API service (rootful, runc: crun does not run on every host)."""
    if os.geteuid() != 0:
        pytest.skip("starting a private podman service needs root here")
    exe = shutil.which("podman", path="/usr/bin:/usr/local/bin")
    runc = shutil.which("runc", path="/usr/sbin:/usr/bin:/usr/local/sbin")
    if exe is None or runc is None:
        pytest.skip("podman (and runc) are not installed (apt-get install podman runc)")
    base = tempfile.mkdtemp(prefix="corral-pm-", dir="/tmp")
    socket_path = os.path.join(base, "podman.sock")
    argv = [
        exe,
        "--root",
        os.path.join(base, "root"),
        "--runroot",
        os.path.join(base, "run"),
        "--runtime",
        runc,
        "--cgroup-manager",
        "cgroupfs",
        "--events-backend",
        "file",
        "system",
        "service",
        "--time=0",
        f"unix://{socket_path}",
    ]
    # Rootful Podman gives containers nofile and nproc limits of 1048576; where root's own hard limits
    # are lower and cannot be raised (inside a container, as here), runc then fails: no defaults.
    conf = os.path.join(base, "containers.conf")
    with open(conf, "w") as f:
        f.write("[containers]\ndefault_ulimits = []\n")
    with open(os.path.join(base, "podman.log"), "wb") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "CONTAINERS_CONF": conf},
            cwd=base,  # conmon writes an `oom` file into its working directory when a container OOMs
        )
    service = PodmanService(base, proc, socket_path)
    try:
        deadline = time.monotonic() + DOCKERD_START_TIMEOUT
        while not _answers(socket_path):
            if proc.poll() is not None or time.monotonic() > deadline:
                with open(os.path.join(base, "podman.log"), errors="replace") as f:
                    tail = f.read()[-1500:]
                pytest.skip(f"the podman service did not start: {tail}")
            time.sleep(0.1)
        yield service
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        _kill_processes_naming(base)
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split()[4] for line in f if line.split()[4].startswith(base + "/")]
        for mount in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)
