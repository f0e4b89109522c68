"""The microvm backend: pure builders against exact vectors, then real VMs (emulated here: slow, so few).

The VM tests boot a real guest with QEMU (KVM where it boots one, else TCG) and skip with the
reason when QEMU, busybox-static or a guest kernel cannot be had.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from corral.agent import stream
from corral.backends import registry
from corral.backends.microvm.layout import GUEST_BWRAP, ZONE_SLOTS, guest_command, plan
from corral.backends.microvm.qemu import MACHINE, SANDBOX, Share, VmSpec, kernel_cmdline, qemu_argv
from corral.errors import PolicyDenied, UnsupportedPolicy
from corral.policy.model import Limits, Network, Policy, Zone
from corral.policy.resolve import resolve
from corral.testing import CHECKS, Skip, run_check


# ---------------------------------------------------------------------------- pure
def test_qemu_argv_exact_vector() -> None:
    spec = VmSpec(
        kernel="/k/vmlinux", initramfs="/k/init.cpio", cmdline="console=ttyS0 quiet", memory_mib=512, cpus=1,
        accel="tcg", agent_fd=7, qmp_fd=8, console="/w/console.log", incoming_fd=9,
        shares=(Share(tag="sys0", path="/usr", readonly=True), Share(tag="z0", path="/data,x", readonly=False)),
    )  # fmt: skip
    assert qemu_argv("/usr/bin/qemu-system-x86_64", spec) == (
        "/usr/bin/qemu-system-x86_64",
        "-M", MACHINE,
        "-accel", "tcg",
        "-cpu", "max",
        "-m", "512M",
        "-smp", "1",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-sandbox", SANDBOX,
        "-kernel", "/k/vmlinux",
        "-initrd", "/k/init.cpio",
        "-append", "console=ttyS0 quiet",
        "-serial", "file:/w/console.log",
        "-chardev", "socket,id=agent,fd=7",
        "-device", "virtio-serial-device",
        "-device", "virtserialport,chardev=agent,name=corral.agent",
        "-chardev", "null,id=net",
        "-device", "virtserialport,chardev=net,name=corral.net",
        "-chardev", "socket,id=qmp,fd=8",
        "-mon", "chardev=qmp,mode=control",
        "-fsdev", "local,id=fs0,path=/usr,security_model=none,readonly=on",
        "-device", "virtio-9p-device,fsdev=fs0,mount_tag=sys0",
        "-fsdev", "local,id=fs1,path=/data,,x,security_model=none",
        "-device", "virtio-9p-device,fsdev=fs1,mount_tag=z0",
        "-incoming", "fd:9",
    )  # fmt: skip
    # No network device, ever. With network 'allow' only what is behind the `corral.net` port changes, not
    # the VM's devices: a state saved by either restores for both.
    allow = spec.replace(net_fd=10)
    none = qemu_argv("q", spec)
    at = none.index("null,id=net")
    assert qemu_argv("q", allow) == (*none[:at], "socket,id=net,fd=10", *none[at + 1 :])
    for s in (spec, allow):
        assert not any(a in ("-netdev", "-nic", "-net") for a in qemu_argv("q", s))
    assert allow.state_key() == spec.state_key() and "corral.net" in spec.state_key()


def test_kernel_cmdline_gives_the_tsc_under_emulation() -> None:
    assert kernel_cmdline("kvm", 2100000) == "console=ttyS0 quiet panic=-1 reboot=t pci=off rdinit=/init"
    assert "tsc_early_khz=2100000" in kernel_cmdline("tcg", 2100000).split()


def test_layout_has_fixed_slots_and_guest_paths(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    policy = Policy(zones=(Zone.rw(str(work)), Zone.ro(str(data), "/data"), Zone.tmpfs("/tmp", size=1 << 20)))
    rp = resolve(policy, host_env={}, host_cwd=str(work))
    layout = plan(rp, empty_dir="/empty")
    sys_shares = [s for s in layout.shares if s.tag.startswith("sys")]
    zone_shares = [s for s in layout.shares if s.tag.startswith("z")]
    assert all(s.readonly for s in sys_shares) and {s.path for s in sys_shares} <= {
        "/usr",
        "/bin",
        "/lib",
        "/etc/ssl",
        "/etc/alternatives",
        "/sbin",
        "/lib64",
        "/lib32",
        "/libx32",
    }
    assert len(zone_shares) == ZONE_SLOTS
    # Zones in mount order (parents first): /data, then the workspace.
    assert zone_shares[0] == Share(tag="z0", path=str(data), readonly=True)
    assert zone_shares[1] == Share(tag="z1", path=str(work), readonly=False)
    assert all(s.path == "/empty" and s.readonly for s in zone_shares[2:])
    assert [m.tag for m in layout.mounts] == [s.tag for s in sys_shares] + ["z0", "z1"]  # unused slots stay unmounted
    assert layout.tmpfs == (  # /tmp, then the sandbox user's home (resolve adds it)
        {"target": "/run/corral/t0", "size": 1 << 20, "mode": "1777"},
        {"target": "/run/corral/t1", "size": 256 << 20, "mode": "0755"},
    )
    argv = guest_command(layout, ["make", "test"], cwd=str(work))
    assert argv[0] == GUEST_BWRAP and argv[-3:] == ("--", "make", "test")
    text = " ".join(argv)
    assert f"--bind /run/corral/z1 {work}" in text and "--ro-bind /run/corral/z0 /data" in text
    assert "--bind /run/corral/t0 /tmp" in text and f"--chdir {work}" in text
    assert "--seccomp 3" in text and "--json-status-fd 4" in text and "--block-fd 5" in text
    assert "--unshare-net" in text and "--uid 1000" in text
    assert str(tmp_path) not in text.replace(str(work), "").replace(str(data), "")  # host paths only as mount points


def test_layout_beyond_the_slots_still_plans(tmp_path: Path) -> None:
    zones = []
    for i in range(ZONE_SLOTS + 2):
        (tmp_path / str(i)).mkdir()
        zones.append(Zone.ro(str(tmp_path / str(i)), f"/z{i}"))
    rp = resolve(Policy(zones=zones), host_env={}, host_cwd=str(tmp_path))
    assert sum(1 for s in plan(rp, empty_dir="/e").shares if s.tag.startswith("z")) == ZONE_SLOTS + 2


def test_stream_frames_survive_any_chunking() -> None:
    data = stream.message(1, {"op": "exec", "argv": ["x"]}) + b"".join(
        stream.data_frames(stream.STDOUT, 1, b"y" * 100_000)
    ) + stream.frame(stream.STDIN, 2)  # fmt: skip
    reader = stream.Reader()
    frames = []
    for i in range(0, len(data), 777):
        reader.feed(data[i : i + 777])
        frames += reader.frames()
    assert frames[0] == (stream.MSG, 1, b'{"op":"exec","argv":["x"]}')
    assert b"".join(p for k, _, p in frames if k == stream.STDOUT) == b"y" * 100_000
    assert frames[-1] == (stream.STDIN, 2, b"")
    assert all(len(p) <= stream.CHUNK for _, _, p in frames)
    with pytest.raises(stream.StreamError):
        bad = stream.Reader()
        bad.feed(b"\x09" + b"\0" * 8)
        bad.frames()


# ---------------------------------------------------------------------------- real VMs
@pytest.fixture(scope="module")
def microvm():  # type: ignore[no-untyped-def]
    backend = registry.create("microvm")
    caps = registry.probe(backend)
    if not caps.available:
        pytest.skip(f"microvm unavailable here: {caps.reason}")
    return backend


def _rp(workdir: Path, *zones: Zone, **limits: object):  # type: ignore[no-untyped-def]
    policy = Policy(zones=(Zone.rw(str(workdir)), Zone.tmpfs("/tmp"), *zones), limits=Limits(**limits))  # type: ignore[arg-type]
    return resolve(policy, host_env={}, host_cwd=str(workdir))


@pytest.mark.slow
def test_boot_exec_and_exit_code(microvm, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    from corral.backends.microvm.backend import MicrovmBackend

    cold = MicrovmBackend(restore=False)
    started = time.monotonic()
    live = cold.start(_rp(workdir), sandbox_id="boot")
    try:
        r = live.exec(["/bin/sh", "-c", "echo out; echo err >&2; exit 7"])
        first_exec = time.monotonic() - started
        assert (r.returncode, r.reason, r.stdout, r.stderr) == (7, "exited", b"out\n", b"err\n"), r
        assert not live.restored  # type: ignore[attr-defined]
        r = live.exec(["cat"], stdin=b"x" * 200_000)
        assert r.ok and r.stdout == b"x" * 200_000, r
        assert live.exec(["no-such-command-corral"]).returncode == 127
    finally:
        live.stop()
    print(f"boot to first exec: {first_exec:.2f}s ({cold.accel()})")


@pytest.mark.slow
def test_restore_gives_a_fresh_share_layout(microvm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "name").write_text(d.name)
    os.chmod(tmp_path, 0o755)
    microvm.run(_rp(a), ["true"], sandbox_id="warm")  # makes sure a saved state exists
    started = time.monotonic()
    live = microvm.start(_rp(a), sandbox_id="a")
    try:
        ra = live.exec(["/bin/sh", "-c", "cat name; echo made > /tmp/t; cat /tmp/t"])
        restore_exec = time.monotonic() - started
        assert live.restored, "the second sandbox should restore the saved state"
        assert ra.ok and ra.stdout == b"amade\n", ra
    finally:
        live.stop()
    live = microvm.start(_rp(b), sandbox_id="b")
    try:
        rb = live.exec(["/bin/sh", "-c", "cat name; cat /tmp/t 2>&1; ls " + str(a) + " 2>&1"])
        assert rb.stdout.startswith(b"b"), rb
        assert b"made" not in rb.stdout and b"No such file" in rb.stdout, rb  # fresh /tmp, a's zone absent
    finally:
        live.stop()
    print(f"restore to first exec: {restore_exec:.2f}s")


@pytest.mark.slow
def test_file_round_trip_and_zones(microvm, workdir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "data"
    data.mkdir()
    (data / "in.txt").write_text("dataset\n")
    live = microvm.start(_rp(workdir, Zone.ro(str(data), "/data")), sandbox_id="files")
    try:
        live.put_file("/tmp/put.bin", bytes(range(256)) * 1000)
        assert live.get_file("/tmp/put.bin") == bytes(range(256)) * 1000
        live.put_file("made-by-put.txt", b"put\n")
        assert (workdir / "made-by-put.txt").read_bytes() == b"put\n"
        r = live.exec(["/bin/sh", "-c", "cat /data/in.txt && echo rw > out.txt && echo no > /data/x"])
        assert r.stdout == b"dataset\n" and r.returncode != 0 and b"Read-only" in r.stderr, r
        assert (workdir / "out.txt").read_text() == "rw\n"
        assert not (data / "x").exists()
        r = live.exec(["/bin/sh", "-c", "cat /etc/shadow; echo x > /usr/corral-x; ls /root"])
        assert r.returncode != 0 and b"root:" not in r.stdout and not os.path.exists("/usr/corral-x"), r
        with pytest.raises(PolicyDenied, match="cannot write"):
            live.put_file("/data/nope", b"x")
        # The errors of put_file and get_file: the conformance suite's check_files_in_and_out, run below.
    finally:
        live.stop()


@pytest.mark.slow
def test_memory_limit_and_timeout(microvm, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    live = microvm.start(_rp(workdir, memory=64 << 20), sandbox_id="limits")
    try:
        r = live.exec(["python3", "-c", "b = bytearray(256 * 2**20)"], timeout=120)
        assert r.reason == "memory" and r.returncode == -9, r
        marker = workdir / "survivor"
        started = time.monotonic()
        r = live.exec(["/bin/sh", "-c", f"(sleep 3; touch {marker}) & sleep 100"], timeout=2)
        assert r.reason == "timeout" and time.monotonic() - started < 30, r
        assert live.exec(["true"]).ok  # the sandbox lives on
    finally:
        live.stop()
    time.sleep(3.5)
    assert not marker.exists(), "a background child outlived the timeout"


@pytest.mark.slow
def test_no_network_and_nested_namespace_sandbox(microvm, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    script = (
        "cat /proc/self/uid_map; grep -E '^(Seccomp|NoNewPrivs|CapEff):' /proc/self/status; uname -r; "
        "echo pids $(ls /proc | grep -c '^[0-9]'); cat /proc/net/dev | tail -n +3 | cut -d: -f1; "
        "python3 -c 'import socket; s = socket.socket(); s.settimeout(3); s.connect((\"10.0.2.2\", 80))' 2>&1 | tail -1"
    )
    r = microvm.run(_rp(workdir), ["/bin/sh", "-c", script], sandbox_id="nested")
    lines = r.stdout_text.splitlines()
    assert lines[0].split() == ["1000", "0", "1"], r  # a user namespace inside the guest: uid 1000 is guest root
    assert "Seccomp:\t2" in r.stdout_text and "NoNewPrivs:\t1" in r.stdout_text, r
    assert "CapEff:\t0000000000000000" in r.stdout_text, r
    assert lines[4] != os.uname().release, "the command must run on the guest's kernel"
    assert int(lines[5].split()[1]) <= 6, r  # its own pid namespace inside the VM
    assert [x.strip() for x in lines[6:-1]] == ["lo"], r  # no interface but loopback
    assert "unreachable" in lines[-1].lower() or "Errno" in lines[-1], r
    with pytest.raises(UnsupportedPolicy, match="network mode 'host'"):
        microvm.start(resolve(Policy(network=Network(mode="host")), host_env={}, host_cwd="/"), sandbox_id="net")


NET_PROBE = """
import asyncio, errno, os, socket, sys, urllib.request
P, E = int(sys.argv[1]), int(sys.argv[2])
print("env", os.environ.get("HTTP_PROXY"), os.environ.get("ALL_PROXY"), repr(os.environ.get("NO_PROXY")))
print("allowed", urllib.request.urlopen("http://127.0.0.1:%d/allowed" % P, timeout=60).read().decode())
try:
    urllib.request.urlopen("http://denied.test:%d/" % P, timeout=60)
except urllib.error.HTTPError as e:
    print("denied", e.code, e.headers["X-Corral-Rule"])
for host, port in (("127.0.0.1", P), ("10.0.2.2", 80)):
    try:
        socket.create_connection((host, port), timeout=5)
        print("DIRECT CONNECTED", host)
    except OSError as e:
        print("direct", host, errno.errorcode.get(e.errno, e.errno))
print("interfaces", sorted(line.split(":")[0].strip() for line in open("/proc/net/dev").readlines()[2:]))

async def tunnel(i):
    r, w = await asyncio.open_connection("127.0.0.1", 3128)
    w.write(b"CONNECT 127.0.0.1:%d HTTP/1.1\\r\\nHost: 127.0.0.1:%d\\r\\n\\r\\n" % (E, E))
    head = await r.readuntil(b"\\r\\n\\r\\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    w.write(b"ping %d\\n" % i)
    line = await r.readline()
    w.close()
    return line

async def main():
    # One connection asks for 4 MiB and is not read until the 40 others are done: it must not hold them up.
    r, w = await asyncio.open_connection("127.0.0.1", 3128)
    w.write(b"GET http://127.0.0.1:%d/big/%d HTTP/1.1\\r\\nHost: 127.0.0.1:%d\\r\\n\\r\\n" % (P, 4 << 20, P))
    await asyncio.sleep(1)
    answers = await asyncio.wait_for(asyncio.gather(*(tunnel(i) for i in range(40))), 120)
    print("tunnels", sum(a == b"ping %d\\n" % i for i, a in enumerate(answers)))
    await r.readuntil(b"\\r\\n\\r\\n")
    print("big", len(await r.readexactly(4 << 20)))
    w.close()

asyncio.run(main())
"""


@pytest.mark.slow
def test_network_allow_through_the_host_proxy(microvm, workdir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Network 'allow' in a VM: the host's proxy through the `corral.net` port, from a command's own namespace."""
    import tempfile

    import corral
    from corral.audit import read_events
    from tests.net.conftest import Origin
    from tests.net.test_sandbox import EchoServer

    origin, echo = Origin(), EchoServer()
    p, e = origin.port, echo.port
    audit = tmp_path / "audit.jsonl"
    policy = corral.Policy.workspace(str(workdir)).replace(
        network=Network(mode="allow", allow=[f"127.0.0.1:{p}", f"127.0.0.1:{e}"]))  # fmt: skip
    try:
        with corral.Sandbox(policy, backend="microvm", audit=str(audit)) as sb:
            r = sb.exec(["python3", "-c", NET_PROBE, str(p), str(e)], timeout=300)
            sockets = {f for f in os.listdir(tempfile.gettempdir()) if f"-{os.getpid()}-private-net-" in f}
            curl = sb.exec(["/bin/sh", "-c", f"command -v curl >/dev/null || exit 99; "
                                             f"curl -sS -x socks5h://127.0.0.1:3128 http://127.0.0.1:{p}/socks; echo; "
                                             f"curl -sS -o /dev/null -w '%{{http_code}}' http://127.0.0.1:{p + 1}/"],
                           timeout=120)  # fmt: skip
    finally:
        origin.close()
        echo.close()
    lines = r.stdout_text.splitlines()
    assert r.ok, r
    assert lines[0] == "env http://127.0.0.1:3128 socks5h://127.0.0.1:3128 ''"
    assert lines[1] == f"allowed GET /allowed host=127.0.0.1:{p} body="
    assert lines[2] == "denied 403 default-deny"  # refused by name, never resolved
    assert lines[3] == "direct 127.0.0.1 ECONNREFUSED"  # the command's own loopback: not the host's
    assert lines[4] == "direct 10.0.2.2 ENETUNREACH"  # no route anywhere: the VM has no network device
    assert lines[5] == "interfaces ['lo']"
    assert lines[6:] == ["tunnels 40", f"big {4 << 20}"]
    assert origin.paths()[0] == "/allowed"
    if curl.returncode != 99:  # curl is in the system view: SOCKS5 through the same port
        assert curl.ok and curl.stdout_text == f"GET /socks host=127.0.0.1:{p} body=\n403", curl
        assert "/socks" in origin.paths()
    # Every decision is in the audit log, under the sandbox's id; the proxy went with the sandbox.
    events = list(read_events(str(audit)))
    decisions = [(ev["via"], ev["action"], ev["rule"], ev["port"]) for ev in events if ev["event"] == "net.decision"]
    assert decisions[:2] == [("http", "allow", f"network.allow=127.0.0.1:{p}", p), ("http", "deny", "default-deny", p)]
    assert decisions.count(("connect", "allow", f"network.allow=127.0.0.1:{e}", e)) == 40
    assert all(ev["sandbox"] == sb.id and ev["backend"] == "microvm" for ev in events)
    assert next(ev for ev in events if ev["event"] == "sandbox.start")["network"] == "allow"
    assert sockets and not sockets & {
        f for f in os.listdir(tempfile.gettempdir()) if f"-{os.getpid()}-private-net-" in f
    }


@pytest.mark.slow
@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
def test_conformance(microvm, check, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    try:
        run_check(check, lambda: microvm, str(workdir))
    except Skip as exc:
        pytest.skip(str(exc))


@pytest.mark.slow
def test_escape_battery(microvm, tmp_path_factory: pytest.TempPathFactory) -> None:  # type: ignore[no-untyped-def]
    """The shared escape and limit battery (corral.selftest), every attack inside the VM."""
    from corral.selftest.battery import BATTERY, AttackContext, Breach, NotApplicable

    enforces = microvm.probe().enforces
    breaches, ran = [], 0
    for attack in BATTERY:
        if attack.requires - enforces:
            continue
        with AttackContext(microvm, base=str(tmp_path_factory.getbasetemp())) as ctx:
            try:
                attack.fn(ctx)
                ctx.host_unchanged()
                ran += 1
            except NotApplicable:
                continue
            except Breach as exc:
                breaches.append(f"{attack.title}: {exc}")
    assert not breaches, breaches
    assert ran >= 25, ran
