"""A memory or pids limit that ends (or fails) a command is named, whether a cgroup or an rlimit holds it.

As root here the limits are cgroups, which count what they refused: the Result's reason says so.
As an ordinary user (tests/test_unprivileged.py runs this file again) they are rlimits, which make
an allocation or a fork fail inside the command and count nothing: the Result's note names them.
"""

from __future__ import annotations

import pytest

import corral
from corral.backends.base import Result

HOG = ["python3", "-c", "b = bytearray(512 * 2**20)"]
FORKS = ["/bin/sh", "-c", "for i in $(seq 60); do sleep 3 & done; wait"]


@pytest.fixture
def policy(tmp_path: object) -> corral.Policy:
    return corral.Policy.workspace(str(tmp_path))


def _check_memory(r: Result) -> None:
    assert r.returncode != 0, r
    if r.reason == "memory":  # a cgroup: the kill is counted
        assert "memory limit 64M" in r.detail, r
    else:  # an rlimit: Python's MemoryError, and the note naming the limit
        assert r.reason == "exited" and b"MemoryError" in r.stderr, r
        assert "memory limit 64M" in r.note and "RLIMIT_DATA" in r.note, r


def _check_pids(r: Result) -> None:
    assert r.returncode != 0, r
    if r.reason == "pids":
        assert "pids limit (20)" in r.detail, r
    else:
        assert r.reason == "exited" and b"fork" in r.stderr, r
        assert "pids limit (20)" in r.note and "RLIMIT_NPROC" in r.note, r


def test_a_memory_hog_is_named_in_a_one_shot_and_a_live_sandbox(policy: corral.Policy) -> None:
    limited = policy.with_limits(memory=64 << 20)
    _check_memory(corral.run(HOG, policy=limited, backend="namespace"))
    with corral.Sandbox(limited, backend="namespace") as sb:
        _check_memory(sb.exec(HOG))
        ok = sb.exec(["/bin/sh", "-c", "exit 3"])
        assert ok.returncode == 3 and ok.reason == "exited", ok
        # Any failure may be the rlimit's doing: the note stays, but only when it is an rlimit.
        assert ("RLIMIT_DATA" in ok.note) == (ok.note != ""), ok


def test_a_fork_loop_is_named_in_a_one_shot_and_a_live_sandbox(policy: corral.Policy) -> None:
    limited = policy.with_limits(pids=20)
    _check_pids(corral.run(FORKS, policy=limited, backend="namespace"))
    with corral.Sandbox(limited, backend="namespace") as sb:
        _check_pids(sb.exec(FORKS))
        # The pids limit (every profile has one) is not named for a failure that says nothing of a fork.
        plain = sb.exec(["/bin/sh", "-c", "echo no >&2; exit 1"])
        assert plain.returncode == 1 and plain.note == "", plain


def test_a_command_that_succeeds_carries_no_note(policy: corral.Policy) -> None:
    r = corral.run(["/bin/true"], policy=policy.with_limits(memory=64 << 20, pids=20), backend="namespace")
    assert r.ok and r.note == "" and r.as_json()["note"] == "", r


def test_the_cli_names_the_limit_either_way(tmp_path: object) -> None:
    from tests.conftest import corral_cli

    r = corral_cli("run", "--memory", "64M", "--", *HOG, cwd=str(tmp_path))
    if r.returncode == 137:  # a cgroup killed it
        assert b"corral: killed: memory limit 64M" in r.stderr, r.stderr
    else:
        assert r.returncode == 1 and b"MemoryError" in r.stderr, r.stderr
        assert b"corral: note: the memory limit 64M is a per-process RLIMIT_DATA" in r.stderr, r.stderr
    quiet = corral_cli("run", "--memory", "64M", "--", "sh", "-c", "exit 0", cwd=str(tmp_path))
    assert quiet.returncode == 0 and b"note" not in quiet.stderr, quiet.stderr


def test_the_open_files_limit_is_named_when_a_command_runs_out(policy: corral.Policy) -> None:
    limited = policy.with_limits(open_files=3)  # fds 0-2: the loader cannot open libc
    with corral.Sandbox(limited, backend="namespace") as sb:
        for r in (corral.run(["sh", "-c", "true"], policy=limited, backend="namespace"), sb.exec(["sh", "-c", "true"])):
            assert r.returncode == 127 and b"Error 24" in r.stderr, r
            assert r.note == "the open files limit (3) is per process: opening more fails inside the command", r


@pytest.mark.parametrize("backend", ["namespace", "landlock"])
def test_a_pids_limit_of_one_leaves_a_one_shot_no_room_and_says_so(policy: corral.Policy, backend: str) -> None:
    r = corral.run(["true"], policy=policy.with_limits(pids=1), backend=backend)
    assert (r.returncode, r.reason, r.detail) == (126, "pids", "true: not started, the pids limit (1) was reached"), r
    if backend == "namespace":  # landlock's RLIMIT_NPROC, as an ordinary user, counts the user's host processes
        assert corral.run(["true"], policy=policy.with_limits(pids=2), backend=backend).ok


def test_the_cli_names_a_command_that_could_not_start_once(tmp_path: object) -> None:
    from tests.conftest import corral_cli

    r = corral_cli("run", "--pids", "1", "--", "true", cwd=str(tmp_path))
    assert r.returncode == 126 and r.stderr == b"corral: true: not started, the pids limit (1) was reached\n", r


def test_a_small_file_size_limit_binds_the_command_not_the_sandbox_s_set_up(policy: corral.Policy) -> None:
    # bubblewrap writes the sandbox's /etc files (ld.so.cache is ~100K) before the limit is set.
    r = corral.run(["sh", "-c", "head -c 20000 /dev/zero > /tmp/x"], policy=policy.with_limits(file_size="10K"),
                   backend="namespace")  # fmt: skip
    assert r.reason == "file_size" and "file size limit 10K" in r.detail, r
