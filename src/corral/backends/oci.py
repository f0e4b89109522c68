"""The container layout of a resolved policy, and the OCI runtime config built from it. Pure: no I/O.

Both container backends show a sandbox the same way:

- a read-only root: corral's own skeleton (directories, and the host's top-level symlinks such as
  `/bin -> usr/bin`) or a named image;
- with the skeleton, the host's system directories read-only at their own paths, exactly the
  namespace backend's system view; with an image, the image's own system;
- corral's minimal `/etc` (see `corral.policy.resolve`): with the skeleton all of it (plus the public
  host directories such as `/etc/ssl`), with an image only the identity files (passwd, group,
  hosts, hostname, resolv.conf, nsswitch.conf) over the image's own `/etc`;
- corral's agent read-only at `/.corral/agent` and the directory of its host socket at `/.corral/run`;
- the zones, read-only, read-write or tmpfs, parents before children;
- a fresh `/var/tmp` tmpfs when `/tmp` is a tmpfs zone (bubblewrap links it to /tmp instead).

`container_mounts` says it as a list of `MountSpec`; `oci_config` turns that into the
`config.json` of an OCI bundle (for runsc or runc); `docker.py` into Engine API mounts.
"""

from __future__ import annotations

import posixpath

from corral._record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from typing import Literal

    from corral.policy.resolve import ResolvedPolicy

    EtcMode = Literal["dir", "files", "rootfs"]

AGENT_DIR = "/.corral/agent"
PYTHON_DIR = "/.corral/python"
RUN_DIR = "/.corral/run"
PROXY_DIR = "/.corral/net"  # the network proxy's private directory (mode 'allow'), holding its socket
PROXY_PORT = 3128  # where the agent's forwarder to it listens, on the sandbox's own loopback
AGENT_SOCKET = RUN_DIR + "/agent.sock"
# The /etc files corral always provides, over an image's own /etc too: they say who the sandbox
# user is and what the sandbox may resolve, and a container engine would otherwise write its own.
IDENTITY_ETC = ("passwd", "group", "hosts", "hostname", "resolv.conf", "nsswitch.conf")
# Files a container engine writes into every container unless a mount already covers them.
ENGINE_ETC = ("hosts", "hostname", "resolv.conf")
BIND_OPTIONS = ("rbind", "nosuid", "nodev")
# Paths inside /proc and /sys that leak host state or offer kernel knobs, as runc's defaults.
MASKED_PATHS = (
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
)
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
CPU_PERIOD_US = 100_000


class MountSpec(Record):
    """One mount inside the container, in the order it must be made."""

    __slots__ = ("dest", "kind", "options", "readonly", "source")
    kind: str  # "bind" | "tmpfs"
    source: str | None  # host path for a bind
    dest: str
    readonly: bool
    options: tuple[str, ...]  # tmpfs data options: size=, mode=, uid=, gid=

    def __init__(
        self, *, kind: str, dest: str, source: str | None = None, readonly: bool = False, options: Sequence[str] = ()
    ) -> None:
        self._set(kind=kind, source=source, dest=dest, readonly=readonly, options=tuple(options))


class Skeleton(Record):
    """What a root filesystem needs before mounts go on it: directories, symlinks, /etc files."""

    __slots__ = ("dirs", "files", "symlinks")
    dirs: tuple[str, ...]  # absolute paths inside, parents first
    symlinks: tuple[tuple[str, str], ...]  # (path inside, target)
    files: tuple[tuple[str, bytes], ...]  # (path inside, content)

    def __init__(
        self, *, dirs: Iterable[str], symlinks: Iterable[tuple[str, str]], files: Iterable[tuple[str, bytes]] = ()
    ) -> None:
        self._set(dirs=tuple(dirs), symlinks=tuple(symlinks), files=tuple(files))


def identity_etc(rp: ResolvedPolicy, *, uid: int, gid: int) -> tuple[tuple[str, bytes], ...]:
    """The sandbox's /etc files (`rp.etc_contents()`) with passwd and group naming `uid`/`gid` (the
    identity the container runs as).

    A container shares the host's user ids (no per-container user namespace), so the sandbox user
    is the caller's uid; it keeps the policy's name and home directory.
    """
    files = rp.etc_contents()
    if uid == rp.uid and gid == rp.gid:
        return files
    user = "root" if uid == 0 else "sandbox"
    passwd = f"{user}:x:{uid}:{gid}:corral sandbox:{rp.home}:/bin/sh\n"
    group = f"{user}:x:{gid}:\n"
    if uid != 0:
        passwd = "root:x:0:0:root:/root:/bin/sh\n" + passwd
    if gid != 0:
        group = "root:x:0:\n" + group
    passwd += "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    group += "nogroup:x:65534:\n"
    out = []
    for name, content in files:
        if name == "passwd":
            content = passwd.encode()
        elif name == "group":
            content = group.encode()
        out.append((name, content))
    return tuple(out)


def container_mounts(
    rp: ResolvedPolicy,
    *,
    host_system: bool,
    etc: EtcMode,
    etc_dir: str | None = None,
    agent_dir: str,
    run_dir: str | None = None,
    python_prefix: str | None = None,
    proxy_socket: str | None = None,
    uid: int,
    gid: int,
) -> tuple[MountSpec, ...]:
    """Every mount of a sandbox, in order.

    `host_system`: the host's system directories are mounted (corral's skeleton root) rather than
    taken from an image. `etc`: "dir" mounts `etc_dir` at /etc (and its engine-managed files one by
    one, so the engine leaves them alone); "files" mounts only the identity files from `etc_dir` over
    an image's /etc; "rootfs" means the files are already in the root (an OCI bundle's own rootfs).
    `run_dir` is the host directory holding the agent's socket (None when the socket is inherited);
    `proxy_socket` the host's network proxy socket (network mode 'allow'): its private directory is
    shown at PROXY_DIR (runsc cannot mount a socket by itself).
    """
    mounts: list[MountSpec] = []
    if host_system:
        for m in rp.system:
            if m.kind == "ro-bind" and not m.dest.startswith("/etc/"):
                mounts.append(MountSpec(kind="bind", source=str(m.source), dest=m.dest, readonly=True))
    if etc == "dir":
        assert etc_dir is not None
        mounts.append(MountSpec(kind="bind", source=etc_dir, dest="/etc", readonly=True))
        names = {*rp.etc_copies, *(name for name, _ in rp.etc_files)}
        for name in ENGINE_ETC:
            if name in names:
                mounts.append(MountSpec(kind="bind", source=f"{etc_dir}/{name}", dest=f"/etc/{name}", readonly=True))
    elif etc == "files":
        assert etc_dir is not None
        for name in IDENTITY_ETC:
            mounts.append(MountSpec(kind="bind", source=f"{etc_dir}/{name}", dest=f"/etc/{name}", readonly=True))
    if host_system:
        for m in rp.system:
            if m.kind == "ro-bind" and m.dest.startswith("/etc/"):
                mounts.append(MountSpec(kind="bind", source=str(m.source), dest=m.dest, readonly=True))
    mounts.append(MountSpec(kind="bind", source=agent_dir, dest=AGENT_DIR, readonly=True))
    if python_prefix is not None:
        mounts.append(MountSpec(kind="bind", source=python_prefix, dest=PYTHON_DIR, readonly=True))
    if run_dir is not None:
        mounts.append(MountSpec(kind="bind", source=run_dir, dest=RUN_DIR, readonly=True))
    if proxy_socket is not None:
        mounts.append(MountSpec(kind="bind", source=posixpath.dirname(proxy_socket), dest=PROXY_DIR, readonly=True))
    for zone in rp.zones:
        if zone.mode == "tmpfs":
            mounts.append(
                MountSpec(
                    kind="tmpfs", dest=zone.mount, options=tmpfs_options(rp, zone.mount, zone.size, uid=uid, gid=gid)
                )
            )
        else:
            mounts.append(MountSpec(kind="bind", source=str(zone.host), dest=zone.mount, readonly=zone.mode == "ro"))
    tmp = next((z for z in rp.zones if z.mount == "/tmp" and z.mode == "tmpfs"), None)
    if tmp is not None and not any(z.mount in ("/var", "/var/tmp") for z in rp.zones):
        mounts.append(
            MountSpec(kind="tmpfs", dest="/var/tmp", options=tmpfs_options(rp, "/var/tmp", tmp.size, uid=uid, gid=gid))
        )
    return tuple(mounts)


def tmpfs_options(rp: ResolvedPolicy, mount: str, size: int | None, *, uid: int, gid: int) -> tuple[str, ...]:
    """/tmp and /var/tmp are sticky and world-writable; other tmpfs zones belong to the sandbox user."""
    options = []
    if size is not None:
        options.append(f"size={size}")
    if mount in ("/tmp", "/var/tmp"):
        options.append("mode=1777")
    else:
        options.append("mode=755")
        if uid or gid:  # root owns a fresh tmpfs anyway
            options += [f"uid={uid}", f"gid={gid}"]
    return tuple(options)


def skeleton(
    rp: ResolvedPolicy,
    mounts: Sequence[MountSpec],
    *,
    etc_files: Sequence[tuple[str, bytes]] = (),
    file_dests: frozenset[str] = frozenset(),
) -> Skeleton:
    """The root a set of mounts needs: the system's top-level symlinks, every mount point, /etc files.

    Used for corral's own image (no files: the engine makes missing mount points itself) and for an
    OCI bundle's root (with `etc_files`; `file_dests` names the mounts of single files, whose mount
    points are empty files rather than directories).
    """
    symlinks = [(m.dest, str(m.source)) for m in rp.system if m.kind == "symlink"]
    linked = {path for path, _ in symlinks}
    dirs: list[str] = []

    def add_dir(path: str) -> bool:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            d = "/" + "/".join(parts[:i])
            if d in linked:
                return False  # a mount under a symlinked directory lands on its target, which exists
            if d not in dirs:
                dirs.append(d)
        return True

    for d in ("/proc", "/dev", "/sys", "/tmp", "/etc", "/run", "/var/tmp", "/home", "/root", RUN_DIR):
        add_dir(d)
    files: list[tuple[str, bytes]] = [(f"/etc/{name}", content) for name, content in etc_files]
    have = {path for path, _ in files}
    for m in mounts:
        if m.dest in have or m.dest in linked:
            continue
        if m.dest in file_dests:
            if add_dir(posixpath.dirname(m.dest)):
                files.append((m.dest, b""))
                have.add(m.dest)
        else:
            add_dir(m.dest)
    return Skeleton(dirs=dirs, symlinks=symlinks, files=files)


def oci_config(
    rp: ResolvedPolicy,
    mounts: Sequence[MountSpec],
    *,
    args: Sequence[str],
    env: Sequence[tuple[str, str]],
    rootfs: str,
    uid: int,
    gid: int,
    annotations: Sequence[tuple[str, str]] = (),
    cgroups_path: str | None = None,
    pids_cgroup: bool = True,
) -> dict[str, object]:
    """An OCI runtime `config.json` (spec 1.0.2) running `args` in the layout `mounts` describes.

    No capabilities at all, no_new_privs, a read-only root, the file-size and core rlimits (the agent
    sets the open-files limit on each command), memory (without swap), pids and cpu limits, and a pid,
    ipc, uts and mount namespace,
    plus a network namespace unless the policy's network is `host`. The seccomp filter is corral's
    own, loaded by the agent before it runs anything (it stacks on whatever the runtime adds).
    `pids_cgroup` False leaves the pids limit out of the resources, for runtimes (runsc) whose
    host processes are not the sandbox's processes: the agent's RLIMIT_NPROC holds it there.
    """
    limits = rp.limits
    rlimits: list[dict[str, object]] = [{"type": "RLIMIT_CORE", "hard": 0, "soft": 0}]
    if limits.file_size is not None:
        rlimits.append({"type": "RLIMIT_FSIZE", "hard": limits.file_size, "soft": limits.file_size})
    # No RLIMIT_NOFILE: the process is corral's agent, which gives each command the open-files limit
    # (under it the agent itself, holding a few descriptors per running command, would run out).
    oci_mounts: list[dict[str, object]] = [
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
    ]
    for m in mounts:
        if m.kind == "tmpfs":
            oci_mounts.append(
                {"destination": m.dest, "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", *m.options]}
            )
        else:
            oci_mounts.append(
                {
                    "destination": m.dest,
                    "type": "bind",
                    "source": m.source,
                    "options": [*BIND_OPTIONS, "ro" if m.readonly else "rw"],
                }
            )
    namespaces = [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]
    if rp.network.mode != "host":
        namespaces.insert(1, {"type": "network"})
    resources: dict[str, object] = {}
    if limits.memory is not None:
        resources["memory"] = {"limit": limits.memory, "swap": limits.memory}
    if limits.pids is not None and pids_cgroup:
        resources["pids"] = {"limit": limits.pids}
    if limits.cpus is not None:
        resources["cpu"] = {"quota": max(1000, int(limits.cpus * CPU_PERIOD_US)), "period": CPU_PERIOD_US}
    linux: dict[str, object] = {
        "namespaces": namespaces,
        "maskedPaths": list(MASKED_PATHS),
        "readonlyPaths": list(READONLY_PATHS),
    }
    if resources:
        linux["resources"] = resources
    if cgroups_path is not None:
        linux["cgroupsPath"] = cgroups_path
    no_caps: list[str] = []
    config: dict[str, object] = {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": uid, "gid": gid, "additionalGids": []},
            "args": list(args),
            "env": [f"{k}={v}" for k, v in env],
            "cwd": "/",
            "capabilities": {k: no_caps for k in ("bounding", "effective", "inheritable", "permitted", "ambient")},
            "rlimits": rlimits,
            "noNewPrivileges": True,
        },
        "root": {"path": rootfs, "readonly": True},
        "hostname": rp.hostname,
        "mounts": oci_mounts,
        "linux": linux,
    }
    if annotations:
        config["annotations"] = dict(annotations)
    return config
