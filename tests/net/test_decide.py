"""The decision function, pure: every refusal the proxy and the guard rely on, with no network at all."""

from __future__ import annotations

import ipaddress

import pytest

from corral import ConfigError, Network
from corral.net.decide import Rules, classify_address, decide, parse_host

ALLOW = Network(
    mode="allow",
    allow=["pypi.org", "*.github.com", "api.example.com:8443", "127.0.0.1:8080", "[::1]:9000", "exact.example.net"],
    allow_cidrs=["10.1.0.0/16", "169.254.0.0/16"],
    deny_cidrs=["10.1.2.0/24", "198.51.100.0/24"],
)
RULES = Rules.from_network(ALLOW)
PUBLIC = ["151.101.0.223"]


def verdict(host: str, port: int = 443, addresses: list[str] | None = None) -> tuple[str, str]:
    d = decide(RULES, host, port, addresses)
    return d.action, d.rule


def test_allowed_names_pass_the_name_stage_without_addresses_then_need_public_ones() -> None:
    d = decide(RULES, "pypi.org", 443)
    assert (d.action, d.rule, d.addresses) == ("allow", "network.allow=pypi.org", ())
    d = decide(RULES, "PyPI.org.", 443, PUBLIC)
    assert (d.action, d.host, d.addresses) == ("allow", "pypi.org", ("151.101.0.223",))
    assert verdict("pypi.org", 80, PUBLIC) == ("allow", "network.allow=pypi.org")
    assert verdict("api.example.com", 8443, PUBLIC) == ("allow", "network.allow=api.example.com:8443")


@pytest.mark.parametrize(
    ("host", "port", "why"),
    [
        ("pypi.org", 22, "port 22 is not allowed for pypi.org"),
        ("api.example.com", 443, "port 443 is not allowed for api.example.com"),
        ("files.pythonhosted.org", 443, "not in network.allow"),
        ("127.0.0.1", 8081, "not in network.allow"),
        ("151.101.0.223", 443, "not in network.allow"),  # pypi.org's address, but only the name is listed
    ],
)
def test_names_and_ports_not_listed_are_refused(host: str, port: int, why: str) -> None:
    d = decide(RULES, host, port)
    assert (d.action, d.rule) == ("deny", "default-deny") and why in d.detail


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("api.github.com", True),
        ("a.b.c.github.com", True),
        ("API.GitHub.COM.", True),
        ("github.com", False),  # the wildcard needs at least one more label
        ("github.com.evil.org", False),
        ("evilgithub.com", False),
        ("x.github.com.", True),
        ("x.github.com..", False),
        ("x.github.com.evil", False),
        ("x.github.co", False),
        ("x\u212a.github.com", False),  # KELVIN SIGN lower-cases to an ASCII k
        ("x\u0430.github.com", False),  # Cyrillic a
        ("x.github.com\x00.evil.org", False),
        ("x.github.com%2eevil.org", False),
        ("x.github.com@evil.org", False),
        ("x.github.com/evil.org", False),
        ("x.github.com evil.org", False),
        ("*.github.com", False),
        ("-x.github.com", False),
        ("exact.example.net", True),
        ("sub.exact.example.net", False),  # an exact entry does not admit names below it
        ("", False),
    ],
)
def test_wildcards_match_whole_labels_only(host: str, allowed: bool) -> None:
    d = decide(RULES, host, 443, PUBLIC)
    assert (d.action == "allow") is allowed, d


@pytest.mark.parametrize(
    "host",
    ["2130706433", "0x7f000001", "0x7f.1", "0177.0.0.1", "0177.0000.0000.0001", "127.1", "127.0.1", "127.000.000.1",
     "0x7f.0x0.0x0.0x1", "017700000001", "1.2.3.4.5", "pypi.123", "0", "08.8.8.8", "256.1.1.1"],
)  # fmt: skip
def test_numeric_tricks_are_refused_before_anything_else(host: str) -> None:
    d = decide(Rules.public(), host, 80)
    assert (d.action, d.rule) == ("deny", "bad-host:numeric"), d


def test_numeric_tricks_say_what_they_mean() -> None:
    for host in ("2130706433", "0x7f.1", "0177.0.0.1", "127.1"):
        assert "127.0.0.1 written another way" in decide(Rules.public(), host, 80).detail


@pytest.mark.parametrize(
    ("address", "category"),
    [
        ("127.0.0.1", "loopback"), ("127.255.255.254", "loopback"), ("::1", "loopback"),
        ("10.0.0.1", "private"), ("172.16.5.4", "private"), ("172.31.255.255", "private"), ("192.168.1.1", "private"),
        ("100.64.0.1", "private"), ("fec0::1", "private"), ("64:ff9b:1::1", "private"),
        ("169.254.1.1", "link-local"), ("fe80::1", "link-local"),
        ("fc00::1", "unique-local"), ("fd12:3456::1", "unique-local"),
        ("224.0.0.1", "multicast"), ("239.255.255.250", "multicast"), ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"), ("0.1.2.3", "unspecified"), ("::", "unspecified"),
        ("169.254.169.254", "metadata"), ("169.254.170.2", "metadata"), ("fd00:ec2::254", "metadata"),
        ("100.100.100.200", "metadata"), ("192.0.0.192", "metadata"),
        ("255.255.255.255", "reserved"), ("240.0.0.1", "reserved"), ("192.0.2.1", "reserved"),
        ("198.18.0.1", "reserved"), ("2001:db8::1", "reserved"), ("2001::1", "reserved"), ("100::1", "reserved"),
        ("::ffff:127.0.0.1", "loopback"), ("::ffff:169.254.169.254", "metadata"), ("::ffff:10.0.0.1", "private"),
        ("::127.0.0.1", "loopback"), ("::10.0.0.1", "private"), ("::8.8.8.8", "reserved"),
        ("2002:7f00:1::", "loopback"), ("2002:a9fe:a9fe::1", "metadata"), ("64:ff9b::7f00:1", "loopback"),
        ("64:ff9b::a00:1", "private"),
        ("8.8.8.8", None), ("151.101.0.223", None), ("2606:4700::1111", None), ("::ffff:8.8.8.8", None),
        ("2002:808:808::", None), ("64:ff9b::808:808", None),
    ],
)  # fmt: skip
def test_address_categories(address: str, category: str | None) -> None:
    assert classify_address(ipaddress.ip_address(address)) == category


@pytest.mark.parametrize(
    "resolved",
    [["127.0.0.1"], ["10.0.0.7"], ["169.254.169.254"], ["::ffff:127.0.0.1"], ["fd00:ec2::254"], ["0.0.0.0"],
     ["2002:7f00:1::"], ["151.101.0.223", "127.0.0.1"], ["224.0.0.251"], ["fe80::1"]],
)  # fmt: skip
def test_an_allowed_name_that_resolves_to_a_forbidden_address_is_refused(resolved: list[str]) -> None:
    """DNS rebinding: the name is fine, the answer is not. One bad address refuses the lot."""
    action, rule = verdict("pypi.org", 443, resolved)
    assert action == "deny" and rule.startswith("blocked-address:"), rule


def test_unresolvable_and_garbage_answers_are_refused() -> None:
    assert verdict("pypi.org", 443, []) == ("deny", "unresolved")
    assert verdict("pypi.org", 443, ["not-an-address"]) == ("deny", "unresolved")


def test_explicit_allows_override_the_address_refusals() -> None:
    assert verdict("127.0.0.1", 8080) == ("allow", "network.allow=127.0.0.1:8080")
    assert verdict("[::1]", 9000) == ("allow", "network.allow=[::1]:9000")
    assert verdict("::ffff:127.0.0.1", 8080)[0] == "allow"  # the same address, mapped
    # A listed name may resolve to an address the user named with that port ...
    assert verdict("pypi.org", 443, ["127.0.0.1"]) == ("deny", "blocked-address:loopback")
    rules = Rules.from_network(Network(mode="allow", allow=["svc.local.test:8080", "127.0.0.1:8080"]))
    assert decide(rules, "svc.local.test", 8080, ["127.0.0.1"]).allowed
    # ... but not with another port.
    assert decide(rules, "svc.local.test", 8080, ["127.0.0.2"]).rule == "blocked-address:loopback"
    # allow_cidrs admit private ranges, on any port, for names and addresses alike:
    assert verdict("10.1.3.4", 5432) == ("allow", "network.allow_cidrs=10.1.0.0/16")
    assert verdict("pypi.org", 443, ["10.1.3.4"]) == ("allow", "network.allow=pypi.org")
    assert verdict("10.2.0.1", 5432) == ("deny", "default-deny")


def test_metadata_is_refused_even_inside_allow_cidrs() -> None:
    assert verdict("169.254.1.1", 80) == ("allow", "network.allow_cidrs=169.254.0.0/16")
    assert verdict("169.254.169.254", 80) == ("deny", "blocked-address:metadata")
    assert verdict("pypi.org", 443, ["169.254.169.254"]) == ("deny", "blocked-address:metadata")


def test_metadata_names_need_an_exact_entry() -> None:
    public = Rules.public()
    assert decide(public, "metadata.google.internal", 80).rule == "blocked-name:metadata"
    wild = Rules.from_network(Network(mode="allow", allow=["*.google.internal:80"]))
    assert decide(wild, "metadata.google.internal", 80).rule == "blocked-name:metadata"
    exact = Rules.from_network(Network(mode="allow", allow=["metadata.google.internal:80", "169.254.169.254:80"]))
    assert decide(exact, "metadata.google.internal", 80, ["169.254.169.254"]).allowed


def test_deny_cidrs_win_over_everything() -> None:
    assert verdict("10.1.2.9", 5432) == ("deny", "network.deny_cidrs=10.1.2.0/24")
    assert verdict("pypi.org", 443, ["198.51.100.7"]) == ("deny", "network.deny_cidrs=198.51.100.0/24")
    assert verdict("pypi.org", 443, ["::ffff:10.1.2.9"]) == ("deny", "network.deny_cidrs=10.1.2.0/24")
    assert verdict("pypi.org", 443, ["2002:a01:209::"]) == ("deny", "network.deny_cidrs=10.1.2.0/24")
    rules = Rules.from_network(Network(mode="allow", allow=["10.9.9.9:80"], deny_cidrs=["10.9.0.0/16"]))
    assert decide(rules, "10.9.9.9", 80).rule == "network.deny_cidrs=10.9.0.0/16"


def test_modes() -> None:
    assert decide(Rules.from_network(Network()), "pypi.org", 443).rule == "mode:none"
    assert decide(Rules.from_network(Network(mode="host")), "10.0.0.1", 22).allowed
    assert decide(Rules.from_network(Network(mode="allow")), "pypi.org", 443).rule == "default-deny"


def test_public_rules_are_an_ssrf_guard() -> None:
    public = Rules.public()
    assert decide(public, "example.com", 8080, ["93.184.215.14"]).allowed
    assert decide(public, "example.com", 8080, ["192.168.0.1"]).rule == "blocked-address:private"
    assert decide(public, "8.8.8.8", 53).allowed
    assert decide(public, "[::ffff:127.0.0.1]", 80).rule == "blocked-address:loopback"
    assert not decide(public, "example.com", 0).allowed
    assert not decide(public, "example.com", 65536).allowed


@pytest.mark.parametrize(
    ("host", "expected"),
    [("Example.COM.", ("example.com", None)), ("[::1]", ("::1", ipaddress.ip_address("::1"))),
     ("10.0.0.1", ("10.0.0.1", ipaddress.ip_address("10.0.0.1"))),
     ("::FFFF:127.0.0.1", ("::ffff:7f00:1", ipaddress.ip_address("::ffff:7f00:1"))),
     ("xn--bcher-kva.example", ("xn--bcher-kva.example", None))],
)  # fmt: skip
def test_parse_host(host: str, expected: tuple[str, object]) -> None:
    assert parse_host(host) == expected


def test_policy_model_validates_network_entries() -> None:
    net = Network.parse("allow:pypi.org,[::1]:8080,10.0.0.0/8,127.0.0.1:3000")
    assert net.allow == ("pypi.org", "[::1]:8080", "127.0.0.1:3000") and net.allow_cidrs == ("10.0.0.0/8",)
    for bad in ("allow:\u212aa.com", "allow:[::1", "allow:[::g]:80", "allow:[::1]:99999", "allow:a.com/x",
                "allow:user@a.com", "allow:10.0.0.0/33"):  # fmt: skip
        with pytest.raises(ConfigError):
            Network.parse(bad)
    with pytest.raises(ConfigError, match="deny_cidrs"):
        Network(mode="allow", deny_cidrs=["nope"])
    with pytest.raises(ConfigError, match="upstream"):
        Network(mode="allow", upstream="socks5://proxy:1080")


def test_entries_the_model_accepts_but_no_resolver_could_match_are_refused_at_start() -> None:
    with pytest.raises(ValueError, match="written another way"):
        Rules.from_network(Network(mode="allow", allow=["2130706433"]))
