"""Backends without namespaces: corral's agent runs as a host process and confines itself.

Shared by `landlock` (Landlock + seccomp + no capabilities + rlimits) and `process` (rlimits and
the policy checks only). Without a mount namespace a zone can only appear at its own host path,
and a tmpfs zone becomes a private host directory: /tmp's is exported as TMPDIR, the home
zone's as HOME; a tmpfs zone anywhere else cannot be offered and is refused. With network mode
'allow', the sandbox's proxy listens on a port of the host's loopback and HTTP(S)_PROXY / ALL_PROXY
point at it; `hello` learns the port (Landlock then allows connect() to it alone).
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import sys
import tempfile

from corral.backends.base import Backend, LiveSandbox
from corral.errors import LaunchError, UnsupportedPolicy

TYPE_CHECKING = False
if TYPE_CHECKING:
    from corral.backends.base import EventSink
    from corral.kernel.cgroups import CgroupHost
    from corral.net.proxy import Resolver
    from corral.net.service import SandboxProxy
    from corral.policy.resolve import ResolvedPolicy


def agent_main_path() -> str:
    import corral.agent

    return os.path.join(os.path.dirname(os.path.realpath(corral.agent.__file__)), "main.py")


class HostAgentBackend(Backend):
    """Start the agent as a confined host process. Subclasses say how it confines itself (`hello`)."""

    def __init__(self, *, cgroups: CgroupHost | None = None, resolver: Resolver | None = None) -> None:
        self._cgroups = cgroups
        self._resolver = resolver  # the network proxy's resolver (None: the host's); tests map names with it

    @property
    def cgroups(self) -> CgroupHost:
        if self._cgroups is None:
            from corral.kernel.cgroups import CgroupHost

            self._cgroups = CgroupHost.detect()
        return self._cgroups

    def hello(
        self, rp: ResolvedPolicy, private: dict[str, str], *, proxy_port: int | None = None
    ) -> tuple[dict[str, object], bytes]:
        """The confinement message for the agent and the seccomp program it loads ("" for none).
        `proxy_port` is the network proxy's port on the host's loopback (network mode 'allow')."""
        raise NotImplementedError

    def start(self, rp: ResolvedPolicy, *, sandbox_id: str, events: EventSink | None = None) -> LiveSandbox:
        from corral.agent.client import AgentClient
        from corral.backends.live import AgentSandbox
        from corral.backends.namespace.launch import command_rlimits, rlimits_for
        from corral.kernel.spawn import Child, memfd_with, spawn

        if rp.limits.cpus is not None and "cpu" not in self.cgroups.controllers:
            raise UnsupportedPolicy(self.name, ("limits.cpus (no cpu cgroup controller here)",))
        private = self._private_dirs(rp)
        env = rp.env_dict
        proxy: SandboxProxy | None = None
        if rp.network.mode == "allow":
            from corral.net.service import SandboxProxy, proxy_env

            try:
                proxy = SandboxProxy.start_tcp(rp.network, events=events, resolver=self._resolver)
            except BaseException:
                _remove(private)
                raise
            assert proxy.port is not None
            env.update(proxy_env(proxy.port))
        if "/tmp" in private:
            env["TMPDIR"] = private["/tmp"]
        if rp.home in private:
            env["HOME"] = private[rp.home]
        # Sandbox path -> host path, longest prefix first: zones at their own paths, tmpfs zones
        # at their private directories.
        path_map = {z.mount: z.host for z in rp.zones if z.host is not None}
        path_map.update(private)
        rp = rp.replace(env=tuple(sorted(env.items())), cwd=translate(path_map, rp.cwd))
        host_sock, agent_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        log_fd = os.memfd_create("corral-agent-log", os.MFD_CLOEXEC)
        null_fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        cgroup = None
        child: Child | None = None
        try:
            limits = rp.limits
            if self.cgroups.mode != "none" and (limits.memory or limits.pids or limits.cpus):
                cgroup = self.cgroups.create(limits)
            argv = [os.path.realpath(sys.executable), "-E", "-s", "-S", "-B", agent_main_path()]
            agent_env = {**env, "CORRAL_AGENT_FD": str(agent_sock.fileno())}
            child = Child(spawn(argv, env=agent_env, stdio=(null_fd, log_fd, log_fd),
                                pass_fds=[agent_sock.fileno()], new_session=True))  # fmt: skip
            # The agent runs nothing before its hello, so attaching it now leaves no gap.
            if cgroup is not None:
                cgroup.attach(child.pid)
            hello, program = self.hello(rp, private, proxy_port=proxy.port if proxy is not None else None)
            controllers = self.cgroups.controllers if cgroup is not None else frozenset()
            hello["rlimits"] = rlimits_for(rp, controllers, agent=True)
            hello["command_rlimits"] = command_rlimits(rp)
            client = AgentClient(host_sock)
            client.handshake(hello, fds=[memfd_with("corral-seccomp", program)] if program else [])
        except BaseException as exc:
            log = _read_log(log_fd)
            if child is not None:
                child.kill()
                child.wait()
            if cgroup is not None:
                cgroup.destroy()
            host_sock.close()
            os.close(log_fd)
            _remove(private)
            if proxy is not None:
                proxy.stop()
            if isinstance(exc, LaunchError) and log:
                raise LaunchError(f"{exc}: {log}") from exc
            raise
        finally:
            agent_sock.close()
            os.close(null_fd)
        agent = child

        def teardown() -> None:
            if cgroup is not None:
                cgroup.kill()
            agent.kill()
            agent.wait()
            if cgroup is not None:
                cgroup.destroy()
            os.close(log_fd)
            _remove(private)
            if proxy is not None:
                proxy.stop()

        return AgentSandbox(backend=self.name, sandbox_id=sandbox_id, rp=rp, client=client, cgroup=cgroup,
                            teardown=teardown, path_map=path_map)  # fmt: skip

    def _private_dirs(self, rp: ResolvedPolicy) -> dict[str, str]:
        private: dict[str, str] = {}
        if any(zone.mode == "tmpfs" for zone in rp.zones):
            reap_stale_private_dirs()
        for zone in rp.zones:
            if zone.mode != "tmpfs":
                continue
            if zone.mount not in ("/tmp", rp.home):
                _remove(private)
                raise UnsupportedPolicy(self.name, (f"tmpfs zone {zone.mount} (only /tmp and the home directory "
                                                    "can be emulated without a mount namespace)",))  # fmt: skip
            # The pid in the name lets a later run remove what a killed one left (reap_stale_private_dirs).
            slug = zone.mount.strip("/").replace("/", "-")
            path = tempfile.mkdtemp(prefix=f"corral-{os.getpid()}-private-{slug}-")
            private[zone.mount] = path
        return private


def translate(path_map: dict[str, str], path: str) -> str:
    """`path` with its longest matching sandbox prefix replaced by the host directory behind it."""
    for mount in sorted(path_map, key=len, reverse=True):
        if path == mount or path.startswith(mount.rstrip("/") + "/"):
            return path_map[mount] + path[len(mount) :]
    return path


def _read_log(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 65536).decode(errors="replace").strip()
    except OSError:
        return ""


def reap_stale_private_dirs(directory: str | None = None) -> list[str]:
    """Remove the private directories of corral processes that no longer exist (killed before they
    could clean up): ours by owner and name, `corral-PID-private-...`. Returns what was removed."""
    directory = directory or tempfile.gettempdir()
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        parts = name.split("-", 2)
        if len(parts) < 3 or parts[0] != "corral" or not parts[1].isdigit() or not parts[2].startswith("private-"):
            continue
        if int(parts[1]) == os.getpid():
            continue
        path = os.path.join(directory, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if st.st_uid != os.getuid() or not stat.S_ISDIR(st.st_mode) or os.path.exists(f"/proc/{parts[1]}"):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _remove(private: dict[str, str]) -> None:
    for path in private.values():
        shutil.rmtree(path, ignore_errors=True)
