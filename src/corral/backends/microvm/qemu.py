"""QEMU's `microvm` machine: the command line (pure, tested against exact vectors) and a running VM.

The machine has no firmware, no PCI and no disks: virtio-mmio devices only. The guest talks to the
host over a virtio-serial port (`corral.agent`), QEMU is driven over QMP, and both channels are
socketpairs whose guest-side ends QEMU inherits (no socket files on the host). A second port,
`corral.net`, carries the connections to the network proxy (network mode 'allow'); every VM has it,
so that one saved state serves every network mode, but its host end is QEMU's null device unless
the sandbox's policy allows network. The host's
directories reach the guest as virtio-9p shares with `security_model=none` (files keep the uid of
the user running corral, as with the namespace backend), read-only shares marked so by QEMU
itself. No network device is ever added. QEMU confines itself with its own seccomp sandbox.
"""

from __future__ import annotations

import json
import os
import select
import socket
import time

from corral._record import Record
from corral.errors import LaunchError, SandboxLost

TYPE_CHECKING = False
if TYPE_CHECKING:
    from corral.kernel.spawn import Child

MACHINE = "microvm,x-option-roms=off,pit=on,pic=on,rtc=on,isa-serial=on"
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
PORT_NAME = "corral.agent"
NET_PORT_NAME = "corral.net"


class Share(Record):
    """A host directory offered to the guest under `tag`."""

    __slots__ = ("path", "readonly", "tag")
    tag: str
    path: str
    readonly: bool

    def __init__(self, *, tag: str, path: str, readonly: bool) -> None:
        self._set(tag=tag, path=path, readonly=readonly)


class VmSpec(Record):
    """Everything a VM is started from. Equal specs (less the descriptors and paths of this one run)
    can restore each other's saved state: see `state_key`."""

    __slots__ = ("accel", "agent_fd", "cmdline", "console", "cpus", "incoming_fd", "initramfs", "kernel",
                 "memory_mib", "net_fd", "qmp_fd", "shares")  # fmt: skip
    kernel: str
    initramfs: str
    cmdline: str
    memory_mib: int
    cpus: int
    accel: str  # "kvm" | "tcg"
    shares: tuple[Share, ...]
    agent_fd: int
    qmp_fd: int
    console: str | None  # a file for the serial console, None to discard it
    incoming_fd: int | None  # a saved state to restore instead of booting
    net_fd: int | None  # the host end of the `corral.net` port (None: nothing behind it)

    def __init__(
        self,
        *,
        kernel: str,
        initramfs: str,
        cmdline: str,
        memory_mib: int,
        cpus: int,
        accel: str,
        shares: tuple[Share, ...],
        agent_fd: int,
        qmp_fd: int,
        console: str | None = None,
        incoming_fd: int | None = None,
        net_fd: int | None = None,
    ) -> None:
        if accel not in ("kvm", "tcg"):
            raise ValueError(f"unknown accelerator {accel!r}")
        self._set(kernel=kernel, initramfs=initramfs, cmdline=cmdline, memory_mib=memory_mib, cpus=cpus,
                  accel=accel, shares=tuple(shares), agent_fd=agent_fd, qmp_fd=qmp_fd, console=console,
                  incoming_fd=incoming_fd, net_fd=net_fd)  # fmt: skip

    def state_key(self) -> str:
        """What a saved state depends on: the machine, its devices and the guest (not the share paths, nor
        what is behind the network port: the device is the same)."""
        tags = ",".join(f"{s.tag}:{'ro' if s.readonly else 'rw'}" for s in self.shares)
        ports = ",".join((PORT_NAME, NET_PORT_NAME))
        return "|".join((MACHINE, self.accel, str(self.memory_mib), str(self.cpus), self.kernel, self.initramfs,
                         self.cmdline, tags, ports))  # fmt: skip


def _opt(value: str) -> str:
    """A value inside a QEMU option list: commas are doubled."""
    return value.replace(",", ",,")


def qemu_argv(qemu: str, spec: VmSpec) -> tuple[str, ...]:
    """The full QEMU command line for `spec`. Pure: no I/O."""
    kvm = spec.accel == "kvm"
    args = [
        qemu,
        "-M", MACHINE,
        "-accel", spec.accel,
        "-cpu", "host" if kvm else "max",
        "-m", f"{spec.memory_mib}M",
        "-smp", str(spec.cpus),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-sandbox", SANDBOX,
        "-kernel", spec.kernel,
        "-initrd", spec.initramfs,
        "-append", spec.cmdline,
        "-serial", f"file:{spec.console}" if spec.console else "null",
        "-chardev", f"socket,id=agent,fd={spec.agent_fd}",
        "-device", "virtio-serial-device",
        "-device", f"virtserialport,chardev=agent,name={PORT_NAME}",
        "-chardev", "null,id=net" if spec.net_fd is None else f"socket,id=net,fd={spec.net_fd}",
        "-device", f"virtserialport,chardev=net,name={NET_PORT_NAME}",
        "-chardev", f"socket,id=qmp,fd={spec.qmp_fd}",
        "-mon", "chardev=qmp,mode=control",
    ]  # fmt: skip
    for i, share in enumerate(spec.shares):
        readonly = ",readonly=on" if share.readonly else ""
        args += [
            "-fsdev", f"local,id=fs{i},path={_opt(share.path)},security_model=none{readonly}",
            "-device", f"virtio-9p-device,fsdev=fs{i},mount_tag={share.tag}",
        ]  # fmt: skip
    if spec.incoming_fd is not None:
        args += ["-incoming", f"fd:{spec.incoming_fd}"]
    return tuple(args)


def kernel_cmdline(accel: str, tsc_khz: int | None) -> str:
    """The guest's command line. Under emulation the TSC frequency is given, not measured: without
    HPET or ACPI PM timer the kernel's calibration against the PIT is unreliable and can hang."""
    parts = ["console=ttyS0", "quiet", "panic=-1", "reboot=t", "pci=off", "rdinit=/init"]
    if accel == "tcg" and tsc_khz:
        parts += [f"tsc_early_khz={tsc_khz}", "tsc=reliable", f"lpj={tsc_khz * 4}"]
    return " ".join(parts)


def host_tsc_khz() -> int | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None


def find_qemu() -> str | None:
    for directory in ("/usr/bin", "/usr/local/bin", "/bin"):
        path = os.path.join(directory, "qemu-system-x86_64")
        if os.access(path, os.X_OK):
            return path
    return None


class Qmp:
    """A minimal QMP client over an inherited socket: commands, replies, fds (SCM_RIGHTS)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self._greeted = False

    def _line(self, deadline: float) -> dict[str, object]:
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.sock], [], [], remaining)[0]:
                raise LaunchError("QEMU's monitor did not answer in time")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise SandboxLost("QEMU exited")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        value = json.loads(line)
        assert isinstance(value, dict)
        return value

    def command(self, name: str, arguments: dict[str, object] | None = None, *, fds: tuple[int, ...] = (),
                timeout: float = 30.0) -> object:  # fmt: skip
        deadline = time.monotonic() + timeout
        if not self._greeted:
            self._line(deadline)  # the greeting
            self._greeted = True
            self.command("qmp_capabilities")
        body = json.dumps({"execute": name, **({"arguments": arguments} if arguments else {})}).encode()
        if fds:
            self.sock.sendmsg([body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(memoryview(
                __import__("array").array("i", fds))))])  # fmt: skip
        else:
            self.sock.sendall(body)
        while True:
            reply = self._line(deadline)
            if "event" in reply:
                continue
            if "error" in reply:
                error = reply["error"]
                desc = error.get("desc", error) if isinstance(error, dict) else error
                raise LaunchError(f"QEMU refused {name}: {desc}")
            return reply.get("return")


class QemuVm:
    """A running QEMU: its process, the agent's channel and the monitor."""

    def __init__(self, child: Child, agent: socket.socket, qmp: Qmp, workdir: str, *,
                 net: socket.socket | None = None) -> None:  # fmt: skip
        self.child = child
        self.agent = agent
        self.qmp = qmp
        self.workdir = workdir
        self.net = net  # the host end of the `corral.net` port, when the sandbox has network 'allow'

    def save_state(self, path: str, *, timeout: float = 120.0) -> None:
        """Write the VM's state to `path` (migration to a file), then let the VM run on."""
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            self.qmp.command("getfd", {"fdname": "state"}, fds=(fd,))
        finally:
            os.close(fd)
        try:
            self.qmp.command("migrate", {"uri": "fd:state"})
            deadline = time.monotonic() + timeout
            while True:
                info = self.qmp.command("query-migrate")
                status = info.get("status") if isinstance(info, dict) else None
                if status == "completed":
                    break
                if status in ("failed", "cancelled") or time.monotonic() > deadline:
                    detail = info.get("error-desc", status) if isinstance(info, dict) else status
                    raise LaunchError(f"saving the VM state failed: {detail}")
                time.sleep(0.02)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        finally:
            # The source pauses when migration ends; it goes on as this sandbox's VM.
            self.qmp.command("cont")

    def console_text(self) -> str:
        try:
            with open(os.path.join(self.workdir, "console.log"), "rb") as f:
                return f.read()[-4000:].decode(errors="replace").strip()
        except OSError:
            return ""

    def kill(self) -> None:
        self.child.kill()
        self.child.wait()
        self.agent.close()
        self.qmp.sock.close()
        if self.net is not None:
            self.net.close()
