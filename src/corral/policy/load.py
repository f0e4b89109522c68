"""Policies from TOML: `corral.toml`, or `[tool.corral]` in pyproject.toml.

    profile = "workspace"            # strict | workspace | fs_safe | net_safe | dev
    backend = "auto"
    workspace = "."                   # relative to this file; see below for the default
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

Every key is checked: a wrong key or value is a `ConfigError` that names the file, the key, the
value and what was expected. The same words are the CLI's flags and the Python fields.

The workspace (the read-write zone of the profile) is the caller's `workspace` when given, else the
file's `workspace` key, else the folder of a file found by search (the project's own config), else
the current directory: a file named explicitly (`--config`, `load_policy(path)`) is a policy, not
a project, and never makes its own folder writable.

A file found by search is used only when no one but you (or root) could have written it, as git's
safe.directory: owned by your euid or root, not writable by its group or others, in a directory
owned by you or root that others cannot write (unless it is sticky, as /tmp: the file is then
yours, and no one else can replace it). Otherwise the search is an error naming the file and its
owner: its `approver` would run as you, and it could add zones or the host's network. A file named
with `--config` is the caller's choice and is not checked. A pyproject.toml is a config when it has
a `tool.corral` table, however written; one that does not mention corral is not even parsed.
"""

from __future__ import annotations

import os
import stat

from corral._record import Record
from corral.errors import ConfigError
from corral.policy.model import Commands, Container, Env, Limits, Network, Policy, Zone, relocated
from corral.policy.profiles import DEFAULT_PROFILE, make_profile
from corral.policy.resolve import host_path
from corral.units import describe

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import TypeVar

    Table = dict[str, object]

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
NO_LIMIT = "none"  # a limit's value that lifts it (the profile's too), as `--memory none` does
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
    """The nearest corral.toml, or pyproject.toml with a `tool.corral` table, from `start` upward.

    A ConfigError when the nearest one is not trusted (another user could have written it) or cannot be read."""
    found = _search(start)
    return found[0] if found else None


# Files find_config returned: checked again when read (the path may be read later, as by the CLI).
_FOUND: set[str] = set()


def _search(start: str | None) -> tuple[str, Table] | None:
    directory = os.path.abspath(start or os.getcwd())
    while True:
        for name in CONFIG_NAMES:
            candidate = os.path.join(directory, name)
            data = _read_found(candidate)
            if data is not None:
                _FOUND.add(candidate)
                return candidate, data
        parent = os.path.dirname(directory)
        if parent == directory:
            return None
        directory = parent


def _read_found(path: str) -> Table | None:
    """The table of a config file found by search, or None when `path` is not one (missing, not a
    regular file, a pyproject.toml without tool.corral). Checked on the descriptor read from."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # a FIFO planted there cannot block us
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if path.endswith("pyproject.toml"):
            return None  # cannot tell whether it configures corral: as before, not a config
        raise ConfigError(f"cannot read it: {exc.strerror}", where=path) from None
    with open(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        if path.endswith("pyproject.toml"):
            raw = f.read()
            if b"corral" not in raw:
                return None
            tool = _parse_toml(raw, path).get("tool")
            if not isinstance(tool, dict) or "corral" not in tool:
                return None
            _check_trusted(path, st)
            return _tool_corral(tool["corral"], path)
        _check_trusted(path, st)
        return _parse_toml(f.read(), path)


def _check_trusted(path: str, st: os.stat_result) -> None:
    """A ConfigError naming `path` unless only this user or root could have written it (`st` is the
    file's own, from the descriptor read): see the module's docstring."""
    euid = os.geteuid()
    reason = None
    if st.st_uid not in (euid, 0):
        reason = f"it is owned by {_user(st.st_uid)}{_not_you(euid)}"
    elif st.st_mode & 0o022:
        who = "others" if st.st_mode & 0o002 else "its group"
        reason = f"it is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})"
    else:
        try:
            link = os.lstat(path)
        except OSError:
            link = None
        if link is not None and stat.S_ISLNK(link.st_mode) and link.st_uid not in (euid, 0):
            reason = f"it is a symbolic link owned by {_user(link.st_uid)}{_not_you(euid)}"
        # The directory it was found in, and the real file's when it is a link.
        directories = [os.path.dirname(path)]
        if link is not None and stat.S_ISLNK(link.st_mode):
            directories.append(os.path.dirname(os.path.realpath(path)))
        for directory in directories:
            if reason is not None:
                break
            try:
                dst = os.stat(directory)
            except OSError as exc:
                reason = f"its directory {directory} cannot be checked: {exc.strerror}"
                break
            mode = stat.S_IMODE(dst.st_mode)
            if dst.st_uid not in (euid, 0):
                reason = f"its directory {directory} is owned by {_user(dst.st_uid)}{_not_you(euid)}"
            elif mode & 0o002 and not mode & stat.S_ISVTX:
                reason = f"its directory {directory} is writable by others and not sticky (mode {mode:04o})"
    if reason is not None:
        raise ConfigError(
            f"refusing this config file, found by searching the directories above: {reason}; whoever "
            f"can write it could widen the sandbox or run its approver as you (use it anyway with --config {path}, "
            "or ignore config files with --no-config)",
            where=path,
        )


def _not_you(euid: int) -> str:
    return ", not by you (root)" if euid == 0 else f", not by you ({_user(euid)}) or root"


def _user(uid: int) -> str:
    import pwd

    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _parse_toml(raw: bytes, path: str) -> Table:
    import tomllib

    try:
        return tomllib.loads(raw.decode())
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not valid TOML: not UTF-8 text (byte {exc.start})", where=path) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", where=path) from None


def _tool_corral(section: object, path: str) -> Table:
    if not isinstance(section, dict):
        raise ConfigError(f"expected a table, got {describe(section)}", where=f"{path}: tool.corral")
    return section


def load_policy(path: str | None = None, *, profile: str | None = None, workspace: str | None = None) -> Policy:
    """The policy from a TOML file (found from the current directory when `path` is None)."""
    return load_config(path, profile=profile, workspace=workspace).policy


def load_config(path: str | None = None, *, profile: str | None = None, workspace: str | None = None,
                search: bool = True) -> Config:  # fmt: skip
    """Profile, then the config file, then the caller's overrides. Without a file: the profile alone.

    A file found by search (not one given as `path`) puts the workspace at its folder by default.
    """
    found = path is None and search
    if found:
        hit = _search(None)
        path, data = hit if hit is not None else (None, {})
    if path is None:
        return Config(policy=make_profile(profile or DEFAULT_PROFILE, workspace=_abs(workspace or _current_dir())))
    if not found:
        data = _read_toml(path)
    base_dir = os.path.dirname(os.path.abspath(path))
    return config_from_mapping(data, base_dir=base_dir, source=path, profile=profile, workspace=workspace,
                               default_workspace=base_dir if found else None)  # fmt: skip


def _abs(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _current_dir() -> str:
    """The current directory as the workspace: never `/`, the sandbox's own root."""
    cwd = os.getcwd()
    if cwd == "/":
        raise ConfigError(
            "the current directory / cannot be the workspace (it is the sandbox's own root): cd to a project "
            "directory, or name one with `workspace` in a --config file",
            where="workspace",
        )
    return cwd


def _read_toml(path: str) -> Table:
    if path in _FOUND:  # found by search (find_config), read now: checked again, on what is read
        data = _read_found(path)
        if data is None:
            raise ConfigError("no longer a config file (it changed since it was found)", where=path)
        return data
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist", where="--config") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}", where="--config") from None
    data = _parse_toml(raw, path)
    if os.path.basename(path) == "pyproject.toml":
        tool = data.get("tool", {})
        if not isinstance(tool, dict) or "corral" not in tool:
            raise ConfigError("has no [tool.corral] table", where=path)
        return _tool_corral(tool["corral"], path)
    return data


def config_from_mapping(data: Mapping[str, object], *, base_dir: str, source: str | None = None,
                        profile: str | None = None, workspace: str | None = None,
                        default_workspace: str | None = None) -> Config:  # fmt: skip
    """A Config from a parsed table. Relative paths in it are relative to `base_dir`; the workspace is
    `workspace`, else the table's `workspace` key, else `default_workspace`, else the current directory."""
    where = source or "config"
    _check_keys(data, _TOP_KEYS, where)
    profile_name = profile or _opt_str(data, "profile", where) or DEFAULT_PROFILE
    ws_key = _opt_str(data, "workspace", where)
    ws_from_file = bool(ws_key) and not workspace
    if workspace:
        ws_path = _abs(workspace)
    elif ws_key:
        ws_path = os.path.normpath(os.path.join(base_dir, os.path.expanduser(ws_key)))
        host_path(ws_path, base_dir=base_dir, where=f"{where}: workspace")
    else:
        ws_path = default_workspace or _current_dir()
    try:
        base = make_profile(profile_name, workspace=ws_path)
    except ConfigError as exc:
        # Name the file only for what the file said (not the caller's profile or directory).
        field = "profile" if exc.where == "profile" else "workspace"
        if (field == "profile" and profile) or (field == "workspace" and not ws_from_file):
            raise
        raise relocated(exc, f"{where}: {field}") from None
    zones = list(base.zones)
    raw_zones = data.get("zones", [])
    if not isinstance(raw_zones, list):
        raise ConfigError(f"expected a list of zone tables ([[zones]]), got {_got(raw_zones)}", where=f"{where}: zones")
    for i, raw in enumerate(raw_zones):
        zones.append(_zone(raw, base_dir, f"{where}: zones[{i}]"))
    network = _network(data.get("network"), where) if "network" in data else base.network
    commands = _commands(data.get("commands"), where) if "commands" in data else base.commands
    limits = base.limits
    if "limits" in data:
        own, lifted = _limits(data.get("limits"), where)
        limits = limits.merged(own).replace(**dict.fromkeys(lifted))
    env = _env(data.get("env"), where) if "env" in data else base.env
    fields: dict[str, object] = {}
    if "cwd" in data:
        fields["cwd"] = _opt_str(data, "cwd", where)
    if "uid" in data:
        fields["uid"] = data["uid"]
    if "hostname" in data:
        fields["hostname"] = data["hostname"]
    if "container" in data:
        fields["container"] = _container(data.get("container"), where)
    policy = _build(Policy, where, {"zones": zones, "network": network, "commands": commands, "limits": limits,
                                    "env": env, "profile": profile_name, **fields})  # fmt: skip
    audit = _opt_str(data, "audit", where)
    if audit:
        audit = os.path.join(base_dir, os.path.expanduser(audit))
    return Config(policy=policy, backend=_backend_name(data, "backend", where),
                  min_backend=_backend_name(data, "min_backend", where), audit=audit, source=source)  # fmt: skip


def _backend_name(data: Mapping[str, object], key: str, where: str) -> str | None:
    name = _opt_str(data, key, where)
    if name is not None and not (key == "backend" and name == "auto"):
        from corral.backends.registry import strength_of

        try:
            strength_of(name)
        except ConfigError as exc:
            raise relocated(exc, f"{where}: {key}") from None
    return name


def _check_keys(data: object, allowed: Mapping[str, str], where: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"expected a table, got {describe(data)}", where=where)
    for key in data:
        if key not in allowed:
            expected = ", ".join(f"{k} ({v})" for k, v in allowed.items())
            raise ConfigError(f"unknown key {key!r}; expected one of: {expected}", where=where)


def _opt_str(data: Mapping[str, object], key: str, where: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"expected {_TOP_KEYS.get(key, 'a string')}, got {_got(value)}", where=f"{where}: {key}")
    return value


def _got(value: object) -> str:
    """A value for a message: a string as itself, quoted; anything else as its TOML type and text."""
    return repr(value) if isinstance(value, str) else describe(value)


def _zone(raw: object, base_dir: str, where: str) -> Zone:
    """One [[zones]] table; `where` is the file and the zone's own index (zones[0] is its first)."""
    _check_keys(raw, _ZONE_KEYS, where)
    assert isinstance(raw, dict)
    mode = raw.get("mode", "ro")
    host = raw.get("host")
    size = raw.get("size")
    try:
        if host is not None:
            if not isinstance(host, str) or not host:
                raise ConfigError(f"expected a host path, got {_got(host)}", where="zone.host")
            host = os.path.normpath(os.path.join(base_dir, os.path.expanduser(host)))
        mount = raw.get("mount", host)
        if not isinstance(mount, str):
            raise ConfigError(f"expected a path inside the sandbox, got {_got(mount)}", where="zone.mount")
        zone = Zone(host=host, mount=mount, mode=mode, size=size)
    except ConfigError as exc:
        field = (exc.where or "").removeprefix("zone.")
        raise relocated(exc, f"{where}.{field}" if field else where) from None
    if zone.host is not None:
        host_path(zone.host, base_dir=base_dir, where=f"{where}.host")  # said here, with the file's own index
    return zone


def _table(raw: object, keys: Mapping[str, str], where: str) -> dict[str, object]:
    """A TOML table whose keys are all known (a ConfigError naming the stray key otherwise)."""
    _check_keys(raw, keys, where)
    assert isinstance(raw, dict)
    return dict(raw)


def _build(make: Callable[..., T], where: str, fields: Mapping[str, object]) -> T:
    """`make(**fields)`, with any ConfigError it raises placed in the file `where`. The model names
    its fields as the file's keys do (limits.memory, network.allow[0]): that name is kept, once."""
    try:
        return make(**fields)
    except ConfigError as exc:
        raise relocated(exc, f"{where}: {exc.where}" if exc.where else where) from None


def _network(raw: object, where: str) -> Network:
    return _build(Network, where, _table(raw, _NETWORK_KEYS, f"{where}: network"))


def _commands(raw: object, where: str) -> Commands:
    return _build(Commands, where, _table(raw, _COMMANDS_KEYS, f"{where}: commands"))


def _limits(raw: object, where: str) -> tuple[Limits, list[str]]:
    """The limits the table sets, and the names of those it lifts (`memory = "none"`)."""
    fields = _table(raw, _LIMIT_KEYS, f"{where}: limits")
    lifted = [key for key, value in fields.items() if value == NO_LIMIT]
    for key in lifted:
        del fields[key]
    # Limits takes sizes ("2G") and durations ("10m") itself.
    return _build(Limits, where, fields), lifted


def _container(raw: object, where: str) -> Container:
    return _build(Container, where, _table(raw, _CONTAINER_KEYS, f"{where}: container"))


def _env(raw: object, where: str) -> Env:
    fields = _table(raw, _ENV_KEYS, f"{where}: env")
    values = fields.get("set", {})
    if not isinstance(values, dict):
        raise ConfigError(f"expected a table of NAME = value, got {_got(values)}", where=f"{where}: env.set")
    return _build(Env, where, {"passthrough": fields.get("pass", ()), "values": values})
