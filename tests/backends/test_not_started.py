"""A one-shot command that cannot start is named by corral (127 / 126), not by bubblewrap's failure (125)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

import corral
from corral.policy.resolve import resolve

pytestmark = pytest.mark.usefixtures("namespace_ok")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "sub").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    return tmp_path


def test_a_fresh_sandbox_is_known_from_its_mounts(project: Path) -> None:
    rp = resolve(corral.Policy.workspace(str(project)))
    assert rp.directory_status(str(project / "sub"), fresh=True) == 0
    assert rp.directory_status(str(project / "notes.txt"), fresh=True) == errno.ENOTDIR
    assert rp.directory_status(str(project / "gone"), fresh=True) == errno.ENOENT
    assert rp.directory_status("/nonexistent", fresh=True) == errno.ENOENT
    assert rp.directory_status("/tmp/made-later", fresh=True) == errno.ENOENT  # a fresh tmpfs is empty
    assert rp.directory_status("/tmp/made-later") is None  # a live one may hold it by now
    for there in ("/", "/tmp", "/usr/bin", "/etc"):
        assert rp.directory_status(there, fresh=True) == 0, there
    assert rp.directory_status("/proc/self", fresh=True) is None  # the kernel's, not told from the host
    assert rp.program_status("true", fresh=True) == 0
    assert rp.program_status("/x/true", fresh=True) == errno.ENOENT
    assert rp.program_status("/x/true") is None
    assert rp.program_status(str(project), fresh=True) == errno.EISDIR
    assert rp.program_status("/usr", fresh=True) == errno.EISDIR
    assert rp.program_status(str(project / "notes.txt"), fresh=True) == errno.EACCES


@pytest.mark.parametrize(
    ("kwargs", "argv", "code", "message"),
    [
        ({"env": {"PATH": "/x"}}, ["true"], 127, "corral: true: command not found"),
        ({"cwd": "/nonexistent"}, ["true"], 126, "cannot use working directory /nonexistent: No such file"),
        ({"cwd": "/tmp/not-yet"}, ["true"], 126, "cannot use working directory /tmp/not-yet: No such file"),
        ({}, ["./sub"], 126, "corral: ./sub: Is a directory"),
    ],
)
def test_a_command_that_cannot_start_is_named(project: Path, kwargs: dict[str, object], argv: list[str], code: int,
                                              message: str) -> None:  # fmt: skip
    r = corral.run(argv, policy=corral.Policy.workspace(str(project)), backend="namespace", **kwargs)  # type: ignore[arg-type]
    assert r.returncode == code and message in r.stderr_text, r
    assert "bwrap" not in r.stderr_text, r


def test_the_cli_says_one_line(project: Path) -> None:
    from tests.conftest import corral_cli

    no_dir = b"corral: cannot use working directory /nonexistent: No such file or directory\n"
    for args, code, message in ((["--env", "PATH=/x", "--", "true"], 127, b"corral: true: command not found\n"),
                                (["--cwd", "/nonexistent", "--", "true"], 126, no_dir)):  # fmt: skip
        r = corral_cli("run", *args, cwd=project)
        assert r.returncode == code and r.stderr == message, r.stderr
