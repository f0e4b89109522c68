from __future__ import annotations

from corral.backends.namespace.argv import Extras, LaunchFds, bwrap_argv
from corral.policy.model import Env, Limits, Network, Policy
from corral.policy.resolve import Mount, ResolvedPolicy, ResolvedZone


def rp(network: str = "none") -> ResolvedPolicy:
    return ResolvedPolicy(
        policy=Policy(),
        zones=(
            ResolvedZone(host=None, mount="/tmp", mode="tmpfs", size=1 << 20),
            ResolvedZone(host="/srv/p", mount="/work", mode="rw", size=None),
            ResolvedZone(host="/srv/data", mount="/work/data", mode="ro", size=None),
        ),
        system=(
            Mount(kind="ro-bind", source="/usr", dest="/usr"),
            Mount(kind="symlink", source="usr/bin", dest="/bin"),
        ),
        etc_files=(("passwd", b"x"),),
        env=tuple(Env().build({}, home="/home/sandbox").items()),
        cwd="/work",
        home="/home/sandbox",
        uid=1000,
        gid=1000,
        hostname="corral",
        network=Network(mode=network),
        limits=Limits(),
        commands=Policy().commands,  # type: ignore[arg-type]
    )


FDS = LaunchFds(seccomp=7, status=8, block=9, etc=(("passwd", 10),))


def test_exact_vector() -> None:
    argv = bwrap_argv("/b/bwrap", rp(), ["make", "-j2"], fds=FDS, extras=Extras(agent_dir="/site/corral/agent"))
    assert argv == (
        "/b/bwrap",
        "--unshare-user",
        "--unshare-ipc",
        "--unshare-pid",
        "--unshare-uts",
        "--unshare-cgroup",
        "--unshare-net",
        "--disable-userns",
        "--uid",
        "1000",
        "--gid",
        "1000",
        "--hostname",
        "corral",
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--dev",
        "/dev",
        "--chmod",
        "1777",
        "/dev/shm",
        "--proc",
        "/proc",
        "--perms",
        "0755",
        "--dir",
        "/etc",
        "--ro-bind",
        "/usr",
        "/usr",
        "--symlink",
        "usr/bin",
        "/bin",
        "--perms",
        "0644",
        "--file",
        "10",
        "/etc/passwd",
        "--ro-bind",
        "/site/corral/agent",
        "/.corral/agent",
        "--size",
        "1048576",
        "--perms",
        "1777",
        "--tmpfs",
        "/tmp",
        "--bind",
        "/srv/p",
        "/work",
        "--ro-bind",
        "/srv/data",
        "/work/data",
        "--symlink",
        "../tmp",
        "/var/tmp",
        "--remount-ro",
        "/",
        "--chdir",
        "/work",
        "--seccomp",
        "7",
        "--json-status-fd",
        "8",
        "--block-fd",
        "9",
        "--",
        "make",
        "-j2",
    )


def test_host_network_shares_the_namespace_and_old_bwrap_gets_no_size() -> None:
    argv = bwrap_argv("bwrap", rp("host"), ["true"], fds=FDS, tmpfs_size=False)
    assert "--unshare-net" not in argv and "--size" not in argv
    assert argv.index("--remount-ro") < argv.index("--")


def test_command_words_are_never_parsed() -> None:
    argv = bwrap_argv("bwrap", rp(), ["sh", "-c", "echo $HOME; --bind / /"], fds=FDS)
    assert argv[argv.index("--") + 1 :] == ("sh", "-c", "echo $HOME; --bind / /")
