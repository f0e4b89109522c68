"""The Python API as the README shows it."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest

import corral
from corral.errors import BackendUnavailable, ConfigError, SandboxLost, UnsupportedPolicy
from tests.conftest import needs_memory_cgroup

pytestmark = pytest.mark.usefixtures("namespace_ok")


def test_public_names() -> None:
    for name in corral.__all__:
        assert getattr(corral, name) is not None
    assert set(corral.__all__) >= {"run", "Sandbox", "Policy", "Result", "CorralError"}


def test_run_is_shaped_like_subprocess(policy: corral.Policy) -> None:
    r = corral.run(["sh", "-c", "cat; echo err >&2; exit 4"], policy=policy, input=b"in")
    assert (r.returncode, r.stdout, r.stderr, r.reason) == (4, b"in", b"err\n", "exited")
    with pytest.raises(corral.CommandFailed):
        corral.run(["false"], policy=policy, check=True)
    with pytest.raises(TypeError):
        corral.run("echo hi", policy=policy)  # type: ignore[arg-type]


def test_run_env_and_cwd(policy: corral.Policy, workdir: Path) -> None:
    (workdir / "sub").mkdir()
    r = corral.run(["sh", "-c", "pwd; echo $X"], policy=policy, env={"X": "y"}, cwd=str(workdir / "sub"))
    assert r.stdout_text == f"{workdir}/sub\ny\n"


def test_sandbox_keeps_state_between_commands(policy: corral.Policy, workdir: Path) -> None:
    (workdir / "a.c").write_text("int main(void) { return 3; }\n")
    with corral.Sandbox(policy, backend="auto") as sb:
        assert sb.backend == "namespace"
        cc = sb.exec(["sh", "-c", "cc -o /tmp/a.out a.c || gcc -o /tmp/a.out a.c"])
        if cc.returncode == 127:
            pytest.skip("no C compiler")
        assert cc.ok, cc.stderr_text
        assert sb.exec(["/tmp/a.out"]).returncode == 3
        sb.put_file("notes.txt", b"hello")
        assert (workdir / "notes.txt").read_bytes() == b"hello"
        assert sb.get_file("/tmp/a.out").startswith(b"\x7fELF")


@needs_memory_cgroup
def test_sandbox_limits_per_exec(policy: corral.Policy) -> None:
    with corral.Sandbox(policy.with_limits(memory=64 << 20)) as sb:
        hog = sb.exec(["python3", "-c", "b = bytearray(512 * 2**20)"])
        assert hog.reason == "memory" and "memory limit 64M" in hog.detail
        assert sb.exec(["true"]).ok  # the sandbox survives its command's death
        slow = sb.exec(["sleep", "30"], timeout=0.5)
        assert slow.reason == "timeout"


def test_streaming_output(policy: corral.Policy) -> None:
    chunks: list[tuple[str, bytes]] = []
    with corral.Sandbox(policy) as sb:
        sb.exec(["sh", "-c", "echo a; echo b >&2"], on_output=lambda s, c: chunks.append((s, c)))
    assert ("stdout", b"a\n") in chunks and ("stderr", b"b\n") in chunks


def test_ask_rules(policy: corral.Policy, tmp_path: Path) -> None:
    p = policy.replace(commands=corral.Commands(ask=["rm"]))
    asked: list[corral.AskRequest] = []

    def approve(req: corral.AskRequest) -> bool:
        asked.append(req)
        return req.argv[-1] == "ok.txt"

    with corral.Sandbox(p, approver=approve, audit=str(tmp_path / "a.jsonl")) as sb:
        assert sb.exec(["rm", "-f", "ok.txt"]).ok
        denied = sb.exec(["rm", "-f", "precious.txt"])
        assert denied.reason == "denied" and denied.returncode is None and "said no" in (denied.rule or "")
    assert len(asked) == 2
    # with no approver at all, asking means no
    assert corral.run(["rm", "x"], policy=p).reason == "denied"


def test_external_approver(policy: corral.Policy, tmp_path: Path) -> None:
    script = tmp_path / "approve.sh"
    script.write_text("#!/bin/sh\ngrep -q '\"yes-please\"'\n")
    script.chmod(0o755)
    p = policy.replace(commands=corral.Commands(ask=["echo"], approver=[str(script)], ask_timeout=5))
    assert corral.run(["echo", "yes-please"], policy=p).ok
    assert corral.run(["echo", "no"], policy=p).reason == "denied"
    hang = tmp_path / "hang.sh"
    hang.write_text("#!/bin/sh\nsleep 30\n")
    hang.chmod(0o755)
    slow = policy.replace(commands=corral.Commands(ask=["echo"], approver=[str(hang)], ask_timeout=0.5))
    assert corral.run(["echo", "x"], policy=slow).reason == "denied"


def test_an_approver_command_that_cannot_run_is_named(policy: corral.Policy, tmp_path: Path) -> None:
    p = policy.replace(commands=corral.Commands(ask=["echo"], approver=[str(tmp_path / "missing")]))
    r = corral.run(["echo", "hi"], policy=p)
    assert r.reason == "denied" and "said no" not in (r.rule or ""), r.rule
    assert "approver command could not be run" in (r.rule or "") and "No such file or directory" in (r.rule or "")
    hang = tmp_path / "hang.sh"
    hang.write_text("#!/bin/sh\nsleep 30\n")
    hang.chmod(0o755)
    slow = policy.replace(commands=corral.Commands(ask=["echo"], approver=[str(hang)], ask_timeout=0.5))
    r = corral.run(["echo", "x"], policy=slow)
    assert r.reason == "denied" and "did not answer within 0.5s" in (r.rule or ""), r.rule


def _children() -> set[int]:
    """This process's child processes (read from /proc: starting a process to look would add one)."""
    import glob

    pids: set[int] = set()
    for task in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
        with open(task) as f:
            pids.update(int(pid) for pid in f.read().split())
    return pids


def test_a_stopped_sandbox_stays_stopped(policy: corral.Policy, tmp_path: Path) -> None:
    """After `with`, the Sandbox refuses everything, rather than silently starting an unaudited new one."""
    audit = tmp_path / "a.jsonl"
    before = _children()
    sb = corral.Sandbox(policy, audit=str(audit))
    with sb:
        assert sb.exec(["true"]).ok
    for use in (
        lambda: sb.exec(["true"]),
        lambda: sb.put_file("/tmp/x", b""),
        lambda: sb.get_file("/tmp/x"),
        sb.start,
        sb.__enter__,
    ):
        with pytest.raises(SandboxLost, match=f"sandbox {sb.id} was stopped; make a new Sandbox"):
            use()
    sb.stop()  # still idempotent
    assert _children() <= before
    assert [json.loads(line)["event"] for line in audit.read_text().splitlines()] == [
        "sandbox.start", "exec", "sandbox.stop"]  # fmt: skip


def test_bad_backend_and_unsupported_policy(policy: corral.Policy) -> None:
    with pytest.raises(ConfigError, match="unknown backend"):
        corral.Sandbox(policy, backend="nope")
    with pytest.raises(UnsupportedPolicy, match="zones"):
        corral.Sandbox(policy, backend="process")
    assert isinstance(BackendUnavailable("x", "y"), corral.CorralError)
    with pytest.raises(ConfigError, match=r"^backend: 'process' is weaker than the required minimum 'landlock'$"):
        corral.Sandbox(policy, backend="process", min_backend="landlock")
    with pytest.raises(ConfigError, match="^min_backend: auto picks only among namespace, landlock, none as strong"):
        corral.Sandbox(policy, min_backend="microvm")


def test_weaker_backend_when_accepted(policy: corral.Policy) -> None:
    with corral.Sandbox(policy, backend="process", allow_weaker=True) as sb:
        assert sb.weaker and sb.exec(["true"]).ok


def test_a_full_sandbox_names_the_pids_limit_for_a_command_it_cannot_start(policy: corral.Policy) -> None:
    """The agent and two running commands fill a pids limit of 3: the next command is refused
    before it starts, with the limit named (not left to fail inside as `Cannot fork`)."""
    import threading

    with corral.Sandbox(policy.with_limits(pids=3), backend="namespace") as sb:
        running = [threading.Event(), threading.Event()]
        results: list[corral.Result] = []

        def hold(up: threading.Event) -> None:
            # `exec` keeps it one process: the shell becomes the sleep once it has said so.
            results.append(sb.exec(["/bin/sh", "-c", "echo up; exec sleep 2"], on_output=lambda *_: up.set()))

        holders = [threading.Thread(target=hold, args=(up,)) for up in running]
        for t in holders:
            t.start()
        assert all(up.wait(10) for up in running), results
        refused = sb.exec(["/bin/true"])
        for t in holders:
            t.join()
        assert [r.returncode for r in results] == [0, 0], results
        assert refused.reason == "pids" and refused.returncode == 126, refused
        assert "not started" in refused.detail and "pids limit (3)" in refused.detail, refused
        assert sb.exec(["/bin/true"]).ok


def test_an_exec_environment_with_a_bad_name_is_refused_before_it_runs(policy: corral.Policy) -> None:
    with corral.Sandbox(policy) as sb:
        for env in ({"1A": "x"}, {"A=B": "x"}, {"OK": "a\0b"}):
            with pytest.raises(corral.ConfigError, match="^env: "):
                sb.exec(["/bin/true"], env=env)
        assert sb.exec(["/bin/sh", "-c", 'echo "$GOOD"'], env={"GOOD": "yes"}).stdout == b"yes\n"


def test_an_argument_with_a_nul_byte_is_refused_and_the_sandbox_lives_on(policy: corral.Policy) -> None:
    # The kernel cannot pass a NUL inside an argument: it crashed the live sandbox's agent once.
    with pytest.raises(corral.ConfigError, match="^argv: argument 1 .* NUL byte"):
        corral.run(["echo", "a\0b"], policy=policy)
    with corral.Sandbox(policy) as sb:
        with pytest.raises(corral.ConfigError, match="^argv: argument 1 .* NUL byte"):
            sb.exec(["echo", "a\0b"])
        with pytest.raises(corral.ConfigError, match="^cwd: "):
            sb.exec(["true"], cwd="/tmp\0x")
        assert sb.exec(["echo", "still here"]).stdout == b"still here\n"


def test_input_takes_bytes_like_values_and_refuses_text(policy: corral.Policy) -> None:
    with corral.Sandbox(policy) as sb:
        for data in (bytearray(b"abcdef"), memoryview(b"abcdef"), b"abcdef"):
            assert sb.exec(["wc", "-c"], stdin=data).stdout.strip() == b"6"
        with pytest.raises(TypeError, match="stdin must be bytes"):
            sb.exec(["wc", "-c"], stdin="abc")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="data must be bytes"):
            sb.put_file("/tmp/x", "text")  # type: ignore[arg-type]
    assert corral.run(["wc", "-c"], policy=policy, input=bytearray(b"xy")).stdout.strip() == b"2"


@pytest.mark.parametrize("timeout", [0, -1, float("inf"), float("nan"), "5"])
def test_a_per_call_timeout_is_checked_like_the_policy_s(policy: corral.Policy, timeout: object) -> None:
    with pytest.raises(corral.ConfigError, match="^timeout: must be a number of seconds"):
        corral.run(["true"], policy=policy, timeout=timeout)  # type: ignore[arg-type]


def test_a_failing_output_callback_ends_the_command(policy: corral.Policy, workdir: Path) -> None:
    def fail(stream: str, chunk: bytes) -> None:
        raise RuntimeError("callback broke")

    script = f"echo x; sleep 2; echo after > {workdir}/after.txt"  # in the workspace: visible on both sides
    with corral.Sandbox(policy) as sb:
        with pytest.raises(RuntimeError, match="callback broke"):
            sb.exec(["sh", "-c", script], on_output=fail, timeout=10)
        time.sleep(2.5)
        assert not (workdir / "after.txt").exists()
        assert sb.exec(["echo", "ok"]).stdout == b"ok\n"
    with pytest.raises(RuntimeError, match="callback broke"):
        corral.run(["sh", "-c", script], policy=policy, on_output=fail)
    time.sleep(2.5)
    assert not (workdir / "after.txt").exists()


def test_allow_weaker_runs_without_the_limits_the_backend_cannot_enforce(policy: corral.Policy) -> None:
    from corral.backends import registry

    for name in ("namespace", "landlock", "process"):
        caps = registry.probe(registry.create(name))
        if caps.available and "limits.cpus" not in caps.enforces:
            break
    else:
        pytest.skip("every backend here enforces a cpus limit (an ordinary user's run checks this)")
    limited = policy.with_limits(cpus=0.5)
    with pytest.raises(corral.UnsupportedPolicy, match="limits.cpus"):
        corral.run(["true"], policy=limited, backend=name)
    # Accepted weaker: it runs, without the limit, and says so. It used to warn, then refuse anyway.
    r = corral.run(["echo", "ran"], policy=limited, backend=name, allow_weaker=True)
    assert r.ok and r.stdout == b"ran\n", r
    with corral.Sandbox(limited, backend=name, allow_weaker=True) as sb:
        assert any("cpus" in part for part in sb.weaker) and sb.exec(["true"]).ok


def test_files_are_written_whole_or_not_at_all_and_failures_are_audited(
    policy: corral.Policy, workdir: Path, tmp_path: Path
) -> None:
    log = tmp_path / "audit.jsonl"
    small = policy.replace(zones=(*policy.zones, corral.Zone.tmpfs("/scratch", size="64K"))).with_limits(file_size="1M")
    with corral.Sandbox(small, audit=str(log)) as sb:
        sb.put_file("/scratch/kept", b"old contents")
        # The tmpfs fills up part way: the old file stays whole, no partial or temporary file is left.
        with pytest.raises(corral.SandboxFileError) as full:
            sb.put_file("/scratch/kept", b"x" * (200 << 10))
        assert full.value.errno == errno.ENOSPC and isinstance(full.value, OSError)
        assert sb.get_file("/scratch/kept") == b"old contents"
        assert sb.exec(["ls", "-A", "/scratch"]).stdout == b"kept\n"
        # Over the file size limit: refused before anything is written, the limit named.
        (workdir / "big").write_bytes(b"before")
        with pytest.raises(corral.SandboxFileError, match=r"over the file size limit \(1M\)") as big:
            sb.put_file("big", b"x" * (2 << 20))
        assert big.value.errno == errno.EFBIG and (workdir / "big").read_bytes() == b"before"
        with pytest.raises(corral.PolicyDenied):
            sb.put_file("/usr/corral-x", b"x")
        with pytest.raises(corral.SandboxFileError, match="No such file"):
            sb.get_file("missing")
    events = [json.loads(line) for line in log.read_text().splitlines()]
    files = [(e["event"], e["path"], e.get("decision"), "error" in e) for e in events if e["event"].startswith("file.")]
    assert files == [
        ("file.put", "/scratch/kept", None, False),
        ("file.put", "/scratch/kept", None, True),
        ("file.get", "/scratch/kept", None, False),
        ("file.put", "big", None, True),
        ("file.put", "/usr/corral-x", "deny", True),
        ("file.get", "missing", None, True),
    ]


@pytest.mark.parametrize("backend", ["namespace", "landlock"])
def test_peak_memory_is_the_command_s_own_or_unknown(policy: corral.Policy, backend: str) -> None:
    # The agent's own resident size (~13 MB) is counted into every command it spawns: a command
    # below it has no known peak rather than the agent's. And the agent's own peak is not that of
    # the (here, large) host process it was started from.
    ballast = bytearray(200 << 20)
    ballast[::4096] = b"x" * len(ballast[::4096])
    with corral.Sandbox(policy, backend=backend) as sb:
        assert sb.exec(["true"]).peak_memory is None
        big = sb.exec(["python3", "-c", "b = bytearray(96 << 20); b[::4096] = b'x' * len(b[::4096])"])
        assert big.ok and big.peak_memory is not None and 96 << 20 <= big.peak_memory < 160 << 20, big


@pytest.mark.parametrize("backend", ["namespace", "landlock"])
def test_a_per_call_timeout_shortens_the_policy_s_time_limit_but_never_lifts_it(
    policy: corral.Policy, backend: str
) -> None:
    limited = policy.with_limits(timeout="1s")
    with corral.Sandbox(limited, backend=backend) as sb:
        for r in (corral.run(["sleep", "5"], policy=limited, backend=backend, timeout=30),
                  sb.exec(["sleep", "5"], timeout=30)):  # fmt: skip
            assert r.reason == "timeout" and r.detail == "timed out after 1s" and r.wall_time < 4, r
        shorter = sb.exec(["sleep", "5"], timeout=0.3)
        assert shorter.reason == "timeout" and shorter.wall_time < 1, shorter


def test_threads_that_first_use_a_sandbox_at_once_share_one(policy: corral.Policy, tmp_path: Path) -> None:
    # ...and it outlives the thread that started it (bubblewrap dies with the thread that spawned it).
    import threading

    log = tmp_path / "audit.jsonl"
    sb = corral.Sandbox(policy, audit=log)  # a path-like audit log
    seen: list[bytes] = []

    def work(i: int) -> None:
        sb.put_file(f"/tmp/{i}", b"x")
        seen.append(sb.exec(["ls", "/tmp"]).stdout)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert set(sb.exec(["ls", "/tmp"]).stdout.split()) >= {str(i).encode() for i in range(8)}
    finally:
        sb.stop()
    starts = [line for line in log.read_text().splitlines() if '"sandbox.start"' in line]
    assert len(starts) == 1, starts


def test_a_sandbox_never_stopped_is_stopped_when_collected(policy: corral.Policy) -> None:
    import gc
    import glob

    mine = f"/tmp/corral-{os.getpid()}-private-*"
    before = set(glob.glob(mine))
    sb = corral.Sandbox(policy, backend="landlock")
    sb.put_file("/tmp/left", b"behind")
    assert set(glob.glob(mine)) > before
    del sb
    gc.collect()
    assert set(glob.glob(mine)) == before


def test_an_interrupted_exec_does_not_leave_its_command_running(policy: corral.Policy) -> None:
    import signal

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    with corral.Sandbox(policy) as sb:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.5)
            with pytest.raises(KeyboardInterrupt):
                sb.exec(["sh", "-c", "sleep 30"])
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        time.sleep(0.3)
        left = sb.exec(["sh", "-c", "cat /proc/[0-9]*/cmdline"])
        assert b"sleep\x0030" not in left.stdout, left


def test_bad_file_arguments_are_refused_and_the_sandbox_lives_on(policy: corral.Policy) -> None:
    with corral.Sandbox(policy) as sb:
        for call in (lambda: sb.put_file("/tmp/f", b"x", mode=None),  # type: ignore[arg-type]
                     lambda: sb.put_file("/tmp/f", b"x", mode=2**40),
                     lambda: sb.put_file("/tmp/f", b"x", mode="644"),  # type: ignore[arg-type]
                     lambda: sb.put_file("/tmp/f", b"x", mode=-1),
                     lambda: sb.get_file("/tmp/f", max_bytes="1M")):  # type: ignore[arg-type]  # fmt: skip
            with pytest.raises(ConfigError, match="^(mode|max_bytes): must be a whole number"):
                call()
        live = sb._live
        assert live is not None
        with pytest.raises(corral.SandboxFileError, match="Invalid argument"):  # below the API's checks
            live.put_file("/tmp/f", b"x", mode=2**40)
        # A mode is the one asked for, on a new file or one that was there (read-only too).
        sb.put_file("/tmp/run.sh", b"#!/bin/sh\necho one\n")
        sb.put_file("/tmp/run.sh", b"#!/bin/sh\necho two\n", mode=0o755)
        assert sb.exec(["/tmp/run.sh"]).stdout == b"two\n"
        sb.put_file("/tmp/ro", b"v1", mode=0o444)
        sb.put_file("/tmp/ro", b"v2", mode=0o444)
        assert sb.exec(["stat", "-c", "%a", "/tmp/run.sh", "/tmp/ro"]).stdout == b"755\n444\n"
        assert sb.get_file("/tmp/ro") == b"v2"
        # A FIFO a command planted blocks neither (the agent serves one request at a time).
        assert sb.exec(["mkfifo", "/tmp/fifo"]).ok
        with pytest.raises(corral.SandboxFileError, match="not a regular file"):
            sb.get_file("/tmp/fifo")
        sb.put_file("/tmp/fifo", b"a file now")
        assert sb.get_file("/tmp/fifo") == b"a file now"


def test_exec_arguments_of_the_wrong_type_are_refused_by_name(policy: corral.Policy, workdir: Path) -> None:
    (workdir / "sub").mkdir()
    with corral.Sandbox(policy) as sb:
        with pytest.raises(TypeError, match=r"argv\[0\] must be a str, not bytes"):
            sb.exec([b"echo", "hi"])  # type: ignore[list-item]
        with pytest.raises(TypeError, match=r"argv\[1\] must be a str, not NoneType"):
            sb.exec(["echo", None])  # type: ignore[list-item]
        with pytest.raises(TypeError, match="cwd must be a str"):
            sb.exec(["pwd"], cwd=5)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="env must be a mapping"):
            sb.exec(["true"], env=[("A", "b")])  # type: ignore[arg-type]
        assert sb.exec(["pwd"], cwd="sub").stdout_text == f"{workdir}/sub\n"  # below the working directory
        assert sb.exec(["echo", workdir / "sub"]).stdout_text == f"{workdir}/sub\n"  # type: ignore[list-item]
        read, write = os.pipe()
        os.write(write, b"from a descriptor")
        os.close(write)
        try:
            assert sb.exec(["cat"], stdin=read).stdout == b"from a descriptor"
        finally:
            os.close(read)


def test_an_exec_during_which_the_sandbox_dies_is_audited(policy: corral.Policy, tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    started = time.monotonic()
    with corral.Sandbox(policy, backend="landlock", audit=str(log)) as sb, pytest.raises(SandboxLost):
        sb.exec(["sh", "-c", "kill -9 $PPID; sleep 20"])
    # What the dead agent started (no pid namespace here) does not hold the caller until it ends.
    assert time.monotonic() - started < 10
    lost = [json.loads(line) for line in log.read_text().splitlines() if '"lost"' in line]
    assert len(lost) == 1 and lost[0]["event"] == "exec" and lost[0]["argv"][0] == "sh", lost


@pytest.mark.parametrize("backend", ["namespace", "landlock"])
def test_a_sandbox_started_by_a_thread_outlives_the_thread(policy: corral.Policy, backend: str) -> None:
    import threading

    sb = corral.Sandbox(policy, backend=backend)
    try:
        starter = threading.Thread(target=lambda: sb.exec(["true"]))  # the thread's exec starts it
        starter.start()
        starter.join()
        time.sleep(0.2)
        assert sb.exec(["echo", "alive"]).stdout == b"alive\n"
    finally:
        sb.stop()


@needs_memory_cgroup
def test_filling_a_tmpfs_under_a_memory_limit_fails_the_write_not_the_sandbox(policy: corral.Policy) -> None:
    with corral.Sandbox(policy.with_limits(memory="64M")) as sb:
        r = sb.exec(["sh", "-c", "head -c 100M /dev/zero > /tmp/fill"])
        assert r.returncode != 0 and b"No space left on device" in r.stderr, r
        assert sb.exec(["sh", "-c", "rm /tmp/fill; echo alive"]).stdout == b"alive\n"
