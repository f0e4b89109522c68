"""A config file found by searching upward is used only when no one but us (or root) could have written it.

Another user who can write a parent directory (/tmp, a shared checkout) could otherwise plant a
corral.toml whose approver runs as us and whose zones open our files. A file named with --config is
the caller's choice and is not checked.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from corral import ConfigError
from corral.policy.load import find_config, load_config, load_policy

OTHER = 12345  # a uid that is neither ours nor root's
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user (os.chown)")


def project(tmp_path: Path, text: str = '[limits]\ntimeout = "5s"\n') -> tuple[Path, Path]:
    """tmp_path/corral.toml and tmp_path/proj, the directory a search starts from."""
    cfg = tmp_path / "corral.toml"
    cfg.write_text(text)
    cfg.chmod(0o644)
    tmp_path.chmod(0o755)
    proj = tmp_path / "proj"
    proj.mkdir()
    return cfg, proj


def refused(cfg: Path, start: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The error every way of searching gives, checked to be the same and to name the file and the fix."""
    monkeypatch.chdir(start)
    messages = []
    for search in (lambda: find_config(str(start)), load_policy, lambda: load_config(search=True)):
        with pytest.raises(ConfigError) as info:
            search()
        messages.append(str(info.value))
    assert len(set(messages)) == 1, messages
    message = messages[0]
    assert message.startswith(f"{cfg}: refusing this config file, found by searching"), message
    assert f"--config {cfg}" in message and "--no-config" in message and "\n" not in message
    return message


@needs_root
def test_a_found_config_owned_by_another_user_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The QA repro: another user's corral.toml in a sticky shared directory above the project added
    `/root` read-write; it is refused, naming its owner."""
    cfg, proj = project(tmp_path, '[[zones]]\nhost = "/root"\nmode = "rw"\n')
    tmp_path.chmod(0o1777)
    os.chown(cfg, OTHER, OTHER)
    assert f"it is owned by uid {OTHER}, not by you (root)" in refused(cfg, proj, monkeypatch)
    # Named with --config (load_config(path)), it is the caller's choice and is used.
    policy = load_policy(str(cfg))
    assert any(z.host == "/root" and z.mode == "rw" for z in policy.zones)


@needs_root
def test_a_found_config_is_checked_again_when_it_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI finds the file (find_config), then reads it (load_config(path)): a file swapped in between is
    another user's, and is refused when read, not used as if named with --config."""
    cfg, proj = project(tmp_path)
    path = find_config(str(proj))
    assert path == str(cfg)
    os.chown(cfg, OTHER, OTHER)
    with pytest.raises(ConfigError, match=f"owned by uid {OTHER}"):
        load_config(path, search=False, workspace=str(proj))


@needs_root
def test_a_found_config_in_another_users_directory_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, proj = project(tmp_path)
    os.chown(tmp_path, OTHER, OTHER)
    assert f"its directory {tmp_path} is owned by uid {OTHER}" in refused(cfg, proj, monkeypatch)


@needs_root
def test_a_found_config_through_another_users_link_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A link another user owns in a sticky directory is theirs to point anywhere (at any root-owned file)."""
    real = tmp_path / "real.toml"
    real.write_text('[limits]\ntimeout = "5s"\n')
    real.chmod(0o644)
    tmp_path.chmod(0o1777)
    cfg = tmp_path / "corral.toml"
    cfg.symlink_to(real)
    os.lchown(cfg, OTHER, OTHER)
    proj = tmp_path / "proj"
    proj.mkdir()
    assert f"it is a symbolic link owned by uid {OTHER}" in refused(cfg, proj, monkeypatch)
    os.lchown(cfg, 0, 0)
    monkeypatch.chdir(proj)
    assert load_policy().limits.timeout == 5


@needs_root
def test_a_pyproject_of_another_user_is_refused_only_when_it_configures_corral(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\ndependencies = ["corral"]\n')
    pyproject.chmod(0o644)
    os.chown(pyproject, OTHER, OTHER)
    proj = tmp_path / "proj"
    proj.mkdir()
    assert find_config(str(proj)) is None or not find_config(str(proj)).startswith(str(tmp_path))  # type: ignore[union-attr]
    pyproject.write_text('[tool.corral]\nprofile = "dev"\n')
    assert f"owned by uid {OTHER}" in refused(pyproject, proj, monkeypatch)


@pytest.mark.parametrize(("mode", "who"), [(0o664, "its group"), (0o646, "others")])
def test_a_found_config_others_can_write_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: int, who: str
) -> None:
    cfg, proj = project(tmp_path)
    cfg.chmod(mode)
    assert f"it is writable by {who} (mode {mode:04o})" in refused(cfg, proj, monkeypatch)
    # The caller's own choice is not checked.
    assert load_policy(str(cfg)).limits.timeout == 5


def test_a_world_writable_directory_is_trusted_only_when_sticky(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a sticky directory (as /tmp) no one else can replace our file; without the sticky bit anyone can."""
    cfg, proj = project(tmp_path)
    tmp_path.chmod(0o777)
    assert f"its directory {tmp_path} is writable by others and not sticky (mode 0777)" in refused(
        cfg, proj, monkeypatch
    )
    tmp_path.chmod(0o1777)
    assert load_policy().limits.timeout == 5


def test_an_unreadable_found_config_is_named_without_config_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No --config was given: the message names the file only (a link to itself cannot be read, even by root)."""
    cfg = tmp_path / "corral.toml"
    cfg.symlink_to(cfg)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_policy()
    assert str(info.value) == f"{cfg}: cannot read it: Too many levels of symbolic links"
    # Named with --config, the flag is named.
    with pytest.raises(ConfigError, match=r"^--config: cannot read"):
        load_policy(str(cfg))


def test_a_fifo_planted_as_the_config_does_not_block_the_search(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "corral.toml")
    assert find_config(str(tmp_path)) != str(tmp_path / "corral.toml")


@needs_root
def test_the_cli_refuses_a_planted_config(tmp_path: Path) -> None:
    """The QA repro end to end, through the real command line, as root: `corral run -- ls /root`."""
    cfg, proj = project(tmp_path, '[[zones]]\nhost = "/root"\nmode = "rw"\n')
    tmp_path.chmod(0o1777)
    os.chown(cfg, OTHER, OTHER)
    r = subprocess.run(
        [sys.executable, "-m", "corral", "run", "--backend", "process", "--allow-weaker", "--", "true"],
        cwd=proj,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 2, r
    assert r.stderr.decode().splitlines() == [
        f"corral: {cfg}: refusing this config file, found by searching the directories above: it is owned by uid "
        f"{OTHER}, not by you (root); whoever can write it could widen the sandbox or run its approver as you (use "
        f"it anyway with --config {cfg}, or ignore config files with --no-config)"
    ]
