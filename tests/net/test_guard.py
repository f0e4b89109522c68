"""The in-process guard: check_url, and the requests and httpx transports checking every connection."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence

import pytest

from corral import Network, PolicyDenied
from corral.net import NetworkDenied, check_url, decide_url
from tests.net.conftest import Origin

httpx = pytest.importorskip("httpx", reason="httpx is not installed (pip install httpx)")
requests = pytest.importorskip("requests", reason="requests is not installed (pip install requests)")


class Names:
    """A resolver over a fixed map that records its calls; an entry may be a list of answers, used in turn."""

    def __init__(self, **names: Sequence[str] | list[Sequence[str]]) -> None:
        self.names = {k.replace("_", "."): v for k, v in names.items()}
        self.calls: list[str] = []

    def __call__(self, host: str, port: int) -> Sequence[str]:
        self.calls.append(host)
        if host not in self.names:
            raise OSError(f"no such name {host}")
        answer = self.names[host]
        if answer and isinstance(answer[0], list | tuple):
            turn = sum(1 for c in self.calls if c == host) - 1
            return answer[min(turn, len(answer) - 1)]  # type: ignore[return-value]
        return answer  # type: ignore[return-value]


@pytest.fixture
def second() -> Iterator[Origin]:
    server = Origin()
    yield server
    server.close()


@pytest.mark.parametrize(
    ("url", "rule"),
    [("http://169.254.169.254/latest/meta-data/", "blocked-address:metadata"),
     ("http://[fd00:ec2::254]/", "blocked-address:metadata"),
     ("http://metadata.google.internal/computeMetadata/v1/", "blocked-name:metadata"),
     ("http://127.0.0.1:8080/", "blocked-address:loopback"),
     ("http://[::ffff:127.0.0.1]/", "blocked-address:loopback"),
     ("http://2130706433/", "bad-host:numeric"),
     ("http://0x7f.1/", "bad-host:numeric"),
     ("http://10.0.0.1/", "blocked-address:private"),
     ("https://192.168.1.1:8443/", "blocked-address:private"),
     ("http://[fe80::1%25eth0]/", "bad-host:invalid"),
     ("file:///etc/passwd", "scheme"),
     ("gopher://127.0.0.1:25/", "scheme"),
     ("http://evil.test\\@good.test/", "bad-url"),
     ("http:///nohost", "bad-url"),
     ("http://good.test:99999/", "bad-url")],
)  # fmt: skip
def test_check_url_refuses_without_sending_anything(url: str, rule: str) -> None:
    resolver = Names()
    with pytest.raises(NetworkDenied) as caught:
        check_url(url, resolver=resolver)
    assert caught.value.rule == rule and isinstance(caught.value, PolicyDenied)
    assert resolver.calls == []  # addresses and refused names are never looked up
    assert decide_url(url, resolver=resolver).rule == rule


def test_check_url_resolves_names_and_checks_every_address() -> None:
    resolver = Names(public_test=["93.184.215.14"], inside_test=["93.184.215.14", "10.0.0.3"])
    d = check_url("https://user:pw@public.test:8443/path?q=1", resolver=resolver)
    assert (d.host, d.port, d.addresses, d.rule) == ("public.test", 8443, ("93.184.215.14",), "public")
    assert decide_url("http://inside.test/", resolver=resolver).rule == "blocked-address:private"
    assert decide_url("http://nowhere.test/", resolver=resolver).rule == "unresolved"
    listed = Network(mode="allow", allow=["public.test"])
    assert check_url("https://public.test/", network=listed, resolver=resolver).allowed
    assert decide_url("https://public.test:8443/", network=listed, resolver=resolver).rule == "default-deny"
    events: list[tuple[str, dict[str, object]]] = []
    decide_url("http://inside.test/", resolver=resolver, events=lambda e, f: events.append((e, f)))
    assert events[0][0] == "net.decision" and events[0][1]["rule"] == "blocked-address:private"


def network_for(origin: Origin) -> Network:
    return Network(mode="allow", allow=[f"allowed.test:{origin.port}", f"127.0.0.1:{origin.port}"])


def test_requests_session_checks_each_connection_and_redirect(origin: Origin, second: Origin) -> None:
    resolver = Names(allowed_test=["127.0.0.1"], internal_test=["127.0.0.1"])
    events: list[dict[str, object]] = []
    session = requests_session_for(origin, resolver, events)
    assert session.get(f"http://allowed.test:{origin.port}/one").text.startswith("GET /one host=allowed.test")
    assert session.get(f"http://allowed.test:{origin.port}/two").ok  # the pooled connection, checked once
    with pytest.raises(NetworkDenied) as caught:
        session.get(f"http://allowed.test:{origin.port}/redirect?to=http://internal.test:{second.port}/secret")
    assert caught.value.rule == "default-deny" and second.hits == []
    with pytest.raises(NetworkDenied):
        session.get(f"http://127.0.0.1:{second.port}/")
    with pytest.raises(NetworkDenied):
        session.get(f"http://allowed.test:{origin.port}/", proxies={"http": "http://127.0.0.1:1"})
    assert [(e["via"], e["action"], e["host"]) for e in events] == [
        ("requests", "allow", "allowed.test"),
        ("requests", "deny", "internal.test"),
        ("requests", "deny", "127.0.0.1"),
    ]


def requests_session_for(origin: Origin, resolver: Names, events: list[dict[str, object]]) -> requests.Session:
    from corral.net import requests_session

    return requests_session(network=network_for(origin), resolver=resolver, events=lambda e, f: events.append(f))


def test_requests_connects_to_the_address_it_checked(origin: Origin) -> None:
    """Rebinding between the check and the connection: the adapter resolves once, at connect time."""
    attacker = Origin("127.0.0.2")
    try:
        resolver = Names(rebind_test=[["127.0.0.1"], ["127.0.0.2"]])
        net = Network(mode="allow", allow=[f"rebind.test:{origin.port}", f"127.0.0.1:{origin.port}"])
        from corral.net import requests_session

        session = requests_session(network=net, resolver=resolver)
        assert session.get(f"http://rebind.test:{origin.port}/", headers={"Connection": "close"}).ok
        # The second request must open a new connection (a kept one was checked already). Without
        # this, under load the pool could hand back the first connection before the server's close
        # arrives, and the request would fail on it instead of reaching the check.
        session.close()
        with pytest.raises(NetworkDenied) as caught:
            session.get(f"http://rebind.test:{origin.port}/")
        assert caught.value.rule == "blocked-address:loopback" and attacker.hits == []
        assert resolver.calls == ["rebind.test", "rebind.test"]
    finally:
        attacker.close()


def test_httpx_transport_checks_each_connection_and_redirect(origin: Origin, second: Origin) -> None:
    from corral.net import GuardTransport

    resolver = Names(allowed_test=["127.0.0.1"])
    events: list[dict[str, object]] = []
    transport = GuardTransport(network=network_for(origin), resolver=resolver, events=lambda e, f: events.append(f))
    with httpx.Client(transport=transport, follow_redirects=True) as client:
        assert client.get(f"http://allowed.test:{origin.port}/one").text.startswith("GET /one")
        with pytest.raises(NetworkDenied) as caught:
            client.get(f"http://allowed.test:{origin.port}/redirect?to=http://127.0.0.1:{second.port}/x")
        assert caught.value.rule == "default-deny"
        with pytest.raises(NetworkDenied):
            client.get("http://169.254.169.254/")
        with pytest.raises(NetworkDenied):
            client.get("file:///etc/passwd")
    assert second.hits == [] and [p.split("?")[0] for p in origin.paths()] == ["/one", "/redirect"]
    assert [(e["action"], e["rule"]) for e in events] == [
        ("allow", f"network.allow=allowed.test:{origin.port}"), ("deny", "default-deny"), ("deny", "default-deny"),
        ("deny", "scheme")]  # fmt: skip
    with pytest.raises(TypeError, match="direct httpcore connection pool"):
        GuardTransport(proxy="http://127.0.0.1:1")


def test_async_httpx_transport(origin: Origin) -> None:
    from corral.net import AsyncGuardTransport

    resolver = Names(allowed_test=["127.0.0.1"], rebind_test=["127.0.0.1"])

    async def main() -> None:
        transport = AsyncGuardTransport(network=network_for(origin), resolver=resolver)
        async with httpx.AsyncClient(transport=transport) as client:
            assert (await client.get(f"http://allowed.test:{origin.port}/async")).status_code == 200
            with pytest.raises(NetworkDenied) as caught:
                await client.get(f"http://rebind.test:{origin.port}/")
            assert caught.value.rule == "default-deny"

    asyncio.run(main())
    assert origin.paths() == ["/async"]


def test_without_a_network_the_guard_is_an_ssrf_guard(origin: Origin) -> None:
    from corral.net import GuardTransport, requests_session

    resolver = Names(local_test=["127.0.0.1"])
    with pytest.raises(NetworkDenied) as caught:
        requests_session(resolver=resolver).get(f"http://local.test:{origin.port}/")
    assert caught.value.rule == "blocked-address:loopback"
    with httpx.Client(transport=GuardTransport(resolver=resolver)) as client, pytest.raises(NetworkDenied):
        client.get(f"http://local.test:{origin.port}/")
    assert origin.hits == []
