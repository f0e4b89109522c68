"""Policies from TOML: `corral.toml`, or `[tool.corral]` in pyproject.toml.

    profile = "workspace"            # strict | workspace | fs_safe | net_safe | dev
    backend = "auto"
    [[zones]]
    host = "../data"                  # relative to this file
    mount = "/data"
    mode = "ro"                       # ro | rw | tmpfs (tmpfs: no host, optional size)
    [network]
    mode = "none"                     # none | host | allow
    allow = ["pypi.org", "*.github.com:443"]
    [commands]
    deny = ["git push", "rm -rf /"]
    ask = ["pip install"]
    approver = ["notify-and-wait"]
    [limits]
    memory = "2G"; pids = 512; cpus = 2; timeout = "10m"; output = "10M"; file_size = "1G"; open_files = 1024
    [env]
    pass = ["CI"]
    set = { PYTHONDONTWRITEBYTECODE = "1" }
    [container]                       # docker and gvisor backends only
    image = "python:3.12-slim"        # default: corral's own image over the host's /usr
    auto_pull = false

Every key is checked: a wrong key or value is a `ConfigError` that names the key, the value and
what was expected. The same words are the CLI's flags and the Python fields.
"""

from __future__ import annotations

import os

from corral._record import Record
from corral.errors import ConfigError
from corral.policy.model import Commands, Container, Env, Limits, Network, Policy, Zone
from corral.policy.profiles import DEFAULT_PROFILE, make_profile
from corral.units import parse_duration, parse_size

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import TypeVar

    T = TypeVar("T")

CONFIG_NAMES = ("corral.toml", "pyproject.toml")
_TOP_KEYS = {
    "profile": "a profile name", "backend": "a backend name", "min_backend": "a backend name",
    "workspace": "a directory", "zones": "a list of zone tables", "network": "a table",
    "commands": "a table", "limits": "a table", "env": "a table", "cwd": "a path inside the sandbox",
    "uid": "a uid", "hostname": "a host name", "audit": "a file path", "container": "a table",
}  # fmt: skip
_ZONE_KEYS = {"host": "a host path", "mount": "a path inside the sandbox", "mode": "ro, rw or tmpfs", "size": "a size"}
_NETWORK_KEYS = {"mode": "none, host or allow", "allow": "a list of domains", "allow_cidrs": "a list of CIDRs",
                 "deny_cidrs": "a list of CIDRs", "upstream": "a proxy URL"}  # fmt: skip
_COMMANDS_KEYS = {"allow": "a list of patterns", "deny": "a list of patterns", "ask": "a list of patterns",
                  "approver": "a command (list of strings)", "ask_timeout": "a duration"}  # fmt: skip
_LIMIT_KEYS = {"cpus": "a number of CPUs", "memory": "a size", "pids": "a number", "timeout": "a duration",
               "output": "a size", "file_size": "a size", "open_files": "a number"}  # fmt: skip
_ENV_KEYS = {"pass": "a list of variable names", "set": "a table of NAME = value"}
_CONTAINER_KEYS = {"image": "an image name", "auto_pull": "true or false"}


class Config(Record):
    """A policy plus the settings that sit beside it in a config file."""

    __slots__ = ("audit", "backend", "min_backend", "policy", "source")
    policy: Policy
    backend: str | None
    min_backend: str | None
    audit: str | None
    source: str | None  # the file it came from

    def __init__(self, *, policy: Policy, backend: str | None = None, min_backend: str | None = None,
                 audit: str | None = None, source: str | None = None) -> None:  # fmt: skip
        self._set(policy=policy, backend=backend, min_backend=min_backend, audit=audit, source=source)


def find_config(start: str | None = None) -> str | None:
    """The nearest corral.toml, or pyproject.toml with a [tool.corral] table, from `start` upward."""
    directory = os.path.abspath(start or os.getcwd())
    while True:
        candidate = os.path.join(directory, "corral.toml")
        if os.path.isfile(candidate):
            return candidate
        candidate = os.path.join(directory, "pyproject.toml")
        if os.path.isfile(candidate) and _has_tool_corral(candidate):
            return candidate
        parent = os.path.dirname(directory)
        if parent == directory:
            return None
        directory = parent


def _has_tool_corral(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return b"[tool.corral" in f.read()
    except OSError:
        return False


def load_policy(path: str | None = None, *, profile: str | None = None, workspace: str | None = None) -> Policy:
    """The policy from a TOML file (found from the current directory when `path` is None)."""
    return load_config(path, profile=profile, workspace=workspace).policy


def load_config(path: str | None = None, *, profile: str | None = None, workspace: str | None = None,
                search: bool = True) -> Config:  # fmt: skip
    """Profile, then the config file, then the caller's overrides. Without a file: the profile alone."""
    if path is None and search:
        path = find_config()
    if path is None:
        return Config(policy=make_profile(profile or DEFAULT_PROFILE, workspace=workspace or os.getcwd()))
    data = _read_toml(path)
    return config_from_mapping(data, base_dir=os.path.dirname(os.path.abspath(path)), source=path,
                               profile=profile, workspace=workspace)  # fmt: skip


def _read_toml(path: str) -> dict[str, object]:
    import tomllib

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist", where="--config") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}", where="--config") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}", where=path) from None
    if os.path.basename(path) == "pyproject.toml":
        tool = data.get("tool", {})
        section = tool.get("corral") if isinstance(tool, dict) else None
        if not isinstance(section, dict):
            raise ConfigError("has no [tool.corral] table", where=path)
        return section
    return data


def config_from_mapping(data: Mapping[str, object], *, base_dir: str, source: str | None = None,
                        profile: str | None = None, workspace: str | None = None) -> Config:  # fmt: skip
    where = source or "config"
    _check_keys(data, _TOP_KEYS, where)
    profile_name = profile or _opt_str(data, "profile", where) or DEFAULT_PROFILE
    ws = workspace or _opt_str(data, "workspace", where)
    ws_path = os.path.normpath(os.path.join(base_dir, os.path.expanduser(ws))) if ws else base_dir
    base = make_profile(profile_name, workspace=ws_path)
    zones = list(base.zones)
    raw_zones = data.get("zones", [])
    if not isinstance(raw_zones, list):
        raise ConfigError(f"expected a list of zone tables ([[zones]]), got {raw_zones!r}", where=f"{where}: zones")
    for i, raw in enumerate(raw_zones):
        zones.append(_zone(raw, base_dir, f"{where}: zones[{i}]"))
    network = _network(data.get("network"), f"{where}: network") if "network" in data else base.network
    commands = _commands(data.get("commands"), f"{where}: commands") if "commands" in data else base.commands
    limits = base.limits.merged(_limits(data.get("limits"), f"{where}: limits")) if "limits" in data else base.limits
    env = _env(data.get("env"), f"{where}: env") if "env" in data else base.env
    fields: dict[str, object] = {}
    if "cwd" in data:
        fields["cwd"] = _opt_str(data, "cwd", where)
    if "uid" in data:
        fields["uid"] = data["uid"]
    if "hostname" in data:
        fields["hostname"] = data["hostname"]
    if "container" in data:
        fields["container"] = _container(data.get("container"), f"{where}: container")
    try:
        policy = Policy(zones=zones, network=network, commands=commands, limits=limits, env=env,
                        profile=profile_name, **fields)  # type: ignore[arg-type]  # fmt: skip
    except ConfigError as exc:
        raise ConfigError(str(exc), where=where) from None
    audit = _opt_str(data, "audit", where)
    if audit:
        audit = os.path.join(base_dir, os.path.expanduser(audit))
    return Config(policy=policy, backend=_opt_str(data, "backend", where),
                  min_backend=_opt_str(data, "min_backend", where), audit=audit, source=source)  # fmt: skip


def _check_keys(data: object, allowed: Mapping[str, str], where: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"expected a table, got {data!r}", where=where)
    for key in data:
        if key not in allowed:
            expected = ", ".join(f"{k} ({v})" for k, v in allowed.items())
            raise ConfigError(f"unknown key {key!r}; expected one of: {expected}", where=where)


def _opt_str(data: Mapping[str, object], key: str, where: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"expected {_TOP_KEYS.get(key, 'a string')}, got {value!r}", where=f"{where}: {key}")
    return value


def _zone(raw: object, base_dir: str, where: str) -> Zone:
    _check_keys(raw, _ZONE_KEYS, where)
    assert isinstance(raw, dict)
    mode = raw.get("mode", "ro")
    host = raw.get("host")
    size = raw.get("size")
    try:
        if host is not None:
            if not isinstance(host, str) or not host:
                raise ConfigError(f"expected a host path, got {host!r}", where="host")
            host = os.path.normpath(os.path.join(base_dir, os.path.expanduser(host)))
        mount = raw.get("mount", host)
        if not isinstance(mount, str):
            raise ConfigError(f"expected a path inside the sandbox, got {mount!r}", where="mount")
        parsed = parse_size(size, where="size") if size is not None else None
        return Zone(host=host, mount=mount, mode=mode, size=parsed)
    except ConfigError as exc:
        raise ConfigError(str(exc), where=where) from None


def _table(raw: object, keys: Mapping[str, str], where: str) -> dict[str, object]:
    """A TOML table whose keys are all known (a ConfigError naming the stray key otherwise)."""
    _check_keys(raw, keys, where)
    assert isinstance(raw, dict)
    return dict(raw)


def _build(make: Callable[..., T], where: str, fields: Mapping[str, object]) -> T:
    """`make(**fields)`, with any ConfigError it raises placed at `where` in the file."""
    try:
        return make(**fields)
    except ConfigError as exc:
        raise ConfigError(str(exc), where=where) from None


def _network(raw: object, where: str) -> Network:
    return _build(Network, where, _table(raw, _NETWORK_KEYS, where))


def _commands(raw: object, where: str) -> Commands:
    fields = _table(raw, _COMMANDS_KEYS, where)
    if "ask_timeout" in fields:
        fields["ask_timeout"] = parse_duration(fields["ask_timeout"], where=f"{where}.ask_timeout")
    return _build(Commands, where, fields)


def _limits(raw: object, where: str) -> Limits:
    fields = _table(raw, _LIMIT_KEYS, where)
    for key, value in fields.items():
        at = f"{where}.{key}"
        if key in ("memory", "output", "file_size"):
            fields[key] = parse_size(value, where=at)
        elif key == "timeout":
            fields[key] = parse_duration(value, where=at)
    return _build(Limits, where, fields)


def _container(raw: object, where: str) -> Container:
    return _build(Container, where, _table(raw, _CONTAINER_KEYS, where))


def _env(raw: object, where: str) -> Env:
    fields = _table(raw, _ENV_KEYS, where)
    values = fields.get("set", {})
    if not isinstance(values, dict):
        raise ConfigError(f"expected a table of NAME = value, got {values!r}", where=f"{where}.set")
    return _build(Env, where, {"passthrough": fields.get("pass", ()), "values": values})
