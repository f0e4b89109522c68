"""A conformance suite for corral backends: anyone implementing the contract can run it.

    from corral.testing import check_backend
    check_backend(lambda: MyBackend())          # raises AssertionError naming the failed check

or, in pytest, parametrize over `CHECKS` and call `run_check(check, factory, workdir)`. Each check
starts real sandboxes with the backend and looks at what happens inside and on the host. Checks
that need a property the backend does not claim (in `probe().enforces`) are skipped.
"""

from __future__ import annotations

import os
import tempfile

from corral.backends.base import Backend, Result
from corral.policy.model import Limits, Policy, Zone
from corral.policy.resolve import ResolvedPolicy, resolve

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    Factory = Callable[[], Backend]
    Check = Callable[[Backend, str], None]


class Skip(Exception):
    """This check does not apply to this backend."""


def _policy(workdir: str, **limits: object) -> ResolvedPolicy:
    policy = Policy(zones=(Zone.rw(workdir), Zone.tmpfs("/tmp")), limits=Limits(**limits))  # type: ignore[arg-type]
    return resolve(policy, host_env={}, host_cwd=workdir)


def _needs(backend: Backend, *features: str) -> None:
    enforces = backend.probe().enforces
    missing = [f for f in features if f not in enforces]
    if missing:
        raise Skip(f"{backend.name} does not claim {', '.join(missing)}")


def _run(backend: Backend, rp: ResolvedPolicy, script: str, **kwargs: object) -> Result:
    return backend.run(rp, ["/bin/sh", "-c", script], sandbox_id="conformance", **kwargs)  # type: ignore[arg-type]


def check_exit_and_output(backend: Backend, workdir: str) -> None:
    r = _run(backend, _policy(workdir), "echo out; echo err >&2; exit 7")
    assert r.returncode == 7 and r.reason == "exited", r
    assert r.stdout == b"out\n" and r.stderr == b"err\n", r


def check_stdin(backend: Backend, workdir: str) -> None:
    r = backend.run(_policy(workdir), ["/bin/cat"], sandbox_id="conformance", stdin=b"x" * 100_000)
    assert r.ok and r.stdout == b"x" * 100_000, r


def check_not_found(backend: Backend, workdir: str) -> None:
    r = backend.run(_policy(workdir), ["no-such-command-corral"], sandbox_id="conformance")
    assert r.returncode == 127, r


def check_workspace_round_trip(backend: Backend, workdir: str) -> None:
    r = _run(backend, _policy(workdir), "echo inside > made-inside.txt && cat made-inside.txt")
    assert r.ok, r
    with open(os.path.join(workdir, "made-inside.txt")) as f:
        assert f.read() == "inside\n"


def check_clean_environment(backend: Backend, workdir: str) -> None:
    os.environ["CORRAL_CONFORMANCE_SECRET"] = "s3cret"
    try:
        rp = resolve(Policy(zones=(Zone.rw(workdir), Zone.tmpfs("/tmp"))), host_cwd=workdir)
        r = _run(backend, rp, "env")
    finally:
        del os.environ["CORRAL_CONFORMANCE_SECRET"]
    assert r.ok and b"s3cret" not in r.stdout, r


def check_no_shadow(backend: Backend, workdir: str) -> None:
    _needs(backend, "fs.isolation")
    r = _run(backend, _policy(workdir), "cat /etc/shadow")
    assert r.returncode != 0 and b"root:" not in r.stdout, r


def check_read_only_outside(backend: Backend, workdir: str) -> None:
    _needs(backend, "fs.isolation")
    r = _run(backend, _policy(workdir), "echo x > /usr/corral-conformance; echo x > /etc/corral-conformance")
    assert r.returncode != 0, r
    assert not os.path.exists("/usr/corral-conformance") and not os.path.exists("/etc/corral-conformance")


def check_timeout_kills_everything(backend: Backend, workdir: str) -> None:
    marker = os.path.join(workdir, "still-alive")
    rp = _policy(workdir)
    r = _run(backend, rp, f"(sleep 2; touch {marker}) & sleep 100", timeout=1.0)
    assert r.reason == "timeout", r
    assert r.wall_time < 10, r
    import time

    time.sleep(2.5)
    assert not os.path.exists(marker), "a background child outlived the timeout"


def check_output_limit(backend: Backend, workdir: str) -> None:
    r = _run(backend, _policy(workdir, output=100_000), "yes corral")
    assert r.reason == "output", r
    assert len(r.stdout) <= 100_000, len(r.stdout)


def check_memory_limit(backend: Backend, workdir: str) -> None:
    _needs(backend, "limits.memory")
    r = backend.run(_policy(workdir, memory=64 << 20), ["python3", "-c", "b = bytearray(512 * 2**20)"],
                    sandbox_id="conformance", timeout=60)  # fmt: skip
    assert r.returncode != 0, r
    assert r.reason in ("memory", "exited"), r


def check_live_sandbox_shares_state(backend: Backend, workdir: str) -> None:
    live = backend.start(_policy(workdir), sandbox_id="conformance")
    try:
        # ${TMPDIR:-/tmp}: backends without a mount namespace offer /tmp as a private TMPDIR
        assert live.exec(["/bin/sh", "-c", "echo 42 > ${TMPDIR:-/tmp}/state"]).ok
        r = live.exec(["/bin/sh", "-c", "cat ${TMPDIR:-/tmp}/state"])
        assert r.ok and r.stdout == b"42\n", r
        live.put_file("/tmp/put.txt", b"put")
        assert live.get_file("/tmp/put.txt") == b"put"
        assert live.exec(["/bin/sh", "-c", "exit 3"]).returncode == 3
    finally:
        live.stop()
    live.stop()  # idempotent


def check_files_in_and_out(backend: Backend, workdir: str) -> None:
    """put_file and get_file: a round trip, replacing a file whole, and the error each failure raises:
    `SandboxFileError` (an OSError with the errno) for what is missing or too large, `PolicyDenied`
    for what the policy refuses."""
    import errno

    from corral.errors import PolicyDenied, SandboxFileError

    def fails(call: Callable[[], object], kind: type[Exception], code: int | None = None) -> None:
        try:
            call()
        except kind as exc:
            assert code is None or getattr(exc, "errno", None) == code, (exc, code)
            assert "in the sandbox" in str(exc) or "outside every zone" in str(exc), exc
        else:
            raise AssertionError(f"{kind.__name__} not raised")

    live = backend.start(_policy(workdir), sandbox_id="conformance")
    try:
        live.put_file("made.txt", b"first version, longer")
        live.put_file("made.txt", b"second")
        assert live.get_file("made.txt") == b"second"
        with open(os.path.join(workdir, "made.txt"), "rb") as f:
            assert f.read() == b"second"
        assert sorted(os.listdir(workdir)) == ["made.txt"], os.listdir(workdir)  # no temporary file left
        fails(lambda: live.get_file("no-such-file"), SandboxFileError, errno.ENOENT)
        fails(lambda: live.get_file(workdir), SandboxFileError, errno.EISDIR)
        fails(lambda: live.get_file("made.txt", max_bytes=3), SandboxFileError, errno.EFBIG)
        fails(lambda: live.put_file("no-such-dir/x", b"x"), SandboxFileError, errno.ENOENT)
        os.mkdir(os.path.join(workdir, "a-dir"))
        fails(lambda: live.put_file("a-dir", b"x"), SandboxFileError)
        os.symlink("made.txt", os.path.join(workdir, "link"))
        fails(lambda: live.put_file("link", b"x"), PolicyDenied)
        assert os.path.islink(os.path.join(workdir, "link")) and live.get_file("made.txt") == b"second"
        if "fs.isolation" in backend.probe().enforces:
            fails(lambda: live.put_file("/usr/corral-conformance", b"x"), PolicyDenied)
            assert not os.path.exists("/usr/corral-conformance")
    finally:
        live.stop()


def check_open_files_limit_binds_each_command(backend: Backend, workdir: str) -> None:
    """The open-files limit is each command's (hard and soft), and concurrent commands under a small
    one do not starve the sandbox's own machinery of descriptors."""
    _needs(backend, "limits.open_files")
    import threading

    live = backend.start(_policy(workdir, open_files=16), sandbox_id="conformance")
    try:
        r = live.exec(["/bin/sh", "-c", "ulimit -n; ulimit -Hn; (ulimit -n 17) 2>/dev/null && echo raised; exit 0"])
        assert r.ok and r.stdout.split() == [b"16", b"16"], r
        results: dict[int, Result] = {}

        def run(i: int) -> None:
            results[i] = live.exec(["/bin/sh", "-c", f"sleep 0.3; echo {i}"])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in range(5):
            assert results[i].ok and results[i].stdout == f"{i}\n".encode(), results[i]
        assert live.exec(["/bin/true"]).ok
    finally:
        live.stop()


CHECKS: list[Check] = [
    check_exit_and_output,
    check_stdin,
    check_not_found,
    check_workspace_round_trip,
    check_clean_environment,
    check_no_shadow,
    check_read_only_outside,
    check_timeout_kills_everything,
    check_output_limit,
    check_memory_limit,
    check_live_sandbox_shares_state,
    check_files_in_and_out,
    check_open_files_limit_binds_each_command,
]


def run_check(check: Check, factory: Factory, workdir: str) -> None:
    check(factory(), workdir)


def check_backend(factory: Factory) -> list[str]:
    """Run every check; return the names of skipped checks. Raises AssertionError on the first failure."""
    skipped = []
    for check in CHECKS:
        with tempfile.TemporaryDirectory(prefix="corral-conformance-") as workdir:
            try:
                run_check(check, factory, os.path.realpath(workdir))
            except Skip:
                skipped.append(check.__name__)
    return skipped
