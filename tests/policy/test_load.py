from __future__ import annotations

from pathlib import Path

import pytest

from corral import ConfigError
from corral.policy.load import find_config, load_config


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_full_config(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
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
    assert mounts[str(tmp_path)].mode == "rw"  # the workspace defaults to the config's directory
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
        ("[[zones]]\nhost = '.'\nmode = 'rwx'", "zone.mode"),
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
