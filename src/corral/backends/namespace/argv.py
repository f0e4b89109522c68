"""The bubblewrap command line for a resolved policy. Pure: no I/O, tested against exact vectors.

Order matters to bubblewrap: later mounts go on top of earlier ones, so the system view comes
first, then /etc, then zones from the outermost to the innermost, and the root is made read-only
last (that remount does not reach the mounts on top of it).
"""

from __future__ import annotations

from corral._record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from corral.policy.resolve import ResolvedPolicy

AGENT_DIR = "/.corral/agent"
PYTHON_DIR = "/.corral/python"
PROXY_SOCKET = "/.corral/proxy.sock"  # the network proxy's unix socket (network mode 'allow')
PROXY_PORT = 3128  # where the forwarder to that socket listens, on the sandbox's own loopback


class LaunchFds(Record):
    """Descriptor numbers bubblewrap reads from (all inherited by it)."""

    __slots__ = ("block", "etc", "seccomp", "status")
    seccomp: int
    status: int  # bwrap writes the sandbox's pid here, then the command's exit code
    block: int
    etc: tuple[tuple[str, int], ...]  # (name under /etc, fd holding its content)

    def __init__(self, *, seccomp: int, status: int, block: int, etc: tuple[tuple[str, int], ...]) -> None:
        self._set(seccomp=seccomp, status=status, block=block, etc=etc)


class Extras(Record):
    """Host paths corral itself needs inside: its agent's code, if needed a Python for it, and the
    network proxy's socket."""

    __slots__ = ("agent_dir", "proxy_socket", "python_prefix")
    agent_dir: str | None
    python_prefix: str | None
    proxy_socket: str | None

    def __init__(
        self, *, agent_dir: str | None = None, python_prefix: str | None = None, proxy_socket: str | None = None
    ) -> None:
        self._set(agent_dir=agent_dir, python_prefix=python_prefix, proxy_socket=proxy_socket)


def bwrap_argv(
    bwrap: str,
    rp: ResolvedPolicy,
    command: Sequence[str],
    *,
    fds: LaunchFds,
    extras: Extras | None = None,
    tmpfs_size: bool = True,
    as_pid_1: bool = False,
) -> tuple[str, ...]:
    """The full argv: `bwrap OPTIONS -- COMMAND...`. `tmpfs_size` is False for bwrap < 0.10.

    `as_pid_1` makes the command the pid namespace's init (for corral's agent): the kernel then
    ignores signals sent to it from inside that it does not handle, so `kill -9 -1` cannot kill it.
    """
    args = [
        bwrap,
        "--unshare-user", "--unshare-ipc", "--unshare-pid", "--unshare-uts", "--unshare-cgroup",
    ]  # fmt: skip
    if rp.network.mode != "host":
        args.append("--unshare-net")
    if as_pid_1:
        args.append("--as-pid-1")
    args += [
        "--disable-userns",
        "--uid", str(rp.uid), "--gid", str(rp.gid),
        "--hostname", rp.hostname,
        "--die-with-parent", "--new-session",
        "--cap-drop", "ALL",
        "--dev", "/dev",
        "--chmod", "1777", "/dev/shm",
        "--proc", "/proc",
        "--perms", "0755", "--dir", "/etc",
    ]  # fmt: skip
    for mount in rp.system:
        if mount.kind == "symlink":
            args += ["--symlink", str(mount.source), mount.dest]
        else:
            args += ["--ro-bind", str(mount.source), mount.dest]
    for name, fd in fds.etc:
        # Copied onto the sandbox's root tmpfs, which is made read-only below: no mount needed.
        args += ["--perms", "0644", "--file", str(fd), f"/etc/{name}"]
    if extras is not None:
        if extras.agent_dir is not None:
            args += ["--ro-bind", extras.agent_dir, AGENT_DIR]
        if extras.python_prefix is not None:
            args += ["--ro-bind", extras.python_prefix, PYTHON_DIR]
        if extras.proxy_socket is not None:
            args += ["--ro-bind", extras.proxy_socket, PROXY_SOCKET]
    cap = tmpfs_cap(rp)
    for zone in rp.zones:
        if zone.mode == "tmpfs":
            size = zone.size if cap is None else min(zone.size or cap, cap)
            if size is not None and tmpfs_size:
                args += ["--size", str(size)]
            mode = "1777" if zone.mount in ("/tmp", "/var/tmp") else "0755"
            args += ["--perms", mode, "--tmpfs", zone.mount]
        else:
            args += ["--bind" if zone.mode == "rw" else "--ro-bind", str(zone.host), zone.mount]
    if not any(z.mount in ("/var", "/var/tmp") for z in rp.zones) and any(z.mount == "/tmp" for z in rp.zones):
        args += ["--symlink", "../tmp", "/var/tmp"]
    args += [
        "--remount-ro", "/",
        "--chdir", rp.cwd,
        "--seccomp", str(fds.seccomp),
        "--json-status-fd", str(fds.status),
        "--block-fd", str(fds.block),
        "--",
        *command,
    ]  # fmt: skip
    return tuple(args)


def tmpfs_cap(rp: ResolvedPolicy) -> int | None:
    """The most each tmpfs zone may hold under a memory limit: together, half of it. A tmpfs's pages
    count toward the limit and nothing frees them when it is reached, so a full one would leave the
    OOM killer only the sandbox's own processes (a live sandbox's agent among them) to kill; capped,
    a command that fills it gets ENOSPC instead."""
    tmpfs = sum(1 for zone in rp.zones if zone.mode == "tmpfs")
    if rp.limits.memory is None or not tmpfs:
        return None
    return max(rp.limits.memory // (2 * tmpfs), 1 << 20)
