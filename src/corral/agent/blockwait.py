"""Wait until a bubblewrap sandbox, its set-up done, waits on its block fd (stdlib only, Python >= 3.8).

bubblewrap reads `--block-fd` right before it execs the command, after every mount. A limit that
must not bind bubblewrap's own set-up (an open-files limit would fail its opens with EMFILE) is
set on the sandbox's process only once /proc shows it blocked in that read. The host's launcher
and the microVM's guest agent both use it.
"""

from __future__ import annotations

import os
import time

_READ_SYSCALL = {"x86_64": "0", "aarch64": "63"}


def wait_until_blocked(pid: int, block_fd: int, timeout: float = 5.0) -> bool:
    """True once `pid` sits in read(`block_fd`); False if /proc cannot say or `timeout` passes."""
    read_nr = _READ_SYSCALL.get(os.uname().machine)
    want = hex(block_fd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open("/proc/%d/syscall" % pid, "rb") as f:
                fields = f.read().decode().split()
        except OSError:
            return False
        if len(fields) > 1 and fields[1] == want and (read_nr is None or fields[0] == read_nr):
            return True
        time.sleep(0.0002)
    return False
