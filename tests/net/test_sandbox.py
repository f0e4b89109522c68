"""End to end: network mode 'allow' through real sandboxes (namespace, landlock), the CLI and the audit log.

The host side of every connection is a server on 127.0.0.1 that the policy names explicitly
(`127.0.0.1:PORT`), or a `*.test` name the backend's proxy resolver maps to it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import corral
from corral.audit import read_events
from corral.backends import registry
from corral.backends.landlock import LandlockBackend
from corral.backends.namespace.backend import NamespaceBackend
from corral.policy.resolve import resolve
from tests.conftest import corral_cli
from tests.net.conftest import Origin

needs_curl = pytest.mark.skipif(
    shutil.which("curl", path="/usr/bin:/bin") is None, reason="curl is not installed (apt-get install curl)"
)


def names(host: str, port: int) -> list[str]:
    if host.endswith(".test"):
        return ["127.0.0.1"]
    raise OSError(f"test resolver: {host} is not a test name")


def policy(workdir: Path, *allow: str) -> corral.Policy:
    return corral.Policy.workspace(str(workdir)).replace(network=corral.Network(mode="allow", allow=allow))


class Events(list[tuple[str, dict[str, object]]]):
    def __call__(self, event: str, fields: dict[str, object]) -> None:
        self.append((event, fields))

    def decisions(self) -> list[tuple[object, object, object]]:
        return [(f["action"], f["rule"], f.get("host")) for e, f in self if e == "net.decision"]


@pytest.fixture
def origin() -> Iterator[Origin]:
    server = Origin()
    yield server
    server.close()


@pytest.fixture
def landlock_ok() -> None:
    caps = registry.probe(registry.create("landlock"))
    if not caps.available:
        pytest.skip(f"landlock backend unavailable here: {caps.reason}")
    if "net.allow" not in caps.enforces:
        pytest.skip("this kernel's Landlock has no network rules (ABI < 4)")


PROBE = """
import os, socket, urllib.request
print(os.environ.get("HTTP_PROXY"), repr(os.environ.get("NO_PROXY")))
print(urllib.request.urlopen("http://allowed.test:{p}/py").read().decode())
try:
    urllib.request.urlopen("http://denied.test:{p}/py")
except urllib.error.HTTPError as e:
    print("denied", e.code, e.headers["X-Corral-Rule"])
try:
    socket.create_connection(("127.0.0.1", {p}), timeout=3)
    print("DIRECT CONNECTED")
except OSError as e:
    print("direct refused", e.errno)
"""


@needs_curl
@pytest.mark.usefixtures("namespace_ok")
def test_namespace_one_shot_curl_and_python(workdir: Path, origin: Origin) -> None:
    p = origin.port
    rp = resolve(policy(workdir, f"allowed.test:{p}", f"127.0.0.1:{p}"))
    backend = NamespaceBackend(resolver=names)
    events = Events()
    script = (f"curl -sS http://allowed.test:{p}/curl; echo; "
              f"curl -sS -o /dev/null -w '%{{http_code}}\\n' http://denied.test:{p}/; "
              f"curl -sS -x socks5h://127.0.0.1:3128 http://allowed.test:{p}/socks; echo; "
              f"curl -sS --noproxy '*' --max-time 3 http://127.0.0.1:{p}/direct; echo direct=$?; "
              f"python3 -c '{PROBE.format(p=p)}'")  # fmt: skip
    r = backend.run(rp, ["sh", "-c", script], sandbox_id="e2e", events=events, timeout=60)
    lines = r.stdout_text.splitlines()
    assert r.ok, r
    assert lines[0] == f"GET /curl host=allowed.test:{p} body="
    assert lines[1] == "403"
    assert lines[2].startswith("GET /socks")
    assert lines[3] == "direct=7"  # the sandbox's own loopback: the host's server is not there
    assert lines[4] == "http://127.0.0.1:3128 ''"
    assert lines[5].startswith("GET /py")
    assert lines[6] == "denied 403 default-deny"
    assert lines[7].startswith("direct refused")
    assert origin.paths() == ["/curl", "/socks", "/py"]
    assert events.decisions() == [
        ("allow", f"network.allow=allowed.test:{p}", "allowed.test"), ("deny", "default-deny", "denied.test"),
        ("allow", f"network.allow=allowed.test:{p}", "allowed.test"), ("allow", f"network.allow=allowed.test:{p}",
        "allowed.test"), ("deny", "default-deny", "denied.test"),
    ]  # fmt: skip


@needs_curl
@pytest.mark.usefixtures("namespace_ok")
def test_live_sandbox_audit_and_proxy_lifetime(workdir: Path, origin: Origin, tmp_path: Path) -> None:
    p = origin.port
    audit = tmp_path / "audit.jsonl"
    with corral.Sandbox(policy(workdir, f"127.0.0.1:{p}"), backend="namespace", audit=str(audit)) as sb:
        r = sb.exec(["curl", "-sS", f"http://127.0.0.1:{p}/live"])
        assert r.ok and r.stdout_text.startswith("GET /live"), r
        r = sb.exec(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{p + 1}/"])
        assert r.stdout_text == "403"
        r = sb.exec(["ls", "-l", "/.corral/proxy.sock"])
        assert r.ok and r.stdout_text.startswith("s"), r  # the one host socket in the sandbox
        sockets = {f for f in os.listdir(tempfile.gettempdir()) if f"-{os.getpid()}-private-net-" in f}
        assert sockets
    events = list(read_events(str(audit)))
    decisions = [(e["action"], e["rule"], e["port"]) for e in events if e["event"] == "net.decision"]
    assert decisions == [("allow", f"network.allow=127.0.0.1:{p}", p), ("deny", "default-deny", p + 1)]
    assert all(e["sandbox"] == events[0]["sandbox"] and e["backend"] == "namespace" for e in events)
    start = next(e for e in events if e["event"] == "sandbox.start")
    assert start["network"] == "allow"
    # The proxy and its socket directory went with the sandbox.
    assert not sockets & {f for f in os.listdir(tempfile.gettempdir()) if f"-{os.getpid()}-private-net-" in f}


@pytest.mark.usefixtures("namespace_ok")
def test_network_none_has_no_proxy_and_no_socket(workdir: Path) -> None:
    r = corral.run(["sh", "-c", "env | grep -ci '_proxy='; ls /.corral/proxy.sock"],
                   policy=corral.Policy.workspace(str(workdir)))  # fmt: skip
    assert r.stdout_text.strip() == "0" and "No such file" in r.stderr_text


@needs_curl
@pytest.mark.usefixtures("namespace_ok")
def test_cli_allow_deny_and_audit(workdir: Path, origin: Origin, tmp_path: Path) -> None:
    p = origin.port
    audit = tmp_path / "cli.jsonl"
    done = corral_cli("run", "--net", f"allow:127.0.0.1:{p}", "--audit", str(audit), "--",
                      "curl", "-sS", "-i", f"http://127.0.0.1:{p}/cli", f"http://127.0.0.1:{p + 1}/no",
                      cwd=workdir)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert b"GET /cli" in done.stdout and b"X-Corral-Rule: default-deny" in done.stdout
    events = list(read_events(str(audit)))
    assert [(e["event"], e.get("action")) for e in events] == [
        ("sandbox.start", None), ("net.decision", "allow"), ("net.decision", "deny"), ("exec", None),
        ("sandbox.stop", None)]  # fmt: skip
    assert events[3]["network"] == "allow" and len({e["sandbox"] for e in events}) == 1


@pytest.mark.usefixtures("namespace_ok")
def test_host_mode_is_recorded_as_such(workdir: Path, tmp_path: Path) -> None:
    audit = tmp_path / "host.jsonl"
    done = corral_cli("run", "--net", "host", "--audit", str(audit), "--", "true", cwd=workdir)
    assert done.returncode == 0, done.stderr
    (event,) = [e for e in read_events(str(audit)) if e["event"] == "exec"]
    assert event["network"] == "host"


class EchoServer:
    """An asyncio echo server on 127.0.0.1 in its own thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.port = 0

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()

        async def start() -> None:
            self.server = await asyncio.start_server(echo, "127.0.0.1", 0, backlog=4096)
            self.port = self.server.sockets[0].getsockname()[1]
            ready.set()

        self.thread = threading.Thread(target=lambda: (self.loop.run_until_complete(start()), self.loop.run_forever()),
                                       daemon=True)  # fmt: skip
        self.thread.start()
        ready.wait(10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


CONCURRENT = """
import asyncio, sys
N, PORT = int(sys.argv[1]), int(sys.argv[2])
async def one(i, opened):
    r, w = await asyncio.open_connection("127.0.0.1", 3128)
    opened.append(w)
    w.write(b"CONNECT echo.test:%d HTTP/1.1\\r\\nHost: echo.test:%d\\r\\n\\r\\n" % (PORT, PORT))
    head = await r.readuntil(b"\\r\\n\\r\\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    w.write(b"ping %d\\n" % i)
    return await r.readline()
async def main():
    opened = []
    answers = await asyncio.gather(*(one(i, opened) for i in range(N)), return_exceptions=True)
    good = sum(1 for i, a in enumerate(answers) if a == b"ping %d\\n" % i)
    print(good, len(opened), [repr(a) for a in answers if not isinstance(a, bytes)][:3])
asyncio.run(main())
"""


@pytest.mark.usefixtures("namespace_ok")
def test_a_thousand_connections_from_inside_a_sandbox(workdir: Path) -> None:
    echo = EchoServer()
    events = Events()
    try:
        rp = resolve(policy(workdir, f"echo.test:{echo.port}", f"127.0.0.1:{echo.port}"))
        backend = NamespaceBackend(resolver=names)
        live = backend.start(rp, sandbox_id="many", events=events)
        try:
            r = live.exec(["python3", "-c", CONCURRENT, "1000", str(echo.port)], timeout=120)
        finally:
            live.stop()
    finally:
        echo.close()
    assert r.ok, r
    good, opened = r.stdout_text.split()[:2]
    assert (good, opened) == ("1000", "1000"), r.stdout_text
    assert len(events.decisions()) == 1000 and {d[0] for d in events.decisions()} == {"allow"}


@pytest.mark.usefixtures("landlock_ok")
def test_landlock_allows_only_the_proxy_port(workdir: Path, origin: Origin) -> None:
    p = origin.port
    bystander = socket.create_server(("127.0.0.1", 0))
    bystander.settimeout(0.5)
    q = bystander.getsockname()[1]
    script = f"""
import os, socket, urllib.request
print(urllib.request.urlopen("http://allowed.test:{p}/landlock").read().decode())
for what, attempt in [
    ("direct", lambda: socket.create_connection(("127.0.0.1", {q}), timeout=3)),
    ("udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)),
    ("unix", lambda: socket.socket(socket.AF_UNIX)),
    ("fastopen", lambda: socket.socket().sendto(b"x", 0x20000000, ("127.0.0.1", {q}))),
    ("listen", lambda: socket.socket().listen(1)),
    ("bind", lambda: socket.socket().bind(("127.0.0.1", 0))),
]:
    try:
        attempt()
        print(what, "ALLOWED")
    except OSError as e:
        print(what, "refused")
"""
    backend = LandlockBackend(resolver=names)
    events = Events()
    rp = resolve(policy(workdir, f"allowed.test:{p}", f"127.0.0.1:{p}"))
    try:
        r = backend.run(rp, ["python3", "-c", script], sandbox_id="ll", events=events, timeout=60)
        with pytest.raises(TimeoutError):
            bystander.accept()
    finally:
        bystander.close()
    assert r.ok, r
    lines = r.stdout_text.splitlines()
    assert lines[0].startswith("GET /landlock")
    assert lines[1:] == [f"{w} refused" for w in ("direct", "udp", "unix", "fastopen", "listen", "bind")]
    assert events.decisions() == [("allow", f"network.allow=allowed.test:{p}", "allowed.test")]


@pytest.mark.usefixtures("landlock_ok")
def test_landlock_proxy_port_closes_with_the_sandbox(workdir: Path) -> None:
    rp = resolve(policy(workdir, "pypi.org"))
    live = LandlockBackend().start(rp, sandbox_id="ll")
    try:
        port = int(live.rp.env_dict["HTTP_PROXY"].rsplit(":", 1)[1])  # type: ignore[attr-defined]
        socket.create_connection(("127.0.0.1", port), timeout=3).close()
    finally:
        live.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=3)


def test_process_backend_refuses_allow_unless_weaker_is_accepted(workdir: Path) -> None:
    backend = registry.create("process")
    caps = backend.probe()
    assert "net.allow" not in caps.enforces
    assert any("in-process guard" in note and "corral.net.check_url" in note for note in caps.notes)
    with pytest.raises(corral.UnsupportedPolicy, match="network mode 'allow'"):
        corral.run(["true"], policy=policy(workdir, "pypi.org"), backend="process")
    done = corral_cli("doctor", "--json")
    process = next(b for b in json.loads(done.stdout)["backends"] if b["name"] == "process")
    assert any("in-process guard" in note for note in process["notes"])
