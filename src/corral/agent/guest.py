"""corral's agent inside a microVM guest: the guest's PID 1 once /init has mounted the basics.

It speaks the byte-stream protocol (stream.py) over a virtio-serial port named `corral.agent`:

1. At boot it says `booted` and waits for a `hello`: the host may first save the VM's state here,
   so that later sandboxes start by restoring it (nothing host-specific is mounted yet).
2. `hello` brings the sandbox's layout: 9p shares to mount (the read-only system directories and
   the zones), tmpfs zones, the limits (applied to the guest's own cgroup v2), fresh entropy.
3. Each `exec` carries a complete bubblewrap command line built by the host (the namespace
   backend's own argv builder): the command runs in a nested namespace sandbox inside the VM, with
   the policy's view, an unprivileged uid, the seccomp filter and a per-command cgroup. Its stdin,
   stdout and stderr travel as frames; a `signal` frame kills it; its end is an `exit` message.
4. With network mode 'allow' (`net` in hello), the agent opens the second port, `corral.net`, and
   for each command listens on 127.0.0.1:PORT inside the command's own network namespace (it
   enters the namespace bubblewrap made, binds, and comes back before the command starts). Every
   connection accepted there goes over that port to the host's proxy (netmux.py). The command
   keeps a network namespace with loopback only; the VM has no network device at all.

Stdlib only, Python >= 3.8: it runs under the host's system Python copied into the initramfs.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import os
import select
import signal
import socket
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

# Imported at boot, before the VM's state is saved, so that restored sandboxes do not pay for it.
if __package__:
    from corral.agent import netmux, processes, stream
else:  # run as a script: our siblings sit next to us in the initramfs
    import netmux  # type: ignore[import-not-found,no-redef]
    import processes  # type: ignore[import-not-found,no-redef]
    import stream  # type: ignore[import-not-found,no-redef]

PORT_NAME = "corral.agent"
NET_PORT_NAME = "corral.net"
CLONE_NEWNET = 0x40000000
BUSYBOX = "/bin/busybox"
CGROUP = "/sys/fs/cgroup"
SANDBOX_CG = CGROUP + "/sandbox"
# Descriptor numbers the host's bubblewrap command line refers to (see corral.backends.microvm.layout).
FD_SECCOMP = 3
FD_STATUS = 4
FD_BLOCK = 5
FD_ETC = 6
_HIGH_FD = 64
# Every signal starts at its default in a command. Named, each costs glibc's posix_spawn child one
# system call instead of two (it asks for the handler of any signal it is not told about, then resets it).
_DEFAULT_SIGNALS = tuple(sorted(set(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}))


def find_port(wanted: str = PORT_NAME) -> str:
    base = "/sys/class/virtio-ports"
    for name in sorted(os.listdir(base)):
        try:
            with open(os.path.join(base, name, "name")) as f:
                if f.read().strip() == wanted:
                    return "/dev/" + name
        except OSError:
            continue
    raise OSError(errno.ENODEV, "no virtio-serial port named " + wanted)


def _setns_call() -> Callable[[int], None]:
    """setns(fd, CLONE_NEWNET) as a function: os.setns (Python >= 3.12) or libc's through ctypes."""
    native = getattr(os, "setns", None)
    if native is not None:
        return lambda fd: native(fd, CLONE_NEWNET)
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def call(fd: int) -> None:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    return call


class Network:
    """Network mode 'allow' in the guest: the `corral.net` port and a listener per command."""

    def __init__(self, poller: select.poll, port: int, setns: Callable[[int], None]) -> None:
        self.listen_port = port
        self.fd = os.open(find_port(NET_PORT_NAME), os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        self.setns = setns
        self.own = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self.mux = netmux.Mux(self.fd, poller)

    def listen_in(self, pid: int, tag: int) -> None:
        """Listen on 127.0.0.1:PORT in the network namespace of `pid` (a command's), for the mux."""
        target = os.open("/proc/%d/ns/net" % pid, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.setns(target)
            try:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind(("127.0.0.1", self.listen_port))
                    sock.listen(1024)
                except OSError:
                    sock.close()
                    raise
            finally:
                try:
                    self.setns(self.own)
                except OSError as exc:  # never serve anything from a command's namespace
                    os.write(2, b"corral guest agent: cannot return to its network namespace: %s\n" % str(exc).encode())
                    os._exit(70)
        finally:
            os.close(target)
        self.mux.listen(sock, tag)


def _high(fd: int) -> int:
    """`fd` moved above every descriptor number a command line refers to (close-on-exec)."""
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _HIGH_FD)
    os.close(fd)
    return new


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    stream.write_all(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return _high(fd)


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read_counter(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except OSError:
        pass
    return 0


def _run(argv: list) -> None:  # type: ignore[type-arg]
    pid = os.posix_spawn(argv[0], argv, {"PATH": "/bin"})
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise OSError(errno.EIO, "%s failed (status %d)" % (" ".join(argv[1:3]), status))


class Exec:
    def __init__(self, ident: int) -> None:
        self.id = ident
        self.pid = 0
        self.status = None  # type: int | None
        self.maxrss = 0
        self.pipes = {}  # type: dict[int, int]  # our read end -> frame kind
        self.stdin_fd = -1
        self.stdin_buf = bytearray()
        self.stdin_eof = False
        self.cgroup = ""
        self.status_fd = -1
        self.error = ""
        self.oom_before = 0
        self.pids_before = 0


class GuestAgent:
    def __init__(self, port: int) -> None:
        self.port = port
        self.reader = stream.Reader()
        self.execs = {}  # type: dict[int, Exec]
        self.by_pid = {}  # type: dict[int, Exec]
        self.by_fd = {}  # type: dict[int, Exec]
        self.etc = []  # type: list[tuple[str, bytes]]
        self.seccomp = b""
        self.ready = False
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.poller = select.poll()
        self.net = None  # type: Network | None
        self.setns = None  # type: Callable[[int], None] | None
        self.setns_error = ""
        try:
            self.setns = _setns_call()  # at boot (see the imports above); needed by network 'allow' only
        except (ImportError, OSError, AttributeError) as exc:
            self.setns_error = "no setns() here: %s" % exc

    def send(self, ident: int, body: dict) -> None:  # type: ignore[type-arg]
        stream.write_all(self.port, stream.message(ident, body))

    # ---------------------------------------------------------------- hello
    def hello(self, msg: dict) -> None:  # type: ignore[type-arg]
        entropy = base64.b64decode(msg.get("entropy", ""))
        if entropy:  # every restored VM starts from the same saved state: stir in the host's randomness
            with open("/dev/urandom", "wb") as f:
                f.write(entropy)
        for share in msg.get("shares", []):
            os.makedirs(share["target"], exist_ok=True)
            opts = "trans=virtio,version=9p2000.L,msize=%d,cache=%s" % (
                int(share.get("msize", 262144)),
                share.get("cache", "none"),
            )
            if share.get("ro"):
                opts += ",ro"
            _run([BUSYBOX, "mount", "-t", "9p", "-o", opts, share["tag"], share["target"]])
        for tmp in msg.get("tmpfs", []):
            os.makedirs(tmp["target"], exist_ok=True)
            opts = "mode=%s" % tmp.get("mode", "0755")
            if tmp.get("size"):
                opts += ",size=%d" % int(tmp["size"])
            _run([BUSYBOX, "mount", "-t", "tmpfs", "-o", opts, "tmpfs", tmp["target"]])
        self.etc = [(str(name), base64.b64decode(data)) for name, data in msg.get("etc", [])]
        self.seccomp = base64.b64decode(msg.get("seccomp", ""))
        limits = msg.get("limits", {})
        _write(CGROUP + "/cgroup.subtree_control", "+memory +pids +cpu")
        os.makedirs(SANDBOX_CG, exist_ok=True)
        if limits.get("memory"):
            _write(SANDBOX_CG + "/memory.max", str(int(limits["memory"])))
            _write(SANDBOX_CG + "/memory.swap.max", "0") if os.path.exists(SANDBOX_CG + "/memory.swap.max") else None
        if limits.get("pids"):
            _write(SANDBOX_CG + "/pids.max", str(int(limits["pids"])))
        if limits.get("cpus"):
            period = 100000
            _write(SANDBOX_CG + "/cpu.max", "%d %d" % (int(float(limits["cpus"]) * period), period))
        _write(SANDBOX_CG + "/cgroup.subtree_control", "+memory +pids")
        if msg.get("hostname"):
            _write("/proc/sys/kernel/hostname", str(msg["hostname"]))
        net = msg.get("net")
        if net:
            if self.setns is None:
                raise OSError(errno.ENOSYS, self.setns_error)
            self.net = Network(self.poller, int(net["port"]), self.setns)
        self.ready = True

    # ---------------------------------------------------------------- exec
    def start(self, ident: int, msg: dict) -> None:  # type: ignore[type-arg]
        ex = Exec(ident)
        argv = [str(a) for a in msg["argv"]]
        env = {str(k): str(v) for k, v in msg.get("env", {}).items()}
        opened = []  # descriptors to close here once bubblewrap has its copies
        actions = []
        try:
            seccomp = _memfd("seccomp", self.seccomp)
            opened.append(seccomp)
            actions.append((os.POSIX_SPAWN_DUP2, seccomp, FD_SECCOMP))
            for i, (name, content) in enumerate(self.etc):
                fd = _memfd("etc-" + name, content)
                opened.append(fd)
                actions.append((os.POSIX_SPAWN_DUP2, fd, FD_ETC + i))
            status_r, status_w = (_high(fd) for fd in os.pipe())
            opened.append(status_w)
            actions.append((os.POSIX_SPAWN_DUP2, status_w, FD_STATUS))
            block_r, block_w = (_high(fd) for fd in os.pipe())
            opened.append(block_r)
            actions.append((os.POSIX_SPAWN_DUP2, block_r, FD_BLOCK))
            if msg.get("stdin"):
                in_r, in_w = (_high(fd) for fd in os.pipe())
                opened.append(in_r)
                os.set_blocking(in_w, False)
                ex.stdin_fd = in_w
            else:
                in_r = _high(os.open("/dev/null", os.O_RDONLY))
                opened.append(in_r)
            out_r, out_w = (_high(fd) for fd in os.pipe())
            err_r, err_w = (_high(fd) for fd in os.pipe())
            opened += [out_w, err_w]
            actions += [
                (os.POSIX_SPAWN_DUP2, in_r, 0),
                (os.POSIX_SPAWN_DUP2, out_w, 1),
                (os.POSIX_SPAWN_DUP2, err_w, 2),
            ]
            ex.pipes = {out_r: stream.STDOUT, err_r: stream.STDERR}
            ex.cgroup = "%s/e%d" % (SANDBOX_CG, ident)
            os.makedirs(ex.cgroup, exist_ok=True)
            ex.oom_before = _read_counter(SANDBOX_CG + "/memory.events", "oom_kill")
            ex.pids_before = _read_counter(SANDBOX_CG + "/pids.events", "max")
            ex.pid = os.posix_spawn(
                argv[0], argv, env, file_actions=actions, setsid=True, setsigdef=_DEFAULT_SIGNALS, setsigmask=()
            )
        except OSError as exc:
            for fd in opened:
                os.close(fd)
            self.send(ident, {"exit": True, "error": exc.strerror or str(exc), "errno": exc.errno or errno.EIO})
            return
        for fd in opened:
            os.close(fd)
        self.execs[ident] = ex
        self.by_pid[ex.pid] = ex
        # bubblewrap writes the command's exit code here at the end: kept open until then (no SIGPIPE).
        ex.status_fd = status_r
        child = self._child_pid(status_r)
        what = "its cgroup"
        try:
            if not child:
                raise OSError(errno.ESRCH, "bubblewrap did not report the sandbox's pid")
            _write(ex.cgroup + "/cgroup.procs", str(child))
            what = "its rlimits"
            rlimits = msg.get("rlimits", {})
            if "RLIMIT_NOFILE" in rlimits:  # not while bubblewrap sets up: its own opens would fail
                processes.wait_until_blocked(child, FD_BLOCK)
            processes.set_rlimits(child, rlimits)
            if self.net is not None:
                what = "a listener for the network proxy in its namespace"
                self.net.listen_in(child, ident)
        except OSError as exc:
            # The command must not start without its limits or its way to the proxy. Kill the
            # sandbox before closing the block fd: at that end of file bubblewrap would run it.
            ex.error = "cannot set up the command's sandbox (%s): %s" % (what, exc)
            processes.kill_unreleased(ex.pid, child)
            self.kill(ex, signal.SIGKILL)
            os.close(block_w)
            block_w = -1
        if block_w >= 0:
            os.write(block_w, b"1")
            os.close(block_w)
        for fd in ex.pipes:
            self.by_fd[fd] = ex
            self.poller.register(fd, select.POLLIN)
        if ex.stdin_fd >= 0:
            self.by_fd[ex.stdin_fd] = ex

    def _child_pid(self, fd: int) -> int:
        """The pid bubblewrap reports for the sandbox (0 if bubblewrap died first)."""
        data = b""
        while True:
            try:
                pid = processes.bwrap_child_pid(data)
            except ValueError:
                return 0
            if pid is not None:
                return pid
            ready = select.select([fd], [], [], 30.0)[0]
            if not ready:
                return 0
            chunk = os.read(fd, 4096)
            if not chunk:
                return 0
            data += chunk

    def stdin(self, ex: Exec, data: bytes) -> None:
        if ex.stdin_fd < 0:
            return
        if not data:
            ex.stdin_eof = True
        ex.stdin_buf += data
        self._flush_stdin(ex)

    def _flush_stdin(self, ex: Exec) -> None:
        while ex.stdin_buf:
            try:
                n = os.write(ex.stdin_fd, ex.stdin_buf[:65536])
            except BlockingIOError:
                break
            except OSError:  # the command closed its stdin: drop the rest
                ex.stdin_buf = bytearray()
                break
            del ex.stdin_buf[:n]
        if ex.stdin_buf:
            self.poller.register(ex.stdin_fd, select.POLLOUT)
            return
        try:
            self.poller.unregister(ex.stdin_fd)
        except KeyError:
            pass
        if ex.stdin_eof:
            self.by_fd.pop(ex.stdin_fd, None)
            os.close(ex.stdin_fd)
            ex.stdin_fd = -1

    def kill(self, ex: Exec, sig: int) -> None:
        if sig == signal.SIGKILL:
            try:
                _write(ex.cgroup + "/cgroup.kill", "1")
            except OSError:
                pass
        if ex.status is None:
            try:
                os.kill(ex.pid, sig)
            except OSError:
                pass

    def output(self, fd: int) -> None:
        ex = self.by_fd[fd]
        try:
            chunk = os.read(fd, stream.CHUNK)
        except BlockingIOError:
            return
        if chunk:
            stream.write_all(self.port, stream.frame(ex.pipes[fd], ex.id, chunk))
            return
        self.poller.unregister(fd)
        os.close(fd)
        del self.by_fd[fd]
        del ex.pipes[fd]
        self._maybe_done(ex)

    def reap(self) -> None:
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            ex = self.by_pid.pop(pid, None)
            if ex is None:
                continue
            ex.status = status
            ex.maxrss = usage.ru_maxrss * 1024
            self._maybe_done(ex)

    def _maybe_done(self, ex: Exec) -> None:
        if ex.status is None or ex.pipes:
            return
        if ex.stdin_fd >= 0:
            try:
                self.poller.unregister(ex.stdin_fd)
            except KeyError:
                pass
            self.by_fd.pop(ex.stdin_fd, None)
            os.close(ex.stdin_fd)
            ex.stdin_fd = -1
        if ex.status_fd >= 0:
            os.close(ex.status_fd)
            ex.status_fd = -1
        if self.net is not None:
            self.net.mux.unlisten(ex.id)
        peak = None
        try:
            with open(ex.cgroup + "/memory.peak") as f:
                peak = int(f.read())
        except (OSError, ValueError):
            pass
        try:
            _write(ex.cgroup + "/cgroup.kill", "1")
        except OSError:
            pass
        reply = {
            "exit": True,
            "status": ex.status,
            "maxrss": ex.maxrss,
            "peak": peak,
            "oom_kills": _read_counter(SANDBOX_CG + "/memory.events", "oom_kill") - ex.oom_before,
            "pids_hits": _read_counter(SANDBOX_CG + "/pids.events", "max") - ex.pids_before,
        }  # type: dict[str, object]
        if ex.error:
            reply["error"] = ex.error
        for _ in range(100):
            try:
                os.rmdir(ex.cgroup)
                break
            except OSError:
                select.select([], [], [], 0.01)
        del self.execs[ex.id]
        self.send(ex.id, reply)

    # ---------------------------------------------------------------- loop
    def request(self, kind: int, ident: int, payload: bytes) -> bool:
        """Handle one frame from the host; False when asked to stop."""
        if kind == stream.STDIN:
            ex = self.execs.get(ident)
            if ex is not None:
                self.stdin(ex, payload)
            return True
        if kind != stream.MSG:
            return True
        msg = stream.decode(payload)
        op = msg.get("op")
        if op == "hello":
            try:
                self.hello(msg)
                self.send(0, {"ready": True, "pid": os.getpid()})
            except Exception as exc:  # report it: the host refuses to use this sandbox
                self.send(0, {"ready": False, "error": "%s: %s" % (type(exc).__name__, exc)})
        elif op == "exec" and self.ready:
            self.start(ident, msg)
        elif op == "signal":
            ex = self.execs.get(ident)
            if ex is not None:
                self.kill(ex, int(msg.get("signal", signal.SIGKILL)))
        elif op == "ping":
            self.send(ident, {"pong": True})
        elif op == "stop":
            return False
        return True

    def serve(self) -> None:
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.poller.register(self.port, select.POLLIN)
        self.poller.register(self.wake_r, select.POLLIN)
        self.send(0, {"booted": True})
        while True:
            try:
                events = self.poller.poll()
            except InterruptedError:
                continue
            for fd, event in events:
                if fd == self.wake_r:
                    try:
                        os.read(self.wake_r, 4096)
                    except BlockingIOError:
                        pass
                    self.reap()
                elif fd == self.port:
                    chunk = os.read(self.port, 1 << 16)
                    if not chunk:
                        select.select([], [], [], 0.05)  # host side not connected (yet): wait for it
                        continue
                    self.reader.feed(chunk)
                    for kind, ident, payload in self.reader.frames():
                        if not self.request(kind, ident, payload):
                            return
                elif fd in self.by_fd:
                    ex = self.by_fd[fd]
                    if fd == ex.stdin_fd:
                        self._flush_stdin(ex)
                    else:
                        self.output(fd)
                elif self.net is not None and self.net.mux.owns(fd):
                    try:
                        self.net.mux.handle(fd, event)
                    except Exception as exc:  # the network ends, the agent (the VM's init) goes on
                        os.write(2, b"corral guest agent: network port failed: %r\n" % exc)
                        self.net.mux.close()
            self.reap()


def main() -> int:
    port = os.open(find_port(), os.O_RDWR | os.O_CLOEXEC)
    agent = GuestAgent(port)
    try:
        agent.serve()
    finally:
        for ex in list(agent.execs.values()):
            agent.kill(ex, signal.SIGKILL)
        os.sync()
    return 0


if __name__ == "__main__":
    code = main()
    if os.getpid() == 1:  # PID 1 must not exit: power the VM off instead
        os.execv(BUSYBOX, [BUSYBOX, "poweroff", "-f"])
    sys.exit(code)
