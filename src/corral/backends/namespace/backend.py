"""The `namespace` backend: bubblewrap namespaces + seccomp + cgroups (+ Landlock inside live sandboxes)."""

from __future__ import annotations

import errno
import os
import sys
import time

from corral.backends.base import Backend, Capabilities, LiveSandbox, Result, effective_timeout
from corral.backends.namespace.argv import AGENT_DIR, PROXY_PORT, PROXY_SOCKET, PYTHON_DIR, Extras
from corral.backends.namespace.launch import Bwrap, command_rlimits, find_bwrap, launch
from corral.errors import BackendUnavailable, LaunchError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from corral.backends.base import EventSink, OutputCallback
    from corral.kernel.cgroups import CgroupHost
    from corral.net.proxy import Resolver
    from corral.net.service import SandboxProxy
    from corral.policy.resolve import ResolvedPolicy

ALWAYS = frozenset({
    "exec.commands",
    "fs.isolation", "fs.remap", "fs.tmpfs", "proc.isolation", "net.none", "net.host", "net.allow",
    "syscall.filter", "limits.timeout", "limits.output", "limits.file_size", "limits.open_files",
})  # fmt: skip


class NamespaceBackend(Backend):
    name = "namespace"
    strength = 30

    def __init__(self, *, cgroups: CgroupHost | None = None, resolver: Resolver | None = None) -> None:
        self._bwrap: Bwrap | None = None
        self._cgroups = cgroups
        self._resolver = resolver  # the network proxy's resolver (None: the host's); tests map names with it

    @property
    def bwrap(self) -> Bwrap:
        if self._bwrap is None:
            self._bwrap = find_bwrap()
        return self._bwrap

    @property
    def cgroups(self) -> CgroupHost:
        if self._cgroups is None:
            from corral.kernel.cgroups import CgroupHost

            self._cgroups = CgroupHost.detect()
        return self._cgroups

    # ------------------------------------------------------------------ probe
    def probe(self) -> Capabilities:
        """Start a real sandbox and look at it from inside: seccomp on, no capabilities, no new privileges."""
        try:
            bwrap = self.bwrap
        except BackendUnavailable as exc:
            return Capabilities(name=self.name, available=False, strength=self.strength, reason=exc.reason, fix=exc.fix)
        blocked = _userns_blocked()
        if blocked:
            return Capabilities(
                name=self.name, available=False, strength=self.strength, reason=blocked[0], fix=blocked[1]
            )
        from corral.policy.model import Policy
        from corral.policy.resolve import resolve

        rp = resolve(Policy(zones=()), host_env={}, host_cwd="/")
        try:
            result = self.run(rp, ["/bin/sh", "-c", "grep -E '^(Seccomp|NoNewPrivs|CapEff):' /proc/self/status"],
                              sandbox_id="probe", timeout=20)  # fmt: skip
        except (LaunchError, OSError) as exc:
            return Capabilities(
                name=self.name, available=False, strength=self.strength,
                reason=f"bubblewrap {bwrap.version_text} could not start a sandbox: {str(exc).strip()}",
                fix=_userns_fix(),
            )  # fmt: skip
        fields = dict(line.split(":", 1) for line in result.stdout_text.splitlines() if ":" in line)
        problems = []
        if fields.get("Seccomp", "").strip() != "2":
            problems.append("seccomp filter not active")
        if fields.get("NoNewPrivs", "").strip() != "1":
            problems.append("no_new_privs not set")
        if fields.get("CapEff", "").strip().strip("0"):
            problems.append("capabilities not dropped")
        if not result.ok or problems:
            reason = "; ".join(problems) or f"the test sandbox failed: {result.stderr_text.strip() or result.detail}"
            return Capabilities(
                name=self.name, available=False, strength=self.strength, reason=reason, fix=_userns_fix()
            )
        cgroups = self.cgroups
        enforces = set(ALWAYS)
        enforces.update("limits.cpus" if c == "cpu" else f"limits.{c}" for c in cgroups.controllers)
        # rlimits stand in for pids (RLIMIT_NPROC) and memory (RLIMIT_DATA) without cgroups.
        enforces.update(("limits.pids", "limits.memory"))
        notes = [f"bubblewrap {bwrap.version_text} ({bwrap.path})"]
        if "memory" not in cgroups.controllers:
            notes.append("memory limit is an RLIMIT_DATA per process (no memory cgroup here)")
        notes.append("Landlock is layered inside live sandboxes where the kernel has it")
        notes.append("network 'allow': loopback only inside; a host proxy (HTTP, CONNECT, SOCKS5) via a unix socket")
        if os.geteuid() == 0:  # as a user the pids limit needs no cgroup (RLIMIT_NPROC in the sandbox's namespace)
            from corral.kernel.cgroups import attach_wait_note

            note = attach_wait_note(cgroups)
            if note:
                notes.append(note)
        return Capabilities(
            name=self.name, available=True, strength=self.strength, enforces=frozenset(enforces),
            limits_via=cgroups.describe, notes=tuple(notes),
        )  # fmt: skip

    # ------------------------------------------------------------------ one-shot
    def run(
        self,
        rp: ResolvedPolicy,
        argv: Sequence[str],
        *,
        sandbox_id: str,
        stdin: bytes | int | None = None,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
        output: tuple[int, int] | None = None,
        events: EventSink | None = None,
    ) -> Result:
        """One command in a fresh sandbox, without an agent: bubblewrap runs the command itself."""
        from corral.kernel.spawn import memfd_with

        # Told apart here, where they can be named, rather than by bubblewrap's own message after it fails.
        missing = rp.directory_status(rp.cwd, fresh=True)
        what, subject = "working directory", rp.cwd
        if not missing:
            missing = rp.program_status(argv[0], fresh=True)
            what, subject = "command", argv[0]
        if not missing and rp.limits.pids == 1:
            # bubblewrap's init is one of the sandbox's processes: a limit of 1 leaves the command none.
            missing, what, subject = errno.EAGAIN, "command", argv[0]
        if missing:
            from corral.backends.outcome import not_started

            return not_started(argv, missing, os.strerror(missing), what=what, subject=subject,
                               pids_limit=rp.limits.pids, output=output)  # fmt: skip
        timeout = effective_timeout(timeout, rp.limits.timeout)
        ours: list[int] = []  # descriptors to close once bubblewrap has its copies
        readers: dict[str, int] = {}
        if output is None:
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            readers = {"stdout": out_r, "stderr": err_r}
            ours += [out_w, err_w]
            out_fds = (out_w, err_w)
        else:
            out_fds = output
        if isinstance(stdin, int):
            in_fd = stdin
        else:
            in_fd = (
                memfd_with("corral-stdin", stdin)
                if stdin is not None
                else os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
            )
            ours.append(in_fd)
        started = time.monotonic()
        proxy: SandboxProxy | None = None
        try:
            command, extras = list(argv), None
            if rp.network.mode == "allow":
                # The command starts behind the in-sandbox forwarder to the proxy (see corral.agent.forward).
                python, extras = agent_python()
                proxy, rp, extras = self._start_proxy(rp, extras, events)
                command = [python, "-E", "-s", "-S", "-B", f"{AGENT_DIR}/forward.py", str(PROXY_PORT),
                           PROXY_SOCKET, "--", *argv]  # fmt: skip
            launched = launch(self.bwrap, rp, command, cgroups=lambda: self.cgroups, stdio=(in_fd, *out_fds),
                              extras=extras)  # fmt: skip
        except BaseException:
            for fd in readers.values():
                os.close(fd)
            if proxy is not None:
                proxy.stop()
            raise
        finally:
            for fd in ours:
                os.close(fd)
        try:
            # Loaded now, while bubblewrap starts the command, rather than before the sandbox.
            from corral.backends.outcome import classify
            from corral.kernel.pump import pump

            deadline = None if timeout is None else started + timeout
            pumped = pump(readers, deadline=deadline, output_limit=rp.limits.output, on_output=on_output,
                          kill=launched.kill, watch=launched.monitor.pidfd)  # fmt: skip
            status = launched.wait()
            assert status is not None
            wall = time.monotonic() - started
            if not launched.command_started() and not (pumped.timed_out or pumped.output_exceeded):
                why = pumped.get("stderr").decode(errors="replace").strip() or "see the messages above"
                raise LaunchError(f"the sandbox failed to start: {why}")
            return classify(argv, shell_to_subprocess(status), pumped, limits=rp.limits, timeout=timeout,
                            wall_time=wall, cgroup=launched.cgroup, rlimits=launched.rlimits)  # fmt: skip
        finally:
            launched.kill()
            launched.wait()
            launched.release()
            if proxy is not None:
                proxy.stop()

    def _start_proxy(
        self, rp: ResolvedPolicy, extras: Extras, events: EventSink | None
    ) -> tuple[SandboxProxy, ResolvedPolicy, Extras]:
        """The sandbox's network proxy on a unix socket, the socket mounted in, the proxy variables set."""
        from corral.net.service import SandboxProxy, proxy_env

        proxy = SandboxProxy.start_unix(rp.network, events=events, resolver=self._resolver)
        assert proxy.socket_path is not None
        env = {**rp.env_dict, **proxy_env(PROXY_PORT)}
        return proxy, rp.replace(env=tuple(sorted(env.items()))), extras.replace(proxy_socket=proxy.socket_path)

    # ------------------------------------------------------------------ live
    def start(self, rp: ResolvedPolicy, *, sandbox_id: str, events: EventSink | None = None) -> LiveSandbox:
        import socket

        from corral.agent.client import AgentClient
        from corral.backends.live import AgentSandbox
        from corral.kernel.spawn import on_lasting_thread

        python, extras = agent_python()
        hello: dict[str, object] = {"landlock": landlock_rules(rp), "command_rlimits": command_rlimits(rp)}
        proxy: SandboxProxy | None = None
        if rp.network.mode == "allow":
            proxy, rp, extras = self._start_proxy(rp, extras, events)
            hello["proxy"] = {"port": PROXY_PORT, "socket": PROXY_SOCKET}
        host_sock, agent_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        log_fd = os.memfd_create("corral-agent-log", os.MFD_CLOEXEC)
        null_fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        agent_fd = agent_sock.fileno()
        command = [python, "-E", "-s", "-S", "-B", f"{AGENT_DIR}/main.py"]
        agent_rp = rp.replace(env=(*rp.env, ("CORRAL_AGENT_FD", str(agent_fd))))
        try:
            # bubblewrap dies with the thread that starts it (--die-with-parent): one that lasts.
            launched = on_lasting_thread(lambda: launch(
                self.bwrap, agent_rp, command, cgroups=self.cgroups, stdio=(null_fd, log_fd, log_fd),
                pass_fds=[agent_fd], extras=extras, want_pids_cgroup=True, as_pid_1=True))  # fmt: skip
        except BaseException:
            host_sock.close()
            os.close(log_fd)
            if proxy is not None:
                proxy.stop()
            raise
        finally:
            agent_sock.close()
            os.close(null_fd)

        def teardown() -> None:
            launched.kill()
            launched.wait()
            launched.release()
            os.close(log_fd)
            if proxy is not None:
                proxy.stop()

        client = AgentClient(host_sock)
        try:
            client.handshake(hello)
        except BaseException as exc:
            teardown_log = _read_log(log_fd)
            host_sock.close()
            teardown()
            if isinstance(exc, LaunchError) and teardown_log:
                raise LaunchError(f"{exc}: {teardown_log}") from exc
            raise
        return AgentSandbox(backend=self.name, sandbox_id=sandbox_id, rp=rp, client=client,
                            cgroup=launched.cgroup, teardown=teardown, rlimits=launched.rlimits)  # fmt: skip


def shell_to_subprocess(code: int) -> int:
    """bubblewrap reports a signal death as 128+N, as shells do; corral reports -N, as subprocess does."""
    return -(code - 128) if 128 < code <= 128 + 64 else code


def agent_python() -> tuple[str, Extras]:
    """A Python for the agent inside the sandbox: the system's when it has one (>= 3.8), else ours."""
    import corral.agent

    agent_dir = os.path.dirname(os.path.realpath(corral.agent.__file__))
    for candidate in ("/usr/bin/python3", "/bin/python3"):
        target = os.path.realpath(candidate)
        name = os.path.basename(target)
        if os.access(target, os.X_OK) and name.startswith("python3."):
            minor = name[len("python3.") :]
            if minor.isdigit() and int(minor) >= 8:
                return candidate, Extras(agent_dir=agent_dir)
    prefix = os.path.realpath(sys.base_prefix)
    executable = os.path.realpath(sys.executable)
    if not executable.startswith(prefix + "/"):
        raise BackendUnavailable("namespace", f"no Python for the sandbox agent (looked in /usr/bin and {prefix})",
                                 fix="apt-get install python3-minimal")  # fmt: skip
    return PYTHON_DIR + executable[len(prefix) :], Extras(agent_dir=agent_dir, python_prefix=prefix)


def landlock_rules(rp: ResolvedPolicy) -> dict[str, object]:
    """Landlock paths as the agent sees them inside the sandbox: a second wall behind the mounts."""
    ro = [m.dest for m in rp.system] + ["/etc", "/proc", AGENT_DIR, PYTHON_DIR, "/dev"]
    rw = ["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty", "/dev/pts",
          "/dev/ptmx", "/dev/shm"]  # fmt: skip
    for zone in rp.zones:
        (rw if zone.mode in ("rw", "tmpfs") else ro).append(zone.mount)
    if any(z.mount == "/tmp" for z in rp.zones):
        rw.append("/var/tmp")
    return {"ro": ro, "rw": rw}


def _read_log(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 65536).decode(errors="replace").strip()
    except OSError:
        return ""


def _userns_blocked() -> tuple[str, str] | None:
    """Why unprivileged user namespaces are off here, if they are."""
    checks: tuple[tuple[str, str, str, str], ...] = (
        ("/proc/sys/user/max_user_namespaces", "0", "user namespaces are disabled (user.max_user_namespaces = 0)",
         "sysctl -w user.max_user_namespaces=15000"),
        ("/proc/sys/kernel/unprivileged_userns_clone", "0", "unprivileged user namespaces are disabled",
         "sysctl -w kernel.unprivileged_userns_clone=1"),
    )  # fmt: skip
    if os.getuid() == 0:
        checks = checks[:1]
    for path, bad, reason, fix in checks:
        try:
            with open(path) as f:
                if f.read().strip() == bad:
                    return reason, fix
        except OSError:
            continue
    return None


def _userns_fix() -> str:
    try:
        with open("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") as f:
            if f.read().strip() == "1":
                return (
                    "Ubuntu's AppArmor blocks unprivileged user namespaces: "
                    "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0, or use --backend landlock"
                )
    except OSError:
        pass
    if os.path.exists("/.dockerenv"):
        return (
            "inside a container, run it with --security-opt seccomp=unconfined "
            "--security-opt apparmor=unconfined, or use --backend landlock"
        )
    return "check that user namespaces are enabled, or use --backend landlock"
