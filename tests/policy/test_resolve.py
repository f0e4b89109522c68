from __future__ import annotations

from pathlib import Path

import pytest

from corral import ConfigError, Policy, Zone
from corral.policy.resolve import open_etc_copy, resolve


def test_missing_host_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        resolve(Policy(zones=[Zone(host=str(tmp_path / "nope"), mount="/x", mode="ro")]))


def test_host_root_cannot_be_writable() -> None:
    with pytest.raises(ConfigError, match="host's root"):
        resolve(Policy(zones=[Zone(host="/", mount="/host", mode="rw")]))


def test_cwd_follows_the_host_directory_into_its_zone(tmp_path: Path) -> None:
    sub = tmp_path / "src"
    sub.mkdir()
    rp = resolve(Policy(zones=[Zone(host=str(tmp_path), mount="/work", mode="rw")]), host_cwd=str(sub))
    assert rp.cwd == "/work/src"
    assert rp.to_host("/work/src/a.py") == str(tmp_path.resolve() / "src/a.py")
    assert rp.to_host("/usr/bin/env") == "/usr/bin/env"
    assert rp.to_host("/tmp/x") is None


def test_symlinked_zone_is_bound_by_its_real_path(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    rp = resolve(Policy(zones=[Zone(host=str(tmp_path / "link"), mount="/w", mode="ro")]))
    assert next(z for z in rp.zones if z.mount == "/w").host == str(real.resolve())


def test_minimal_etc_has_no_secrets(tmp_path: Path) -> None:
    rp = resolve(Policy.workspace(str(tmp_path)))
    names = {name for name, _ in rp.etc_files} | set(rp.etc_copies) | {m.dest for m in rp.system}
    assert "passwd" in names and "/etc/shadow" not in names and "shadow" not in names
    passwd = dict(rp.etc_files)["passwd"].decode()
    assert "sandbox:x:1000:1000" in passwd and passwd.count("\n") == 3


def test_public_etc_copies_are_read_at_launch_and_never_a_secret(tmp_path: Path) -> None:
    rp = resolve(Policy.workspace(str(tmp_path)))
    assert "ld.so.cache" in rp.etc_copies and "localtime" not in rp.etc_copies  # a link stays a link
    contents = dict(rp.etc_contents())
    assert contents["ld.so.cache"] == Path("/etc/ld.so.cache").read_bytes() and "passwd" in contents
    # Whatever a hand-made policy lists, only public names are opened.
    assert open_etc_copy("shadow") is None and open_etc_copy("../etc/shadow") is None
    forged = rp.replace(etc_copies=("shadow", "services"))
    assert [name for name, _ in forged.etc_contents()][:1] == ["services"]
    assert "shadow" not in dict(forged.etc_contents())


def test_environment_is_clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_secret")
    rp = resolve(Policy.workspace(str(tmp_path)))
    assert "GITHUB_TOKEN" not in rp.env_dict and "ghp_secret" not in str(rp.env)


def test_the_workspace_cannot_be_the_root() -> None:
    with pytest.raises(ConfigError, match="managed by the sandbox"):
        Policy.workspace("/")


@pytest.mark.parametrize("name", ["1A", "A=B", ""])
def test_environment_added_at_run_time_is_checked(tmp_path: Path, name: str) -> None:
    """`corral.run(env={"1A": "1"})` was accepted while `--env 1BAD` was refused; it fails before
    anything starts."""
    import corral

    rp = resolve(Policy.workspace(str(tmp_path)))
    with pytest.raises(ConfigError, match="^env: not a valid variable name"):
        rp.replace(env=(*rp.env, (name, "1")))
    with pytest.raises(ConfigError, match="^env: not a valid variable name"):
        corral.run(["true"], policy=rp, env={name: "1"})
