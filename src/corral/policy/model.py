"""The policy: plain, immutable, validated data. Nothing here touches the host.

A `Policy` says what a sandbox may see (zones), reach (network), run (commands), use (limits) and
inherit (environment). `corral.policy.resolve` turns it into a `ResolvedPolicy` against one host.
Every constructor validates its input and raises `ConfigError` naming the field at fault.
"""

from __future__ import annotations

import posixpath

from corral._record import Record
from corral.errors import ConfigError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from typing import Literal

    ZoneMode = Literal["ro", "rw", "tmpfs"]
    NetMode = Literal["none", "host", "allow"]

ZONE_MODES = ("ro", "rw", "tmpfs")
NET_MODES = ("none", "host", "allow")
# Mount points a zone may never cover: the sandbox builds these itself.
RESERVED_MOUNTS = ("/", "/proc", "/dev", "/sys")
# The read-only system view and corral's own /etc: a zone there would replace them (a command finds no
# shell, or the host's /etc with its secrets). A zone inside one of them is checked when resolved.
SYSTEM_MOUNTS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
# The variables a clean environment keeps; PATH and HOME are the sandbox's own, not the host's.
BASE_ENV = ("PATH", "HOME", "LANG", "TERM", "TZ")
SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Bounds the kernel sets: a value past them would fail later, in a cgroup file or an rlimit.
MIN_CPUS = 0.01  # cpu.max's smallest quota, 1 ms, in corral's 100 ms period
MAX_CPUS = 8192  # the largest NR_CPUS a Linux build allows (x86-64 MAXSMP)
MAX_PIDS = 4_194_304  # PID_MAX_LIMIT on 64-bit: no more processes can exist
MAX_OPEN_FILES = 1 << 20  # fs.nr_open's default: RLIMIT_NOFILE past it is refused (EPERM)
MAX_BYTES = (1 << 63) - 1  # LLONG_MAX: the largest file size and memory.max; rlimits are signed 64-bit in Python
MAX_SECONDS = 24 * 86400  # poll(2) waits at most INT_MAX ms (24.8 days); a margin for grace periods


def relocated(exc: ConfigError, where: str) -> ConfigError:
    """`exc`'s message, said once, at `where` (a flag, or a file and key) instead of its own place."""
    text = str(exc)
    own = f"{exc.where}: " if exc.where else ""
    return ConfigError(text[len(own) :] if own and text.startswith(own) else text, where=where)


def _tuple_of_str(value: object, *, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        raise ConfigError(f"expected a list of strings, got the string {value!r}", where=where)
    try:
        items: tuple[object, ...] = tuple(value)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(f"expected a list of strings, got {_describe(value)}", where=where) from None
    out: list[str] = []
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item:
            raise ConfigError(f"expected a non-empty string, got {_got(item)}", where=f"{where}[{i}]")
        out.append(item)
    return tuple(out)


def _optional_count(value: object, *, where: str, most: int, why: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"expected a whole number, got {_describe(value)}{_unquote(value)}", where=where)
    if value <= 0:
        raise ConfigError(f"must be positive, got {value}", where=where)
    if value > most:
        raise ConfigError(f"must be at most {most} ({why}), got {value}", where=where)
    return value


def _optional_size(value: object, *, where: str) -> int | None:
    """Bytes from a number or a size such as "512M", as in TOML and on the command line."""
    if value is None:
        return None
    from corral.units import parse_size

    size = parse_size(value, where=where)
    if size > MAX_BYTES:
        raise ConfigError(f"must be at most 2**63 - 1 bytes (the kernel's largest size), got {value!r}", where=where)
    return size


def _optional_duration(value: object, *, where: str) -> float | None:
    """Seconds from a number or a duration such as "30s", as in TOML and on the command line."""
    if value is None:
        return None
    from corral.units import parse_duration

    seconds = parse_duration(value, where=where)
    if seconds > MAX_SECONDS:
        raise ConfigError(f"must be at most 24 days ({MAX_SECONDS}s), got {value!r}", where=where)
    return seconds


def _describe(value: object) -> str:
    from corral.units import describe

    return describe(value)


def _unquote(value: object) -> str:
    """A hint for a number written as a string (`cpus = "1.5"` in TOML)."""
    return " (write the number without quotes)" if isinstance(value, str) else ""


def _got(value: object) -> str:
    """A value for a message: a string as itself, quoted; anything else as its type and text."""
    return repr(value) if isinstance(value, str) else _describe(value)


def normalize_mount(mount: object, *, where: str) -> str:
    """An absolute, normalized path inside the sandbox."""
    if not isinstance(mount, str) or not mount:
        raise ConfigError(f"expected an absolute path, got {_got(mount)}", where=where)
    if "\0" in mount:
        raise ConfigError("path contains a NUL byte", where=where)
    if not mount.startswith("/"):
        raise ConfigError(f"must be an absolute path inside the sandbox, got {mount!r}", where=where)
    normalized = posixpath.normpath(mount)
    return "/" + normalized.lstrip("/")


class Zone(Record):
    """A place in the sandbox: a host directory or file (read-only or read-write) or a fresh tmpfs."""

    __slots__ = ("host", "mode", "mount", "size")
    mount: str
    mode: ZoneMode
    host: str | None
    size: int | None

    def __init__(
        self, *, mount: str, mode: ZoneMode = "ro", host: str | None = None, size: int | str | None = None
    ) -> None:
        if mode not in ZONE_MODES:
            raise ConfigError(f"expected one of {', '.join(ZONE_MODES)}, got {_got(mode)}", where="zone.mode")
        mount = normalize_mount(mount, where="zone.mount")
        for reserved in RESERVED_MOUNTS:
            if mount == reserved or (reserved != "/" and mount.startswith(reserved + "/")):
                raise ConfigError(f"{mount} is managed by the sandbox and cannot be a zone", where="zone.mount")
        if mount in SYSTEM_MOUNTS:
            raise ConfigError(f"{mount} is part of the sandbox's read-only system view and cannot be a zone "
                              f"(mount the zone elsewhere)", where="zone.mount")  # fmt: skip
        if mode == "tmpfs":
            if host is not None:
                raise ConfigError("a tmpfs zone has no host path", where="zone.host")
            size = _optional_size(size, where="zone.size")
        else:
            if not isinstance(host, str) or not host:
                raise ConfigError(f"a {mode} zone needs a host path", where="zone.host")
            if "\0" in host:
                raise ConfigError("path contains a NUL byte", where="zone.host")
            if size is not None:
                raise ConfigError("only tmpfs zones have a size", where="zone.size")
        self._set(mount=mount, mode=mode, host=host, size=size)

    @classmethod
    def ro(cls, host: str, mount: str | None = None) -> Zone:
        return cls(host=host, mount=mount or _default_mount(host), mode="ro")

    @classmethod
    def rw(cls, host: str, mount: str | None = None) -> Zone:
        return cls(host=host, mount=mount or _default_mount(host), mode="rw")

    @classmethod
    def tmpfs(cls, mount: str, size: int | str | None = None) -> Zone:
        return cls(mount=mount, mode="tmpfs", size=size)

    @classmethod
    def parse(cls, spec: str) -> Zone:
        """`HOST[:MOUNT][:ro|rw]` as given to `--zone` (read-only unless `:rw`)."""
        parts = spec.split(":")
        mode: ZoneMode = "ro"
        if len(parts) > 1 and parts[-1] in ("ro", "rw"):
            mode = "rw" if parts.pop() == "rw" else "ro"
        if len(parts) > 2 or not parts[0]:
            raise ConfigError(f"expected HOST[:MOUNT][:ro|rw], got {spec!r}", where="--zone")
        host = parts[0]
        mount = parts[1] if len(parts) == 2 and parts[1] else _default_mount(host)
        return cls(host=host, mount=mount, mode=mode)

    @classmethod
    def parse_tmpfs(cls, spec: str) -> Zone:
        """`MOUNT[:SIZE]` as given to `--tmpfs`."""
        mount, _, size = spec.partition(":")
        return cls(mount=mount, mode="tmpfs", size=size or None)


def _default_mount(host: str) -> str:
    # A zone given only by its host path appears at the same absolute path inside.
    return posixpath.normpath(posixpath.join(_cwd(), host))


def _cwd() -> str:
    import os

    return os.getcwd()


class Network(Record):
    """What the sandbox may reach. `none` (the default) leaves it only its own loopback."""

    __slots__ = ("allow", "allow_cidrs", "deny_cidrs", "mode", "upstream")
    mode: NetMode
    allow: tuple[str, ...]
    allow_cidrs: tuple[str, ...]
    deny_cidrs: tuple[str, ...]
    upstream: str | None

    def __init__(
        self,
        *,
        mode: NetMode = "none",
        allow: Iterable[str] = (),
        allow_cidrs: Iterable[str] = (),
        deny_cidrs: Iterable[str] = (),
        upstream: str | None = None,
    ) -> None:
        if mode not in NET_MODES:
            raise ConfigError(f"expected one of {', '.join(NET_MODES)}, got {_got(mode)}", where="network.mode")
        allow_t = _tuple_of_str(allow, where="network.allow")
        allow_cidrs_t = _tuple_of_str(allow_cidrs, where="network.allow_cidrs")
        deny_cidrs_t = _tuple_of_str(deny_cidrs, where="network.deny_cidrs")
        if mode != "allow" and (allow_t or allow_cidrs_t):
            raise ConfigError(f"an allowlist needs mode 'allow', not {mode!r}", where="network.allow")
        for i, pattern in enumerate(allow_t):
            _check_domain_pattern(pattern, where=f"network.allow[{i}]")
        allow_t = tuple(a.lower() for a in allow_t)
        for name, cidrs in (("allow_cidrs", allow_cidrs_t), ("deny_cidrs", deny_cidrs_t)):
            for i, cidr in enumerate(cidrs):
                _check_cidr(cidr, where=f"network.{name}[{i}]")
        if upstream is not None and (not isinstance(upstream, str) or not upstream.startswith("http://")):
            raise ConfigError(
                f"expected an HTTP proxy URL such as http://proxy:3128, got {_got(upstream)}", where="network.upstream"
            )
        self._set(mode=mode, allow=allow_t, allow_cidrs=allow_cidrs_t, deny_cidrs=deny_cidrs_t, upstream=upstream)

    @classmethod
    def parse(cls, spec: str) -> Network:
        """`none`, `host` or `allow:DOMAIN[:PORT],...` as given to `--net` (an item with a `/` is a CIDR)."""
        if spec in ("none", "host"):
            return cls(mode=spec)  # type: ignore[arg-type]
        if spec.startswith("allow:"):
            items = [s.strip() for s in spec[len("allow:") :].split(",") if s.strip()]
            if not items:
                raise ConfigError("allow: needs at least one domain", where="--net")
            # Address ranges (10.0.0.0/8) go to allow_cidrs; everything else is a name or an address.
            return cls(
                mode="allow", allow=[i for i in items if "/" not in i], allow_cidrs=[i for i in items if "/" in i]
            )
        raise ConfigError(f"expected none, host or allow:DOMAIN,..., got {spec!r}", where="--net")


def _check_domain_pattern(pattern: str, *, where: str) -> None:
    if not pattern.isascii() or any(c.isspace() or c in "/@%" for c in pattern):
        raise ConfigError(f"not a domain pattern: {pattern!r} (write names in their ASCII xn-- form)", where=where)
    if pattern.startswith("[") or pattern.count(":") > 1:  # an IPv6 address: [addr], [addr]:port or addr
        address, close, port = pattern[1:].partition("]") if pattern.startswith("[") else (pattern, "]", "")
        if not close or (port and (not port.startswith(":") or not port[1:].isdigit())):
            raise ConfigError(f"expected [IPv6] or [IPv6]:PORT, got {pattern!r}", where=where)
        if port and not 0 < int(port[1:]) < 65536:
            raise ConfigError(f"bad port in {pattern!r}", where=where)
        import ipaddress

        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            raise ConfigError(f"not an IPv6 address: {pattern!r}", where=where) from None
        return
    host, _, port = pattern.rpartition(":") if pattern.count(":") == 1 else (pattern, "", "")
    if port and (not port.isdigit() or not 0 < int(port) < 65536):
        raise ConfigError(f"bad port in {pattern!r}", where=where)
    labels = host.split(".")
    if host == "*" or any(not label for label in labels):
        raise ConfigError(f"not a domain pattern: {pattern!r}", where=where)
    if "*" in host[1:] or (host.startswith("*") and not host.startswith("*.")):
        raise ConfigError(f"a wildcard may only be a leading '*.' label: {pattern!r}", where=where)
    if host.startswith("*.") and len(labels) < 3:
        raise ConfigError(f"over-broad pattern {pattern!r}: name at least two labels after '*.'", where=where)


def _check_cidr(cidr: str, *, where: str) -> None:
    import ipaddress

    try:
        ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        raise ConfigError(
            f"expected an address range such as 10.0.0.0/8 or fd00::/8, got {cidr!r}", where=where
        ) from None


class Commands(Record):
    """Which commands may run. Deny wins over ask, ask over allow; a non-empty allow list denies the rest.

    Patterns are command prefixes: `git push` matches `git push origin main`; each word may use
    `*`, `?` and `[...]` globs. `ask` goes to a Python callback or the external `approver` command;
    a failure or a timeout of the approver means deny.
    """

    __slots__ = ("allow", "approver", "ask", "ask_timeout", "deny")
    allow: tuple[str, ...]
    deny: tuple[str, ...]
    ask: tuple[str, ...]
    approver: tuple[str, ...] | None
    ask_timeout: float

    def __init__(
        self,
        *,
        allow: Iterable[str] = (),
        deny: Iterable[str] = (),
        ask: Iterable[str] = (),
        approver: Iterable[str] | None = None,
        ask_timeout: float | str = 60.0,
    ) -> None:
        approver_t = None if approver is None else _tuple_of_str(approver, where="commands.approver")
        if approver_t == ():
            raise ConfigError("the approver command is empty", where="commands.approver")
        timeout = _optional_duration(ask_timeout, where="commands.ask_timeout")
        if timeout is None:
            raise ConfigError("expected a duration such as 30s, got None", where="commands.ask_timeout")
        self._set(
            allow=_tuple_of_str(allow, where="commands.allow"),
            deny=_tuple_of_str(deny, where="commands.deny"),
            ask=_tuple_of_str(ask, where="commands.ask"),
            approver=approver_t,
            ask_timeout=timeout,
        )


class Limits(Record):
    """Resource limits. `None` means no limit beyond the host's own.

    Sizes (memory, output, file_size) are bytes or strings such as "512M"; timeout is seconds or a
    string such as "30s" (the forms TOML and the command line take).
    """

    __slots__ = ("cpus", "file_size", "memory", "open_files", "output", "pids", "timeout")
    cpus: float | None
    memory: int | None
    pids: int | None
    timeout: float | None
    output: int | None
    file_size: int | None
    open_files: int | None

    def __init__(
        self,
        *,
        cpus: float | None = None,
        memory: int | str | None = None,
        pids: int | None = None,
        timeout: float | str | None = None,
        output: int | str | None = None,
        file_size: int | str | None = None,
        open_files: int | None = None,
    ) -> None:
        if cpus is not None and (isinstance(cpus, bool) or not isinstance(cpus, int | float)):
            raise ConfigError(f"expected a number of CPUs, got {_describe(cpus)}{_unquote(cpus)}", where="limits.cpus")
        # `not MIN <= cpus <= MAX` also refuses nan and infinity.
        if cpus is not None and not MIN_CPUS <= cpus <= MAX_CPUS:
            raise ConfigError(f"must be a number of CPUs from {MIN_CPUS} to {MAX_CPUS}, got {cpus!r}",
                              where="limits.cpus")  # fmt: skip
        memory = _optional_size(memory, where="limits.memory")
        if memory is not None and memory < 4 << 20:
            raise ConfigError(f"must be at least 4M, got {memory} bytes", where="limits.memory")
        self._set(
            cpus=None if cpus is None else float(cpus),
            memory=memory,
            pids=_optional_count(pids, where="limits.pids", most=MAX_PIDS, why="the kernel's PID_MAX_LIMIT"),
            timeout=_optional_duration(timeout, where="limits.timeout"),
            output=_optional_size(output, where="limits.output"),
            file_size=_optional_size(file_size, where="limits.file_size"),
            open_files=_optional_count(
                open_files, where="limits.open_files", most=MAX_OPEN_FILES, why="the kernel's default fs.nr_open"
            ),
        )

    def merged(self, other: Limits) -> Limits:
        """These limits with every limit `other` sets replacing ours."""
        return Limits(**{k: v if v is not None else getattr(self, k) for k, v in other.as_dict().items()})


class Env(Record):
    """The sandbox's environment: clean, plus named pass-through variables and fixed values."""

    __slots__ = ("passthrough", "values")
    passthrough: tuple[str, ...]
    values: tuple[tuple[str, str], ...]

    def __init__(self, *, passthrough: Iterable[str] = (), values: Mapping[str, str] | None = None) -> None:
        names = _tuple_of_str(passthrough, where="env.pass")
        for name in names:
            check_env_name(name, where="env.pass")
        pairs: list[tuple[str, str]] = []
        for name, value in (values or {}).items():
            check_env_variable(name, value, where="env.set")
            pairs.append((name, value))
        self._set(passthrough=names, values=tuple(sorted(pairs)))

    def build(self, host_env: Mapping[str, str], *, home: str) -> dict[str, str]:
        """The environment a command starts with."""
        env = {"PATH": SANDBOX_PATH, "HOME": home}
        for name in ("LANG", "TERM", "TZ"):
            if name in host_env:
                env[name] = host_env[name]
        env.setdefault("LANG", "C.UTF-8")
        for name in self.passthrough:
            if name in host_env:
                env[name] = host_env[name]
        env.update(self.values)
        return env


class Container(Record):
    """What the container backends (docker, gvisor) start from; the other backends ignore it.

    `image` None (the default) means corral's own minimal image: an empty root with the host's
    system directories mounted read-only, the same system view as the namespace backend, built
    locally without a registry. A named image (`python:3.12-slim`, a local tag) provides the system
    instead; it must contain `/bin/sh` and `python3` (>= 3.8) for corral's agent. `auto_pull` lets
    the engine pull a named image that is not present locally (off by default: no surprise
    downloads, no registry needed).
    """

    __slots__ = ("auto_pull", "image")
    image: str | None
    auto_pull: bool

    def __init__(self, *, image: str | None = None, auto_pull: bool = False) -> None:
        if image is not None and (not isinstance(image, str) or not image or any(c.isspace() for c in image)):
            raise ConfigError(
                f"expected an image name such as python:3.12-slim, got {_got(image)}", where="container.image"
            )
        if not isinstance(auto_pull, bool):
            raise ConfigError(f"expected true or false, got {_describe(auto_pull)}", where="container.auto_pull")
        self._set(image=image, auto_pull=auto_pull)


def check_env_name(name: object, *, where: str) -> None:
    """A name an environment can hold: a non-empty string without `=` or NUL, not starting with a digit."""
    if not isinstance(name, str) or not name or "=" in name or "\0" in name or name[0].isdigit():
        raise ConfigError(f"not a valid variable name: {name!r}", where=where)


def check_env_variable(name: object, value: object, *, where: str) -> None:
    """A variable an environment can hold: a valid name, and a string value without NUL."""
    check_env_name(name, where=where)
    if not isinstance(value, str) or "\0" in value:
        raise ConfigError(f"value of {name} must be a string without NUL bytes", where=where)


class Policy(Record):
    """Everything a sandbox is allowed. Build one with `Policy.workspace()`, `Policy.from_profile()`,
    `corral.policy.load_policy()` (TOML) or directly; change one with `.replace(...)` / `.with_zones(...)`.
    """

    __slots__ = ("commands", "container", "cwd", "env", "hostname", "limits", "network", "profile", "uid", "zones")
    zones: tuple[Zone, ...]
    network: Network
    commands: Commands
    limits: Limits
    env: Env
    cwd: str | None
    uid: int
    hostname: str
    profile: str | None
    container: Container

    def __init__(
        self,
        *,
        zones: Iterable[Zone] = (),
        network: Network | None = None,
        commands: Commands | None = None,
        limits: Limits | None = None,
        env: Env | None = None,
        cwd: str | None = None,
        uid: int = 1000,
        hostname: str = "corral",
        profile: str | None = None,
        container: Container | None = None,
    ) -> None:
        zones_t = tuple(zones)
        for i, zone in enumerate(zones_t):
            if not isinstance(zone, Zone):
                raise ConfigError(f"expected a Zone, got {type(zone).__name__}", where=f"zones[{i}]")
        # A later zone at the same mount point replaces an earlier one.
        by_mount: dict[str, Zone] = {}
        for zone in zones_t:
            by_mount.pop(zone.mount, None)
            by_mount[zone.mount] = zone
        if cwd is not None:
            cwd = normalize_mount(cwd, where="cwd")
        if isinstance(uid, bool) or not isinstance(uid, int) or not 0 <= uid < 65534:
            got = uid if isinstance(uid, int) and not isinstance(uid, bool) else _describe(uid)
            raise ConfigError(f"expected a uid between 0 and 65533, got {got}", where="uid")
        if (
            not isinstance(hostname, str)
            or not hostname
            or len(hostname) > 63
            or not all(c.isalnum() or c == "-" for c in hostname)
        ):
            raise ConfigError(f"not a valid host name: {_got(hostname)}", where="hostname")
        parts = (("network", network, Network), ("commands", commands, Commands), ("limits", limits, Limits),
                 ("env", env, Env), ("container", container, Container))  # fmt: skip
        for field, value, kind in parts:
            if value is not None and not isinstance(value, kind):  # a dict would fail later, far from here
                raise ConfigError(f"expected a corral.{kind.__name__}, got {type(value).__name__} {value!r:.60} "
                                  f"(write corral.{kind.__name__}(...))", where=field)  # fmt: skip
        self._set(
            zones=tuple(by_mount.values()),
            network=network if network is not None else Network(),
            commands=commands if commands is not None else Commands(),
            limits=limits if limits is not None else Limits(),
            env=env if env is not None else Env(),
            cwd=cwd,
            uid=uid,
            hostname=hostname,
            profile=profile,
            container=container if container is not None else Container(),
        )

    @classmethod
    def workspace(cls, path: str = ".") -> Policy:
        """The default: `path` read-write at its own absolute path, system read-only, /tmp a tmpfs, no network."""
        from corral.policy.profiles import make_profile

        return make_profile("workspace", workspace=path)

    @classmethod
    def from_profile(cls, name: str, workspace: str = ".") -> Policy:
        """A named profile: strict, workspace, fs_safe, net_safe or dev."""
        from corral.policy.profiles import make_profile

        return make_profile(name, workspace=workspace)

    def with_zones(self, *zones: Zone) -> Policy:
        return self.replace(zones=(*self.zones, *zones))

    def with_limits(self, **limits: object) -> Policy:
        return self.replace(limits=self.limits.merged(Limits(**limits)))  # type: ignore[arg-type]
