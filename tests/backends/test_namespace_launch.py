"""launch(): a sandbox whose limits cannot be applied never runs its command; finding bubblewrap."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from corral.backends.namespace.launch import _system_version, find_bwrap, launch
from corral.kernel.cgroups import Cgroup, CgroupHost
from corral.policy.model import Limits, Policy
from corral.policy.resolve import resolve

pytestmark = pytest.mark.usefixtures("namespace_ok")


class _AttachFails(Cgroup):
    def attach(self, pid: int) -> None:
        raise OSError(28, "No space left on device (as a full cgroup would say)")


class _HostWhoseAttachFails(CgroupHost):
    """The real cgroup host of this machine, except that moving a process in fails."""

    def create(self, limits: Limits | None = None) -> Cgroup:
        real = super().create(limits)
        return _AttachFails(real.mode, real.dirs)


def test_a_failed_cgroup_attach_kills_the_sandbox_before_it_runs(workdir: Path) -> None:
    host = CgroupHost.detect()
    if host.mode == "none":
        pytest.skip(f"no usable cgroups: {host.reason}")
    failing = _HostWhoseAttachFails(host.mode, host.bases)
    marker = workdir / "ran"
    rp = resolve(Policy.workspace(str(workdir)).with_limits(memory=64 << 20))
    with pytest.raises(OSError):
        launch(find_bwrap(), rp, ["/bin/sh", "-c", f"echo escaped > {marker}"], cgroups=failing)
    time.sleep(0.5)  # had bubblewrap been left behind, its command would have run by now
    assert not marker.exists(), "the command ran without the cgroup that failed to apply"
    mine = [
        name
        for base in failing.bases.values()
        for name in os.listdir(base)
        if name.startswith(f"corral-{os.getpid()}-")
    ]
    assert mine == [], "the failed sandbox's cgroup was left behind"


def test_a_cgroup_host_that_cannot_be_found_kills_the_sandbox_before_it_runs(workdir: Path) -> None:
    """The cgroup host is looked for while bubblewrap builds the sandbox: failing then must not free it."""

    def no_host() -> CgroupHost:
        raise OSError(5, "Input/output error (as an unreadable mountinfo would say)")

    marker = workdir / "ran"
    rp = resolve(Policy.workspace(str(workdir)).with_limits(memory=64 << 20))
    with pytest.raises(OSError):
        launch(find_bwrap(), rp, ["/bin/sh", "-c", f"echo escaped > {marker}"], cgroups=no_host)
    time.sleep(0.5)
    assert not marker.exists(), "the command ran although its cgroup host could not be found"


def test_a_system_bwrap_version_is_run_once_and_again_when_the_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    runs = tmp_path / "runs"
    fake = tmp_path / "bwrap"
    fake.write_text(f"#!/bin/sh\necho run >> {runs}\necho bubblewrap 0.9.0\n")
    fake.chmod(0o755)
    assert _system_version(str(fake)) == (0, 9, 0)
    assert _system_version(str(fake)) == (0, 9, 0)
    assert runs.read_text().count("run") == 1  # the second answer came from the cache
    fake.write_text(f"#!/bin/sh\necho run >> {runs}\necho bubblewrap 0.10.0\n")  # an upgrade
    assert _system_version(str(fake)) == (0, 10, 0)
    assert runs.read_text().count("run") == 2
