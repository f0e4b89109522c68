"""The `gvisor` backend: gVisor's user-space kernel (runsc) between the sandbox and the host kernel.

Two roads, chosen by the policy:

- **runsc directly** (no engine needed), for corral's own system view (no `[container] image`):
  corral writes an OCI bundle from the policy (`corral.backends.oci`: a skeleton root with corral's
  /etc, the host's system directories read-only, the zones, no capabilities, no_new_privs,
  rlimits, memory/pids/cpu resources) and runs `runsc run` with corral's agent as the container's
  process. The agent's socket is the container's stdin, so descriptors pass straight in; the
  agent stacks corral's seccomp filter inside gVisor. The platform is the first that works here
  among systrap, kvm and ptrace (or `CORRAL_GVISOR_PLATFORM`), remembered per runsc version.
- **runsc as an engine runtime**, for a named image: the `docker` backend with the `runsc`
  runtime, which the engine must have registered with `--host-uds=open` (the agent connects to a
  host socket), best with `--network=none` too — `corral doctor` says how.

Sandboxes started directly are recorded under a private state directory (`runsc --root`); the
next start kills and deletes any whose owner process is gone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

from corral.backends.base import Backend, Capabilities, LiveSandbox, Result
from corral.backends.docker import ALWAYS, DockerBackend
from corral.backends.live import AgentSandbox
from corral.backends.registry import cached_lines, remember_lines
from corral.errors import BackendUnavailable, LaunchError, SandboxLost, UnsupportedPolicy

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from corral.backends.base import EventSink, OutputCallback
    from corral.backends.engine import Engine
    from corral.net.service import SandboxProxy
    from corral.policy.resolve import ResolvedPolicy

PLATFORMS = ("systrap", "kvm", "ptrace")
PLATFORM_TRIAL_TIMEOUT = 5.0
HOST_UDS_ARGS = ("--host-uds=open", "--host-uds=all", "--fsgofer-host-uds", "--host-uds=connect")
RUNSC_RUNTIME = "runsc"
# Old gVisor shows no NoNewPrivs line in /proc/self/status: ask prctl(PR_GET_NO_NEW_PRIVS) instead.
PROBE_SCRIPT = (
    "grep -E '^(Seccomp|CapEff):' /proc/self/status; "
    "python3 -c 'import ctypes; print(\"NoNewPrivs:\", ctypes.CDLL(None).prctl(39, 0, 0, 0, 0))'"
)


class Runsc:
    """A runsc binary, its version, its platforms and corral's state directory for it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.root = _state_root()
        self._version: str | None = None
        self._platforms: tuple[str, ...] | None = None

    @property
    def version(self) -> str:
        if self._version is None:
            out = _run([self.path, "--version"], timeout=20).stdout
            first = out.splitlines()[0] if out.strip() else "runsc ?"
            self._version = first.replace("runsc version", "").strip()
        return self._version

    @property
    def platforms(self) -> tuple[str, ...]:
        """The platforms this runsc knows, in corral's order of preference."""
        if self._platforms is None:
            text = _run([self.path, "flags"], timeout=20).stdout
            line = next((ln for ln in text.splitlines() if "platform to use" in ln), "")
            self._platforms = tuple(p for p in PLATFORMS if p in line) or ("ptrace",)
        return self._platforms

    def command(self, *args: str, platform: str, network: str = "none", host_uds: bool = False) -> list[str]:
        """`host_uds`: the sandbox may connect to a host unix socket mounted in (the network proxy's)."""
        argv = [
            self.path,
            "--root",
            self.root,
            "--platform",
            platform,
            "--network",
            network,
            "--file-access-mounts=shared",
        ]
        if host_uds:
            argv.append("--host-uds=open")
        if os.getuid() != 0:
            argv += ["--rootless", "--ignore-cgroups"]
        return [*argv, *args]

    def delete(self, container_id: str) -> None:
        _run([self.path, "--root", self.root, "delete", "--force", container_id], timeout=30)


def find_runsc() -> Runsc:
    path = shutil.which("runsc") or shutil.which("runsc", path="/usr/bin:/usr/local/bin:/usr/sbin:/usr/local/sbin")
    if path is None:
        raise BackendUnavailable(
            "gvisor",
            "runsc (gVisor) is not installed",
            fix="sudo apt-get install runsc, or see https://gvisor.dev/docs/user_guide/install/",
        )
    return Runsc(path)


class _EngineRuntime(DockerBackend):
    """gVisor through a container engine: the docker backend with the runsc runtime."""

    name = "gvisor"
    strength = 50
    runtime = RUNSC_RUNTIME

    def check_runtime(self, engine: Engine) -> None:
        runtimes = engine.runtimes
        if RUNSC_RUNTIME not in runtimes:
            raise BackendUnavailable(
                self.name,
                f"the engine ({engine.describe}) has no '{RUNSC_RUNTIME}' runtime registered",
                fix="sudo runsc install -- --host-uds=open --network=none && sudo systemctl restart docker "
                "(adds runsc to /etc/docker/daemon.json)",
            )
        args = self._runtime_args(engine)
        if not any(a in HOST_UDS_ARGS for a in args):
            raise BackendUnavailable(
                self.name,
                f"the engine's runsc runtime does not let a sandbox reach a host socket (runtimeArgs {args})",
                fix='add "--host-uds=open" to runtimeArgs of runsc in /etc/docker/daemon.json, then restart the daemon',
            )

    def start(self, rp: ResolvedPolicy, *, sandbox_id: str, events: EventSink | None = None) -> LiveSandbox:
        args = self._runtime_args(self.engine)
        if rp.network.mode == "host" and "--network=none" in args:
            raise UnsupportedPolicy(self.name, ("network mode 'host' (the engine's runsc runtime runs with "
                                                "--network=none)",))  # fmt: skip
        return super().start(rp, sandbox_id=sandbox_id, events=events)

    @staticmethod
    def _runtime_args(engine: Engine) -> list[str]:
        raw = engine.runtimes.get(RUNSC_RUNTIME, {}).get("runtimeArgs")
        return [str(a) for a in raw] if isinstance(raw, list) else []

    def launch_fix(self) -> str:
        return "check the runsc runtime (runsc logs: add --debug-log to its runtimeArgs); corral doctor shows details"


class GVisorBackend(Backend):
    name = "gvisor"
    strength = 50

    def __init__(self) -> None:
        self._runsc: Runsc | None = None
        self._engine_backend: _EngineRuntime | None = None
        self._platform: str | None = None

    @property
    def runsc(self) -> Runsc:
        if self._runsc is None:
            self._runsc = find_runsc()
        return self._runsc

    @property
    def engine_backend(self) -> _EngineRuntime:
        if self._engine_backend is None:
            self._engine_backend = _EngineRuntime()
        return self._engine_backend

    # ------------------------------------------------------------------ probe
    def probe(self) -> Capabilities:
        direct_problem: tuple[str, str] | None = None
        notes: list[str] = []
        try:
            runsc = self.runsc
            platform = self.platform(fresh=True)
            notes.append(f"runsc {runsc.version} ({runsc.path}) directly, platform {platform}")
        except BackendUnavailable as exc:
            direct_problem = (exc.reason, exc.fix)
        engine_caps = self._probe_engine()
        if engine_caps.available:
            notes.append(f"named images through the engine's runsc runtime ({engine_caps.notes[0]})")
        else:
            notes.append(f"named images: not available ({engine_caps.reason}; fix: {engine_caps.fix})")
        if direct_problem is not None and not engine_caps.available:
            return Capabilities(
                name=self.name,
                available=False,
                strength=self.strength,
                reason=direct_problem[0],
                fix=direct_problem[1],
                notes=tuple(notes),
            )
        if direct_problem is not None:
            notes.insert(0, f"runsc directly: not available ({direct_problem[0]})")
        enforces = set(ALWAYS) | {"limits.pids"}  # ALWAYS has net.allow: the proxy's socket is mounted in
        if os.getuid() == 0:
            enforces |= {"limits.memory", "limits.cpus"}
        else:
            notes.append("rootless runsc: commands run as root in its user namespace (you outside); it ignores "
                         "cgroups, so no memory or cpus limit (run as root for them)")  # fmt: skip
        if engine_caps.available and direct_problem is not None:
            enforces = set(engine_caps.enforces)
        notes.append("a memory limit bounds the whole sandbox: exceeding it ends the sandbox, not one command")
        notes.append("commands run with your uid (no user namespace); the policy's uid is not applied")
        limits_via = "the sandbox's cgroup (runsc)" if direct_problem is None else engine_caps.limits_via
        return Capabilities(
            name=self.name,
            available=True,
            strength=self.strength,
            enforces=frozenset(enforces),
            limits_via=limits_via,
            notes=tuple(notes),
        )

    def _probe_engine(self) -> Capabilities:
        try:
            from corral.backends.engine import connect

            engine = connect(self.name)
        except BackendUnavailable as exc:
            return Capabilities(name=self.name, available=False, strength=self.strength, reason=exc.reason, fix=exc.fix)
        try:
            self.engine_backend._engine = engine
            self.engine_backend.check_runtime(engine)
        except BackendUnavailable as exc:
            return Capabilities(name=self.name, available=False, strength=self.strength, reason=exc.reason, fix=exc.fix)
        return self.engine_backend.probe()

    def platform(self, *, fresh: bool = False) -> str:
        """The runsc platform to use: CORRAL_GVISOR_PLATFORM, a remembered choice, or the first that works."""
        forced = os.environ.get("CORRAL_GVISOR_PLATFORM")
        if forced:
            return forced
        if self._platform is not None and not fresh:
            return self._platform
        runsc = self.runsc
        key = f"{runsc.path}|{runsc.version}|{os.uname().release}|{os.getuid()}"
        cached = None if fresh else cached_lines("gvisor-platform", key)
        if cached and cached[0] in PLATFORMS:
            self._platform = cached[0]
            return cached[0]
        problems = []
        for candidate in runsc.platforms:
            if candidate == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
                problems.append("kvm: /dev/kvm is not accessible")
                continue
            problem = self._try_platform(candidate)
            if problem is None:
                self._platform = candidate
                remember_lines("gvisor-platform", key, [candidate])
                return candidate
            problems.append(f"{candidate}: {problem}")
        raise BackendUnavailable(
            self.name,
            f"runsc {runsc.version} could not start a sandbox on any platform: " + "; ".join(problems),
            fix="run corral as root (runsc needs it here), or check runsc's own logs",
        )

    def _try_platform(self, platform: str) -> str | None:
        from corral.policy.model import Policy, Zone
        from corral.policy.resolve import resolve

        rp = resolve(Policy(zones=(Zone.tmpfs("/tmp"),)), host_env={}, host_cwd="/")
        try:
            live = self._start_direct(rp, sandbox_id="probe", platform=platform, start_timeout=PLATFORM_TRIAL_TIMEOUT)
        except (LaunchError, OSError) as exc:
            return str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__
        try:
            result = live.exec(["/bin/sh", "-c", PROBE_SCRIPT], timeout=PLATFORM_TRIAL_TIMEOUT)
        finally:
            live.stop()
        fields = dict(line.split(":", 1) for line in result.stdout_text.splitlines() if ":" in line)
        if not result.ok:
            return f"the test command failed: {result.stderr_text.strip() or result.detail}"
        if fields.get("Seccomp", "").strip() != "2":
            return "seccomp filter not active inside"
        if fields.get("NoNewPrivs", "").strip() != "1":
            return "no_new_privs not set inside"
        if fields.get("CapEff", "").strip().strip("0"):
            return "capabilities not dropped inside"
        return None

    # ------------------------------------------------------------------ live
    def start(self, rp: ResolvedPolicy, *, sandbox_id: str, events: EventSink | None = None) -> LiveSandbox:
        if rp.policy.container.image is not None:
            return self.engine_backend.start(rp, sandbox_id=sandbox_id, events=events)
        try:
            runsc = self.runsc
        except BackendUnavailable:
            # no runsc here, but an engine with the runsc runtime: corral's own image through it
            return self.engine_backend.start(rp, sandbox_id=sandbox_id, events=events)
        return self._start_direct(rp, sandbox_id=sandbox_id, platform=self.platform(), runsc=runsc, events=events)

    def _start_direct(
        self,
        rp: ResolvedPolicy,
        *,
        sandbox_id: str,
        platform: str,
        runsc: Runsc | None = None,
        start_timeout: float = 30.0,
        events: EventSink | None = None,
    ) -> LiveSandbox:
        import socket

        from corral.agent.client import AgentClient
        from corral.backends.containers import StateDir, hello_for, owner_label, proxy_hello, start_proxy
        from corral.backends.namespace.argv import AGENT_DIR
        from corral.backends.namespace.backend import agent_python
        from corral.backends.oci import container_mounts, identity_etc, oci_config, skeleton
        from corral.kernel.cgroups import Cgroup
        from corral.kernel.spawn import Child, memfd_with, spawn

        runsc = runsc or self.runsc
        reap_orphans(runsc)
        # Rootless runsc maps the caller to root inside its user namespace: root inside is the
        # caller outside, the one identity that owns the caller's files.
        uid, gid = (os.getuid(), os.getgid()) if os.getuid() == 0 else (0, 0)
        python, extras = agent_python()
        os.makedirs(os.path.join(runsc.root, "sandboxes"), mode=0o700, exist_ok=True)
        state = StateDir(sandbox_id, base=os.path.join(runsc.root, "sandboxes"))
        container_id = f"corral-{sandbox_id}-{os.urandom(4).hex()}"
        child: Child | None = None
        cgroup: Cgroup | None = None
        proxy: SandboxProxy | None = None
        if rp.network.mode == "allow":
            proxy, rp = start_proxy(rp, events)
        host_sock, agent_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        log_fd = os.memfd_create("corral-runsc-log", os.MFD_CLOEXEC)
        try:
            mounts = container_mounts(
                rp,
                host_system=True,
                etc="rootfs",
                agent_dir=str(extras.agent_dir),
                python_prefix=extras.python_prefix,
                proxy_socket=proxy.socket_path if proxy is not None else None,
                uid=uid,
                gid=gid,
            )
            file_dests = frozenset(m.dest for m in mounts if m.source is not None and os.path.isfile(m.source))
            skel = skeleton(rp, mounts, etc_files=identity_etc(rp, uid=uid, gid=gid), file_dests=file_dests)
            bundle = os.path.join(state.path, "bundle")
            _materialize(os.path.join(bundle, "rootfs"), skel)
            limits = rp.limits
            cgroups_path = None
            if limits.memory is not None or limits.cpus is not None:
                if os.getuid() != 0:
                    raise UnsupportedPolicy(
                        self.name, ("limits.memory / limits.cpus (runsc without root ignores cgroups)",)
                    )
                # corral's own cgroup, which runsc joins (and leaves alone): its counters outlive the sandbox
                cgroups_path = f"/corral-gvisor/{container_id}"
                cgroup = Cgroup.create_at(cgroups_path, limits)
            env = [("CORRAL_AGENT_FD", "0"), ("PATH", dict(rp.env)["PATH"])]
            config = oci_config(
                rp,
                mounts,
                args=[python, "-E", "-s", "-S", "-B", f"{AGENT_DIR}/main.py"],
                env=env,
                rootfs="rootfs",
                uid=uid,
                gid=gid,
                cgroups_path=cgroups_path,
                pids_cgroup=False,
                annotations=[("corral.owner", owner_label()), ("corral.sandbox", sandbox_id)],
            )
            with open(os.path.join(bundle, "config.json"), "w", encoding="utf-8") as f:
                json.dump(config, f, indent=1)
            with open(os.path.join(state.path, "owner"), "w", encoding="utf-8") as f:
                f.write(f"{container_id}\n{owner_label()}\n")
            network = "host" if rp.network.mode == "host" else "none"
            argv = runsc.command("run", "--bundle", bundle, container_id, platform=platform, network=network,
                                 host_uds=proxy is not None)  # fmt: skip
            child = Child(
                spawn(
                    argv,
                    env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                    stdio=(agent_sock.fileno(), log_fd, log_fd),
                    new_session=True,
                )
            )
            agent_sock.close()
            client = AgentClient(host_sock)
            # The pids limit is an RLIMIT_NPROC inside: gVisor counts its own processes (a host pids
            # cgroup would count the sentry's threads instead).
            hello, program = hello_for(rp, landlock=None, cgroup_controllers=frozenset({"memory", "cpu"}))
            if proxy is not None:
                hello["proxy"] = proxy_hello(proxy)
            client.handshake(hello, fds=[memfd_with("corral-seccomp", program)], timeout=start_timeout)
        except BaseException as exc:
            agent_sock.close()
            host_sock.close()
            log = _read_log(log_fd)
            os.close(log_fd)
            if child is not None:
                child.kill()
                child.wait()
            runsc.delete(container_id)
            if cgroup is not None:
                cgroup.destroy()
            state.remove()
            if proxy is not None:
                proxy.stop()
            if isinstance(exc, (LaunchError, OSError)) and log:
                raise LaunchError(f"the sandbox did not start ({exc}): {log}") from exc
            raise
        monitor = child
        sandbox_cgroup = cgroup

        def teardown() -> None:
            status = monitor.wait(timeout=2.0)
            if status is None:
                monitor.kill()
                monitor.wait()
            if status != 0:  # `runsc run` deletes its container when it ends well; otherwise we do
                runsc.delete(container_id)
            if sandbox_cgroup is not None:
                live.memory_exhausted = sandbox_cgroup.memory_exhausted()
                sandbox_cgroup.destroy()
            os.close(log_fd)
            state.remove()
            if proxy is not None:
                proxy.stop()

        live = GVisorSandbox(
            backend=self.name, sandbox_id=sandbox_id, rp=rp, client=client, cgroup=None, teardown=teardown
        )
        return live


class GVisorSandbox(AgentSandbox):
    """A live runsc sandbox. Its memory limit bounds the whole sandbox (gVisor's kernel included):
    a command that exceeds it ends the sandbox, which is reported as that command's memory limit."""

    memory_exhausted = False

    def exec(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | int | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
        output: tuple[int, int] | None = None,
    ) -> Result:
        if self._stopped and self.memory_exhausted:
            raise SandboxLost(f"sandbox {self.id} ended: its memory limit was exceeded")
        # gVisor reads and writes an imported regular file at its own offset, from 0 (over what the
        # host wrote before, or again from the start): give the sandbox pipes, copied here.
        if output is not None and any(_is_regular_file(fd) for fd in output):
            with _Relay(output) as pipes:
                return self.exec(argv, stdin=stdin, env=env, cwd=cwd, timeout=timeout, on_output=on_output,
                                 output=pipes)  # fmt: skip
        if isinstance(stdin, int) and _is_regular_file(stdin):
            with _StdinRelay(stdin) as pipe:
                return self.exec(argv, stdin=pipe, env=env, cwd=cwd, timeout=timeout, on_output=on_output,
                                 output=output)  # fmt: skip
        started = time.monotonic()
        try:
            return super().exec(
                argv, stdin=stdin, env=env, cwd=cwd, timeout=timeout, on_output=on_output, output=output
            )
        except SandboxLost:
            if not self.memory_exhausted:
                raise
        from corral.units import format_size

        limit = format_size(self.rp.limits.memory or 0)
        message = f"killed: memory limit {limit} (it bounds the whole gVisor sandbox, which ended)"
        return Result(
            argv=argv,
            returncode=-9,
            signal=9,
            reason="memory",
            detail=message,
            stderr=f"corral: {message}\n".encode(),
            wall_time=time.monotonic() - started,
        )


def _is_regular_file(fd: int) -> bool:
    import stat

    try:
        return stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return False


class _Relay:
    """Two pipes whose contents a thread copies into two host descriptors, until both close."""

    def __init__(self, targets: tuple[int, int]) -> None:
        self.targets = targets
        self.pipes = [os.pipe2(os.O_CLOEXEC), os.pipe2(os.O_CLOEXEC)]
        import threading

        self.thread = threading.Thread(target=self._copy, name="corral-gvisor-relay", daemon=True)

    def __enter__(self) -> tuple[int, int]:
        self.thread.start()
        return self.pipes[0][1], self.pipes[1][1]

    def __exit__(self, *exc: object) -> None:
        for _, w in self.pipes:
            os.close(w)  # the command has ended: what it wrote is in the pipes, then EOF
        self.thread.join()
        for r, _ in self.pipes:
            os.close(r)

    def _copy(self) -> None:
        import select

        sources = {self.pipes[0][0]: self.targets[0], self.pipes[1][0]: self.targets[1]}
        poller = select.poll()
        for fd in sources:
            poller.register(fd, select.POLLIN)
        while sources:
            for fd, _ in poller.poll():
                chunk = os.read(fd, 65536)
                if not chunk:
                    poller.unregister(fd)
                    del sources[fd]
                    continue
                view = memoryview(chunk)
                try:
                    while view:
                        view = view[os.write(sources[fd], view) :]
                except OSError:
                    pass  # the reader went away: keep draining so the command never blocks


class _StdinRelay:
    """A pipe a thread fills from a host file, from its current offset (the command may stop
    reading early: the copy then stops too, at the pipe's EPIPE)."""

    def __init__(self, source: int) -> None:
        import threading

        self.source = source
        self.r, self.w = os.pipe2(os.O_CLOEXEC)
        self.thread = threading.Thread(target=self._copy, name="corral-gvisor-stdin", daemon=True)

    def __enter__(self) -> int:
        self.thread.start()
        return self.r

    def __exit__(self, *exc: object) -> None:
        os.close(self.r)  # the command has ended: a blocked copy gets EPIPE
        self.thread.join()

    def _copy(self) -> None:
        try:
            while chunk := os.read(self.source, 65536):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(self.w, view) :]
        except OSError:
            pass
        finally:
            os.close(self.w)


def reap_orphans(runsc: Runsc) -> list[str]:
    """Kill and delete directly started sandboxes whose owner process is gone; returns their ids."""
    from corral.backends.containers import owner_gone

    base = os.path.join(runsc.root, "sandboxes")
    try:
        names = os.listdir(base)
    except OSError:
        return []
    reaped = []
    for name in names:
        path = os.path.join(base, name)
        try:
            with open(os.path.join(path, "owner"), encoding="utf-8") as f:
                container_id, owner = [*f.read().splitlines(), "", ""][:2]
        except OSError:
            # a state directory still being written, or one whose owner died before writing it
            if time.time() - _mtime(path) > 60:
                shutil.rmtree(path, ignore_errors=True)
            continue
        if owner and owner_gone(owner):
            if container_id:
                runsc.delete(container_id)
                if os.getuid() == 0:
                    from corral.kernel.cgroups import Cgroup

                    try:
                        Cgroup.create_at(f"/corral-gvisor/{container_id}", None).destroy()
                    except OSError:
                        pass
            shutil.rmtree(path, ignore_errors=True)
            reaped.append(container_id)
    return reaped


def _materialize(rootfs: str, skel: object) -> None:
    from corral.backends.oci import Skeleton

    assert isinstance(skel, Skeleton)
    os.makedirs(rootfs, mode=0o755)
    os.chmod(rootfs, 0o755)
    for d in skel.dirs:
        path = rootfs + d
        os.makedirs(path, mode=0o755, exist_ok=True)
        if d in ("/tmp", "/var/tmp"):
            os.chmod(path, 0o1777)
    for path, target in skel.symlinks:
        os.makedirs(os.path.dirname(rootfs + path), exist_ok=True)
        os.symlink(target, rootfs + path)
    for path, content in skel.files:
        os.makedirs(os.path.dirname(rootfs + path), exist_ok=True)
        with open(rootfs + path, "wb") as f:
            f.write(content)
        os.chmod(rootfs + path, 0o644)


def _state_root() -> str:
    if os.getuid() == 0:
        return "/run/corral/runsc"
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    if runtime_dir and os.path.isdir(runtime_dir):
        return os.path.join(runtime_dir, "corral", "runsc")
    return f"/tmp/corral-{os.getuid()}/runsc"


def _run(argv: list[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(argv, 255, "", str(exc))


def _read_log(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 65536).decode(errors="replace").strip()[-2000:]
    except OSError:
        return ""


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0
