"""The `microvm` backend: a QEMU `microvm` virtual machine per live sandbox.

Start-up: the first sandbox for a given guest and VM shape boots the guest (kernel + corral's
initramfs), waits until the guest agent is up, saves the VM's state, and goes on; every later
sandbox starts QEMU restoring that state, with its own share paths, and sends the guest its
layout (`hello`). Inside, each command runs in a nested bubblewrap sandbox built from the policy by
the namespace backend's own argv builder, under the guest's cgroup v2 limits.

Network: the VM never has a network device. With network mode 'allow', the sandbox's proxy (the
same as the namespace backend's) listens on a host unix socket; the guest agent listens on
127.0.0.1:3128 inside each command's own network namespace and sends every connection over the
`corral.net` virtio-serial port, where `NetBridge` connects it to the proxy. Mode 'host' is refused.

KVM is used when it really boots a guest here (checked once by booting one, then remembered);
otherwise QEMU emulates the CPU (TCG): it works, but slowly (seconds to boot), so `doctor` says
so, and `auto` never picks this backend.
"""

from __future__ import annotations

import base64
import errno
import logging
import os
import shutil
import socket
import tempfile
import time

from corral.backends.base import Backend, Capabilities, LiveSandbox, Result, effective_timeout, file_error
from corral.errors import (
    BackendUnavailable,
    LaunchError,
    PolicyDenied,
    SandboxFileError,
    SandboxLost,
    UnsupportedPolicy,
)
from corral.kernel.cgroups import Cgroup

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from corral.backends.base import EventSink, OutputCallback
    from corral.backends.microvm.client import StreamClient
    from corral.backends.microvm.image import GuestImage
    from corral.backends.microvm.layout import Layout
    from corral.backends.microvm.netbridge import NetBridge
    from corral.backends.microvm.qemu import QemuVm, VmSpec
    from corral.net.proxy import Resolver
    from corral.net.service import SandboxProxy
    from corral.policy.resolve import ResolvedPolicy

log = logging.getLogger(__name__)

ENFORCES = frozenset({
    "exec.commands",
    "fs.isolation", "fs.remap", "fs.tmpfs", "proc.isolation", "net.none", "net.allow", "syscall.filter",
    "limits.memory", "limits.pids", "limits.cpus", "limits.timeout", "limits.output", "limits.file_size",
    "limits.open_files",
})  # fmt: skip
DEFAULT_MEMORY_MIB = 512
GUEST_OVERHEAD_MIB = 192  # kernel, agent, bubblewrap: guest RAM beyond the memory limit
BOOT_TIMEOUT = {"kvm": 20.0, "tcg": 120.0}
KVM_CHECK_TIMEOUT = 15.0
TCG_NOTE = "works, slow (~5 s boot, ~1 s restore, emulated CPU): not for production"
PROBE_SCRIPT = "grep -E '^(Seccomp|NoNewPrivs|CapEff):' /proc/self/status; cat /proc/net/dev | wc -l"


class GuestCounters(Cgroup):
    """The guest cgroup's counters for one command, as the guest agent reported them."""

    def __init__(self, oom_kills: int, pids_hits: int, peak: int | None) -> None:
        super().__init__("guest", {})
        self._oom = oom_kills
        self._pids = pids_hits
        self._peak = peak

    def oom_kills(self) -> int:
        return self._oom

    def pids_hits(self) -> int:
        return self._pids

    def peak_memory(self) -> int | None:
        return self._peak


class MicrovmBackend(Backend):
    name = "microvm"
    strength = 60

    def __init__(self, *, restore: bool = True, resolver: Resolver | None = None) -> None:
        """`restore=False` always boots (and saves no state): for measuring and testing the boot path.
        `resolver` is the network proxy's (None: the host's); tests map names with it."""
        self._restore = restore
        self._resolver = resolver
        self._image: GuestImage | None = None
        self._accel: str | None = None
        self._caps: Capabilities | None = None

    # ------------------------------------------------------------------ set-up
    @property
    def qemu(self) -> str:
        from corral.backends.microvm.qemu import find_qemu

        path = find_qemu()
        if path is None:
            raise BackendUnavailable(self.name, "qemu-system-x86_64 is not installed",
                                     fix="apt-get install qemu-system-x86")  # fmt: skip
        return path

    def image(self) -> GuestImage:
        if self._image is None:
            from corral.backends.microvm.image import ensure_image

            if os.uname().machine != "x86_64":
                raise BackendUnavailable(self.name, f"only x86_64 hosts are supported (this is {os.uname().machine})")
            self._image = ensure_image()
        return self._image

    def accel(self) -> str:
        """ "kvm" when KVM really boots a guest here, else "tcg" (checked once, remembered in the cache)."""
        if self._accel is not None:
            return self._accel
        forced = os.environ.get("CORRAL_MICROVM_ACCEL")
        if forced in ("kvm", "tcg"):
            self._accel = forced
            return forced
        from corral.backends.microvm.image import cache_dir

        image = self.image()
        marker = os.path.join(cache_dir(), f"accel-{image.key}-{_qemu_version(self.qemu)}")
        try:
            with open(marker) as f:
                self._accel = f.read().strip()
                return self._accel
        except OSError:
            pass
        accel = "tcg"
        if os.access("/dev/kvm", os.R_OK | os.W_OK):
            try:
                vm, _client, workdir = self._launch(image, "kvm", self._empty_layout(), None, timeout=KVM_CHECK_TIMEOUT)
                vm.kill()
                shutil.rmtree(workdir, ignore_errors=True)
                accel = "kvm"
            except (LaunchError, SandboxLost) as exc:
                log.info("KVM does not boot a guest here (%s): using emulation", exc)
        with open(marker, "w") as f:
            f.write(accel)
        self._accel = accel
        return accel

    def _empty_layout(self) -> Layout:
        from corral.backends.microvm.layout import plan
        from corral.policy.model import Policy
        from corral.policy.resolve import resolve

        rp = resolve(Policy(zones=()), host_env={}, host_cwd="/")
        return plan(rp, empty_dir=_empty_dir())

    # ------------------------------------------------------------------ probe
    def probe(self) -> Capabilities:
        """Boot a real guest (KVM when it works, else emulation) and look inside a command's sandbox."""
        if self._caps is None:
            self._caps = self._probe()
        return self._caps

    def _probe(self) -> Capabilities:
        try:
            self.qemu  # noqa: B018
            accel = self.accel()
        except BackendUnavailable as exc:
            return Capabilities(name=self.name, available=False, strength=self.strength, reason=exc.reason,
                                fix=exc.fix)  # fmt: skip
        except Exception as exc:
            return Capabilities(name=self.name, available=False, strength=self.strength,
                                reason=f"cannot prepare the guest: {exc}", fix=_fix())  # fmt: skip
        from corral.policy.model import Policy, Zone
        from corral.policy.resolve import resolve

        rp = resolve(Policy(zones=(Zone.tmpfs("/tmp"),)), host_env={}, host_cwd="/")
        try:
            live = self.start(rp, sandbox_id="probe")
            try:
                result = live.exec(["/bin/sh", "-c", PROBE_SCRIPT], timeout=120)
            finally:
                live.stop()
        except Exception as exc:
            return Capabilities(name=self.name, available=False, strength=self.strength,
                                reason=f"the test VM failed: {exc}", fix=_fix())  # fmt: skip
        fields = dict(line.split(":", 1) for line in result.stdout_text.splitlines() if ":" in line)
        problems = []
        if fields.get("Seccomp", "").strip() != "2":
            problems.append("seccomp filter not active in the guest")
        if fields.get("CapEff", "").strip().strip("0"):
            problems.append("capabilities not dropped in the guest")
        if not result.ok or problems:
            reason = "; ".join(problems) or f"the test command failed: {result.stderr_text.strip() or result.detail}"
            return Capabilities(name=self.name, available=False, strength=self.strength, reason=reason,
                                fix="report this as a corral bug")  # fmt: skip
        image = self.image()
        notes = [f"accelerator: {accel}" + ("" if accel == "kvm" else f" ({TCG_NOTE})"),
                 f"guest kernel {image.kernel_release}; {_qemu_label(self.qemu)}",
                 "each command runs in a bubblewrap sandbox inside the VM; no network device",
                 "network 'allow': loopback only inside; the host proxy (HTTP, CONNECT, SOCKS5) through a "
                 "virtio-serial port; 'host' is refused"]  # fmt: skip
        return Capabilities(name=self.name, available=True, strength=self.strength, enforces=ENFORCES,
                            limits_via="guest cgroup v2", notes=tuple(notes))  # fmt: skip

    # ------------------------------------------------------------------ start
    def start(self, rp: ResolvedPolicy, *, sandbox_id: str, events: EventSink | None = None) -> LiveSandbox:
        from corral.backends.microvm.layout import file_zones

        if rp.network.mode not in ("none", "allow"):
            raise UnsupportedPolicy(self.name, (f"network mode '{rp.network.mode}' (the VM has no network device; "
                                                "use 'allow' to reach listed hosts through the proxy)",))  # fmt: skip
        bad = file_zones(rp, [os.path.isdir(z.host) for z in rp.zones if z.host is not None])
        if bad:
            raise UnsupportedPolicy(self.name, bad)
        image = self.image()
        accel = self.accel()
        proxy: SandboxProxy | None = None
        if rp.network.mode == "allow":
            from corral.backends.namespace.argv import PROXY_PORT
            from corral.net.service import SandboxProxy, proxy_env

            proxy = SandboxProxy.start_unix(rp.network, events=events, resolver=self._resolver)
            rp = rp.replace(env=tuple(sorted({**rp.env_dict, **proxy_env(PROXY_PORT)}.items())))
        try:
            return self._start(rp, sandbox_id, image, accel, proxy)
        except BaseException:
            if proxy is not None:
                proxy.stop()
            raise

    def _start(
        self, rp: ResolvedPolicy, sandbox_id: str, image: GuestImage, accel: str, proxy: SandboxProxy | None
    ) -> MicrovmSandbox:
        from corral.backends.microvm.image import cache_dir
        from corral.backends.microvm.layout import ZONE_SLOTS, plan
        from corral.kernel.seccomp import build_filter

        layout = plan(rp, empty_dir=_empty_dir())
        memory = DEFAULT_MEMORY_MIB
        if rp.limits.memory is not None:
            memory = max(memory, -(-rp.limits.memory // (1 << 20)) + GUEST_OVERHEAD_MIB)
        started = time.monotonic()
        standard = self._restore and sum(1 for z in rp.zones if z.host is not None) <= ZONE_SLOTS
        state = None
        if standard:
            key = _state_key(self.qemu, image, accel, layout, memory, _cpus(rp))
            state = os.path.join(cache_dir(), f"state-{key}.bin")
        restored = state is not None and os.path.isfile(state)
        if restored and state is not None:
            os.utime(state)  # most recently used: kept by pruning
        timeout = BOOT_TIMEOUT[accel]
        net = proxy is not None
        try:
            vm, client, workdir = self._launch(image, accel, layout, state if restored else None, timeout=timeout,
                                               memory=memory, cpus=_cpus(rp), net=net)  # fmt: skip
        except LaunchError as exc:
            if not restored or state is None:
                raise
            # A saved state QEMU cannot load (truncated, another QEMU build): forget it and boot.
            log.warning("could not restore %s (%s): booting instead", state, exc)
            _unlink(state)
            restored = False
            vm, client, workdir = self._launch(image, accel, layout, None, timeout=timeout, memory=memory,
                                               cpus=_cpus(rp), net=net)  # fmt: skip
        bridge: NetBridge | None = None
        try:
            if state is not None and not restored:
                try:
                    vm.save_state(state)
                    _prune(cache_dir(), "state-", ".bin", keep=4)
                except LaunchError as exc:  # the sandbox works without it; later ones boot too
                    log.warning("could not save the VM state for fast start: %s", exc)
            hello = {
                "shares": [m.as_json() for m in layout.mounts],
                "tmpfs": list(layout.tmpfs),
                "etc": [[name, base64.b64encode(data).decode()] for name, data in layout.guest_rp.etc_files],
                "seccomp": base64.b64encode(build_filter()).decode(),
                "limits": {"memory": rp.limits.memory, "pids": rp.limits.pids, "cpus": rp.limits.cpus},
                "entropy": base64.b64encode(os.urandom(64)).decode(),
                "hostname": rp.hostname,
            }
            if proxy is not None:
                from corral.backends.microvm.netbridge import NetBridge
                from corral.backends.namespace.argv import PROXY_PORT

                assert vm.net is not None and proxy.socket_path is not None
                hello["net"] = {"port": PROXY_PORT}
                bridge = NetBridge(vm.net, proxy.socket_path)
                bridge.start()
            client.hello(hello, timeout=timeout)
        except BaseException as exc:
            console = vm.console_text()
            if bridge is not None:
                bridge.stop()
            vm.kill()
            shutil.rmtree(workdir, ignore_errors=True)
            if isinstance(exc, (LaunchError, SandboxLost)) and console:
                raise LaunchError(f"{exc}; guest console: {console[-1500:]}") from exc
            raise
        ready = time.monotonic() - started
        log.info("microvm %s ready in %.3fs (%s, %s)", sandbox_id, ready, accel, "restored" if restored else "booted")
        return MicrovmSandbox(sandbox_id=sandbox_id, rp=rp, layout=layout, vm=vm, client=client, workdir=workdir,
                              restored=restored, start_time=ready, proxy=proxy, bridge=bridge)  # fmt: skip

    def _launch(
        self,
        image: GuestImage,
        accel: str,
        layout: Layout,
        state: str | None,
        *,
        timeout: float,
        memory: int = DEFAULT_MEMORY_MIB,
        cpus: int = 1,
        net: bool = False,
    ) -> tuple[QemuVm, StreamClient, str]:
        """Start QEMU (booting, or restoring `state`) and wait until the guest agent is there. With `net`,
        the `corral.net` port's host end is a socketpair (`vm.net`), else QEMU's null device."""
        from corral.backends.microvm.client import StreamClient
        from corral.backends.microvm.qemu import QemuVm, Qmp, VmSpec, host_tsc_khz, kernel_cmdline, qemu_argv
        from corral.kernel.spawn import Child, on_lasting_thread, spawn

        workdir = tempfile.mkdtemp(prefix="corral-microvm-")
        host_agent, vm_agent = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        host_qmp, vm_qmp = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        host_net, vm_net = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) if net else (None, None)
        passed = [vm_agent.fileno(), vm_qmp.fileno(), *([vm_net.fileno()] if vm_net is not None else [])]
        state_fd = None
        if state is not None:
            state_fd = os.open(state, os.O_RDONLY | os.O_CLOEXEC)
            passed.append(state_fd)
        cmdline = kernel_cmdline(accel, host_tsc_khz())
        spec: VmSpec = VmSpec(kernel=image.kernel, initramfs=image.initramfs, cmdline=cmdline,
                              memory_mib=memory, cpus=cpus, accel=accel, shares=layout.shares,
                              agent_fd=vm_agent.fileno(), qmp_fd=vm_qmp.fileno(),
                              console=os.path.join(workdir, "console.log"), incoming_fd=state_fd,
                              net_fd=vm_net.fileno() if vm_net is not None else None)  # fmt: skip
        null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        errlog = os.open(os.path.join(workdir, "qemu.log"), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            # setpriv's --pdeathsig fires when the thread that starts it ends: one that lasts.
            argv = _die_with_us(qemu_argv(self.qemu, spec))
            pid = on_lasting_thread(lambda: spawn(argv, env={"PATH": "/usr/bin:/bin"}, stdio=(null, errlog, errlog),
                                                  pass_fds=passed, new_session=True))  # fmt: skip
        except OSError as exc:
            for sock in (host_agent, host_qmp, host_net):
                if sock is not None:
                    sock.close()
            raise LaunchError(f"cannot run {self.qemu}: {exc.strerror}") from exc
        finally:
            for fd in (null, errlog, *([state_fd] if state_fd is not None else [])):
                os.close(fd)
            for sock in (vm_agent, vm_qmp, vm_net):
                if sock is not None:
                    sock.close()
        vm = QemuVm(Child(pid), host_agent, Qmp(host_qmp), workdir, net=host_net)
        client = StreamClient(host_agent)
        try:
            if state is None:
                client.wait_message("booted", timeout=timeout)
            else:
                # A restored guest is already waiting for its hello; make sure QEMU loaded the state.
                _wait_running(vm, timeout)
        except BaseException as exc:
            console = vm.console_text()
            errors = _read(os.path.join(workdir, "qemu.log"))
            vm.kill()
            shutil.rmtree(workdir, ignore_errors=True)
            detail = "; ".join(x for x in (errors[-800:], console[-800:] and f"console: {console[-800:]}") if x)
            if isinstance(exc, (LaunchError, SandboxLost)):
                raise LaunchError(f"the VM did not start ({accel}): {exc}" + (f": {detail}" if detail else "")) from exc
            raise
        return vm, client, workdir


class MicrovmSandbox(LiveSandbox):
    backend = "microvm"

    def __init__(self, *, sandbox_id: str, rp: ResolvedPolicy, layout: Layout, vm: QemuVm, client: StreamClient,
                 workdir: str, restored: bool, start_time: float, proxy: SandboxProxy | None = None,
                 bridge: NetBridge | None = None) -> None:  # fmt: skip
        from corral.backends.namespace.launch import rlimits_for

        self.id = sandbox_id
        self.rp = rp
        self.layout = layout
        self.vm = vm
        self.client = client
        self.workdir = workdir
        self.restored = restored
        self.start_time = start_time
        self.proxy = proxy
        self.bridge = bridge
        self._rlimits = rlimits_for(rp, frozenset({"memory", "pids"}))

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
        from corral.backends.microvm.layout import guest_command
        from corral.backends.namespace.backend import shell_to_subprocess
        from corral.backends.outcome import classify, not_started

        self._check_exec(argv)
        cwd = cwd or self.rp.cwd
        missing = self.rp.program_status(argv[0], cwd)
        if missing:
            return not_started(argv, missing, os.strerror(missing), what="command", subject=argv[0], output=output)
        full_env = self._command_env(env)
        limits = self.rp.limits
        timeout = effective_timeout(timeout, limits.timeout)
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        try:
            reply, pumped = self.client.exec(guest_command(self.layout, argv, cwd=cwd), env=full_env, stdin=stdin,
                                             rlimits=self._rlimits, deadline=deadline, output_limit=limits.output,
                                             on_output=on_output, output=output)  # fmt: skip
        except SandboxLost:
            self.stop()
            raise
        wall = time.monotonic() - started
        if reply.get("error") is not None:
            raise LaunchError(f"the guest could not start bubblewrap: {reply['error']}")
        status = reply.get("status")
        assert isinstance(status, int)
        code = os.waitstatus_to_exitcode(status)
        returncode = code if code < 0 else shell_to_subprocess(code)
        counters = GuestCounters(_int(reply.get("oom_kills")), _int(reply.get("pids_hits")),
                                 _int(reply.get("peak")) or None)  # fmt: skip
        return classify(argv, returncode, pumped, limits=limits, timeout=timeout, wall_time=wall, cgroup=counters,
                        maxrss=_int(reply.get("maxrss")) or None)  # fmt: skip

    def put_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        # The script's exit status is the errno that explains a refusal. The data goes to a file
        # beside the target, renamed over it: a failed write leaves the old file whole.
        script = ('[ -L "$1" ] && exit 40; [ -d "$1" ] && exit 21; d=$(dirname "$1"); [ -d "$d" ] || exit 2; '
                  '[ -w "$d" ] || exit 13; t="$d/.$(basename "$1").corral-put-$$"; '
                  'if cat > "$t" && chmod "$2" "$t" && mv -f "$t" "$1"; then exit 0; fi; '
                  'rm -f "$t"; exit 5')  # fmt: skip
        r = self.exec(["/bin/sh", "-c", script, "sh", self._absolute(path), f"{mode:o}"], stdin=data, timeout=None)
        if not r.ok:
            raise _script_error("write", path, r)

    def get_file(self, path: str, *, max_bytes: int = 64 << 20) -> bytes:
        script = ('[ -e "$1" ] || exit 2; [ -d "$1" ] && exit 21; [ -f "$1" ] || exit 22; [ -r "$1" ] || exit 13; '
                  '[ "$(wc -c < "$1")" -le "$2" ] || exit 27; exec cat "$1"')  # fmt: skip
        r = self.exec(["/bin/sh", "-c", script, "sh", self._absolute(path), str(max_bytes)], timeout=None)
        if not r.ok:
            raise _script_error("read", path, r)
        if len(r.stdout) > max_bytes or r.stdout_truncated:
            raise _script_error("read", path, r, errno.EFBIG)
        return r.stdout

    def _absolute(self, path: str) -> str:
        import posixpath

        return posixpath.normpath(posixpath.join(self.rp.cwd, path))

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            if self.bridge is not None:
                self.bridge.stop()
            self.vm.kill()
        finally:
            if self.proxy is not None:
                self.proxy.stop()
            shutil.rmtree(self.workdir, ignore_errors=True)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _prune(directory: str, prefix: str, suffix: str, *, keep: int) -> None:
    """Remove all but the `keep` most recently used cache files named PREFIX*SUFFIX (saved states are big)."""
    try:
        names = [n for n in os.listdir(directory) if n.startswith(prefix) and n.endswith(suffix)]
    except OSError:
        return
    paths = sorted((os.path.join(directory, n) for n in names), key=_mtime, reverse=True)
    for path in paths[keep:]:
        _unlink(path)


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


def _cpus(rp: ResolvedPolicy) -> int:
    cpus = rp.limits.cpus
    return 1 if cpus is None else max(1, min(os.cpu_count() or 1, -(-int(cpus * 100) // 100)))


def _empty_dir() -> str:
    from corral.backends.microvm.image import cache_dir

    path = os.path.join(cache_dir(), "empty")
    os.makedirs(path, mode=0o555, exist_ok=True)
    return path


def _state_key(qemu: str, image: GuestImage, accel: str, layout: Layout, memory: int, cpus: int) -> str:
    import hashlib

    from corral.backends.microvm.qemu import VmSpec

    spec = VmSpec(kernel=image.kernel, initramfs=image.initramfs, cmdline=accel, memory_mib=memory, cpus=cpus,
                  accel=accel, shares=layout.shares, agent_fd=0, qmp_fd=0)  # fmt: skip
    text = "|".join((spec.state_key(), image.key, _qemu_version(qemu)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _qemu_version(qemu: str) -> str:
    st = os.stat(qemu)
    return f"{st.st_size}-{int(st.st_mtime)}"


def _qemu_label(qemu: str) -> str:
    import subprocess

    out = subprocess.run([qemu, "--version"], capture_output=True, text=True, check=False).stdout
    words = out.split()
    return f"QEMU {words[3]}" if len(words) > 3 and words[2] == "version" else f"QEMU at {qemu}"


def _wait_running(vm: QemuVm, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        status = vm.qmp.command("query-status", timeout=max(1.0, deadline - time.monotonic()))
        state = status.get("status") if isinstance(status, dict) else None
        if state == "running":
            return
        waiting = ("inmigrate", "prelaunch", "restore-vm", "paused", "postmigrate")
        if state not in waiting or time.monotonic() > deadline:
            raise LaunchError(f"the restored VM is {state!r}, not running")
        if state in ("paused", "postmigrate"):
            vm.qmp.command("cont")
        time.sleep(0.005)


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


def _fix() -> str:
    return "apt-get install qemu-system-x86 busybox-static (and apt-get update for the kernel download)"


def _die_with_us(argv: tuple[str, ...] | list[str]) -> list[str]:
    """`argv` under `setpriv --pdeathsig KILL` where util-linux has it: a VM must not outlive a corral
    process that was killed before it could stop it."""
    import shutil

    setpriv = shutil.which("setpriv", path="/usr/bin:/bin:/usr/sbin:/sbin")
    return [setpriv, "--pdeathsig", "KILL", "--", *argv] if setpriv else list(argv)


def _script_error(verb: str, path: str, r: Result, code: int | None = None) -> PolicyDenied | SandboxFileError:
    """The error for a file script's failure: its exit status is an errno (EIO when it is not one)."""
    code = code or (r.returncode if r.returncode in (2, 13, 21, 22, 27, 40) else errno.EIO)
    reason = os.strerror(code) if code != errno.EIO else (r.stderr_text.strip() or r.detail or os.strerror(code))
    return file_error(verb, path, code, reason)
