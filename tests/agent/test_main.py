"""The in-sandbox agent of a live namespace sandbox: what a command leaves behind dies with it.

Both ways the agent learns that a command ended are covered: a pidfd per command (the default
where the kernel and Python have them) and SIGCHLD (`CORRAL_AGENT_REAP=signal`, the fallback).
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

import corral

pytestmark = pytest.mark.usefixtures("namespace_ok")

# Every process the sandbox's pid namespace holds, but the agent (pid 1) and the listing shell.
LIST_PROCESSES = r"""
for d in /proc/[0-9]*; do
  pid=${d#/proc/}
  [ "$pid" = 1 ] || [ "$pid" = $$ ] && continue
  read -r stat < "$d/stat" 2>/dev/null || continue
  echo "$stat"
done
"""


@pytest.fixture(params=["pidfd", "signal"])
def sandbox(request: pytest.FixtureRequest, workdir: Path) -> corral.Sandbox:
    policy = corral.Policy.workspace(str(workdir))
    if request.param == "signal":
        policy = policy.replace(env=corral.Env(values={"CORRAL_AGENT_REAP": "signal"}))
    with corral.Sandbox(policy, backend="namespace") as sb:
        yield sb


def _others(sb: corral.Sandbox) -> list[str]:
    r = sb.exec(["/bin/sh", "-c", LIST_PROCESSES])
    assert r.ok, r
    return r.stdout_text.split("\n")[:-1]


def test_background_children_die_and_are_reaped(sandbox: corral.Sandbox) -> None:
    # A plain background child, one in its own session, and one reparented (double fork).
    r = sandbox.exec(["/bin/sh", "-c", "sleep 100 & setsid sleep 100 & (sleep 100 &) ; echo started"])
    assert r.ok and r.stdout == b"started\n", r
    assert _others(sandbox) == [], "a command's leftovers outlived it (or stayed as zombies)"


def test_many_commands_leave_no_zombies(sandbox: corral.Sandbox) -> None:
    for i in range(30):
        r = sandbox.exec(["/bin/sh", "-c", f"exit {i % 3}"])
        assert r.returncode == i % 3, r
    assert _others(sandbox) == []


def test_concurrent_commands_each_get_their_own_status(sandbox: corral.Sandbox) -> None:
    import threading

    results: dict[int, corral.Result] = {}

    def run(i: int) -> None:
        results[i] = sandbox.exec(["/bin/sh", "-c", f"sleep 0.{i % 4}; echo {i}; exit {i}"])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, r in results.items():
        assert r.returncode == i and r.stdout == f"{i}\n".encode(), r
    assert _others(sandbox) == []


def test_the_agent_survives_signals_and_commands_get_default_dispositions(sandbox: corral.Sandbox) -> None:
    # The agent catches these (it is the pid namespace's init); a command must start with the defaults.
    signal_the_agent = "kill -TERM 1; kill -INT 1; kill -HUP 1; kill -USR1 1"
    r = sandbox.exec(["/bin/sh", "-c", f"{signal_the_agent}; grep SigIgn /proc/self/status"])
    assert r.ok, r
    ignored = int(r.stdout.split()[1], 16)
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGPIPE, signal.SIGTERM, signal.SIGXFSZ,
                signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD):  # fmt: skip
        assert not ignored & (1 << (sig - 1)), f"{sig.name} is ignored in a command"
    # SIGPIPE ends a writer whose reader is gone, as outside.
    r = sandbox.exec(["/bin/sh", "-c", "(yes; echo $? >&2) | head -c 1 >/dev/null"])
    assert r.ok and r.stderr.strip() == str(128 + signal.SIGPIPE).encode(), r
    assert sandbox.exec(["/bin/true"]).ok


def test_a_command_killing_everything_it_can_leaves_the_sandbox_usable(sandbox: corral.Sandbox) -> None:
    # `kill -9 -1` signals every process the command may signal; the agent, the pid namespace's
    # init, is the one the kernel spares, so the sandbox keeps working.
    sandbox.exec(["/bin/sh", "-c", "sleep 100 & kill -9 -1; sleep 1"])
    r = sandbox.exec(["/bin/sh", "-c", "echo still here"])
    assert r.ok and r.stdout == b"still here\n", r
    assert _others(sandbox) == []


@pytest.mark.parametrize("start", ["spawn", "fork"])
def test_programs_are_found_on_the_commands_path(workdir: Path, start: str) -> None:
    """The agent finds a command as a shell would, whether it spawns it (posix_spawnp searching
    PATH) or forks to set per-command rlimits first (its own search): same programs, same errors."""
    first, second = workdir / "first", workdir / "second"
    for directory in (first, second):
        directory.mkdir()
    (first / "tool").write_text("#!/bin/sh\necho not executable\n")  # no x bit: skipped
    (first / "both").mkdir()  # a directory: skipped
    (second / "tool").write_text("#!/bin/sh\necho second\n")
    (second / "tool").chmod(0o755)
    (second / "both").write_text("#!/bin/sh\necho file\n")
    (second / "both").chmod(0o755)
    (second / "only-unreadable").write_text("x")
    (workdir / "local").write_text("#!/bin/sh\necho local\n")
    (workdir / "local").chmod(0o755)
    policy = corral.Policy.workspace(str(workdir))
    if start == "fork":
        policy = policy.with_limits(open_files=256)
    path = f"{first}:{second}:/usr/bin:/bin"
    with corral.Sandbox(policy, backend="namespace") as sb:
        run = lambda *argv: sb.exec(list(argv), env={"PATH": path})  # noqa: E731
        assert run("tool").stdout == b"second\n"
        assert run("both").stdout == b"file\n"
        assert run("./local").stdout == b"local\n"
        assert run(str(second / "tool")).stdout == b"second\n"
        missing = run("no-such-program")
        assert (missing.returncode, missing.detail) == (127, "no-such-program: command not found"), missing
        refused = run("only-unreadable")
        assert (refused.returncode, refused.detail) == (126, "only-unreadable: Permission denied"), refused
        # The search follows each command's PATH, not the one before it.
        assert sb.exec(["tool"], env={"PATH": f"{first}:/usr/bin"}).returncode == 126
        assert sb.exec(["sh", "-c", "echo $PATH"], env={"PATH": "/bin:/usr/bin"}).stdout == b"/bin:/usr/bin\n"
        assert run("tool").stdout == b"second\n"


def test_a_request_no_program_can_receive_is_refused_by_the_agent_itself(sandbox: corral.Sandbox) -> None:
    # Below corral's own checks (another host client, or a bug): the agent answers, and lives on.
    live = sandbox.start()._live
    assert live is not None
    r = live.exec(["echo", "a\0b"])
    assert r.returncode == 126 and "Invalid argument" in r.detail, r
    r = live.exec(["true"], cwd="/tmp\0x")
    assert r.returncode == 126 and "working directory" in r.detail, r
    with pytest.raises(corral.SandboxFileError, match="Invalid argument"):
        live.put_file("/tmp/a\0b", b"x")
    with pytest.raises(corral.SandboxFileError, match="Invalid argument"):
        live.get_file("/tmp/a\0b")
    with pytest.raises(corral.ConfigError, match="^path: not a file path"):
        sandbox.put_file("a\0b", b"x")
    assert sandbox.exec(["echo", "alive"]).stdout == b"alive\n"
