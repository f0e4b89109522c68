from __future__ import annotations

import os
import subprocess
import time

import pytest

from corral.kernel.cgroups import CgroupHost
from corral.policy.model import Limits

HOST = CgroupHost.detect()
pytestmark = pytest.mark.skipif(HOST.mode == "none", reason=f"no usable cgroups: {HOST.reason}")


def test_limits_attach_kill_destroy() -> None:
    cg = HOST.create(
        Limits(memory=64 << 20, pids=50, cpus=0.5) if HOST.controllers >= {"memory", "pids", "cpu"} else Limits(pids=50)
    )
    try:
        child = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"])
        cg.attach(child.pid)
        time.sleep(0.3)  # let it fork inside
        pids = cg.pids()
        assert child.pid in pids
        cg.kill()
        assert child.wait(timeout=10) != 0
        deadline = time.time() + 5
        while cg.pids() and time.time() < deadline:
            time.sleep(0.05)
        assert cg.pids() == []
    finally:
        cg.destroy()
    assert not any(os.path.exists(d) for d in cg.dirs.values())


def test_stale_cgroups_of_dead_owners_are_reaped() -> None:
    base = next(iter(HOST.bases.values()))
    stale = os.path.join(base, "corral-999999999-1-1")
    os.mkdir(stale)
    HOST.reap_stale()
    assert not os.path.exists(stale)


def test_oom_and_pids_events() -> None:
    if not HOST.controllers >= {"memory", "pids"}:
        pytest.skip("needs memory and pids controllers")
    cg = HOST.create(Limits(memory=32 << 20, pids=8))
    try:
        child = subprocess.Popen(["python3", "-c", "import time; time.sleep(0.3); b = bytearray(200 * 2**20)"])
        cg.attach(child.pid)
        assert child.wait(timeout=30) == -9
        assert cg.oom_kills() >= 1
        assert cg.oom_kills() == 0  # counted from the previous call
        child = subprocess.Popen(
            ["sh", "-c", "sleep 0.3; for i in 1 2 3 4 5 6 7 8 9 10; do sleep 1 & done; wait"], stderr=subprocess.DEVNULL
        )
        cg.attach(child.pid)
        child.wait(timeout=30)
        assert cg.pids_hits() >= 1
    finally:
        cg.destroy()


def test_v2_code_path_on_the_unified_hierarchy() -> None:
    """This host is v1 with a bare unified (v2) hierarchy: enough to drive the v2 paths (no controllers)."""
    from corral.kernel.cgroupfs import cgroup_mounts, own_cgroups

    unified = cgroup_mounts().get("unified")
    if unified is None or os.geteuid() != 0:
        pytest.skip("needs root and a mounted cgroup2 hierarchy")
    v2 = CgroupHost._detect_v2(unified, own_cgroups().get("", "/"))
    assert v2.mode == "v2", v2.reason
    cg = v2.create(Limits())
    try:
        child = subprocess.Popen(["sh", "-c", "sleep 0.3; sleep 60 & sleep 60 & wait"])
        cg.attach(child.pid)  # before it forks: its children are born inside
        time.sleep(0.8)
        assert len(cg.pids()) >= 3
        cg.kill()  # through cgroup.kill
        assert child.wait(timeout=10) == -9
    finally:
        cg.destroy()
    assert not os.path.exists(cg.dirs["v2"])


def test_a_sandbox_cgroup_uses_only_the_hierarchies_its_limits_need() -> None:
    if HOST.mode != "v1" or not {"pids", "cpu"} <= set(HOST.bases):
        pytest.skip("needs cgroup v1 with the pids and cpu hierarchies")
    cg = HOST.create(Limits(pids=50))
    try:
        assert "pids" in cg.dirs and "cpu" not in cg.dirs
        if "memory" in HOST.bases:
            assert "memory" in cg.dirs  # it measures peak memory even without a memory limit
        if "unified" in HOST.bases:
            assert "freezer" not in cg.dirs  # cgroup.kill does the freezer's job
    finally:
        cg.destroy()
    cg = HOST.create(Limits(pids=50, cpus=0.5))
    try:
        assert {"pids", "cpu"} <= set(cg.dirs)
    finally:
        cg.destroy()


def test_attach_prefetch_leaves_this_process_where_it_was() -> None:
    from corral.kernel import cgroupfs as cgroups

    with open("/proc/self/cgroup") as f:
        before = f.read()
    cgroups.start_attach_prefetch()
    if os.geteuid() == 0:
        assert cgroups._prefetch_in_flight, "as root the prefetch should have started"
        cgroups.start_attach_prefetch()  # one at a time: this call starts nothing
    deadline = time.monotonic() + 5
    while cgroups._prefetch_in_flight and time.monotonic() < deadline:
        time.sleep(0.01)  # the background write ends after one RCU grace period
    assert not cgroups._prefetch_in_flight
    with open("/proc/self/cgroup") as f:
        assert f.read() == before


def test_cgroup_mounts_agree_with_a_parse_of_every_line() -> None:
    """The fast parse (only lines naming a cgroup filesystem) agrees with reading every line."""
    from corral.kernel.cgroupfs import V1_CONTROLLERS, cgroup_mounts

    expected: dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, _source, *opts = right.split()
            mount = left.split()[4]
            if fstype == "cgroup2":
                expected.setdefault("unified", mount)
            elif fstype == "cgroup":
                for option in (opts[-1] if opts else "").split(","):
                    if option in V1_CONTROLLERS:
                        expected.setdefault(option, mount)
    assert cgroup_mounts() == expected


def test_doctor_names_the_attach_wait_and_its_fix() -> None:
    from corral.kernel.cgroups import attach_wait_note

    try:
        with open("/sys/kernel/rcu_expedited") as f:
            expedited = f.read().strip() != "0"
    except OSError:
        pytest.skip("no /sys/kernel/rcu_expedited")
    with open("/proc/self/mountinfo") as f:
        favordynmods = any(" - cgroup2 " in line and "favordynmods" in line for line in f)
    note = attach_wait_note(HOST)
    if expedited or favordynmods:
        assert note is None
    else:
        assert note is not None and "rcu_expedited" in note and "favordynmods" in note


def test_attach_prefetch_never_moves_the_callers_other_threads() -> None:
    """A library must not undo where its caller put its threads (v1 lets each thread have its own cgroup)."""
    import threading

    from corral.kernel import cgroupfs as cgroups

    pids_base = cgroups.cgroup_mounts().get("pids")
    if os.geteuid() != 0 or pids_base is None:
        pytest.skip("needs root and the cgroup v1 pids hierarchy")
    elsewhere = os.path.join(pids_base, f"corral-test-thread-{os.getpid()}")
    os.mkdir(elsewhere)
    ready, done = threading.Event(), threading.Event()
    tid: list[int] = []

    def worker() -> None:
        tid.append(threading.get_native_id())
        ready.set()
        done.wait(10)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        ready.wait(5)
        with open(os.path.join(elsewhere, "tasks"), "w") as f:
            f.write(str(tid[0]))
        cgroups.start_attach_prefetch()
        deadline = time.monotonic() + 5
        while cgroups._prefetch_in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        with open(f"/proc/self/task/{tid[0]}/cgroup") as f:
            placed = [line.split(":", 2)[2].strip() for line in f if line.split(":")[1] == "pids"]
        assert placed == [f"/corral-test-thread-{os.getpid()}"], placed
    finally:
        done.set()
        thread.join()
        os.rmdir(elsewhere)


def _thread_cgroups() -> str:
    with open("/proc/thread-self/cgroup") as f:
        return f.read()


@pytest.fixture
def v1_root() -> None:
    if HOST.mode != "v1" or os.geteuid() != 0:
        pytest.skip("needs cgroup v1 and root")


@pytest.mark.usefixtures("v1_root")
def test_a_thread_joins_spawns_inside_and_leaves() -> None:
    """(That joining skips the attach's RCU wait is measured by bench/startup.py, not here.)"""
    limits = Limits(pids=7)
    assert HOST.joins_by_thread(limits)
    assert not HOST.joins_by_thread(Limits(pids=7, memory=64 << 20)) and not HOST.joins_by_thread(Limits(cpus=1))
    cg = HOST.create(limits, by_thread=True)
    before = _thread_cgroups()
    try:
        assert set(cg.dirs) == {"memory", "pids"} & set(HOST.bases)  # no cgroup2 (whole processes), no freezer
        back = cg.enter_as_thread(HOST.mounts)
        try:
            child = subprocess.Popen(["sleep", "60"])  # spawned by this thread: starts inside
        finally:
            assert cg.leave_as_thread(back)
        assert _thread_cgroups() == before
        assert cg.pids() == [child.pid]
        cg.set_limits(limits)
        with open(os.path.join(cg.dirs["pids"], "pids.max")) as f:
            assert f.read().strip() == "8"  # the limit, plus the process corral spawned inside
        cg.kill()
        assert child.wait(timeout=10) != 0
    finally:
        cg.destroy()
    assert not any(os.path.exists(d) for d in cg.dirs.values())


@pytest.mark.usefixtures("v1_root")
def test_a_cgroup_holding_its_callers_thread_is_never_killed_or_removed() -> None:
    cg = HOST.create(Limits(pids=7), by_thread=True)
    back = cg.enter_as_thread(HOST.mounts)
    try:
        nowhere = [("/nonexistent/tasks", "/nonexistent/root/tasks")] * len(back)
        assert not cg.leave_as_thread(nowhere)
        assert cg.holds_caller
        cg.kill()  # would kill this test's own process
        cg.destroy()
        assert all(os.path.isdir(d) for d in cg.dirs.values())
    finally:
        cg.holds_caller = False
        assert cg.leave_as_thread(back)
        cg.destroy()
    assert not any(os.path.exists(d) for d in cg.dirs.values())


@pytest.mark.usefixtures("v1_root")
def test_no_attach_prefetch_where_sandboxes_are_joined_by_a_thread() -> None:
    """On v1 the default policy's sandbox needs no attach; a prefetch in flight would hold the cgroup
    mutex that making its cgroup needs, for a whole RCU grace period."""
    from corral.kernel import cgroupfs

    cgroupfs.start_attach_prefetch(unless_v1=True)
    assert not cgroupfs._prefetch_in_flight
