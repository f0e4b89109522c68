"""launch(): a sandbox whose limits cannot be applied never runs its command; finding bubblewrap."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import ClassVar

import pytest

from corral.backends.namespace.launch import _system_version, find_bwrap, launch
from corral.errors import LaunchError
from corral.kernel.cgroups import Cgroup, CgroupHost
from corral.policy.model import Limits, Policy
from corral.policy.resolve import resolve

pytestmark = pytest.mark.usefixtures("namespace_ok")


class _AttachFails(Cgroup):
    def attach(self, pid: int) -> None:
        raise OSError(28, "No space left on device (as a full cgroup would say)")


class _HostWhoseAttachFails(CgroupHost):
    """The real cgroup host of this machine, except that moving a process in fails."""

    def create(self, limits: Limits | None = None, *, by_thread: bool = False) -> Cgroup:
        real = super().create(limits, by_thread=by_thread)
        return _AttachFails(real.mode, real.dirs)


def test_a_failed_cgroup_attach_kills_the_sandbox_before_it_runs(workdir: Path) -> None:
    host = CgroupHost.detect()
    if host.mode == "none":
        pytest.skip(f"no usable cgroups: {host.reason}")
    failing = _HostWhoseAttachFails(host.mode, host.bases)
    marker = workdir / "ran"
    rp = resolve(Policy.workspace(str(workdir)).with_limits(memory=64 << 20))
    with pytest.raises(LaunchError, match="cannot start the sandbox"):
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


@pytest.mark.parametrize("limits", [{"memory": 64 << 20}, {"pids": 20}], ids=["during-start", "before-start"])
def test_a_cgroup_host_that_cannot_be_found_kills_the_sandbox_before_it_runs(
    workdir: Path, limits: dict[str, int]
) -> None:
    """The cgroup host is looked for while bubblewrap builds the sandbox (a memory limit: it is
    attached by pid), or before (a cgroup the launching thread joins): failing must not free it.
    Either way the caller gets corral's own error, not an OSError."""
    if "pids" in limits and os.geteuid() != 0:
        pytest.skip("as an ordinary user a pids limit needs no cgroup")

    def no_host() -> CgroupHost:
        raise OSError(5, "Input/output error (as an unreadable mountinfo would say)")

    marker = workdir / "ran"
    rp = resolve(Policy.workspace(str(workdir)).with_limits(**limits))
    with pytest.raises(LaunchError, match="cannot start the sandbox: .*Input/output error"):
        launch(find_bwrap(), rp, ["/bin/sh", "-c", f"echo escaped > {marker}"], cgroups=no_host)
    time.sleep(0.5)
    assert not marker.exists(), "the command ran although its cgroup host could not be found"


def _v1_root() -> CgroupHost:
    host = CgroupHost.detect()
    if host.mode != "v1" or os.geteuid() != 0:
        pytest.skip("needs cgroup v1 and root (a sandbox's cgroup joined by the launching thread)")
    return host


class _LimitsFail(Cgroup):
    def set_limits(self, limits: Limits) -> None:
        raise OSError(22, "Invalid argument (as a refused pids.max would say)")


class _StuckThread(Cgroup):
    """Leaving fails as if the thread's old cgroup and the root both refused it; `back` keeps the real way."""

    back: ClassVar[list[tuple[str, str]]] = []

    def leave_as_thread(self, back: list[tuple[str, str]]) -> bool:
        _StuckThread.back = back
        return super().leave_as_thread([("/nonexistent/tasks", "/nonexistent/tasks")] * len(back))


def _host_making(kind: type[Cgroup], host: CgroupHost) -> CgroupHost:
    class Host(CgroupHost):
        def create(self, limits: Limits | None = None, *, by_thread: bool = False) -> Cgroup:
            real = super().create(limits, by_thread=by_thread)
            made = kind(real.mode, real.dirs)
            made.pids_extra = real.pids_extra
            return made

    return Host(host.mode, host.bases, mounts=host.mounts)


def test_a_joined_cgroup_whose_limits_fail_kills_the_sandbox_before_it_runs(workdir: Path) -> None:
    host = _host_making(_LimitsFail, _v1_root())
    marker = workdir / "ran"
    rp = resolve(Policy.workspace(str(workdir)).with_limits(pids=20))
    assert host.joins_by_thread(rp.limits)
    with pytest.raises(LaunchError, match="cannot start the sandbox"):
        launch(find_bwrap(), rp, ["/bin/sh", "-c", f"echo escaped > {marker}"], cgroups=host)
    time.sleep(0.5)
    assert not marker.exists(), "the command ran without its pids limit"
    assert not [n for b in host.bases.values() for n in os.listdir(b) if n.startswith(f"corral-{os.getpid()}-")]


def test_a_thread_that_cannot_leave_the_sandbox_cgroup_stops_the_launch(workdir: Path) -> None:
    """Killing or removing that cgroup would kill corral's own process: the launch fails, the sandbox
    never runs, and the cgroup stays (for reap_stale once this process is gone)."""
    host = _host_making(_StuckThread, _v1_root())
    marker = workdir / "ran"
    rp = resolve(Policy.workspace(str(workdir)).with_limits(pids=20))
    with open("/proc/thread-self/cgroup") as f:
        before = f.read()
    left: list[str] = []
    try:
        with pytest.raises(LaunchError, match="back out of the sandbox's cgroup"):
            launch(find_bwrap(), rp, ["/bin/sh", "-c", f"echo escaped > {marker}"], cgroups=host)
        time.sleep(0.5)
        assert not marker.exists(), "the command ran although the launch failed"
        left = [
            os.path.join(b, n)
            for b in host.bases.values()
            for n in os.listdir(b)
            if n.startswith(f"corral-{os.getpid()}-")
        ]
        assert left, "the cgroup holding this process was removed (its kill would have killed us)"
    finally:
        assert Cgroup("v1", {}).leave_as_thread(_StuckThread.back)
        with open("/proc/thread-self/cgroup") as f:
            assert f.read() == before
        for path in left:
            os.rmdir(path)


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


@pytest.mark.parametrize("memory", [None, 256 << 20], ids=["joined-by-thread", "attached-by-pid"])
def test_the_pids_limit_counts_the_same_whichever_way_the_sandbox_enters_its_cgroup(
    workdir: Path, memory: int | None
) -> None:
    """bubblewrap's own process is inside a cgroup the launching thread joined: the limit still
    means the sandbox's processes. Here: its init, python and N - 2 children."""
    import corral

    if os.geteuid() != 0:
        pytest.skip("as an ordinary user the pids limit is an rlimit, not a cgroup")
    script = (
        "import os, time\n"
        "kids = []\n"
        "for _ in range(10):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError:\n"
        "        break\n"
        "    if pid == 0:\n"
        "        time.sleep(30)\n"
        "        os._exit(0)\n"
        "    kids.append(pid)\n"
        "print(len(kids), sum(name.isdigit() for name in os.listdir('/proc')))\n"
    )
    policy = Policy.workspace(str(workdir)).with_limits(pids=6, memory=memory)
    r = corral.run(["python3", "-c", script], policy=policy, backend="namespace")
    assert r.stdout_text.split() == ["4", "6"], r  # 4 children; 6 processes in all


def test_a_default_sandbox_sees_no_host_cgroup_names(workdir: Path) -> None:
    """Started inside its cgroup, the sandbox's cgroup namespace is rooted there: /proc/self/cgroup
    names nothing of the host (before, it named corral's cgroup, with corral's host pid)."""
    import corral

    _v1_root()
    with open("/proc/thread-self/cgroup") as f:
        before = f.read()
    r = corral.run(["cat", "/proc/self/cgroup"], policy=Policy.workspace(str(workdir)), backend="namespace")
    assert r.ok and "corral" not in r.stdout_text and all(line.endswith(":/") for line in r.stdout_text.split()), r
    with open("/proc/thread-self/cgroup") as f:
        assert f.read() == before, "the caller's thread was left in another cgroup"
