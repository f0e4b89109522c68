"""The container backends (docker, gvisor) through the same suites as every other backend:
the public conformance checks (corral.testing) and the escape battery (corral.selftest.battery).

docker runs against a private dockerd the tests start (see conftest.py); gvisor runs runsc
directly. A backend that cannot work here is skipped with its reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import corral
from corral.backends import registry
from corral.backends.base import Backend, Capabilities
from corral.selftest.battery import BATTERY, Attack, AttackContext, Breach, NotApplicable
from corral.testing import CHECKS, Skip, run_check

from .conftest import container_backend

BACKENDS = ["docker", "gvisor"]


def _ready(name: str, request: pytest.FixtureRequest) -> tuple[Backend, Capabilities]:
    if name == "docker":
        request.getfixturevalue("docker_host")
    return container_backend(name)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
def test_conformance(name: str, check, workdir: Path, request: pytest.FixtureRequest) -> None:  # type: ignore[no-untyped-def]
    _ready(name, request)
    try:
        run_check(check, lambda: registry.create(name), str(workdir))
    except Skip as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("attack", BATTERY, ids=[a.name for a in BATTERY])
def test_attack_is_blocked(
    name: str, attack: Attack, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> None:
    backend, caps = _ready(name, request)
    missing = attack.requires - caps.enforces
    if missing:
        pytest.skip(f"{name} does not claim {', '.join(sorted(missing))}")
    with AttackContext(registry.create(name), base=str(tmp_path_factory.getbasetemp())) as ctx:
        try:
            attack.fn(ctx)
        except NotApplicable as exc:
            pytest.skip(str(exc))
        except Breach as exc:
            pytest.fail(f"{attack.title}: NOT BLOCKED on {name}: {exc}")
        ctx.host_unchanged()
    assert backend.name == name and os.path.isdir(str(tmp_path_factory.getbasetemp()))


@pytest.mark.parametrize("name", BACKENDS)
def test_cli_output_into_a_file_keeps_what_was_there(name: str, workdir: Path, request: pytest.FixtureRequest) -> None:
    """`(echo before; corral run -- echo inside) > log`: the sandbox writes after what the host wrote
    (gVisor would write an imported file from offset 0: corral relays through pipes)."""
    import subprocess
    import sys

    from ..conftest import ROOT

    _ready(name, request)
    log = workdir / "log.txt"
    script = (
        f"echo before; {sys.executable} -m corral run --backend {name} -- sh -c 'echo inside; echo err >&2'; echo after"
    )
    with open(log, "wb") as out:
        subprocess.run(
            ["sh", "-c", script],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            check=True,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
            timeout=120,
        )
    assert log.read_text().splitlines() == ["before", "inside", "err", "after"]


@pytest.mark.parametrize("name", BACKENDS)
def test_cli_stdin_from_a_file_continues_where_the_host_stopped(
    name: str, workdir: Path, request: pytest.FixtureRequest
) -> None:
    import subprocess
    import sys

    from ..conftest import ROOT

    _ready(name, request)
    (workdir / "in.txt").write_text("one\ntwo\nthree\n")
    script = f"read first; echo host:$first; {sys.executable} -m corral run --backend {name} -- cat"
    with open(workdir / "in.txt", "rb") as stdin:
        done = subprocess.run(
            ["sh", "-c", script],
            stdin=stdin,
            capture_output=True,
            cwd=workdir,
            check=True,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
            timeout=120,
        )
    assert done.stdout.decode().splitlines() == ["host:one", "two", "three"]


ALLOW_PROBE = """
import os, socket, urllib.request
print(os.environ["HTTP_PROXY"])
print(urllib.request.urlopen("http://127.0.0.1:{p}/allowed").read().decode().splitlines()[0])
try:
    urllib.request.urlopen("http://127.0.0.1:{q}/denied")
except urllib.error.HTTPError as e:
    print("denied", e.code, e.headers["X-Corral-Rule"])
try:
    socket.create_connection(("127.0.0.1", {p}), timeout=3)
    print("DIRECT CONNECTED")
except OSError as e:
    print("direct refused")
"""


@pytest.mark.parametrize("name", BACKENDS)
def test_network_allow_through_the_mounted_proxy_socket(
    name: str, workdir: Path, request: pytest.FixtureRequest
) -> None:
    """Network mode 'allow': only the listed address, through the host's proxy; no direct route."""
    from corral.policy.resolve import resolve
    from tests.net.conftest import Origin

    _ready(name, request)
    origin = Origin()
    try:
        p = origin.port
        policy = corral.Policy.workspace(str(workdir)).replace(
            network=corral.Network(mode="allow", allow=[f"127.0.0.1:{p}"])
        )
        events: list[tuple[str, dict[str, object]]] = []
        r = registry.create(name).run(
            resolve(policy, host_cwd=str(workdir)),
            ["python3", "-c", ALLOW_PROBE.format(p=p, q=p + 1)],
            sandbox_id="allow",
            events=lambda e, f: events.append((e, f)),
            timeout=60,
        )
        assert r.ok, r
        assert r.stdout_text.splitlines() == [
            "http://127.0.0.1:3128",
            f"GET /allowed host=127.0.0.1:{p} body=",
            "denied 403 default-deny",
            "direct refused",
        ]
        assert origin.paths() == ["/allowed"]
        assert [(f["action"], f["port"]) for e, f in events if e == "net.decision"] == [("allow", p), ("deny", p + 1)]
    finally:
        origin.close()
