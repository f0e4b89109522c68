"""What the container backends share: a private host directory per sandbox, corral's agent as the
container's only process, who owns a container (to reap orphans), and the agent's confinement.

Why the agent rather than the engine's exec API: Docker's exec API cannot kill an exec (there is
no endpoint for it; a timeout would leave the command running), knows nothing of the process tree
a command leaves behind, and cannot stop reading at an output limit without leaving the writer
blocked. corral's agent, already the in-sandbox supervisor of the namespace backend, does all of
that (a command's session is killed at its end, at a timeout or an output limit; orphans are
reaped; stdin/stdout/stderr are the host's own pipes, passed as descriptors), reports peak memory,
and lets corral stack its own seccomp filter (and Landlock where the kernel allows it) on the
engine's. The price: the image needs `/bin/sh` and `python3`, which corral's default image has (it
is the host's system, mounted read-only).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time

from corral.errors import LaunchError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from corral.backends.base import EventSink
    from corral.net.service import SandboxProxy
    from corral.policy.resolve import ResolvedPolicy

LABEL_SANDBOX = "corral.sandbox"
LABEL_OWNER = "corral.owner"
LABEL_BACKEND = "corral.backend"
LABEL_STATE = "corral.state"  # the sandbox's private host directory, removed with an orphan
AGENT_TIMEOUT = 30.0
# Finds a python3 in an image and starts the agent with it (an image's python may be anywhere).
FIND_PYTHON = (
    "for p in /usr/local/bin/python3 /usr/bin/python3 /bin/python3 /opt/python/bin/python3; do "
    'if [ -x "$p" ]; then exec "$p" -E -s -S -B {agent}; fi; done; '
    "echo 'corral: this image has no python3 (corral needs /bin/sh and python3 >= 3.8 in an image)' >&2; exit 127"
)


class StateDir:
    """A private host directory for one sandbox: `etc/` (its /etc files) and `run/` (the agent's socket).

    The directory itself is 0700, so nobody else on the host can reach the socket inside it;
    the engine (root) mounts its subdirectories into the container.
    """

    def __init__(self, sandbox_id: str, *, base: str | None = None) -> None:
        self.path = os.path.realpath(tempfile.mkdtemp(prefix=f"corral-{sandbox_id}-", dir=base))
        self.etc = os.path.join(self.path, "etc")
        self.run = os.path.join(self.path, "run")
        os.mkdir(self.etc, 0o755)
        os.mkdir(self.run, 0o755)
        self.socket_path = os.path.join(self.run, "agent.sock")

    def write_etc(self, files: tuple[tuple[str, bytes], ...], *, mount_points: tuple[str, ...] = ()) -> None:
        """The /etc files, and empty directories where host /etc directories get mounted on top."""
        for name, content in files:
            path = os.path.join(self.etc, name)
            with open(path, "wb") as f:
                f.write(content)
            os.chmod(path, 0o644)
        for dest in mount_points:
            os.makedirs(os.path.join(self.etc, dest[len("/etc/") :]), mode=0o755, exist_ok=True)

    def listen(self) -> socket.socket:
        """The socket the agent connects to from inside (bound before the container starts)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.bind(self.socket_path)
        sock.listen(1)
        return sock

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    @staticmethod
    def remove_orphan(path: str) -> None:
        """Remove a crashed sandbox's directory, named by a container label: only one of ours (a
        `corral-*` directory of ours, not a link, in the temporary directory), whatever the label says."""
        parent = os.path.realpath(tempfile.gettempdir())
        if os.path.dirname(path) != parent or not os.path.basename(path).startswith("corral-"):
            return
        try:
            st = os.lstat(path)
        except OSError:
            return
        import stat

        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
            shutil.rmtree(path, ignore_errors=True)


def accept_agent(
    listener: socket.socket,
    *,
    alive: Callable[[], str | None],
    timeout: float = AGENT_TIMEOUT,
    allowed_uids: frozenset[int] = frozenset(),
) -> socket.socket:
    """Wait for the agent to connect. `alive()` returns why the container is gone, or None while it runs.

    Only one connection is ever accepted; the listening socket is closed and unlinked after it, so
    nothing else inside can connect later. A peer whose uid is not in `allowed_uids` (when given)
    is refused.
    """
    import select

    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(listener.fileno(), select.POLLIN)
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LaunchError(f"the sandbox agent did not connect within {timeout:g}s")
            if poller.poll(int(min(remaining, 0.25) * 1000) + 1):
                conn, _ = listener.accept()
                if allowed_uids:
                    import struct

                    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                    _pid, uid, _gid = struct.unpack("3i", creds)
                    if uid not in allowed_uids:
                        conn.close()
                        raise LaunchError(f"an unexpected process (uid {uid}) connected to the agent socket")
                conn.setblocking(True)
                return conn
            gone = alive()
            if gone is not None:
                raise LaunchError(gone)
    finally:
        try:
            os.unlink(listener.getsockname())
        except (OSError, TypeError):
            pass
        listener.close()


def hello_for(
    rp: ResolvedPolicy,
    *,
    landlock: dict[str, object] | None,
    cgroup_controllers: frozenset[str] = frozenset({"memory", "pids", "cpu"}),
) -> tuple[dict[str, object], bytes]:
    """The agent's confinement: file-size and core rlimits (open files per command), and those standing in for
    the limits no cgroup holds (the engine's cgroup holds memory, pids and cpu), Landlock where
    given and available, and corral's seccomp filter, which stacks on the engine's own."""
    from corral.backends.namespace.launch import command_rlimits, rlimits_for
    from corral.kernel.seccomp import build_filter

    hello: dict[str, object] = {
        "rlimits": rlimits_for(rp, cgroup_controllers, agent=True),
        "command_rlimits": command_rlimits(rp),
    }
    if landlock:
        hello["landlock"] = landlock
    return hello, build_filter()


def start_proxy(rp: ResolvedPolicy, events: EventSink | None) -> tuple[SandboxProxy, ResolvedPolicy]:
    """Network mode 'allow': the sandbox's proxy on a host unix socket (its directory mounted in at
    PROXY_DIR, where the agent's forwarder reaches it from the sandbox's loopback) and the proxy
    variables set."""
    from corral.backends.oci import PROXY_PORT
    from corral.net.service import SandboxProxy, proxy_env

    proxy = SandboxProxy.start_unix(rp.network, events=events)
    env = {**rp.env_dict, **proxy_env(PROXY_PORT)}
    return proxy, rp.replace(env=tuple(sorted(env.items())))


def proxy_hello(proxy: SandboxProxy) -> dict[str, object]:
    """What the agent's forwarder needs: its port on the sandbox's loopback and the socket inside."""
    from corral.backends.oci import PROXY_DIR, PROXY_PORT

    assert proxy.socket_path is not None
    return {"port": PROXY_PORT, "socket": f"{PROXY_DIR}/{os.path.basename(proxy.socket_path)}"}


# ------------------------------------------------------------------ owners and orphans
def owner_label() -> str:
    """Who started a container: boot id, pid namespace, pid and the pid's start time."""
    return ":".join((_boot_id(), _pid_namespace(), str(os.getpid()), _start_time(os.getpid())))


def owner_gone(label: str) -> bool:
    """Whether the corral process that owns a container is certainly gone (False when unsure)."""
    parts = label.split(":")
    if len(parts) != 4 or not parts[2].isdigit():
        return False
    boot, pidns, pid, started = parts
    if boot != _boot_id():
        return True  # the machine rebooted since
    if pidns != _pid_namespace():
        return False  # another container's corral, sharing this engine: not ours to judge
    return _start_time(int(pid)) != started


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip().replace(":", "")
    except OSError:
        return "unknown"


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid").replace(":", "")
    except OSError:
        return "unknown"


def _start_time(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return "gone"
    return data[data.rfind(b")") + 2 :].split()[19].decode()
