"""corral's seccomp filter, generated as classic BPF in pure Python.

Why not libseccomp at run time: the filter is needed on every launch, and a generator with no
C library, no `ctypes` and no on-disk cache is both faster and safer (a cache under the user's home
could be rewritten from inside a sandbox whose workspace is the home directory). The syscall
numbers below are checked against libseccomp's tables by the test suite (tests/kernel/test_seccomp.py).

The filter is a denylist: everything is allowed except
- any syscall from a foreign ABI (i386 or x32 on x86_64): killed / ENOSYS, so numbers cannot be aliased;
- the syscalls in DENIED (ptrace, mount family, bpf, io_uring, keyctl, setns, unshare, ...): EPERM;
- clone with any CLONE_NEW* flag (new namespaces, above all new user namespaces): EPERM;
- clone3, whose flags live in memory a filter cannot read: ENOSYS (libc falls back to clone);
- ioctl TIOCSTI and TIOCLINUX (terminal keystroke injection), compared on the low 32 bits: EPERM;
- socket() with an address family the network mode does not need: EAFNOSUPPORT; netlink only
  for NETLINK_ROUTE.

With `tcp_client_only` (the landlock backend's network mode 'allow', where Landlock limits TCP
connect() to the proxy's port) IPv4 and IPv6 sockets must also be TCP (no UDP, ICMP, SCTP or MPTCP,
which Landlock does not restrict), and listen() and TCP Fast Open sends (sendto/sendmsg/sendmmsg
with MSG_FASTOPEN, which connect without connect() and so without Landlock's check) are refused: EPERM.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

EPERM = 1
ENOSYS = 38
EAFNOSUPPORT = 97

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
X32_SYSCALL_BIT = 0x40000000

# name: (x86_64 number, aarch64 number); None where the syscall does not exist on that arch.
SYSCALLS: dict[str, tuple[int | None, int | None]] = {
    "ptrace": (101, 117),
    "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271),
    "pidfd_getfd": (438, 438),
    "process_madvise": (440, 440),
    "kcmp": (312, 272),
    "mount": (165, 40),
    "umount2": (166, 39),
    "pivot_root": (155, 41),
    "chroot": (161, 51),
    "move_mount": (429, 429),
    "open_tree": (428, 428),
    "fsopen": (430, 430),
    "fsconfig": (431, 431),
    "fsmount": (432, 432),
    "fspick": (433, 433),
    "mount_setattr": (442, 442),
    "open_tree_attr": (467, 467),
    "setns": (308, 268),
    "unshare": (272, 97),
    "kexec_load": (246, 104),
    "kexec_file_load": (320, 294),
    "init_module": (175, 105),
    "finit_module": (313, 273),
    "delete_module": (176, 106),
    "bpf": (321, 280),
    "perf_event_open": (298, 241),
    "userfaultfd": (323, 282),
    "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427),
    "keyctl": (250, 219),
    "add_key": (248, 217),
    "request_key": (249, 218),
    "open_by_handle_at": (304, 265),
    "name_to_handle_at": (303, 264),
    "acct": (163, 89),
    "swapon": (167, 224),
    "swapoff": (168, 225),
    "reboot": (169, 142),
    "syslog": (103, 116),
    "quotactl": (179, 60),
    "quotactl_fd": (443, 443),
    "lookup_dcookie": (212, 18),
    "iopl": (172, None),
    "ioperm": (173, None),
    "uselib": (134, None),
    "_sysctl": (156, None),
    "settimeofday": (164, 170),
    "clock_settime": (227, 112),
    "clock_adjtime": (305, 266),
    "vhangup": (153, 58),
    "fanotify_init": (300, 262),
    "sethostname": (170, 161),
    "setdomainname": (171, 162),
    "ustat": (136, None),
    "sysfs": (139, None),
    "nfsservctl": (180, 42),
    # Special-cased below, never plainly denied:
    "clone": (56, 220),
    "clone3": (435, 435),
    "ioctl": (16, 29),
    "socket": (41, 198),
    "listen": (50, 201),
    "sendto": (44, 206),
    "sendmsg": (46, 211),
    "sendmmsg": (307, 269),
}
SPECIAL = ("clone", "clone3", "ioctl", "socket", "listen", "sendto", "sendmsg", "sendmmsg")
DENIED = tuple(name for name in SYSCALLS if name not in SPECIAL)

CLONE_NEW_FLAGS = 0x7E020000  # NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
TIOCSTI = 0x5412
TIOCLINUX = 0x541C
AF_UNIX, AF_INET, AF_INET6, AF_NETLINK = 1, 2, 10, 16
NETLINK_ROUTE = 0
# Families a sandbox with its own network namespace may use (all traffic stays inside it).
FAMILIES_NETNS = (AF_UNIX, AF_INET, AF_INET6, AF_NETLINK)
SOCK_STREAM = 1
SOCK_TYPE_MASK = 0xF  # the type without SOCK_NONBLOCK / SOCK_CLOEXEC
IPPROTO_TCP = 6
MSG_FASTOPEN = 0x20000000
# (syscall, index of its flags argument) for the sends that can carry MSG_FASTOPEN
_FASTOPEN_SENDS = (("sendto", 3), ("sendmsg", 2), ("sendmmsg", 3))

# classic BPF opcodes
_LD_ABS_W = 0x20
_ALU_AND_K = 0x54
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
RET_KILL_PROCESS = 0x80000000
RET_ALLOW = 0x7FFF0000


def ret_errno(errno: int) -> int:
    return 0x00050000 | errno


def _arg_lo(i: int) -> int:
    # offsetof(struct seccomp_data, args[i]); the low 32 bits come first on little-endian arches
    return 16 + 8 * i


class _Asm:
    """A tiny assembler: straight-line code with forward jumps to labels."""

    def __init__(self) -> None:
        self.code: list[tuple[int, object, object, int]] = []
        self.labels: dict[str, int] = {}

    def ld(self, offset: int) -> None:
        self.code.append((_LD_ABS_W, 0, 0, offset))

    def jump(self, op: int, k: int, jt: str | int, jf: str | int) -> None:
        self.code.append((op, jt, jf, k))

    def and_(self, k: int) -> None:
        self.code.append((_ALU_AND_K, 0, 0, k))

    def ret(self, value: int) -> None:
        self.code.append((_RET_K, 0, 0, value))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def assemble(self) -> bytes:
        # struct sock_filter {u16 code; u8 jt; u8 jf; u32 k} in native byte order; int.to_bytes
        # rather than struct.pack spares `corral run` loading the _struct extension (~0.5 ms).
        out = bytearray()
        order = sys.byteorder
        for pc, (op, jt, jf, k) in enumerate(self.code):
            out += op.to_bytes(2, order)
            out.append(self._offset(pc, jt))
            out.append(self._offset(pc, jf))
            out += k.to_bytes(4, order)
        return bytes(out)

    def _offset(self, pc: int, target: object) -> int:
        if isinstance(target, int):
            return target
        assert isinstance(target, str)
        offset = self.labels[target] - pc - 1
        if not 0 <= offset <= 255:
            raise ValueError(f"BPF jump to {target} out of range ({offset})")
        return offset


def native_arch() -> str:
    import os

    machine = os.uname().machine
    if machine not in AUDIT_ARCH or sys.byteorder != "little":
        raise OSError(f"corral's seccomp filter does not support the {machine} architecture yet")
    return machine


_BUILT: dict[tuple[tuple[int, ...], str, bool], bytes] = {}


def build_filter(
    *, families: Iterable[int] = FAMILIES_NETNS, arch: str | None = None, tcp_client_only: bool = False
) -> bytes:
    """The filter as a `struct sock_filter[]` byte string, for `bwrap --seccomp FD` or PR_SET_SECCOMP."""
    arch = arch or native_arch()
    key = (tuple(sorted(set(families))), arch, tcp_client_only)
    if key not in _BUILT:
        _BUILT[key] = _assemble_filter(key[0], arch, tcp_client_only=tcp_client_only)
    return _BUILT[key]


def _assemble_filter(families: tuple[int, ...], arch: str, *, tcp_client_only: bool = False) -> bytes:
    index = 0 if arch == "x86_64" else 1
    allowed = families

    def nr(name: str) -> int | None:
        return SYSCALLS[name][index]

    a = _Asm()
    a.ld(4)  # arch
    a.jump(_JEQ_K, AUDIT_ARCH[arch], 1, 0)
    a.ret(RET_KILL_PROCESS)
    a.ld(0)  # syscall number
    if arch == "x86_64":
        a.jump(_JGE_K, X32_SYSCALL_BIT, 0, 1)
        a.ret(ret_errno(ENOSYS))
    for name in DENIED:
        number = nr(name)
        if number is not None:
            a.jump(_JEQ_K, number, 0, 1)
            a.ret(ret_errno(EPERM))
    a.jump(_JEQ_K, _require(nr("clone3")), 0, 1)
    a.ret(ret_errno(ENOSYS))

    a.jump(_JEQ_K, _require(nr("clone")), 0, "not_clone")
    a.ld(_arg_lo(0))
    a.jump(_JSET_K, CLONE_NEW_FLAGS, "deny", "allow")
    a.label("not_clone")

    a.jump(_JEQ_K, _require(nr("ioctl")), 0, "not_ioctl")
    a.ld(_arg_lo(1))
    a.jump(_JEQ_K, TIOCSTI, "deny", 0)
    a.jump(_JEQ_K, TIOCLINUX, "deny", "allow")
    a.label("not_ioctl")

    if tcp_client_only:
        a.jump(_JEQ_K, _require(nr("listen")), "deny", 0)
        for name, flags_arg in _FASTOPEN_SENDS:
            a.jump(_JEQ_K, _require(nr(name)), 0, f"not_{name}")
            a.ld(_arg_lo(flags_arg))
            a.jump(_JSET_K, MSG_FASTOPEN, "deny", "allow")
            a.label(f"not_{name}")

    a.jump(_JEQ_K, _require(nr("socket")), 0, "allow")
    a.ld(_arg_lo(0))
    for family in allowed:
        if family == AF_NETLINK:
            a.jump(_JEQ_K, family, "netlink", 0)
        elif tcp_client_only and family in (AF_INET, AF_INET6):
            a.jump(_JEQ_K, family, "tcp", 0)
        else:
            a.jump(_JEQ_K, family, "allow", 0)
    a.ret(ret_errno(EAFNOSUPPORT))
    a.label("netlink")
    a.ld(_arg_lo(2))
    a.jump(_JEQ_K, NETLINK_ROUTE, "allow", 0)
    a.ret(ret_errno(EAFNOSUPPORT))
    if tcp_client_only:
        a.label("tcp")
        a.ld(_arg_lo(1))
        a.and_(SOCK_TYPE_MASK)
        a.jump(_JEQ_K, SOCK_STREAM, 0, "deny")
        a.ld(_arg_lo(2))
        a.jump(_JEQ_K, 0, "allow", 0)
        a.jump(_JEQ_K, IPPROTO_TCP, "allow", "deny")

    a.label("deny")
    a.ret(ret_errno(EPERM))
    a.label("allow")
    a.ret(RET_ALLOW)
    return a.assemble()


def _require(number: int | None) -> int:
    assert number is not None
    return number
