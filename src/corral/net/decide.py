"""May a sandbox reach HOST:PORT at these addresses? Pure: no I/O, no DNS, no clock.

A decision has two stages, and the proxy and the in-process guard run both:

1. **the name** (`decide(rules, host, port)`, no addresses yet): the host is parsed strictly (no
   decimal, octal, hex or shortened IPv4, no IPv6 zone ids, no non-ASCII, no empty labels), then
   matched against the allowlist. A name that fails here is never resolved, so the proxy cannot be
   used to leak data through DNS lookups.
2. **the addresses** (`decide(rules, host, port, addresses)`): every address the name resolved to
   must be public; loopback, private, shared (CGNAT), link-local, unique-local, site-local,
   multicast, unspecified, reserved and cloud-metadata addresses are refused, as are addresses that
   embed one of those (IPv4-mapped, IPv4-compatible, 6to4, NAT64). The caller then connects to
   exactly these addresses and never resolves the name again: DNS rebinding has nothing to rebind.

Explicit allows override the address refusals: an allow entry naming an address
(`127.0.0.1:8080`, `[::1]:8080`) admits that address and port, and `allow_cidrs` admit their ranges
(on any port, but never a cloud-metadata address). `deny_cidrs` win over everything.

Allow entries are `name` (ports 80 and 443), `name:port`, `*.name` (any name below `name`, at any
depth, but not `name` itself), `*.name:port`, `address` and `address:port`.
"""

from __future__ import annotations

import ipaddress

from corral._record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from typing import Literal

    from corral.policy.model import Network

    Action = Literal["allow", "deny"]
    IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
    IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

__all__ = ["DEFAULT_PORTS", "Decision", "Rules", "classify_address", "decide", "parse_host"]

# An allow entry without a port admits the web ports only.
DEFAULT_PORTS = frozenset({80, 443})

METADATA_NAMES = frozenset({
    "metadata.google.internal", "metadata.goog", "metadata", "instance-data", "instance-data.ec2.internal",
})  # fmt: skip
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OCI, DigitalOcean, ... instance metadata
        "169.254.169.253",  # AWS DNS
        "169.254.169.123",  # AWS time
        "169.254.170.2",  # AWS ECS task metadata
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud (classic)
        "fd00:ec2::254",  # AWS, IPv6
        "fd00:ec2::253",
        "fd00:ec2::123",
    )
)


def _nets(*pairs: tuple[str, str]) -> tuple[tuple[IPNetwork, str], ...]:
    return tuple((ipaddress.ip_network(net), category) for net, category in pairs)


# The refused ranges, most specific first. Written out rather than taken from `ipaddress`'s
# is_global/is_private, whose answers have changed between Python releases.
BLOCKED_V4 = _nets(
    ("0.0.0.0/8", "unspecified"),  # 0.0.0.0 reaches the local host on Linux
    ("127.0.0.0/8", "loopback"),
    ("10.0.0.0/8", "private"),
    ("172.16.0.0/12", "private"),
    ("192.168.0.0/16", "private"),
    ("100.64.0.0/10", "private"),  # shared address space (carrier-grade NAT)
    ("169.254.0.0/16", "link-local"),
    ("224.0.0.0/4", "multicast"),
    ("192.0.0.0/24", "reserved"),
    ("192.0.2.0/24", "reserved"),
    ("198.51.100.0/24", "reserved"),
    ("203.0.113.0/24", "reserved"),
    ("198.18.0.0/15", "reserved"),
    ("192.88.99.0/24", "reserved"),
    ("240.0.0.0/4", "reserved"),  # includes 255.255.255.255
)
BLOCKED_V6 = _nets(
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("fe80::/10", "link-local"),
    ("fc00::/7", "unique-local"),
    ("fec0::/10", "private"),  # site-local (deprecated, still routed by some stacks)
    ("ff00::/8", "multicast"),
    ("::/96", "reserved"),  # IPv4-compatible (deprecated)
    ("64:ff9b:1::/48", "private"),  # local-use NAT64
    ("100::/64", "reserved"),  # discard
    ("2001::/23", "reserved"),  # IETF protocol assignments, Teredo
    ("2001:db8::/32", "reserved"),
    ("3fff::/20", "reserved"),
    ("5f00::/16", "reserved"),
)
GLOBAL_UNICAST_V6 = ipaddress.ip_network("2000::/3")
NAT64 = ipaddress.ip_network("64:ff9b::/96")
SIX_TO_FOUR = ipaddress.ip_network("2002::/16")
COMPAT = ipaddress.ip_network("::/96")

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")


class HostError(ValueError):
    """A host that is not a plain DNS name or a canonical address. `rule` says which kind."""

    def __init__(self, rule: str, detail: str) -> None:
        self.rule = rule
        self.detail = detail
        super().__init__(detail)


def parse_host(host: str) -> tuple[str, IPAddress | None]:
    """(normalized host, address when the host is an address literal). Raises `HostError`.

    Normalized: lower case, one trailing dot removed, IPv6 without brackets in its compressed
    form. Accepted addresses are dotted-quad IPv4 (four decimal parts, no leading zeros) and IPv6;
    anything else that ends in a number is refused ("2130706433", "0x7f.1", "0177.0.0.1", "127.1"),
    because resolvers disagree on what such hosts mean.
    """
    if not isinstance(host, str) or not host:
        raise HostError("bad-host:invalid", "the host is empty")
    if not host.isascii():
        # Checked before lower(): "\u212a".lower() == "k".
        raise HostError("bad-host:invalid", f"{host!r} is not ASCII (write the name in its xn-- form)")
    text = host.lower()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
        if ":" not in text:
            raise HostError("bad-host:invalid", f"{host!r} is not an IPv6 address")
    if ":" in text:
        if "%" in text:
            raise HostError("bad-host:invalid", f"{host!r} has an IPv6 zone id")
        try:
            address6 = ipaddress.IPv6Address(text)
        except ValueError:
            raise HostError("bad-host:invalid", f"{host!r} is not a valid IPv6 address") from None
        return str(address6), address6
    if text.endswith("."):
        text = text[:-1]
    labels = text.split(".")
    if _numeric_label(labels[-1]):
        if len(labels) == 4 and all(_canonical_octet(label) for label in labels):
            address4 = ipaddress.IPv4Address(text)
            return str(address4), address4
        meaning = _inet_aton(labels)
        what = f"{meaning} written another way" if meaning else "not a valid address"
        raise HostError("bad-host:numeric", f"{host!r} is {what}; write addresses as four decimal numbers")
    if len(text) > 253:
        raise HostError("bad-host:invalid", f"the name {host[:40]!r}... is longer than 253 characters")
    for label in labels:
        if not label or len(label) > 63 or not _NAME_CHARS.issuperset(label):
            raise HostError("bad-host:invalid", f"{host!r} is not a valid DNS name")
        if label.startswith("-") or label.endswith("-"):
            raise HostError("bad-host:invalid", f"{host!r} is not a valid DNS name")
    return text, None


def _numeric_label(label: str) -> bool:
    if label.isdigit():
        return True
    return label.startswith("0x") and all(c in "0123456789abcdef" for c in label[2:])


def _canonical_octet(label: str) -> bool:
    return label.isdigit() and (label == "0" or not label.startswith("0")) and int(label) <= 255


def _inet_aton(labels: Sequence[str]) -> str | None:
    """What inet_aton(3) makes of these labels (the classic a, a.b, a.b.c forms, octal and hex), or None."""
    if not 1 <= len(labels) <= 4:
        return None
    values = []
    for label in labels:
        try:
            if label.startswith("0x"):
                values.append(int(label[2:] or "0", 16))
            elif label.startswith("0") and len(label) > 1:
                values.append(int(label, 8))
            else:
                values.append(int(label, 10))
        except ValueError:
            return None
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (5 - len(values)):
        return None
    number = last
    for i, v in enumerate(head):
        number |= v << (24 - 8 * i)
    return str(ipaddress.IPv4Address(number))


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _embedded(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address a 6to4, NAT64 or IPv4-compatible IPv6 address carries."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address in SIX_TO_FOUR:
        return address.sixtofour
    if address in NAT64 or (address in COMPAT and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def classify_address(address: IPAddress) -> str | None:
    """Why `address` is refused by default ("loopback", "private", "metadata", ...), None when it is public."""
    address = _unmapped(address)
    if address in METADATA_ADDRESSES:
        return "metadata"
    table = BLOCKED_V4 if isinstance(address, ipaddress.IPv4Address) else BLOCKED_V6
    embedded = _embedded(address)
    if embedded is not None:
        inner = classify_address(embedded)
        if inner is not None:
            return inner
        if address in NAT64:  # outside 2000::/3, but a public IPv4 address through a NAT64 gateway
            return None
    for net, category in table:
        if address in net:
            return category
    if isinstance(address, ipaddress.IPv6Address) and address not in GLOBAL_UNICAST_V6:
        return "reserved"
    return None


class _NameRule:
    __slots__ = ("entry", "name", "ports", "wildcard")

    def __init__(self, entry: str, name: str, wildcard: bool, ports: frozenset[int]) -> None:
        self.entry = entry
        self.name = name  # without the "*." of a wildcard
        self.wildcard = wildcard
        self.ports = ports

    def matches_name(self, host: str) -> bool:
        if self.wildcard:
            return host.endswith("." + self.name)
        return host == self.name


class _AddressRule:
    __slots__ = ("address", "entry", "ports")

    def __init__(self, entry: str, address: IPAddress, ports: frozenset[int]) -> None:
        self.entry = entry
        self.address = address
        self.ports = ports


def split_entry(entry: str) -> tuple[str, int | None]:
    """`host`, `host:port`, `[v6]`, `[v6]:port` or a bare IPv6 address -> (host, port or None)."""
    if entry.startswith("["):
        close = entry.find("]")
        if close < 0:
            raise ValueError(f"unclosed '[' in {entry!r}")
        host, rest = entry[: close + 1], entry[close + 1 :]
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise ValueError(f"unexpected {rest!r} after the address in {entry!r}")
        return host, _port(rest[1:], entry)
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, _port(port, entry)
    return entry, None


def _port(text: str, entry: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"bad port in {entry!r}")
    return int(text)


class Rules:
    """A `Network` compiled for fast, repeated decisions. Build with `Rules.from_network` or `Rules.public`."""

    def __init__(
        self,
        *,
        mode: str,
        names: Iterable[_NameRule] = (),
        addresses: Iterable[_AddressRule] = (),
        allow_cidrs: Iterable[IPNetwork] = (),
        deny_cidrs: Iterable[IPNetwork] = (),
        any_public: bool = False,
    ) -> None:
        self.mode = mode
        self.names = tuple(names)
        self.addresses = tuple(addresses)
        self.allow_cidrs = tuple(allow_cidrs)
        self.deny_cidrs = tuple(deny_cidrs)
        self.any_public = any_public

    @classmethod
    def from_network(cls, network: Network) -> Rules:
        """Raises ValueError on an entry the policy model let through but this module cannot read."""
        names: list[_NameRule] = []
        addresses: list[_AddressRule] = []
        for entry in network.allow:
            host, port = split_entry(entry)
            ports = frozenset({port}) if port is not None else DEFAULT_PORTS
            wildcard = host.startswith("*.")
            try:
                normalized, literal = parse_host(host[2:] if wildcard else host)
            except HostError as exc:
                raise ValueError(f"network.allow entry {entry!r}: {exc.detail}") from None
            if literal is not None:
                if wildcard:
                    raise ValueError(f"network.allow entry {entry!r}: an address cannot have a wildcard")
                addresses.append(_AddressRule(entry, _unmapped(literal), ports))
            else:
                names.append(_NameRule(entry, normalized, wildcard, ports))
        return cls(
            mode=network.mode,
            names=names,
            addresses=addresses,
            allow_cidrs=(ipaddress.ip_network(c, strict=False) for c in network.allow_cidrs),
            deny_cidrs=(ipaddress.ip_network(c, strict=False) for c in network.deny_cidrs),
        )

    @classmethod
    def public(cls, *, deny_cidrs: Iterable[str] = ()) -> Rules:
        """Any name on any port, public addresses only: a plain SSRF guard (`check_url`'s default)."""
        return cls(
            mode="allow", any_public=True, deny_cidrs=(ipaddress.ip_network(c, strict=False) for c in deny_cidrs)
        )


class Decision(Record):
    """The answer for one destination. `rule` names what decided (stable, for logs and the X-Corral-Rule header);
    `detail` says it in words; `addresses` are the checked addresses to connect to (empty until resolved)."""

    __slots__ = ("action", "addresses", "detail", "host", "port", "rule")
    action: Action
    rule: str
    detail: str
    host: str
    port: int
    addresses: tuple[str, ...]

    def __init__(
        self, *, action: Action, rule: str, detail: str = "", host: str = "", port: int = 0,
        addresses: Iterable[str] = (),
    ) -> None:  # fmt: skip
        self._set(action=action, rule=rule, detail=detail, host=host, port=port, addresses=tuple(addresses))

    @property
    def allowed(self) -> bool:
        return self.action == "allow"

    def as_event(self) -> dict[str, object]:
        return {"host": self.host, "port": self.port, "action": self.action, "rule": self.rule,
                "detail": self.detail, "addresses": list(self.addresses)}  # fmt: skip


def _deny(rule: str, detail: str, host: str, port: int) -> Decision:
    return Decision(action="deny", rule=rule, detail=detail, host=host, port=port)


def decide(rules: Rules, host: str, port: int, addresses: Sequence[str] | None = None) -> Decision:
    """The decision for `host:port`. Without `addresses`, only the name is judged: an allowed name comes
    back with no addresses, meaning "resolve it, then ask again with what it resolved to". An address
    literal is judged completely at once (its addresses are itself; `addresses` is ignored)."""
    if rules.mode == "none":
        return _deny("mode:none", "network mode 'none': nothing is reachable", host, port)
    if rules.mode == "host":
        return Decision(action="allow", rule="mode:host", detail="network mode 'host'", host=host, port=port,
                        addresses=addresses or ())  # fmt: skip
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        return _deny("bad-port", f"{port!r} is not a TCP port", host, port)
    try:
        name, literal = parse_host(host)
    except HostError as exc:
        return _deny(exc.rule, exc.detail, str(host), port)
    shown = f"[{name}]" if literal is not None and literal.version == 6 else name

    if literal is not None:
        allowed_by = _literal_rule(rules, _unmapped(literal), port)
        if allowed_by is None:
            return _deny("default-deny", f"{shown}:{port} is not in network.allow", name, port)
        checked: tuple[IPAddress, ...] = (literal,)
    else:
        matched = _name_rule(rules, name, port)
        if matched is None:
            return _deny("default-deny", _why_not_listed(rules, name, port), name, port)
        # A metadata service's name passes only when an entry names it exactly (no wildcard, no "public").
        exact = isinstance(matched, _NameRule) and not matched.wildcard
        if name in METADATA_NAMES and not exact:
            return _deny("blocked-name:metadata", f"{name} is a cloud metadata service", name, port)
        allowed_by = f"network.allow={matched.entry}" if isinstance(matched, _NameRule) else "public"
        if addresses is None:
            return Decision(action="allow", rule=allowed_by, detail=f"{name}:{port} may be resolved", host=name,
                            port=port)  # fmt: skip
        if not addresses:
            return _deny("unresolved", f"{name} did not resolve to any address", name, port)
        parsed: list[IPAddress] = []
        for text in addresses:
            try:
                parsed.append(ipaddress.ip_address(text))
            except ValueError:
                return _deny("unresolved", f"{name} resolved to {text!r}, which is not an address", name, port)
        checked = tuple(parsed)

    for address in checked:
        refusal = _refuse_address(rules, address, port)
        if refusal is not None:
            rule, why = refusal
            where = f"{shown}" if literal is not None else f"{name} resolved to {address}, which"
            return _deny(rule, f"{where} is {why}", name, port)
    return Decision(action="allow", rule=allowed_by, detail=f"{shown}:{port} allowed by {allowed_by}", host=name,
                    port=port, addresses=tuple(str(_unmapped(a)) for a in checked))  # fmt: skip


def _name_rule(rules: Rules, name: str, port: int) -> _NameRule | bool | None:
    """The entry admitting `name:port`, True for "any public destination", None when nothing does."""
    for rule in rules.names:
        if port in rule.ports and rule.matches_name(name):
            return rule
    return True if rules.any_public else None


def _why_not_listed(rules: Rules, name: str, port: int) -> str:
    ports = sorted({p for rule in rules.names if rule.matches_name(name) for p in rule.ports})
    if ports:
        return f"port {port} is not allowed for {name} (allowed: {', '.join(map(str, ports))})"
    return f"{name}:{port} is not in network.allow"


def _literal_rule(rules: Rules, address: IPAddress, port: int) -> str | None:
    for rule in rules.addresses:
        if rule.address == address and port in rule.ports:
            return f"network.allow={rule.entry}"
    for net in rules.allow_cidrs:
        if address.version == net.version and address in net:
            return f"network.allow_cidrs={net}"
    if rules.any_public:
        return "public"
    return None


def _in(address: IPAddress, net: IPNetwork) -> bool:
    return address.version == net.version and address in net


def _refuse_address(rules: Rules, address: IPAddress, port: int) -> tuple[str, str] | None:
    """(rule, reason) when `address` may not be reached on `port`, else None."""
    plain = _unmapped(address)
    embedded = _embedded(plain)
    for net in rules.deny_cidrs:
        if _in(plain, net) or (embedded is not None and _in(embedded, net)):
            return f"network.deny_cidrs={net}", f"in network.deny_cidrs {net}"
    if any(rule.address == plain and port in rule.ports for rule in rules.addresses):
        return None  # named exactly, with its port: the user's explicit choice
    category = classify_address(plain)
    if category is None:
        return None
    if category != "metadata" and any(_in(plain, net) for net in rules.allow_cidrs):
        return None
    article = "an" if category[0] in "aeiou" else "a"
    noun = "cloud metadata address" if category == "metadata" else f"{category} address"
    return f"blocked-address:{category}", f"{article} {noun}"
