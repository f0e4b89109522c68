"""The `docker` backend: one container per live sandbox, through the Docker Engine API (or Podman's).

A sandbox is a container with a read-only root (corral's own skeleton image with the host's
system directories mounted read-only, or a named image), corral's /etc, the policy's zones as
bind mounts and tmpfs, no network (`none`) unless the policy says `host`, every capability
dropped, no-new-privileges, the engine's default seccomp profile with corral's filter stacked on
it, and the memory (without swap), pids and cpu limits as the container's cgroup. Its only
process is corral's agent (see `corral.backends.containers` for why the agent rather than the exec
API), connected through a socket in a private host directory; commands run as the caller's uid
(a container has no user namespace of its own here, so files keep their owners, as on the
namespace backend).

Containers carry the labels `corral.sandbox`, `corral.backend` and `corral.owner` (boot id, pid
namespace, pid and start time of the corral process). A stopped sandbox removes its container;
a crashed corral's agent sees its socket close and exits, and the next start reaps any container
whose owner is gone. The engine's own socket is never mounted: a zone that would expose it is refused.
"""

from __future__ import annotations

import os
import time

from corral.backends.base import Backend, Capabilities, LiveSandbox
from corral.errors import BackendUnavailable, LaunchError, UnsupportedPolicy

TYPE_CHECKING = False
if TYPE_CHECKING:
    from corral.backends.base import EventSink
    from corral.backends.engine import Engine
    from corral.backends.oci import MountSpec
    from corral.net.service import SandboxProxy
    from corral.policy.resolve import ResolvedPolicy

ALWAYS = frozenset(
    {
        "exec.commands",
        "fs.isolation",
        "fs.remap",
        "fs.tmpfs",
        "proc.isolation",
        "net.none",
        "net.host",
        "net.allow",
        "syscall.filter",
        "limits.timeout",
        "limits.output",
        "limits.file_size",
        "limits.open_files",
    }
)
PROBE_SCRIPT = (
    "cat /.corral-probe/marker; grep -E '^(Seccomp|CapEff):' /proc/self/status; "
    # prctl(PR_GET_NO_NEW_PRIVS) rather than /proc/self/status, which old gVisor lacks the line in
    "python3 -c 'import ctypes; print(\"NoNewPrivs:\", ctypes.CDLL(None).prctl(39, 0, 0, 0, 0))'; "
    "cat /etc/shadow >/dev/null 2>&1 && echo SHADOW-READABLE; "
    "touch /usr/.corral-probe 2>/dev/null && echo USR-WRITABLE; exit 0"
)


class DockerBackend(Backend):
    name = "docker"
    strength = 40
    runtime: str | None = None  # an engine runtime other than its default ("runsc" for gVisor)

    def __init__(self) -> None:
        self._engine: Engine | None = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            from corral.backends.engine import connect

            self._engine = connect(self.name)
        return self._engine

    # ------------------------------------------------------------------ probe
    def probe(self) -> Capabilities:
        """Connect to the engine, then start a real sandbox and look at it from inside."""
        try:
            engine = self.engine
            self.check_runtime(engine)
        except BackendUnavailable as exc:
            return Capabilities(name=self.name, available=False, strength=self.strength, reason=exc.reason, fix=exc.fix)
        problem = self._probe_sandbox()
        if problem is not None:
            return Capabilities(
                name=self.name, available=False, strength=self.strength, reason=problem[0], fix=problem[1]
            )
        enforces = set(ALWAYS)
        info = engine.info
        for key, feature in (
            ("MemoryLimit", "limits.memory"),
            ("PidsLimit", "limits.pids"),
            ("CpuCfsQuota", "limits.cpus"),
        ):
            if info.get(key, True):
                enforces.add(feature)
        notes = [
            engine.describe,
            f"runtime {self.runtime or info.get('DefaultRuntime', 'runc')}, cgroup v{engine.cgroup_version}",
            "corral's seccomp filter stacked on the engine's default profile",
            "network 'allow': loopback only inside; the host's proxy through a mounted unix socket",
            "commands run as root in the engine's user namespace (you outside); the policy's uid is not applied"
            if engine.rootless
            else "commands run with your uid (no per-container user namespace); the policy's uid is not applied",
            "image: corral's own (the host's /usr read-only) unless the policy's container.image names one",
        ]
        return Capabilities(
            name=self.name,
            available=True,
            strength=self.strength,
            enforces=frozenset(enforces),
            limits_via=f"the container's cgroup (v{engine.cgroup_version})",
            notes=tuple(notes),
        )

    def check_runtime(self, engine: Engine) -> None:
        """Raise BackendUnavailable when this backend's engine runtime is not usable."""

    def _probe_sandbox(self) -> tuple[str, str] | None:
        import tempfile

        from corral.policy.model import Policy, Zone
        from corral.policy.resolve import resolve

        marker = os.urandom(8).hex()
        with tempfile.TemporaryDirectory(prefix="corral-probe-") as tmp:
            os.chmod(tmp, 0o755)
            with open(os.path.join(tmp, "marker"), "w") as f:
                f.write(marker + "\n")
            rp = resolve(Policy(zones=(Zone.ro(tmp, "/.corral-probe"), Zone.tmpfs("/tmp"))), host_env={}, host_cwd="/")
            try:
                result = self.run(rp, ["/bin/sh", "-c", PROBE_SCRIPT], sandbox_id="probe", timeout=60)
            except BackendUnavailable as exc:
                return exc.reason, exc.fix
            except Exception as exc:
                return f"a test container failed: {exc}", self.launch_fix()
        out = result.stdout_text
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        problems = []
        if marker not in out:
            problems.append(
                "a bind-mounted host directory was not visible inside (is the engine on another machine "
                "or in another mount namespace?)"
            )
        if fields.get("Seccomp", "").strip() != "2":
            problems.append("seccomp filter not active")
        if fields.get("NoNewPrivs", "").strip() != "1":
            problems.append("no_new_privs not set")
        if fields.get("CapEff", "").strip().strip("0"):
            problems.append("capabilities not dropped")
        if "SHADOW-READABLE" in out or "USR-WRITABLE" in out:
            problems.append("the system view is not confined")
        if problems or not result.ok:
            detail = "; ".join(problems) or (result.stderr_text.strip() or result.detail)
            return f"the test sandbox failed: {detail}", self.launch_fix()
        return None

    def launch_fix(self) -> str:
        return "see the engine's log (journalctl -u docker); corral doctor shows the details"

    # ------------------------------------------------------------------ live
    def start(self, rp: ResolvedPolicy, *, sandbox_id: str, events: EventSink | None = None) -> LiveSandbox:
        import socket

        from corral.agent.client import AgentClient
        from corral.agent.confine import landlock_abi
        from corral.backends.containers import (
            FIND_PYTHON,
            LABEL_BACKEND,
            LABEL_OWNER,
            LABEL_SANDBOX,
            LABEL_STATE,
            StateDir,
            accept_agent,
            hello_for,
            owner_label,
            proxy_hello,
            start_proxy,
        )
        from corral.backends.images import ensure_image
        from corral.backends.live import AgentSandbox
        from corral.backends.namespace.argv import AGENT_DIR
        from corral.backends.namespace.backend import agent_python, landlock_rules
        from corral.backends.oci import AGENT_SOCKET, RUN_DIR, container_mounts, identity_etc
        from corral.kernel.cgroups import Cgroup
        from corral.kernel.spawn import memfd_with

        engine = self.engine
        self.check_runtime(engine)
        self._refuse_engine_socket(rp, engine)
        reap_orphans(engine)
        image, host_system = ensure_image(engine, rp)
        # The caller's own identity, so files in zones keep their owner: the caller's uid in a
        # rootful engine, root in a rootless one (whose user namespace maps it to the caller).
        uid, gid = (0, 0) if engine.rootless else (os.getuid(), os.getgid())
        proxy: SandboxProxy | None = None
        if rp.network.mode == "allow":
            proxy, rp = start_proxy(rp, events)
        try:
            state = StateDir(sandbox_id)
        except BaseException:
            if proxy is not None:
                proxy.stop()
            raise
        container_id: str | None = None
        listener: socket.socket | None = None
        try:
            etc_files = identity_etc(rp, uid=uid, gid=gid)
            python_prefix = None
            if host_system:
                python, extras = agent_python()
                python_prefix = extras.python_prefix
                agent_dir = str(extras.agent_dir)
                entrypoint = [python, "-E", "-s", "-S", "-B", f"{AGENT_DIR}/main.py"]
                state.write_etc(
                    etc_files,
                    mount_points=tuple(m.dest for m in rp.system if m.kind == "ro-bind" and m.dest.startswith("/etc/")),
                )
                self._etc_symlinks(rp, state.etc)
            else:
                from corral.backends.hostagent import agent_main_path

                agent_dir = os.path.dirname(agent_main_path())
                entrypoint = ["/bin/sh", "-c", FIND_PYTHON.format(agent=f"{AGENT_DIR}/main.py")]
                state.write_etc(etc_files)
            mounts = container_mounts(
                rp,
                host_system=host_system,
                etc="dir" if host_system else "files",
                etc_dir=state.etc,
                agent_dir=agent_dir,
                run_dir=state.run,
                python_prefix=python_prefix,
                proxy_socket=proxy.socket_path if proxy is not None else None,
                uid=uid,
                gid=gid,
            )
            listener = state.listen()
            labels = {LABEL_SANDBOX: sandbox_id, LABEL_OWNER: owner_label(), LABEL_BACKEND: self.name,
                      LABEL_STATE: state.path}  # fmt: skip
            container_id = self._create(
                engine,
                rp,
                image,
                entrypoint,
                mounts,
                labels,
                uid=uid,
                gid=gid,
                env={"CORRAL_AGENT_SOCKET": AGENT_SOCKET, "PATH": dict(rp.env)["PATH"]},
            )
            engine.api.start(container_id)
            cid = container_id
            conn = accept_agent(listener, alive=lambda: self._gone(engine, cid), allowed_uids=frozenset({uid, 0}))
            listener = None
            client = AgentClient(conn)
            landlock = None
            if host_system and self.runtime is None and landlock_abi() > 0:
                # a second wall behind the mounts, as in the namespace backend (gVisor has no Landlock)
                landlock = landlock_rules(rp)
                ro = landlock.get("ro")
                landlock["ro"] = [*ro, RUN_DIR] if isinstance(ro, list) else [RUN_DIR]
            hello, program = hello_for(rp, landlock=landlock)
            if proxy is not None:
                hello["proxy"] = proxy_hello(proxy)
            try:
                client.handshake(hello, fds=[memfd_with("corral-seccomp", program)], timeout=30)
            except BaseException:
                conn.close()
                raise
            pid = engine.api.inspect_container(cid).get("State", {}).get("Pid") or 0
            cgroup = Cgroup.of_process(int(pid)) if pid else None
        except BaseException as exc:
            if listener is not None:
                listener.close()
            log = self._logs(engine, container_id) if container_id else ""
            if container_id is not None:
                self._remove(engine, container_id)
            state.remove()
            if proxy is not None:
                proxy.stop()
            if isinstance(exc, LaunchError) and log:
                raise LaunchError(f"{exc}: {log}") from exc
            raise

        def teardown() -> None:
            self._remove(engine, cid)
            state.remove()
            if proxy is not None:
                proxy.stop()

        return AgentSandbox(
            backend=self.name, sandbox_id=sandbox_id, rp=rp, client=client, cgroup=cgroup, teardown=teardown
        )

    def _create(
        self,
        engine: Engine,
        rp: ResolvedPolicy,
        image: str,
        entrypoint: list[str],
        mounts: tuple[MountSpec, ...],
        labels: dict[str, str],
        *,
        uid: int,
        gid: int,
        env: dict[str, str],
    ) -> str:
        import docker  # type: ignore[import-untyped]

        from corral.backends.oci import MASKED_PATHS, READONLY_PATHS

        limits = rp.limits
        binds = []
        tmpfs: dict[str, str] = {}
        for m in mounts:
            if m.kind == "tmpfs":
                options = list(m.options)
                if engine.kind == "podman" and any(o.startswith("uid=") for o in options):
                    # Podman refuses uid=/gid= on a tmpfs: the sandbox user's directory is made writable
                    options = [o for o in options if not o.startswith(("uid=", "gid=", "mode="))] + ["mode=1777"]
                # exec: as a tmpfs zone is under bubblewrap (the engine's default is noexec)
                tmpfs[m.dest] = ",".join(("rw", "exec", "nosuid", "nodev", *options))
            else:
                binds.append(
                    docker.types.Mount(
                        target=m.dest, source=m.source, type="bind", read_only=m.readonly, propagation="rprivate"
                    )
                )
        # No engine ulimits: the agent sets the core and file-size rlimits on itself before it runs
        # anything, and the open-files limit on each command (and Podman adds its own nofile and
        # nproc defaults next to any given here).
        host_config: dict[str, object] = {
            "mounts": binds,
            "tmpfs": tmpfs,
            "read_only": True,
            "network_mode": "host" if rp.network.mode == "host" else "none",
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"],
            "ipc_mode": "private",
            "init": False,
        }
        if limits.memory is not None:
            host_config["mem_limit"] = limits.memory
            host_config["memswap_limit"] = limits.memory
        if limits.pids is not None:
            host_config["pids_limit"] = limits.pids
        if limits.cpus is not None:
            host_config["nano_cpus"] = int(limits.cpus * 1e9)
        if self.runtime is not None:
            host_config["runtime"] = self.runtime
        try:
            hc = engine.api.create_host_config(**host_config)
            # The engine's defaults, and all of /sys: the namespace backend shows no /sys either.
            hc["MaskedPaths"] = [*MASKED_PATHS, "/proc/devices", "/sys"]
            hc["ReadonlyPaths"] = list(READONLY_PATHS)
            created = engine.api.create_container(
                image,
                entrypoint=entrypoint,
                command=[],
                user=f"{uid}:{gid}",
                environment=env,
                labels=labels,
                host_config=hc,
                hostname=None if rp.network.mode == "host" else rp.hostname,
                working_dir="/",
                stop_signal="SIGKILL",
                detach=True,
            )
        except docker.errors.APIError as exc:
            raise LaunchError(f"the engine refused the container: {exc.explanation or exc}") from exc
        return str(created["Id"])

    @staticmethod
    def _etc_symlinks(rp: ResolvedPolicy, etc_dir: str) -> None:
        for m in rp.system:
            if m.kind == "symlink" and m.dest.startswith("/etc/"):
                path = os.path.join(etc_dir, m.dest[len("/etc/") :])
                if not os.path.lexists(path):
                    os.symlink(str(m.source), path)

    def _refuse_engine_socket(self, rp: ResolvedPolicy, engine: Engine) -> None:
        sock = os.path.realpath(engine.socket_path)
        for zone in rp.zones:
            if zone.host is None:
                continue
            host = zone.host.rstrip("/") or "/"
            if sock == host or sock.startswith(host.rstrip("/") + "/"):
                raise UnsupportedPolicy(
                    self.name,
                    (f"zone {zone.host} (it would expose the container engine's socket {sock} inside the sandbox)",),
                )

    @staticmethod
    def _gone(engine: Engine, container_id: str) -> str | None:
        try:
            state = engine.api.inspect_container(container_id).get("State", {})
        except Exception as exc:
            return f"the container disappeared: {exc}"
        if state.get("Status") in ("exited", "dead"):
            return f"the container exited with status {state.get('ExitCode')} before its agent connected"
        return None

    @staticmethod
    def _logs(engine: Engine, container_id: str) -> str:
        try:
            raw = engine.api.logs(container_id, stdout=True, stderr=True, tail=20)
        except Exception:
            return ""
        return bytes(raw).decode(errors="replace").strip()

    @staticmethod
    def _remove(engine: Engine, container_id: str) -> None:
        import docker

        for _ in range(3):
            try:
                engine.api.remove_container(container_id, force=True)
                return
            except docker.errors.NotFound:
                return
            except docker.errors.APIError as exc:
                if "already in progress" in str(exc):
                    return
                time.sleep(0.2)


def reap_orphans(engine: Engine) -> list[str]:
    """Remove corral's containers whose owner process is gone; returns their ids."""
    from corral.backends.containers import LABEL_OWNER, LABEL_STATE, StateDir, owner_gone

    try:
        found = engine.api.containers(all=True, filters={"label": LABEL_OWNER})
    except Exception:
        return []
    reaped = []
    for c in found:
        labels = c.get("Labels") or {}
        owner = labels.get(LABEL_OWNER, "")
        if owner and owner_gone(owner):
            DockerBackend._remove(engine, c["Id"])
            if labels.get(LABEL_STATE):
                StateDir.remove_orphan(str(labels[LABEL_STATE]))
            reaped.append(str(c["Id"]))
    return reaped
