"""Resolve a `Policy` against this host: the one place policy code touches the filesystem.

The result, a `ResolvedPolicy`, holds absolute real host paths, the read-only system view, the
minimal /etc and the final environment; backends see only it. Resolution fails with a
`ConfigError` naming the zone when a host path is missing, a zone would expose the host's root, or
zones would not fit together: one that hides the working directory, a mount point inside a
read-only zone or the system view that does not exist there (bubblewrap cannot create it).
"""

from __future__ import annotations

import os
import posixpath
import stat

from corral._record import Record
from corral.errors import ConfigError
from corral.policy.model import Commands, Limits, Network, Policy, Zone, check_env_variable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

# Read-only system directories shown at their host paths (symlinks, as on merged-/usr hosts, stay symlinks).
ENOENT, EACCES, ENOTDIR, EISDIR = 2, 13, 20, 21  # errno, without importing it
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# Public, secret-free parts of /etc shown read-only when the host has them. Never shadow, sudoers,
# ssh keys, machine-id or anything naming the host's users: those are synthesized or absent.
# Regular files are copied into the sandbox's own /etc (cheap); only directories are bind-mounted
# (each mount costs bubblewrap ~0.2 ms), so the list of directories is kept short. The copies are
# read when a sandbox is built (`open_etc_copy`), not when a policy is resolved: a launch hands
# bubblewrap the open files, which costs 0.04 ms where reading them into corral cost 0.5 ms.
ETC_PUBLIC = (
    "alternatives", "ssl", "ld.so.cache", "localtime", "timezone", "os-release", "lsb-release",
    "debian_version", "protocols", "services", "mime.types", "bash.bashrc", "profile", "inputrc",
    "host.conf", "gai.conf",
)  # fmt: skip
ETC_MAX_FILE = 4 << 20
SANDBOX_USER = "sandbox"


class Mount(Record):
    """One step in building the sandbox's filesystem, applied in order."""

    __slots__ = ("dest", "kind", "size", "source")
    kind: str  # "ro-bind" | "bind" | "tmpfs" | "symlink" | "file"
    source: str | None  # host path, symlink target, or file content key
    dest: str
    size: int | None

    def __init__(self, *, kind: str, dest: str, source: str | None = None, size: int | None = None) -> None:
        self._set(kind=kind, source=source, dest=dest, size=size)


class ResolvedZone(Record):
    __slots__ = ("host", "mode", "mount", "size")
    host: str | None  # the real host path (symlinks resolved)
    mount: str
    mode: str
    size: int | None

    def __init__(self, *, host: str | None, mount: str, mode: str, size: int | None) -> None:
        self._set(host=host, mount=mount, mode=mode, size=size)


class ResolvedPolicy(Record):
    """A policy bound to this host. Pure data; backends turn it into a sandbox."""

    __slots__ = (
        "commands", "cwd", "env", "etc_copies", "etc_files", "gid", "home", "hostname", "limits",
        "network", "policy", "system", "uid", "zones",
    )  # fmt: skip
    policy: Policy
    zones: tuple[ResolvedZone, ...]  # parents before children
    system: tuple[Mount, ...]  # the read-only system view and public /etc entries
    etc_copies: tuple[str, ...]  # public host /etc files copied in as they are (names under /etc)
    etc_files: tuple[tuple[str, bytes], ...]  # /etc files corral writes: (name, content)
    env: tuple[tuple[str, str], ...]
    cwd: str
    home: str
    uid: int
    gid: int
    hostname: str
    network: Network
    limits: Limits
    commands: Commands

    def __init__(self, **fields: object) -> None:
        # `corral.run(env=...)` adds to the environment through `replace`: its names are checked here.
        env = fields.get("env", ())
        for name, value in env if isinstance(env, tuple) else ():
            check_env_variable(name, value, where="env")
        self._set(**{"etc_copies": (), **fields})

    def etc_contents(self) -> tuple[tuple[str, bytes], ...]:
        """Every file of the sandbox's /etc with its content, the public copies read now (for
        backends that ship contents rather than open files)."""
        copies = []
        for name in self.etc_copies:
            fd = open_etc_copy(name)
            if fd is None:
                continue
            try:
                with open(fd, "rb") as f:
                    data = f.read(ETC_MAX_FILE + 1)
            except OSError:
                continue
            if len(data) <= ETC_MAX_FILE:
                copies.append((name, data))
        return (*copies, *self.etc_files)

    @property
    def env_dict(self) -> dict[str, str]:
        return dict(self.env)

    def to_host(self, path: str) -> str | None:
        """The host path behind a sandbox path, or None when it lies in a tmpfs or outside every zone.

        System directories map to themselves. Used for checks and messages, never to write.
        """
        path = posixpath.normpath(path)
        best: ResolvedZone | None = None
        for zone in self.zones:
            if (path == zone.mount or path.startswith(zone.mount.rstrip("/") + "/")) and (
                best is None or len(zone.mount) > len(best.mount)
            ):
                best = zone
        if best is not None:
            if best.host is None:
                return None
            return best.host + path[len(best.mount) :] if path != best.mount else best.host
        for mount in self.system:
            if mount.dest in SYSTEM_DIRS and (path == mount.dest or path.startswith(mount.dest + "/")):
                return path
        return None

    def program_status(self, name: str, cwd: str | None = None, *, fresh: bool = False) -> int | None:
        """Whether `name` would be found inside: 0 yes, ENOENT / EACCES / EISDIR no, None when it
        cannot be told from the host. Lets a launch report 127 / 126 precisely. `fresh`: a sandbox
        just built (a one-shot), whose tmpfs are still empty, so a path on none of its mounts is missing.
        """
        cwd = cwd or self.cwd
        if "/" in name:
            candidates = [posixpath.join(cwd, name)]
        else:
            path_var = dict(self.env).get("PATH", "")
            candidates = [posixpath.join(d or cwd, name) for d in path_var.split(":")]
        denied = False
        for candidate in candidates:
            host = self.to_host(candidate)
            if host is None:
                where = self._fresh_place(candidate) if fresh else "unknown"
                if where == "unknown":
                    return None
                if where == "dir" and "/" in name:
                    return EISDIR
                continue
            try:
                if os.path.isdir(host):
                    if "/" in name:
                        return EISDIR
                    continue
                if os.path.exists(host):
                    if os.access(host, os.X_OK):
                        return 0
                    denied = True
            except OSError:
                return None
        return EACCES if denied else ENOENT

    def directory_status(self, path: str, *, fresh: bool = False) -> int | None:
        """Whether `path` is a directory inside: 0 yes, ENOENT / ENOTDIR no, None when it cannot be
        told from the host (`fresh` as for program_status)."""
        host = self.to_host(path)
        if host is None:
            where = self._fresh_place(path) if fresh else "unknown"
            return {"dir": 0, "missing": ENOENT}.get(where)
        try:
            st = os.stat(host)
        except FileNotFoundError:
            return ENOENT
        except OSError:
            return None
        return 0 if stat.S_ISDIR(st.st_mode) else ENOTDIR

    def _fresh_place(self, path: str) -> str:
        """What a freshly built sandbox has at `path`, which lies on no host-backed mount: "dir" (a
        mount point or a directory leading to one), "missing", or "unknown" (/proc, /dev, /etc's files)."""
        path = posixpath.normpath(path)
        if any(path.startswith(top + "/") for top in ("/proc", "/dev", "/etc")):
            return "unknown"
        mounts = (
            [z.mount for z in self.zones]
            + [m.dest for m in self.system]
            + ["/etc", "/dev", "/proc", "/.corral", "/var/tmp"]
        )
        if path == "/" or any(m == path or m.startswith(path.rstrip("/") + "/") for m in mounts):
            return "dir"
        return "missing"

    def writable_mounts(self) -> tuple[str, ...]:
        return tuple(z.mount for z in self.zones if z.mode in ("rw", "tmpfs"))


def resolve(
    policy: Policy,
    *,
    host_env: Mapping[str, str] | None = None,
    host_cwd: str | None = None,
    base_dir: str | None = None,
) -> ResolvedPolicy:
    """Bind `policy` to this host. Relative zone host paths are taken from `base_dir` (default: cwd)."""
    host_env = os.environ if host_env is None else host_env
    host_cwd = os.getcwd() if host_cwd is None else host_cwd
    base_dir = host_cwd if base_dir is None else base_dir
    zones = tuple(sorted(_resolve_zones(policy.zones, base_dir), key=lambda z: z.mount.count("/")))

    uid = policy.uid
    gid = uid
    home = "/root" if uid == 0 else f"/home/{SANDBOX_USER}"
    if not any(z.mount == home for z in zones):
        zones = (*zones, ResolvedZone(host=None, mount=home, mode="tmpfs", size=256 << 20))

    _check_layout(policy, zones, host_cwd)
    env = policy.env.build(host_env, home=home)
    resolved = ResolvedPolicy(
        policy=policy,
        zones=zones,
        system=_system_view(),
        etc_copies=_etc_copies(),
        etc_files=_etc_files(policy, uid=uid, gid=gid, home=home),
        env=tuple(sorted(env.items())),
        cwd="/",
        home=home,
        uid=uid,
        gid=gid,
        hostname=policy.hostname,
        network=policy.network,
        limits=policy.limits,
        commands=policy.commands,
    )
    return resolved.replace(cwd=_sandbox_cwd(policy, zones, host_cwd))


def _resolve_zones(zones: tuple[Zone, ...], base_dir: str) -> list[ResolvedZone]:
    out: list[ResolvedZone] = []
    for i, zone in enumerate(zones):
        where = f"zones[{i}] ({zone.mount})"
        if zone.host is None:
            out.append(ResolvedZone(host=None, mount=zone.mount, mode="tmpfs", size=zone.size))
            continue
        real = host_path(zone.host, base_dir=base_dir, where=where)
        if zone.mode == "rw" and real == "/":
            raise ConfigError("refusing to make the host's root directory writable", where=where)
        out.append(ResolvedZone(host=real, mount=zone.mount, mode=zone.mode, size=None))
    return out


def _check_layout(policy: Policy, zones: tuple[ResolvedZone, ...], host_cwd: str) -> None:
    """Zones that would not fit together, refused before anything starts (zones: parents first)."""
    names = {zone.mount: f"zones[{i}] ({zone.mount})" for i, zone in enumerate(policy.zones)}
    kinds = {"ro": "read-only", "rw": "read-write", "tmpfs": "tmpfs"}
    for zone in zones:
        name = names.get(zone.mount, f"the sandbox's home ({zone.mount})")
        # Mounted on a path of the read-only system view (the host's own, at the same path): it must exist there.
        system = next((d for d in SYSTEM_DIRS if zone.mount.startswith(d + "/")), None)
        if system is not None and policy.container.image is None and not os.path.exists(zone.mount):
            raise ConfigError(f"{zone.mount} does not exist in the read-only system view ({system}), so nothing can "
                              "be mounted there: mount the zone elsewhere", where=name)  # fmt: skip
        # Mounted inside a read-only zone: the mount point must already exist in it.
        for outer in zones:
            if outer.mode != "ro" or outer.host is None or not zone.mount.startswith(outer.mount.rstrip("/") + "/"):
                continue
            inner = outer.host + zone.mount[len(outer.mount) :]
            if not os.path.exists(inner):
                raise ConfigError(
                    f"this read-only zone (host {outer.host}) holds the mount point of {name}, but {inner} does not "
                    "exist and a read-only zone cannot get new directories: mount one of them elsewhere",
                    where=names.get(outer.mount, outer.mount),
                )
    if policy.cwd is not None:
        return
    # The working directory: the zone showing the host's current directory, and any zone mounted over it.
    real_cwd = os.path.realpath(host_cwd)
    shown = _cwd_zone(zones, real_cwd)
    if shown is not None:
        assert shown.host is not None
        path = posixpath.normpath(shown.mount + real_cwd[len(shown.host) :])
        for zone in zones:
            if zone.mount.startswith(shown.mount.rstrip("/") + "/") and _within(path, zone.mount):
                raise ConfigError(
                    f"a {kinds[zone.mode]} zone at {zone.mount} hides the working directory {path} (the host's "
                    f"{real_cwd}): move the zone, run from another directory, or set --cwd",
                    where=names.get(zone.mount, zone.mount),
                )
    elif not any(zone.mode == "rw" for zone in zones):
        for given in policy.zones:
            if given.mount == real_cwd:
                raise ConfigError(
                    f"a {kinds[given.mode]} zone at {given.mount} replaces the working directory {real_cwd} (the "
                    "workspace): move the zone, run from another directory, or set --cwd",
                    where=names[given.mount],
                )


def _within(path: str, mount: str) -> bool:
    return path == mount or path.startswith(mount.rstrip("/") + "/")


def _cwd_zone(zones: tuple[ResolvedZone, ...], real_cwd: str) -> ResolvedZone | None:
    """The host zone that shows `real_cwd` (the innermost host directory containing it)."""
    best: ResolvedZone | None = None
    for zone in zones:
        inside = zone.host is not None and os.path.isdir(zone.host) and _within(real_cwd, zone.host)
        if inside and (best is None or len(zone.host or "") > len(best.host or "")):
            best = zone
    return best


def host_path(host: str, *, base_dir: str, where: str) -> str:
    """The real path behind a zone's host path (relative to `base_dir`); a ConfigError at `where`
    when it does not exist or cannot be used."""
    joined = posixpath.join(base_dir, os.path.expanduser(host))
    real = os.path.realpath(joined)
    try:
        os.stat(real)
    except FileNotFoundError:
        raise ConfigError(f"host path {joined} does not exist", where=where) from None
    except OSError as exc:
        raise ConfigError(f"cannot use host path {joined}: {exc.strerror}", where=where) from None
    return real


def _system_view() -> tuple[Mount, ...]:
    mounts: list[Mount] = []
    for d in SYSTEM_DIRS:
        if os.path.islink(d):
            mounts.append(Mount(kind="symlink", source=os.readlink(d), dest=d))
        elif os.path.isdir(d):
            mounts.append(Mount(kind="ro-bind", source=d, dest=d))
    for name in ETC_PUBLIC:
        path = "/etc/" + name
        if os.path.islink(path):
            mounts.append(Mount(kind="symlink", source=os.readlink(path), dest=path))
        elif os.path.isdir(path):
            mounts.append(Mount(kind="ro-bind", source=path, dest=path))
    return tuple(mounts)


def _etc_copies() -> tuple[str, ...]:
    names = []
    for name in ETC_PUBLIC:
        try:
            if stat.S_ISREG(os.lstat("/etc/" + name).st_mode):
                names.append(name)
        except OSError:
            continue
    return tuple(names)


def open_etc_copy(name: str) -> int | None:
    """A read-only descriptor on the host's /etc/NAME while it is a regular file (not a link) of at
    most ETC_MAX_FILE bytes; None otherwise (the sandbox then goes without it, as on a host without
    it). Only names in ETC_PUBLIC are ever opened, whatever a hand-made ResolvedPolicy lists."""
    if name not in ETC_PUBLIC:
        return None
    try:
        fd = os.open("/etc/" + name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
    except OSError:
        st = None
    if st is None or not stat.S_ISREG(st.st_mode) or st.st_size > ETC_MAX_FILE:
        os.close(fd)
        return None
    return fd


def _etc_files(policy: Policy, *, uid: int, gid: int, home: str) -> tuple[tuple[str, bytes], ...]:
    user = "root" if uid == 0 else SANDBOX_USER
    passwd = "root:x:0:0:root:/root:/bin/sh\n"
    group = "root:x:0:\n"
    if uid != 0:
        passwd += f"{user}:x:{uid}:{gid}:corral sandbox:{home}:/bin/sh\n"
        group += f"{user}:x:{gid}:\n"
    passwd += "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    group += "nogroup:x:65534:\n"
    name = policy.hostname
    hosts = f"127.0.0.1\tlocalhost {name}\n::1\tlocalhost ip6-localhost ip6-loopback {name}\n"
    resolv = _host_resolv_conf() if policy.network.mode == "host" else "# no network in this sandbox\n"
    return (
        ("passwd", passwd.encode()),
        ("group", group.encode()),
        ("hosts", hosts.encode()),
        ("hostname", f"{name}\n".encode()),
        ("resolv.conf", resolv.encode()),
        ("nsswitch.conf", b"passwd: files\ngroup: files\nhosts: files dns\nservices: files\nprotocols: files\n"),
    )


def _host_resolv_conf() -> str:
    try:
        with open("/etc/resolv.conf", encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _sandbox_cwd(policy: Policy, zones: tuple[ResolvedZone, ...], host_cwd: str) -> str:
    if policy.cwd is not None:
        return policy.cwd
    real_cwd = os.path.realpath(host_cwd)
    best = _cwd_zone(zones, real_cwd)
    if best is not None and best.host is not None:
        rel = real_cwd[len(best.host) :]
        return posixpath.normpath(best.mount + rel) if rel else best.mount
    for zone in zones:
        if zone.mode == "rw":
            return zone.mount
    return "/"
