"""The container layout and the OCI config: pure functions, checked against exact expected output."""

from __future__ import annotations

import io
import tarfile

from corral.backends.images import base_tag, skeleton_tar
from corral.backends.oci import MountSpec, container_mounts, identity_etc, oci_config, skeleton
from corral.policy.model import Env, Limits, Network, Policy
from corral.policy.resolve import Mount, ResolvedPolicy, ResolvedZone


def rp(*, network: str = "none", limits: Limits | None = None) -> ResolvedPolicy:
    return ResolvedPolicy(
        policy=Policy(),
        zones=(
            ResolvedZone(host=None, mount="/tmp", mode="tmpfs", size=1 << 20),
            ResolvedZone(host="/srv/p", mount="/work", mode="rw", size=None),
            ResolvedZone(host=None, mount="/home/sandbox", mode="tmpfs", size=None),
            ResolvedZone(host="/srv/data", mount="/work/data", mode="ro", size=None),
        ),
        system=(
            Mount(kind="ro-bind", source="/usr", dest="/usr"),
            Mount(kind="symlink", source="usr/bin", dest="/bin"),
            Mount(kind="ro-bind", source="/etc/ssl", dest="/etc/ssl"),
            Mount(kind="symlink", source="/usr/share/zoneinfo/UTC", dest="/etc/localtime"),
        ),
        etc_files=(
            ("passwd", b"p"),
            ("group", b"g"),
            ("hosts", b"h"),
            ("hostname", b"n"),
            ("resolv.conf", b"r"),
            ("nsswitch.conf", b"s"),
        ),
        env=tuple(Env().build({}, home="/home/sandbox").items()),
        cwd="/work",
        home="/home/sandbox",
        uid=1000,
        gid=1000,
        hostname="corral",
        network=Network(mode=network),
        limits=limits or Limits(),
        commands=Policy().commands,
    )


def test_mounts_with_the_host_system() -> None:
    mounts = container_mounts(
        rp(), host_system=True, etc="dir", etc_dir="/s/etc", agent_dir="/site/agent", run_dir="/s/run", uid=0, gid=0
    )
    assert mounts == (
        MountSpec(kind="bind", source="/usr", dest="/usr", readonly=True),
        MountSpec(kind="bind", source="/s/etc", dest="/etc", readonly=True),
        MountSpec(kind="bind", source="/s/etc/hosts", dest="/etc/hosts", readonly=True),
        MountSpec(kind="bind", source="/s/etc/hostname", dest="/etc/hostname", readonly=True),
        MountSpec(kind="bind", source="/s/etc/resolv.conf", dest="/etc/resolv.conf", readonly=True),
        MountSpec(kind="bind", source="/etc/ssl", dest="/etc/ssl", readonly=True),
        MountSpec(kind="bind", source="/site/agent", dest="/.corral/agent", readonly=True),
        MountSpec(kind="bind", source="/s/run", dest="/.corral/run", readonly=True),
        MountSpec(kind="tmpfs", dest="/tmp", options=("size=1048576", "mode=1777")),
        MountSpec(kind="bind", source="/srv/p", dest="/work", readonly=False),
        MountSpec(kind="tmpfs", dest="/home/sandbox", options=("mode=755",)),
        MountSpec(kind="bind", source="/srv/data", dest="/work/data", readonly=True),
        MountSpec(kind="tmpfs", dest="/var/tmp", options=("size=1048576", "mode=1777")),
    )


def test_mounts_over_an_image() -> None:
    mounts = container_mounts(
        rp(),
        host_system=False,
        etc="files",
        etc_dir="/s/etc",
        agent_dir="/site/agent",
        run_dir="/s/run",
        python_prefix="/opt/py",
        uid=1000,
        gid=100,
    )
    assert [(m.kind, m.source, m.dest) for m in mounts[:9]] == [
        ("bind", "/s/etc/passwd", "/etc/passwd"),
        ("bind", "/s/etc/group", "/etc/group"),
        ("bind", "/s/etc/hosts", "/etc/hosts"),
        ("bind", "/s/etc/hostname", "/etc/hostname"),
        ("bind", "/s/etc/resolv.conf", "/etc/resolv.conf"),
        ("bind", "/s/etc/nsswitch.conf", "/etc/nsswitch.conf"),
        ("bind", "/site/agent", "/.corral/agent"),
        ("bind", "/opt/py", "/.corral/python"),
        ("bind", "/s/run", "/.corral/run"),
    ]
    assert not any(m.dest == "/usr" for m in mounts), "an image brings its own system"
    assert MountSpec(kind="tmpfs", dest="/home/sandbox", options=("mode=755", "uid=1000", "gid=100")) in mounts


def test_skeleton_for_a_bundle() -> None:
    mounts = container_mounts(rp(), host_system=True, etc="rootfs", agent_dir="/site/agent", uid=0, gid=0)
    skel = skeleton(rp(), mounts, etc_files=(("passwd", b"p"),), file_dests=frozenset({"/work/data"}))
    assert skel.dirs == (
        "/proc",
        "/dev",
        "/sys",
        "/tmp",
        "/etc",
        "/run",
        "/var",
        "/var/tmp",
        "/home",
        "/root",
        "/.corral",
        "/.corral/run",
        "/usr",
        "/etc/ssl",
        "/.corral/agent",
        "/work",
        "/home/sandbox",
    )
    assert skel.symlinks == (("/bin", "usr/bin"), ("/etc/localtime", "/usr/share/zoneinfo/UTC"))
    assert skel.files == (("/etc/passwd", b"p"), ("/work/data", b""))


def test_oci_config_exact() -> None:
    policy = rp(limits=Limits(memory=64 << 20, pids=50, cpus=1.5, file_size=1 << 20, open_files=64))
    mounts = (
        MountSpec(kind="bind", source="/srv/p", dest="/work"),
        MountSpec(kind="tmpfs", dest="/tmp", options=("size=1024", "mode=1777")),
    )
    config = oci_config(
        policy,
        mounts,
        args=["python3", "/.corral/agent/main.py"],
        env=[("CORRAL_AGENT_FD", "0")],
        rootfs="rootfs",
        uid=1000,
        gid=1000,
        annotations=[("corral.sandbox", "abc")],
        cgroups_path="/corral-gvisor/x",
        pids_cgroup=False,
    )
    no_caps: list[str] = []
    assert config == {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 1000, "gid": 1000, "additionalGids": []},
            "args": ["python3", "/.corral/agent/main.py"],
            "env": ["CORRAL_AGENT_FD=0"],
            "cwd": "/",
            "capabilities": {
                "bounding": no_caps,
                "effective": no_caps,
                "inheritable": no_caps,
                "permitted": no_caps,
                "ambient": no_caps,
            },
            "rlimits": [
                {"type": "RLIMIT_CORE", "hard": 0, "soft": 0},
                {"type": "RLIMIT_FSIZE", "hard": 1 << 20, "soft": 1 << 20},
            ],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "corral",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
            },
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=67108864"],
            },
            {"destination": "/work", "type": "bind", "source": "/srv/p", "options": ["rbind", "nosuid", "nodev", "rw"]},
            {
                "destination": "/tmp",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "nodev", "size=1024", "mode=1777"],
            },
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": [
                "/proc/acpi",
                "/proc/asound",
                "/proc/kcore",
                "/proc/keys",
                "/proc/latency_stats",
                "/proc/timer_list",
                "/proc/timer_stats",
                "/proc/sched_debug",
                "/proc/scsi",
                "/sys/firmware",
            ],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
            "resources": {"memory": {"limit": 64 << 20, "swap": 64 << 20}, "cpu": {"quota": 150000, "period": 100000}},
            "cgroupsPath": "/corral-gvisor/x",
        },
        "annotations": {"corral.sandbox": "abc"},
    }


def test_oci_config_host_network_and_pids() -> None:
    config = oci_config(rp(network="host", limits=Limits(pids=7)), (), args=["a"], env=(), rootfs="r", uid=0, gid=0)
    linux = config["linux"]
    assert isinstance(linux, dict)
    assert {"type": "network"} not in linux["namespaces"]
    assert linux["resources"] == {"pids": {"limit": 7}}
    assert "cgroupsPath" not in linux and "annotations" not in config


def test_identity_etc_names_the_running_uid() -> None:
    files = dict(identity_etc(rp(), uid=1234, gid=99))
    assert files["passwd"].decode().splitlines() == [
        "root:x:0:0:root:/root:/bin/sh",
        "sandbox:x:1234:99:corral sandbox:/home/sandbox:/bin/sh",
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin",
    ]
    assert files["group"] == b"root:x:0:\nsandbox:x:99:\nnogroup:x:65534:\n"
    assert files["hosts"] == b"h"
    assert identity_etc(rp(), uid=1000, gid=1000) == rp().etc_files


def test_base_image_is_deterministic() -> None:
    skel = skeleton(rp(), ())
    assert skeleton_tar(skel) == skeleton_tar(skel)
    assert base_tag(skel).startswith("corral-base:") and len(base_tag(skel)) == len("corral-base:") + 12
    with tarfile.open(fileobj=io.BytesIO(skeleton_tar(skel))) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["bin"].issym() and members["bin"].linkname == "usr/bin"
    assert members["tmp"].mode == 0o1777 and members["."].mode == 0o755
    assert not any(m.isfile() for m in members.values())
