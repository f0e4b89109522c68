from __future__ import annotations

import struct

import pytest

from corral.kernel import seccomp

pyseccomp = pytest.importorskip("pyseccomp", reason="pyseccomp (libseccomp) checks the syscall table")


@pytest.mark.parametrize("name", sorted(seccomp.SYSCALLS))
def test_syscall_numbers_match_libseccomp(name: str) -> None:
    x86, arm = seccomp.SYSCALLS[name]
    for arch, ours in ((pyseccomp.Arch.X86_64, x86), (pyseccomp.Arch.AARCH64, arm)):
        try:
            theirs = pyseccomp.resolve_syscall(arch, name)
        except Exception:
            theirs = -1
        if theirs < 0:
            # unknown to this libseccomp (too new) or absent on the arch
            assert ours is None or name in ("open_tree_attr",), (name, arch, ours)
        else:
            assert ours == theirs, (name, arch, ours, theirs)


def decode(program: bytes) -> list[tuple[int, int, int, int]]:
    return [struct.unpack("<HBBI", program[i : i + 8]) for i in range(0, len(program), 8)]


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_program_shape(arch: str) -> None:
    prog = decode(seccomp.build_filter(arch=arch))
    # load arch; foreign arch -> kill
    assert prog[0] == (0x20, 0, 0, 4)
    assert prog[1] == (0x15, 1, 0, seccomp.AUDIT_ARCH[arch])
    assert prog[2] == (0x06, 0, 0, seccomp.RET_KILL_PROCESS)
    assert prog[3] == (0x20, 0, 0, 0)
    assert prog[-1] == (0x06, 0, 0, seccomp.RET_ALLOW)
    assert prog[-2] == (0x06, 0, 0, seccomp.ret_errno(seccomp.EPERM))
    denied = {k for op, _jt, _jf, k in prog if op == 0x15}
    index = 0 if arch == "x86_64" else 1
    for name in ("ptrace", "mount", "bpf", "io_uring_setup", "keyctl", "setns", "unshare", "perf_event_open"):
        assert seccomp.SYSCALLS[name][index] in denied, name
    assert len(prog) < 4096


def test_x86_64_refuses_x32_abi() -> None:
    prog = decode(seccomp.build_filter(arch="x86_64"))
    assert prog[4] == (0x35, 0, 1, seccomp.X32_SYSCALL_BIT)
    assert prog[5] == (0x06, 0, 0, seccomp.ret_errno(seccomp.ENOSYS))


def test_socket_families_follow_the_network_mode() -> None:
    full = decode(seccomp.build_filter(arch="x86_64"))
    none = decode(seccomp.build_filter(arch="x86_64", families=()))
    ks = lambda p: {k for op, _a, _b, k in p if op == 0x15}  # noqa: E731
    assert {seccomp.AF_UNIX, seccomp.AF_INET6}.issubset(ks(full))
    assert len(none) < len(full)
