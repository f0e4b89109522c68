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


@attack("processes", "ptrace another process", requires=["syscall.filter"])
def ptrace_attach(ctx: AttackContext) -> None:
    # PTRACE_ATTACH (16) to pid 1 of whatever this sandbox sees
    _syscall_refused(ctx, "ptrace", "16, 1, 0, 0", "ptrace(PTRACE_ATTACH)")


@attack("processes", "process_vm_readv", requires=["syscall.filter"])
def process_vm_readv(ctx: AttackContext) -> None:
    _syscall_refused(ctx, "process_vm_readv", "1, 0, 0, 0, 0, 0", "process_vm_readv")


@attack("processes", "mount a filesystem", requires=["syscall.filter"])
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


@attack("processes", "TIOCSTI keystroke injection", requires=["syscall.filter"])
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


@attack("processes", "io_uring", requires=["syscall.filter"])
def io_uring(ctx: AttackContext) -> None:
    _syscall_refused(ctx, "io_uring_setup", "8, ctypes.create_string_buffer(120)", "io_uring_setup")


@attack("processes", "bpf, perf_event_open, userfaultfd, keyctl", requires=["syscall.filter"])
def kernel_attack_surface(ctx: AttackContext) -> None:
    _syscall_refused(ctx, "bpf", "0, 0, 0", "bpf")
    _syscall_refused(ctx, "perf_event_open", "ctypes.create_string_buffer(128), 0, -1, -1, 0", "perf_event_open")
    _syscall_refused(ctx, "userfaultfd", "0", "userfaultfd")
    _syscall_refused(ctx, "keyctl", "0, 0, 0", "keyctl")


@attack("processes", "load a kernel module", requires=["syscall.filter"])
def load_module(ctx: AttackContext) -> None:
    _syscall_refused(ctx, "init_module", "0, 0, b''", "init_module")


@attack("processes", "setuid binaries give nothing", requires=["syscall.filter"])
def setuid_binary(ctx: AttackContext) -> None:
    r = ctx.sh("grep NoNewPrivs /proc/self/status; "
               "su root -c 'grep CapEff /proc/self/status' </dev/null 2>/dev/null; "
               "sudo -n grep CapEff /proc/self/status 2>/dev/null")  # fmt: skip
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
