"""Confine the current process: no_new_privs, Landlock, a seccomp filter (rlimits: processes.py).

Stdlib only and Python 3.8-compatible: the agent imports it inside sandboxes, where the only
Python may be the system's. The host imports it too, to probe the kernel (`landlock_abi`).
"""

from __future__ import annotations

import ctypes
import os

PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36
SECCOMP_MODE_FILTER = 2

SYS_LANDLOCK = {  # create_ruleset, add_rule, restrict_self: the same numbers on x86_64 and aarch64
    "create": 444,
    "add": 445,
    "restrict": 446,
}
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
LANDLOCK_RULE_NET_PORT = 2

FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
FS_IOCTL_DEV = 1 << 15  # ABI 5
NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1

FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
READ_RIGHTS = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR


class ConfineError(OSError):
    pass


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise ConfineError(err, f"{what}: {os.strerror(err)}")
    return result


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when Landlock is absent or disabled."""
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    result = libc.syscall(
        SYS_LANDLOCK["create"], None, ctypes.c_size_t(0), ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION)
    )
    return int(result) if result > 0 else 0


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPort(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


def handled_fs(abi: int) -> int:
    rights = (1 << 13) - 1
    if abi >= 2:
        rights |= FS_REFER
    if abi >= 3:
        rights |= FS_TRUNCATE
    if abi >= 5:
        rights |= FS_IOCTL_DEV
    return rights


def apply_landlock(  # type: ignore[no-untyped-def]
    read_only: list,  # type: ignore[type-arg]
    read_write: list,  # type: ignore[type-arg]
    *,
    connect_ports=None,
    restrict_net: bool = False,
    scope: bool = False,
) -> int:
    """Allow only `read_only` (read + execute) and `read_write` (everything) paths; return the ABI used.

    With `restrict_net` (ABI >= 4) TCP bind is refused and connect is allowed only to
    `connect_ports`. With `scope` (ABI >= 6) signals and abstract unix sockets cannot leave the
    domain. Missing paths are skipped. Raises ConfineError when Landlock is unavailable.
    """
    abi = landlock_abi()
    if abi < 1:
        raise ConfineError(95, "Landlock is not supported by this kernel")
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    fs = handled_fs(abi)
    attr = _RulesetAttr(fs, 0, 0)
    size = 8
    if restrict_net and abi >= 4:
        attr.handled_access_net = NET_BIND_TCP | NET_CONNECT_TCP
        size = 16
    if scope and abi >= 6:
        attr.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
        size = 24
    ruleset = _check(
        libc.syscall(SYS_LANDLOCK["create"], ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0)),
        "landlock_create_ruleset",
    )
    try:
        # Device nodes may never be made, not even in a writable zone (root could mknod a disk).
        writable = fs & ~(FS_MAKE_CHAR | FS_MAKE_BLOCK)
        for paths, rights in ((read_only, READ_RIGHTS), (read_write, writable)):
            for path in paths:
                try:
                    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    is_dir = os.path.isdir("/proc/self/fd/%d" % fd)
                    allowed = (rights if is_dir else rights & FILE_RIGHTS) & fs
                    rule = _PathBeneath(allowed, fd)
                    _check(
                        libc.syscall(
                            SYS_LANDLOCK["add"],
                            ctypes.c_int(ruleset),
                            ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH),
                            ctypes.byref(rule),
                            ctypes.c_uint32(0),
                        ),
                        "landlock_add_rule " + path,
                    )
                finally:
                    os.close(fd)
        if restrict_net and abi >= 4:
            for port in connect_ports or ():
                rule_net = _NetPort(NET_CONNECT_TCP, int(port))
                _check(
                    libc.syscall(
                        SYS_LANDLOCK["add"],
                        ctypes.c_int(ruleset),
                        ctypes.c_int(LANDLOCK_RULE_NET_PORT),
                        ctypes.byref(rule_net),
                        ctypes.c_uint32(0),
                    ),
                    "landlock_add_rule port",
                )
        set_no_new_privs()
        _check(
            libc.syscall(SYS_LANDLOCK["restrict"], ctypes.c_int(ruleset), ctypes.c_uint32(0)), "landlock_restrict_self"
        )
    finally:
        os.close(ruleset)
    return abi


def set_no_new_privs() -> None:
    libc = _libc()
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def set_child_subreaper() -> None:
    libc = _libc()
    _check(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def load_seccomp(program: bytes) -> None:
    """Install a classic-BPF seccomp filter (implies no_new_privs)."""
    if len(program) % 8 or not program:
        raise ConfineError(22, "a seccomp program is a non-empty array of 8-byte instructions")
    set_no_new_privs()
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    libc = _libc()
    _check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0), "prctl(PR_SET_SECCOMP)")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_SYS_CAPSET = {"x86_64": 126, "aarch64": 91}


def drop_capabilities() -> None:
    """Drop every capability from the bounding, ambient, effective, permitted and inheritable sets.

    Afterwards even uid 0 cannot regain a capability by exec (the bounding set is empty).
    """
    libc = _libc()
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    # Emptying the bounding set needs CAP_SETPCAP. Without it we are not root and hold no
    # capabilities, and no_new_privs already stops setuid and file-capability binaries.
    can_drop_bounding = os.geteuid() == 0
    for cap in range(64 if can_drop_bounding else 0):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0:
            err = ctypes.get_errno()
            if err == 22:  # EINVAL: past the last capability this kernel knows
                break
            raise ConfineError(err, "prctl(PR_CAPBSET_DROP, %d): %s" % (cap, os.strerror(err)))
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    libc.syscall.restype = ctypes.c_long
    number = _SYS_CAPSET.get(os.uname().machine)
    if number is None:
        raise ConfineError(95, "capset: unsupported architecture")
    _check(libc.syscall(number, ctypes.byref(header), ctypes.byref(data)), "capset")
