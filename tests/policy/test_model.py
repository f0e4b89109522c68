from __future__ import annotations

import math

import pytest

from corral import ConfigError, Limits, Network, Policy, Zone
from corral.policy.model import MAX_BYTES, MAX_SECONDS, Commands, Env, relocated
from corral.policy.profiles import PROFILES, make_profile
from corral.units import parse_duration, parse_number, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("64M", 64 << 20),
        ("1.5G", 3 << 29),
        ("512k", 512 << 10),
        ("4096", 4096),
        (2048, 2048),
        ("2GiB", 2 << 30),
        ("10MB", 10 << 20),
    ],
)
def test_sizes(text: object, expected: int) -> None:
    assert parse_size(text, where="x") == expected


@pytest.mark.parametrize("bad", ["-5", "0", "lots", "1.2.3M", "", True, None, [], "5X"])
def test_bad_sizes_name_the_flag(bad: object) -> None:
    with pytest.raises(ConfigError, match="--memory"):
        parse_size(bad, where="--memory")


@pytest.mark.parametrize(("text", "expected"), [("2s", 2.0), ("500ms", 0.5), ("1.5m", 90.0), ("1h", 3600.0), (3, 3.0)])
def test_durations(text: object, expected: float) -> None:
    assert parse_duration(text, where="x") == expected


@pytest.mark.parametrize("bad", ["-1s", "0", "soon", "nan", "inf", False])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ConfigError, match="--timeout"):
        parse_duration(bad, where="--timeout")


def test_negative_limits_are_refused_with_the_field_named() -> None:
    with pytest.raises(ConfigError, match="limits.pids"):
        Limits(pids=-1)
    with pytest.raises(ConfigError, match="limits.cpus"):
        Limits(cpus=0)
    with pytest.raises(ConfigError, match="limits.memory"):
        Limits(memory=1024)
    with pytest.raises(ConfigError, match="limits.timeout"):
        Limits(timeout=-3)


def test_zone_validation() -> None:
    with pytest.raises(ConfigError, match="zone.mode"):
        Zone(host="/x", mount="/x", mode="rwx")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="absolute"):
        Zone(host="/x", mount="relative", mode="ro")
    for reserved in ("/", "/proc", "/proc/1", "/dev", "/sys/fs"):
        with pytest.raises(ConfigError, match="managed by the sandbox"):
            Zone(host="/x", mount=reserved, mode="ro")
    with pytest.raises(ConfigError, match="tmpfs zone has no host"):
        Zone(host="/x", mount="/y", mode="tmpfs")
    with pytest.raises(ConfigError, match="needs a host"):
        Zone(mount="/y", mode="rw")
    assert Zone(host="/x", mount="/a/../b/", mode="ro").mount == "/b"


def test_zone_specs() -> None:
    assert Zone.parse("/src:/work:rw") == Zone(host="/src", mount="/work", mode="rw")
    assert Zone.parse("/src:rw") == Zone(host="/src", mount="/src", mode="rw")
    assert Zone.parse("/data") == Zone(host="/data", mount="/data", mode="ro")
    assert Zone.parse_tmpfs("/cache:100M") == Zone(mount="/cache", mode="tmpfs", size=100 << 20)
    with pytest.raises(ConfigError, match="--zone"):
        Zone.parse(":/x")


def test_network_specs() -> None:
    assert Network.parse("none").mode == "none"
    net = Network.parse("allow:PyPI.org,*.github.com,api.example.com:8443")
    assert net.allow == ("pypi.org", "*.github.com", "api.example.com:8443")
    for bad in ("allow:*", "allow:*.com", "allow:a.*.com", "allow:x.com:99999", "allow:", "wifi"):
        with pytest.raises(ConfigError):
            Network.parse(bad)


def test_env_is_clean_and_named() -> None:
    host = {"PATH": "/root/bin:/usr/bin", "AWS_SECRET_ACCESS_KEY": "x", "TERM": "xterm", "CI": "1"}
    env = Env(passthrough=["CI"], values={"FOO": "bar"}).build(host, home="/home/sandbox")
    assert env["PATH"].startswith("/usr/local/sbin") and "/root/bin" not in env["PATH"]
    assert "AWS_SECRET_ACCESS_KEY" not in env
    assert env["TERM"] == "xterm" and env["CI"] == "1" and env["FOO"] == "bar" and env["HOME"] == "/home/sandbox"
    with pytest.raises(ConfigError, match="env.set"):
        Env(values={"1BAD": "x"})


def test_records_are_immutable_values() -> None:
    a = Limits(memory=64 << 20)
    assert a == Limits(memory=64 << 20) and hash(a) == hash(Limits(memory=64 << 20))
    with pytest.raises(AttributeError):
        a.memory = 1  # type: ignore[misc]
    assert a.replace(pids=5).pids == 5 and a.pids is None
    assert Limits(pids=1).merged(Limits(memory=8 << 20)) == Limits(pids=1, memory=8 << 20)


def test_later_zone_at_same_mount_wins(tmp_path: object) -> None:
    p = Policy(zones=[Zone(host="/a", mount="/w", mode="ro"), Zone(host="/b", mount="/w", mode="rw")])
    assert p.zones == (Zone(host="/b", mount="/w", mode="rw"),)


@pytest.mark.parametrize("name", PROFILES)
def test_profiles(name: str) -> None:
    p = make_profile(name, workspace="/srv/project")
    assert p.profile == name
    assert any(z.mount == "/tmp" and z.mode == "tmpfs" for z in p.zones)
    work = next(z for z in p.zones if z.mount == "/srv/project")
    assert work.mode == ("ro" if name == "strict" else "rw")
    assert p.network.mode == {"fs_safe": "host", "dev": "host", "net_safe": "allow"}.get(name, "none")


def test_unknown_profile() -> None:
    with pytest.raises(ConfigError, match="unknown profile"):
        Policy.from_profile("lax")


def test_commands_validation() -> None:
    with pytest.raises(ConfigError, match="commands.deny"):
        Commands(deny="rm -rf /")  # a string, not a list
    with pytest.raises(ConfigError, match="commands.approver"):
        Commands(approver=[])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("cpus", math.inf), ("cpus", math.nan), ("cpus", -math.inf), ("cpus", 0.001), ("cpus", 8193), ("cpus", 10**400),
        ("pids", 4_194_305), ("pids", 10**20), ("open_files", (1 << 20) + 1), ("memory", MAX_BYTES + 1),
        ("memory", "99999999999999999999"), ("output", MAX_BYTES + 1), ("file_size", "9" * 400),
        ("timeout", MAX_SECONDS + 1), ("timeout", math.inf), ("timeout", 10**400), ("timeout", "3000000"),
    ],
)  # fmt: skip
def test_limits_past_what_the_kernel_takes_are_refused(field: str, value: object) -> None:
    """`--cpus inf` was an OverflowError traceback, `--pids 1e20` an ERANGE at launch (exit 125) or,
    as an ordinary user, silently accepted."""
    with pytest.raises(ConfigError, match=rf"^limits\.{field}: "):
        Limits(**{field: value})  # type: ignore[arg-type]


def test_limits_at_the_kernel_bounds_are_accepted() -> None:
    top = Limits(cpus=8192, pids=4_194_304, open_files=1 << 20, memory=MAX_BYTES, output=MAX_BYTES,
                 file_size=str(MAX_BYTES), timeout=MAX_SECONDS)  # fmt: skip
    assert top.file_size == MAX_BYTES and top.timeout == MAX_SECONDS
    assert Limits(cpus=0.01).cpus == 0.01


def test_limits_take_the_sizes_and_durations_toml_and_flags_take() -> None:
    policy = Policy.workspace("/srv/p").with_limits(memory="512M", output="1M", file_size="1G", timeout="2m")
    assert policy.limits.memory == 512 << 20 and policy.limits.output == 1 << 20
    assert policy.limits.file_size == 1 << 30 and policy.limits.timeout == 120.0
    for field, bad in (("memory", "lots"), ("output", "5X"), ("file_size", True), ("timeout", "soon")):
        with pytest.raises(ConfigError, match=rf"^limits\.{field}: expected a"):
            Limits(**{field: bad})  # type: ignore[arg-type]
    assert Zone.tmpfs("/cache", size="100M").size == 100 << 20
    assert Commands(ask_timeout="5s").ask_timeout == 5.0
    with pytest.raises(ConfigError, match="commands.ask_timeout"):
        Commands(ask_timeout=math.nan)


def test_size_parsing_is_exact_for_whole_numbers() -> None:
    assert parse_size(MAX_BYTES, where="x") == MAX_BYTES == parse_size(str(MAX_BYTES), where="x")
    with pytest.raises(ConfigError, match="x: must be a finite duration"):
        parse_duration(10**400, where="x")


@pytest.mark.parametrize("name", ["1A", "", "A=B", "A\0B", 7])
def test_bad_environment_names_are_refused(name: object) -> None:
    with pytest.raises(ConfigError, match="env.set: not a valid variable name"):
        Env(values={name: "1"})  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match=r"^env\.pass"):
        Env(passthrough=[name])  # type: ignore[list-item]


def test_relocated_says_the_message_once_at_the_new_place() -> None:
    moved = relocated(ConfigError("must be positive, got 0", where="limits.pids"), "--pids")
    assert str(moved) == "--pids: must be positive, got 0" and moved.where == "--pids"
    assert str(relocated(ConfigError("bare"), "f.toml")) == "f.toml: bare"


@pytest.mark.parametrize("text", ["\uff16\uff14M", "\u0666\u0664M", "1.\uff15G", "\u00b2M", "\u096ak", ".M", "..", "."])
def test_sizes_take_ascii_digits_only(text: str) -> None:
    """int() and float() read any script's digits: `--memory` with fullwidth 64M was 64 MiB; a superscript two
    raised a ValueError."""
    with pytest.raises(ConfigError, match=r"^--memory: expected a size such as 512M or 2G, got "):
        parse_size(text, where="--memory")


@pytest.mark.parametrize("text", ["\uff12s", "\u0662s", "1.\uff15m", "\u00b3s", ".s"])
def test_durations_take_ascii_digits_only(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^--timeout: expected a duration such as 30s, 500ms or 2m, got "):
        parse_duration(text, where="--timeout")


def test_limits_take_ascii_digits_only() -> None:
    with pytest.raises(ConfigError, match="^limits.memory: expected a size"):
        Limits(memory="\uff11G")
    with pytest.raises(ConfigError, match="^limits.timeout: expected a duration"):
        Limits(timeout="\u0662s")


@pytest.mark.parametrize(
    ("text", "integer", "expected"), [("0", True, 0), ("12", True, 12), ("-3", True, -3), ("1.5", False, 1.5)]
)
def test_numbers(text: str, integer: bool, expected: float) -> None:
    assert parse_number(text, where="--cpus", integer=integer) == expected


@pytest.mark.parametrize(
    ("text", "integer"),
    [("\uff10", True), ("\u0660.\u0665", False), ("\uff11", True), ("2.\u0665", False), ("x", True)],
)
def test_numbers_take_ascii_digits_only(text: str, integer: bool) -> None:
    """For --uid, --pids, --open-files and --cpus: a fullwidth zero was uid 0, Arabic-Indic 0.5 half a CPU."""
    whole = "whole " if integer else ""
    with pytest.raises(ConfigError, match=f"^--uid: expected a {whole}number, got {text!r}$"):
        parse_number(text, where="--uid", integer=integer)


@pytest.mark.parametrize("mount", ["/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc", "/usr/"])
def test_a_zone_cannot_replace_the_system_view(mount: str) -> None:
    """`--zone X:/usr` or `--tmpfs /usr` replaced the system (`execvp sh: No such file or directory`);
    `--zone /etc` put the host's /etc, shadow included, over corral's own."""
    for zone in (lambda: Zone.tmpfs(mount), lambda: Zone.ro("/x", mount), lambda: Zone.rw("/x", mount)):
        with pytest.raises(ConfigError, match="^zone.mount: .* is part of the sandbox's read-only system view"):
            zone()
    assert Zone.ro("/x", "/usr/local/src/project").mount == "/usr/local/src/project"  # inside: checked when resolved
    assert Zone.ro("/x", "/library").mount == "/library"


@pytest.mark.parametrize("field, value", [("limits", {"memory": "1G"}), ("network", "host"), ("env", {"A": "b"}),
                                          ("commands", {"deny": ["rm"]}), ("container", "python:3.12")])  # fmt: skip
def test_a_part_of_the_wrong_type_is_refused_where_it_is_given(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"^{field}: expected a corral\.\w+, got {type(value).__name__} "):
        Policy(**{field: value})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=rf"^{field}: expected a corral\."):
        Policy.workspace("/tmp").replace(**{field: value})
