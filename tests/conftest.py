"""Shared fixtures. Tests use the real backends, real cgroups and real git: nothing of the kernel is mocked."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import corral
from corral.backends import registry

ROOT = Path(__file__).resolve().parent.parent


def backend_works(name: str) -> tuple[bool, str]:
    caps = registry.probe(registry.create(name))
    return caps.available, caps.reason


@pytest.fixture(scope="session")
def namespace_ok() -> None:
    ok, why = backend_works("namespace")
    if not ok:
        pytest.skip(f"namespace backend unavailable here: {why}")


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A project directory the sandbox may write (made world-traversable for unprivileged runs)."""
    work = tmp_path / "project"
    work.mkdir()
    os.chmod(tmp_path, 0o755)
    return work.resolve()


@pytest.fixture
def policy(workdir: Path) -> corral.Policy:
    return corral.Policy.workspace(str(workdir))


def corral_cli(
    *args: str,
    cwd: Path | str | None = None,
    input: bytes | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[bytes]:
    """Run the real `corral` command line (the installed entry point's module)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "corral", *args],
        cwd=cwd,
        input=input,
        capture_output=True,
        env=full_env,
        timeout=timeout,
        check=False,
    )


def is_root() -> bool:
    return os.geteuid() == 0


def cgroup_controllers() -> frozenset[str]:
    from corral.kernel.cgroups import CgroupHost

    return CgroupHost.detect().controllers


needs_memory_cgroup = pytest.mark.skipif(
    "memory" not in cgroup_controllers(),
    reason="no writable memory cgroup for this user (the memory limit falls back to RLIMIT_DATA)",
)
needs_python3 = pytest.mark.skipif(shutil.which("python3", path="/usr/bin:/bin") is None, reason="no /usr/bin/python3")
