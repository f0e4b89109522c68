"""corral.agent.processes, on real processes: what the launcher and both agents do to a sandbox from outside."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time

import pytest

from corral.agent.processes import bwrap_child_pid, children_of, kill_unreleased, set_rlimits, wait_until_blocked


def test_the_sandbox_pid_is_read_once_bubblewraps_first_object_is_complete() -> None:
    assert bwrap_child_pid(b"") is None
    assert bwrap_child_pid(b'{ "child-pid": 41') is None  # a partial read: wait for more
    assert bwrap_child_pid(b'{ "child-pid": 4177, "cgroup-namespace": 4026532182 }\n') == 4177
    assert bwrap_child_pid(b'{ "child-pid": 12 }{ "exit-code": 0 }') == 12
    with pytest.raises(ValueError, match="unexpected bubblewrap status"):
        bwrap_child_pid(b'{ "something": "else" }')


def test_children_are_listed_and_an_unknown_pid_says_so() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert child.pid in (children_of(os.getpid()) or [])
    finally:
        child.kill()
        child.wait()
    assert children_of(2**22 + 1) is None  # above pid_max: no such process


def test_rlimits_are_lowered_soft_and_hard_and_never_raised() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        set_rlimits(child.pid, {"RLIMIT_NOFILE": 64})
        assert resource.prlimit(child.pid, resource.RLIMIT_NOFILE) == (64, 64)
        set_rlimits(child.pid, {"RLIMIT_NOFILE": 4096})  # asking for more changes nothing
        assert resource.prlimit(child.pid, resource.RLIMIT_NOFILE) == (64, 64)
    finally:
        child.kill()
        child.wait()


def test_a_process_blocked_reading_its_block_fd_is_seen_and_another_fd_is_not() -> None:
    block_r, block_w = os.pipe()
    os.set_inheritable(block_r, True)
    child = subprocess.Popen(
        [sys.executable, "-c", f"import os; os.read({block_r}, 1)"], pass_fds=(block_r,), close_fds=True
    )
    try:
        assert wait_until_blocked(child.pid, block_r, timeout=10)
        assert not wait_until_blocked(child.pid, block_r + 100, timeout=0.05)
    finally:
        os.write(block_w, b"1")
        child.wait()
        os.close(block_r)
        os.close(block_w)
    assert not wait_until_blocked(child.pid, block_r, timeout=0.05)  # gone: /proc cannot say


def test_an_unreleased_sandbox_and_all_its_parent_started_are_killed() -> None:
    # A stand-in for bubblewrap: a parent with two children; the "sandbox" pid is one of them.
    parent = subprocess.Popen(["sh", "-c", "sleep 100 & sleep 100 & wait"])
    deadline = time.monotonic() + 10
    while len(children_of(parent.pid) or []) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    victims = children_of(parent.pid) or []
    assert len(victims) == 2
    kill_unreleased(parent.pid, victims[0])
    assert parent.wait(timeout=10) == 0  # its `wait` returned: both children are gone
    assert not any(os.path.exists(f"/proc/{pid}") for pid in victims)  # killed, and reaped by their parent
