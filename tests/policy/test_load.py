from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from corral import ConfigError
from corral.policy.load import find_config, load_config, load_policy


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_full_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "data").mkdir()
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    cfg = write(
        tmp_path / "corral.toml",
        """
profile = "workspace"
backend = "namespace"
audit = "logs/audit.jsonl"
[[zones]]
host = "data"
mount = "/data"
mode = "ro"
[[zones]]
mount = "/cache"
mode = "tmpfs"
size = "100M"
[network]
mode = "none"
[commands]
deny = ["git push"]
ask = ["pip install"]
approver = ["/bin/false"]
ask_timeout = "5s"
[limits]
memory = "1G"
pids = 100
cpus = 1.5
timeout = "2m"
output = "1M"
[env]
pass = ["CI"]
set = { FOO = "bar" }
""",
    )
    config = load_config(str(cfg))
    p = config.policy
    assert config.backend == "namespace"
    assert config.audit == str(tmp_path / "logs/audit.jsonl")
    mounts = {z.mount: z for z in p.zones}
    assert mounts["/data"].host == str(tmp_path / "data") and mounts["/data"].mode == "ro"
    assert mounts["/cache"].size == 100 << 20
    # A file named explicitly is a policy: the workspace stays the current directory.
    assert mounts[str(project)].mode == "rw" and str(tmp_path) not in mounts
    assert p.limits.memory == 1 << 30 and p.limits.pids == 100 and p.limits.cpus == 1.5 and p.limits.timeout == 120
    assert p.commands.deny == ("git push",) and p.commands.ask_timeout == 5.0
    assert p.env.passthrough == ("CI",) and dict(p.env.values) == {"FOO": "bar"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("memroy = 1", "unknown key 'memroy'"),
        ("[limits]\nmemroy = '1G'", "unknown key 'memroy'"),
        ("[limits]\nmemory = 'lots'", "limits.memory: expected a size"),
        ("[limits]\npids = -4", "limits.pids: must be positive"),
        ("[limits]\ntimeout = 'soon'", "limits.timeout"),
        ("[[zones]]\nhost = '.'\nmode = 'rwx'", "zones[0].mode"),
        ("zones = 'x'", "expected a list of zone tables"),
        ("[network]\nmode = 'wifi'", "network.mode"),
        ("[network]\nmode = 'allow'\nallow = ['*']", "not a domain pattern"),
        ("[commands]\ndeny = 'git push'", "commands.deny"),
        ("profile = 'lax'", "unknown profile"),
        ("[env]\nset = { '1X' = 'y' }", "env.set"),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    cfg = write(tmp_path / "corral.toml", text)
    with pytest.raises(ConfigError) as info:
        load_config(str(cfg))
    assert message in str(info.value)


def test_pyproject_tool_corral_and_upward_search(tmp_path: Path) -> None:
    write(tmp_path / "pyproject.toml", "[project]\nname='x'\n[tool.corral]\nprofile = 'strict'\n")
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    assert find_config(str(sub)) == str(tmp_path / "pyproject.toml")
    assert load_config(find_config(str(sub))).policy.profile == "strict"


def test_pyproject_without_section_is_not_a_config(tmp_path: Path) -> None:
    write(tmp_path / "pyproject.toml", "[project]\nname='x'\n")
    assert find_config(str(tmp_path)) in (None,) or not find_config(str(tmp_path)).startswith(str(tmp_path))


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/corral.toml")


def test_an_explicit_config_elsewhere_does_not_move_the_workspace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A --config outside the project made its own folder the read-write workspace (and hid the project)."""
    policies, project = tmp_path / "policies", tmp_path / "project"
    policies.mkdir()
    project.mkdir()
    cfg = write(policies / "p.toml", '[limits]\ntimeout = "5s"\n')
    monkeypatch.chdir(project)
    rw = {z.host for z in load_policy(str(cfg)).zones if z.mode == "rw"}
    assert rw == {str(project)}
    other = tmp_path / "other"
    other.mkdir()
    assert {z.host for z in load_policy(str(cfg), workspace=str(other)).zones if z.mode == "rw"} == {str(other)}
    # The file's own `workspace` key still counts, relative to the file.
    write(cfg, 'workspace = "../other"\n')
    assert {z.host for z in load_policy(str(cfg)).zones if z.mode == "rw"} == {str(other)}


def test_a_config_found_by_search_keeps_its_folder_as_the_workspace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "corral.toml", '[limits]\ntimeout = "5s"\n')
    sub = tmp_path / "src"
    sub.mkdir()
    monkeypatch.chdir(sub)
    assert {z.host for z in load_policy().zones if z.mode == "rw"} == {str(tmp_path)}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[limits]\nmemory = '1k'", "limits.memory: must be at least 4M, got 1024 bytes"),
        ("[limits]\ncpus = inf", "limits.cpus: must be a number of CPUs from 0.01 to 8192, got inf"),
        ("[limits]\npids = 99999999999", "limits.pids: must be at most 4194304"),
        ("[network]\nmode = 'allow'\nallow = ['*']", "network.allow[0]: not a domain pattern"),
        ("[env]\npass = ['1A']", "env.pass: not a valid variable name: '1A'"),
        ("[[zones]]\nmount = '/c'\nmode = 'tmpfs'\nsize = 'lots'", "zones[0].size: expected a size"),
        ("[[zones]]\nmount = 'rel'\nmode = 'tmpfs'", "zones[0].mount: must be an absolute path"),
        ("[[zones]]\nhost = '/nonexistent-corral'\nmount = '/x'", "zones[0].host: host path /nonexistent-corral does"),
        ("workspace = '/nonexistent-corral'", "workspace: host path /nonexistent-corral does not exist"),
        ("backend = 'warp'", "backend: unknown backend 'warp'"),
        ("min_backend = 'warp'", "min_backend: unknown backend 'warp'"),
        ("profile = 'lax'", "profile: unknown profile 'lax'"),
        ("[commands]\nask_timeout = 'soon'", "commands.ask_timeout: expected a duration"),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_errors_name_the_file_and_its_key_once(tmp_path: Path, text: str, message: str) -> None:
    """Each said once: not `FILE: FILE is not valid TOML`, not `limits: limits.memory`, not a zone index
    counted among the profile's zones, never without the file."""
    cfg = write(tmp_path / "corral.toml", text)
    with pytest.raises(ConfigError) as info:
        load_config(str(cfg))
    assert str(info.value).startswith(f"{cfg}: {message}"), str(info.value)
    assert str(info.value).count(str(cfg)) == 1


def test_a_zone_is_named_by_its_own_index_in_the_file(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    cfg = write(tmp_path / "corral.toml", "[[zones]]\nhost = 'data'\n[[zones]]\nhost = 'gone'\nmount = '/g'\n")
    with pytest.raises(ConfigError, match=r"corral.toml: zones\[1\]\.host: host path .*/gone does not exist"):
        load_config(str(cfg))


@pytest.mark.parametrize(
    "text",
    [
        "[tool]\ncorral = { profile = 'strict' }\n",
        "tool.corral.profile = 'strict'\n",
        "[tool.black]\nline-length = 99\n[tool.corral]\nprofile = 'strict'\n",
        "[tool.corral.limits]\npids = 7\n",
    ],
)
def test_pyproject_tool_corral_however_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    """A byte search for `[tool.corral` missed the inline and dotted forms of the same table."""
    write(tmp_path / "pyproject.toml", text)
    monkeypatch.chdir(tmp_path)
    assert find_config(str(tmp_path)) == str(tmp_path / "pyproject.toml")
    policy = load_policy()
    assert policy.profile == "strict" or policy.limits.pids == 7


@pytest.mark.parametrize(
    "text",
    [
        "[project]\nname = 'x'\n# settings live in [tool.corral] (not yet)\n",
        "[project]\nname = 'x'\ndependencies = ['corral>=1']\n",
        "[tool.corralx]\nprofile = 'strict'\n",
    ],
)
def test_pyproject_mentioning_corral_without_the_table_is_not_a_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    """A comment naming [tool.corral] made every run fail: "has no [tool.corral] table"."""
    write(tmp_path / "pyproject.toml", text)
    monkeypatch.chdir(tmp_path)
    assert find_config(str(tmp_path)) != str(tmp_path / "pyproject.toml")
    assert load_policy().profile == "workspace"


def test_a_pyproject_not_mentioning_corral_is_not_parsed(tmp_path: Path) -> None:
    """Start-up stays light: tomllib is imported only for a file that may configure corral."""
    write(tmp_path / "pyproject.toml", "[project]\nname = 'x'\n")
    code = (
        "import sys; from corral.policy.load import find_config; "
        f"assert find_config({str(tmp_path)!r}) != {str(tmp_path / 'pyproject.toml')!r}; "
        "print('tomllib' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "False", out


def test_a_tool_corral_that_is_not_a_table_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write(tmp_path / "pyproject.toml", "[tool]\ncorral = 'strict'\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_policy()
    assert str(info.value) == f"{cfg}: tool.corral: expected a table, got the string 'strict'"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[limits]\ncpus = '1.5'", "limits.cpus: expected a number of CPUs, got the string '1.5' (write the number"),
        ("[limits]\npids = '5'", "limits.pids: expected a whole number, got the string '5' (write the number"),
        ("[limits]\ntimeout = 1979-05-27", "limits.timeout: expected a duration such as 30s, got a date (1979-05-27)"),
        ("[limits]\nmemory = 07:32:00", "limits.memory: expected a size such as 512M, got a time (07:32:00)"),
        ("[limits]\noutput = 1979-05-27T07:32:00Z", "limits.output: expected a size such as 512M, got a date-time"),
        ("[limits]\nopen_files = 1979-05-27", "limits.open_files: expected a whole number, got a date (1979-05-27)"),
        ("[[zones]]\nhost = '.'\nmode = 1979-05-27", "zones[0].mode: expected one of ro, rw, tmpfs, got a date"),
        ("[commands]\ndeny = [1979-05-27]", "commands.deny[0]: expected a non-empty string, got a date (1979-05-27)"),
        ("profile = 1979-05-27", "profile: expected a profile name, got a date (1979-05-27)"),
        ("uid = 1979-05-27", "uid: expected a uid between 0 and 65533, got a date (1979-05-27)"),
        ("limits = 1979-05-27", "limits: expected a table, got a date (1979-05-27)"),
        ("[limits]\nmemory = '\uff11G'", "limits.memory: expected a size such as 512M or 2G, got '\uff11G'"),
        (
            "[limits]\ntimeout = '\uff12s'",
            "limits.timeout: expected a duration such as 30s, 500ms or 2m, got '\uff12s'",
        ),
    ],
)
def test_type_errors_name_the_toml_type(tmp_path: Path, text: str, message: str) -> None:
    """`cpus = "1.5"` said `must be a number of CPUs from 0.01 to 8192`; a TOML date leaked
    `datetime.date(1979, 5, 27)`; fullwidth digits were read as numbers."""
    cfg = write(tmp_path / "corral.toml", text)
    with pytest.raises(ConfigError) as info:
        load_config(str(cfg))
    assert str(info.value).startswith(f"{cfg}: {message}"), str(info.value)
    assert "datetime" not in str(info.value)


def test_none_lifts_a_limit_in_toml_as_on_the_command_line(tmp_path: Path) -> None:
    """`--memory none` lifted a profile's limit; `memory = "none"` in TOML was `expected a size`."""
    cfg = write(
        tmp_path / "corral.toml",
        "profile = 'strict'\n[limits]\nmemory = 'none'\ntimeout = 'none'\npids = 'none'\ncpus = 'none'\n"
        "open_files = 'none'\noutput = '2M'\n",
    )
    limits = load_config(str(cfg)).policy.limits
    assert (limits.memory, limits.timeout, limits.pids, limits.cpus, limits.open_files) == (None,) * 5
    assert limits.output == 2 << 20 and limits.file_size == 64 << 20  # set here, and kept from strict
    write(cfg, "[limits]\nmemory = 'unlimited'\n")
    with pytest.raises(ConfigError, match="limits.memory: expected a size"):
        load_config(str(cfg))


def test_the_root_directory_cannot_be_the_workspace(monkeypatch: pytest.MonkeyPatch) -> None:
    """Running from / said `zone.mount: / is managed by the sandbox and cannot be a zone`."""
    monkeypatch.chdir("/")
    with pytest.raises(ConfigError) as info:
        load_config(search=False)
    assert str(info.value).startswith("workspace: the current directory / cannot be the workspace"), str(info.value)
    assert "cd to a project directory" in str(info.value) and "zone.mount" not in str(info.value)
