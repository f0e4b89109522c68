"""Without mount namespaces a tmpfs zone is a private host directory: it goes when its run ends,
however it ends (SIGTERM, SIGHUP), and what a killed run left is removed by the next one."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from corral.backends import registry
from corral.backends.hostagent import reap_stale_private_dirs


def _free_pid() -> int:
    return next(pid for pid in range(4_194_000, 4_194_304) if not os.path.exists(f"/proc/{pid}"))


def test_only_the_private_directories_of_dead_corral_processes_are_removed(tmp_path: Path) -> None:
    dead, alive = _free_pid(), os.getppid()
    stale = tmp_path / f"corral-{dead}-private-tmp-abc"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "notes.txt").write_text("left behind")
    kept = [
        tmp_path / f"corral-{os.getpid()}-private-tmp-own",  # ours, still running
        tmp_path / f"corral-{alive}-private-tmp-live",  # a process that exists
        tmp_path / f"corral-{dead}-123abc",  # a container's state directory, not a private one
        tmp_path / "corral-1002",
        tmp_path / f"other-{dead}-private-tmp-x",
    ]
    for path in kept:
        path.mkdir()
    (tmp_path / f"corral-{dead}-private-file").write_text("not a directory")
    assert reap_stale_private_dirs(str(tmp_path)) == [str(stale)]
    assert not stale.exists() and all(path.exists() for path in kept)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_terminated_run_removes_its_private_directories(tmp_path: Path, sig: signal.Signals) -> None:
    if not registry.probe(registry.create("landlock")).available:
        pytest.skip("the landlock backend does not work here")
    marker = tmp_path / "tmpdir.txt"
    proc = subprocess.Popen([sys.executable, "-m", "corral", "run", "--backend", "landlock", "--", "sh", "-c",
                             f'echo "$TMPDIR" > {marker}; echo x > "$TMPDIR/notes.txt"; sleep 30'],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 20
    while not (marker.exists() and marker.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    private = marker.read_text().strip()
    assert "-private-" in private and os.path.isdir(private)
    proc.send_signal(sig)
    assert proc.wait(timeout=20) == 128 + sig
    assert not os.path.exists(private), os.listdir(private)


def test_a_network_proxy_s_socket_directory_is_named_and_reaped_the_same_way() -> None:
    import tempfile

    from corral.net.service import SandboxProxy
    from corral.policy.model import Network

    stale = Path(tempfile.gettempdir()) / f"corral-{_free_pid()}-private-net-test"
    stale.mkdir()
    proxy = SandboxProxy.start_unix(Network(mode="allow", allow=["127.0.0.1:9"]))
    try:
        assert proxy.socket_path is not None
        assert os.path.basename(os.path.dirname(proxy.socket_path)).startswith(f"corral-{os.getpid()}-private-net-")
        assert not stale.exists()
    finally:
        proxy.stop()
        shutil.rmtree(stale, ignore_errors=True)
