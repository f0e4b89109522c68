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


def test_a_zone_replacing_the_working_directory_is_refused(tmp_path: Path) -> None:
    """`--tmpfs $PWD` replaced the workspace zone: the command silently ran in `/`."""
    work = str(tmp_path.resolve())
    policy = Policy.workspace(work).with_zones(Zone.tmpfs(work))
    with pytest.raises(ConfigError) as info:
        resolve(policy, host_cwd=work)
    assert str(info.value) == (
        f"zones[1] ({work}): a tmpfs zone at {work} replaces the working directory {work} (the workspace): "
        "move the zone, run from another directory, or set --cwd"
    )
    # With the working directory named, the zone is what the caller asked for.
    assert resolve(policy.replace(cwd="/tmp"), host_cwd=work).cwd == "/tmp"
    # `cd /tmp && corral run`: the profile's own /tmp replaced the workspace.
    with pytest.raises(ConfigError, match=r"^zones\[0\] \(/tmp\): a tmpfs zone at /tmp replaces the working"):
        resolve(Policy.workspace("/tmp"), host_cwd="/tmp")


@pytest.mark.parametrize("mode", ["tmpfs", "ro", "rw"])
def test_a_zone_hiding_the_working_directory_is_refused(tmp_path: Path, mode: str) -> None:
    work = tmp_path.resolve()
    (work / "build").mkdir()
    other = tmp_path / "other"
    other.mkdir()
    zone = Zone.tmpfs(f"{work}/build") if mode == "tmpfs" else Zone(host=str(other), mount=f"{work}/build", mode=mode)
    policy = Policy.workspace(str(work)).with_zones(zone)
    with pytest.raises(ConfigError) as info:
        resolve(policy, host_cwd=str(work / "build"))
    kind = {"ro": "read-only", "rw": "read-write", "tmpfs": "tmpfs"}[mode]
    assert str(info.value) == (
        f"zones[2] ({work}/build): a {kind} zone at {work}/build hides the working directory {work}/build (the "
        f"host's {work}/build): move the zone, run from another directory, or set --cwd"
    )
    # From the project's root the zone hides only what it was put there to hide.
    assert resolve(policy, host_cwd=str(work)).cwd == str(work)


def test_the_working_directory_outside_every_zone_still_falls_back_to_the_workspace(tmp_path: Path) -> None:
    """The Python API from an unrelated directory (here under the profile's /tmp): not a hidden workspace."""
    (tmp_path / "w").mkdir()
    rp = resolve(Policy.workspace(str(tmp_path / "w")), host_cwd=str(tmp_path))
    assert rp.cwd == str((tmp_path / "w").resolve())
    assert resolve(Policy.workspace(str(tmp_path / "w")), host_cwd="/").cwd == str((tmp_path / "w").resolve())


def test_a_mount_point_missing_in_a_read_only_zone_is_refused(tmp_path: Path) -> None:
    """`--zone /data:/tmp` with the workspace under /tmp failed inside bubblewrap: "Can't mkdir parents
    ... Read-only file system"."""
    data, work = tmp_path / "data", tmp_path / "work"
    data.mkdir()
    work.mkdir()
    policy = Policy.workspace(str(work)).with_zones(Zone.ro(str(data), "/tmp"))
    real_work = str(work.resolve())
    with pytest.raises(ConfigError) as info:
        resolve(policy, host_cwd=str(work))
    assert str(info.value) == (
        f"zones[1] (/tmp): this read-only zone (host {data.resolve()}) holds the mount point of zones[0] "
        f"({real_work}), but {data.resolve()}{real_work[len('/tmp') :]} does not exist and a read-only zone cannot "
        "get new directories: mount one of them elsewhere"
    )
    # Once the mount point exists there, bubblewrap mounts over it.
    (data / real_work[len("/tmp/") :]).mkdir(parents=True)
    assert resolve(policy, host_cwd=str(work)).cwd == real_work
    # A tmpfs or read-write zone gets its mount points made.
    assert resolve(Policy.workspace(str(work)).with_zones(Zone.tmpfs("/tmp/x")), host_cwd=str(work))


def test_a_mount_point_missing_in_the_system_view_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        resolve(
            Policy.workspace(str(tmp_path)).with_zones(Zone.tmpfs("/usr/corral-nonexistent")), host_cwd=str(tmp_path)
        )
    assert str(info.value) == (
        "zones[2] (/usr/corral-nonexistent): /usr/corral-nonexistent does not exist in the read-only system view "
        "(/usr), so nothing can be mounted there: mount the zone elsewhere"
    )
    assert resolve(Policy.workspace(str(tmp_path)).with_zones(Zone.tmpfs("/usr/share")), host_cwd=str(tmp_path))
    # A named image brings its own system view: what it holds cannot be told here.
    policy = Policy.workspace(str(tmp_path)).with_zones(Zone.tmpfs("/usr/corral-nonexistent"))
    assert resolve(policy.replace(container=policy.container.replace(image="python:3.12-slim")), host_cwd=str(tmp_path))
