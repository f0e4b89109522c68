"""The proxy on loopback: what it lets through, every bypass it refuses, and the audit line for each.

The test servers listen on 127.0.0.x; the proxy's resolver maps the test names (`*.test`) to them.
Loopback is refused by default, so each allowed test destination is also named explicitly
(`127.0.0.1:PORT`), the way a user names a local service.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time

import pytest

from corral import Network
from tests.net.conftest import (
    Origin,
    ProxyFactory,
    Recorder,
    exchange,
    http_get,
    socks_connect,
    status_and_rule,
)


def allow(*entries: str, **kwargs: object) -> Network:
    return Network(mode="allow", allow=entries, **kwargs)  # type: ignore[arg-type]


def connect_tunnel(port: int, target: str, host_header: str | None = None) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {host_header or target}\r\n\r\n".encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):  # byte by byte: what follows the head belongs to the tunnel
        chunk = sock.recv(1)
        if not chunk:
            break
        head += chunk
    return sock, head


def recv_all(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    out = b""
    try:
        while len(out) < limit and (chunk := sock.recv(65536)):
            out += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return out


def client_hello(server_name: str | None) -> bytes:
    """A real TLS ClientHello from Python's ssl module, naming `server_name` (SNI)."""
    ctx = ssl.create_default_context()
    if server_name is None:
        ctx.check_hostname = False
    obj = ctx.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def split_records(hello: bytes, at: int) -> bytes:
    """The same ClientHello as two TLS records (a legal fragmentation that hides the SNI from naive parsers)."""
    version, body = hello[1:3], hello[5:]
    records = [b"\x16" + version + len(part).to_bytes(2, "big") + part for part in (body[:at], body[at:])]
    return b"".join(records)


# ---------------------------------------------------------------------- allowed and denied
def test_allowed_name_over_plain_http_connect_and_socks(make_proxy: ProxyFactory, origin: Origin) -> None:
    p = origin.port
    proxy = make_proxy(allow(f"allowed.test:{p}", f"127.0.0.1:{p}"), {"allowed.test": ["127.0.0.1"]})

    response = http_get(proxy.port, f"http://allowed.test:{p}/plain?token=s3cret")
    assert status_and_rule(response)[0] == 200 and b"GET /plain?token=s3cret host=allowed.test" in response

    sock, head = connect_tunnel(proxy.port, f"allowed.test:{p}")
    with sock:
        assert head.startswith(b"HTTP/1.1 200")
        sock.sendall(f"GET /tunnel HTTP/1.1\r\nHost: allowed.test:{p}\r\nConnection: close\r\n\r\n".encode())
        assert b"GET /tunnel" in recv_all(sock)

    sock, reply = socks_connect(proxy.port, 3, b"allowed.test", p)
    with sock:
        assert reply[:2] == b"\x05\x00"
        sock.sendall(f"GET /socks HTTP/1.1\r\nHost: allowed.test:{p}\r\nConnection: close\r\n\r\n".encode())
        assert b"GET /socks" in recv_all(sock)

    assert origin.paths() == ["/plain?token=s3cret", "/tunnel", "/socks"]
    events = proxy.events("net.decision")
    assert [(e["via"], e["action"], e["rule"]) for e in events] == [
        ("http", "allow", f"network.allow=allowed.test:{p}"),
        ("connect", "allow", f"network.allow=allowed.test:{p}"),
        ("socks5", "allow", f"network.allow=allowed.test:{p}"),
    ]
    assert events[0]["addresses"] == ["127.0.0.1"] and events[0]["sandbox"] == "test"
    assert events[0]["url"] == f"http://allowed.test:{p}/plain"  # the query string is not logged


def test_denied_name_gets_403_with_the_rule_and_is_never_resolved(make_proxy: ProxyFactory, origin: Origin) -> None:
    p = origin.port
    proxy = make_proxy(allow(f"allowed.test:{p}", f"127.0.0.1:{p}"),
                       {"allowed.test": ["127.0.0.1"], "denied.test": ["127.0.0.1"]})  # fmt: skip
    response = http_get(proxy.port, f"http://denied.test:{p}/")
    assert status_and_rule(response) == (403, "default-deny")
    assert b"denied.test" in response.split(b"\r\n\r\n", 1)[1]
    sock, head = connect_tunnel(proxy.port, f"denied.test:{p}")
    sock.close()
    assert status_and_rule(head) == (403, "default-deny")
    sock, reply = socks_connect(proxy.port, 3, b"denied.test", p)
    sock.close()
    assert reply[:2] == b"\x05\x02"  # connection not allowed by ruleset
    # A port the name is not listed with:
    assert status_and_rule(http_get(proxy.port, f"http://allowed.test:{p + 1}/"))[1] == "default-deny"

    assert origin.hits == []
    assert proxy.resolved == []  # refused names cause no DNS traffic at all
    assert [(e["via"], e["action"], e["rule"], e["host"]) for e in proxy.events("net.decision")] == [
        ("http", "deny", "default-deny", "denied.test"),
        ("connect", "deny", "default-deny", "denied.test"),
        ("socks5", "deny", "default-deny", "denied.test"),
        ("http", "deny", "default-deny", "allowed.test"),
    ]


def test_loopback_is_refused_unless_named(make_proxy: ProxyFactory, origin: Origin) -> None:
    p = origin.port
    proxy = make_proxy(allow(f"named.test:{p}", "127.0.0.1:1"), {"named.test": ["127.0.0.1"]})
    assert status_and_rule(http_get(proxy.port, f"http://named.test:{p}/"))[1] == "blocked-address:loopback"
    assert status_and_rule(http_get(proxy.port, f"http://127.0.0.1:{p}/"))[1] == "default-deny"
    assert status_and_rule(http_get(proxy.port, f"http://localhost:{p}/"))[1] == "default-deny"
    assert origin.hits == []


# ---------------------------------------------------------------------- DNS rebinding
def test_dns_rebinding_is_resolved_once_and_checked(make_proxy: ProxyFactory, origin: Origin) -> None:
    """The answer changes between requests (and could between check and use): the proxy connects only
    to the address it checked, and refuses the new answer."""
    p = origin.port
    attacker = Origin("127.0.0.2")
    try:
        answers = iter([["127.0.0.1"], ["127.0.0.2"], ["127.0.0.2"]])
        proxy = make_proxy(allow(f"rebind.test:{p}", f"rebind.test:{attacker.port}", f"127.0.0.1:{p}"),
                           {"rebind.test": lambda: next(answers)})  # type: ignore[dict-item]  # fmt: skip
        assert status_and_rule(http_get(proxy.port, f"http://rebind.test:{p}/first"))[0] == 200
        assert status_and_rule(http_get(proxy.port, f"http://rebind.test:{p}/second")) == (
            403, "blocked-address:loopback")  # fmt: skip
        sock, head = connect_tunnel(proxy.port, f"rebind.test:{attacker.port}")
        sock.close()
        assert status_and_rule(head) == (403, "blocked-address:loopback")
        assert proxy.resolved == ["rebind.test"] * 3  # once per request, never again to connect
        assert origin.paths() == ["/first"] and attacker.hits == []
        assert [e["rule"] for e in proxy.events("net.decision")][1:] == ["blocked-address:loopback"] * 2
    finally:
        attacker.close()


def test_cached_answers_are_judged_again(make_proxy: ProxyFactory, origin: Origin) -> None:
    p = origin.port
    proxy = make_proxy(allow(f"cached.test:{p}", f"cached.test:{p + 1}", f"127.0.0.1:{p}"),
                       {"cached.test": ["127.0.0.1"]}, dns_cache_seconds=60)  # fmt: skip
    assert status_and_rule(http_get(proxy.port, f"http://cached.test:{p}/a"))[0] == 200
    assert status_and_rule(http_get(proxy.port, f"http://cached.test:{p}/b"))[0] == 200
    # The same cached answer, for a port the address is not named with:
    assert status_and_rule(http_get(proxy.port, f"http://cached.test:{p + 1}/"))[1] == "blocked-address:loopback"
    assert proxy.resolved == ["cached.test"]


def test_an_answer_with_one_forbidden_address_is_refused_whole(make_proxy: ProxyFactory, origin: Origin) -> None:
    p = origin.port
    proxy = make_proxy(allow(f"mixed.test:{p}", f"127.0.0.1:{p}"), {"mixed.test": ["127.0.0.1", "127.0.0.2"]})
    assert status_and_rule(http_get(proxy.port, f"http://mixed.test:{p}/")) == (403, "blocked-address:loopback")
    assert origin.hits == []


# ---------------------------------------------------------------------- numeric tricks
@pytest.mark.parametrize("host", ["2130706433", "0x7f000001", "0x7f.0.0.1", "0177.0.0.1", "127.1", "127.0.1",
                                  "017700000001"])  # fmt: skip
def test_numeric_hosts_are_refused_everywhere(make_proxy: ProxyFactory, origin: Origin, host: str) -> None:
    p = origin.port
    proxy = make_proxy(allow(f"127.0.0.1:{p}"))  # even where the address they spell is allowed
    assert status_and_rule(http_get(proxy.port, f"http://{host}:{p}/"))[1] == "bad-host:numeric"
    sock, head = connect_tunnel(proxy.port, f"{host}:{p}")
    sock.close()
    assert status_and_rule(head)[1] == "bad-host:numeric"
    sock, reply = socks_connect(proxy.port, 3, host.encode(), p)
    sock.close()
    assert reply[:2] == b"\x05\x02"
    assert origin.hits == [] and proxy.resolved == []
    assert {e["rule"] for e in proxy.events("net.decision")} == {"bad-host:numeric"}


@pytest.mark.parametrize(
    "host", ["[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[::127.0.0.1]", "[::1]", "[0:0:0:0:0:ffff:7f00:1]"]
)
def test_ipv6_spellings_of_loopback_are_refused(make_proxy: ProxyFactory, origin: Origin, host: str) -> None:
    proxy = make_proxy(allow("127.0.0.1:1"))
    rules = set()
    for target in (f"{host}:{origin.port}",):
        rules.add(status_and_rule(http_get(proxy.port, f"http://{target}/"))[1])
        sock, head = connect_tunnel(proxy.port, target)
        sock.close()
        rules.add(status_and_rule(head)[1])
    address = host.strip("[]").encode()
    sock, reply = socks_connect(proxy.port, 4, socket.inet_pton(socket.AF_INET6, address.decode()), origin.port)
    sock.close()
    assert reply[:2] == b"\x05\x02"
    assert rules == {"default-deny"}  # an address literal must be listed itself
    assert origin.hits == []
    # and listed by name, resolving to them, they are refused as loopback:
    named = make_proxy(allow(f"v6.test:{origin.port}"), {"v6.test": [host.strip("[]")]})
    assert status_and_rule(http_get(named.port, f"http://v6.test:{origin.port}/"))[1] == "blocked-address:loopback"


# ---------------------------------------------------------------------- wildcard confusion
@pytest.mark.parametrize(
    ("host", "allowed"),
    [("a.ok.test", True), ("deep.a.ok.test", True), ("ok.test", False), ("ok.test.evil.test", False),
     ("evilok.test", False), ("a.ok.test.", True), ("A.OK.TEST", True), ("a.ok.tes", False)],
)  # fmt: skip
def test_wildcards_through_the_proxy(make_proxy: ProxyFactory, origin: Origin, host: str, allowed: bool) -> None:
    p = origin.port
    names = {n: ["127.0.0.1"] for n in ("a.ok.test", "deep.a.ok.test", "ok.test", "ok.test.evil.test", "evilok.test")}
    proxy = make_proxy(allow(f"*.ok.test:{p}", f"127.0.0.1:{p}"), names)
    status, rule = status_and_rule(http_get(proxy.port, f"http://{host}:{p}/"))
    assert (status == 200) is allowed, rule
    if not allowed:
        assert rule == "default-deny" and proxy.resolved == []


def test_authority_tricks_are_refused(make_proxy: ProxyFactory, origin: Origin) -> None:
    p = origin.port
    proxy = make_proxy(allow(f"allowed.test:{p}", f"127.0.0.1:{p}"), {"allowed.test": ["127.0.0.1"]})
    for url in (f"http://allowed.test:{p}@evil.test:{p}/", f"http://evil.test:{p}#@allowed.test:{p}/"):
        response = exchange(proxy.port, f"GET {url} HTTP/1.1\r\nHost: allowed.test:{p}\r\n\r\n".encode())
        assert status_and_rule(response)[0] in (400, 403), response
    response = exchange(proxy.port, f"GET https://allowed.test:{p}/ HTTP/1.1\r\nHost: allowed.test\r\n\r\n".encode())
    assert status_and_rule(response) == (400, "bad-request:scheme")
    response = exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
    assert status_and_rule(response) == (400, "bad-request:target")
    assert origin.hits == []


# ---------------------------------------------------------------------- one name, another name
def test_host_header_must_name_the_target(make_proxy: ProxyFactory, origin: Origin) -> None:
    p = origin.port
    proxy = make_proxy(allow(f"allowed.test:{p}", f"127.0.0.1:{p}"), {"allowed.test": ["127.0.0.1"]})
    response = http_get(proxy.port, f"http://allowed.test:{p}/", host=f"evil.test:{p}")
    assert status_and_rule(response) == (403, "host-mismatch")
    sock, head = connect_tunnel(proxy.port, f"allowed.test:{p}", host_header=f"evil.test:{p}")
    sock.close()
    assert status_and_rule(head) == (403, "host-mismatch")
    two_hosts = f"GET http://allowed.test:{p}/ HTTP/1.1\r\nHost: allowed.test:{p}\r\nHost: evil.test\r\n\r\n"
    assert status_and_rule(exchange(proxy.port, two_hosts.encode()))[0] == 400
    assert origin.hits == []
    assert [e["rule"] for e in proxy.events("net.decision")] == ["host-mismatch", "host-mismatch", "bad-request:host"]


@pytest.mark.parametrize("split", [None, 1, 40])
def test_connect_then_tls_for_another_name_is_cut(make_proxy: ProxyFactory, recorder: Recorder,
                                                  split: int | None) -> None:  # fmt: skip
    """Domain fronting: the tunnel is opened to an allowed name, the ClientHello names another."""
    p = recorder.port
    proxy = make_proxy(allow(f"allowed.test:{p}", f"127.0.0.1:{p}"), {"allowed.test": ["127.0.0.1"]})
    hello = client_hello("evil.test")
    if split is not None:
        hello = split_records(hello, split)
    sock, head = connect_tunnel(proxy.port, f"allowed.test:{p}")
    with sock:
        assert head.startswith(b"HTTP/1.1 200")
        sock.sendall(hello[:3])  # the proxy must wait for the whole ClientHello
        time.sleep(0.05)
        sock.sendall(hello[3:])
        assert recv_all(sock) == b""
    time.sleep(0.2)
    assert all(data == b"" for data in recorder.received), "ClientHello bytes reached the server"
    decisions = [(e["action"], e["rule"]) for e in proxy.events("net.decision")]
    assert decisions == [("allow", f"network.allow=allowed.test:{p}"), ("deny", "sni-mismatch")]


def test_connect_then_tls_for_the_same_name_goes_through(make_proxy: ProxyFactory, recorder: Recorder) -> None:
    p = recorder.port
    proxy = make_proxy(allow(f"allowed.test:{p}", f"127.0.0.1:{p}"), {"allowed.test": ["127.0.0.1"]})
    for name in ("allowed.test", "ALLOWED.test.", None):
        hello = client_hello(name)
        sock, head = connect_tunnel(proxy.port, f"allowed.test:{p}")
        with sock:
            assert head.startswith(b"HTTP/1.1 200")
            sock.sendall(hello)
            echoed = b""
            while len(echoed) < len(hello):
                chunk = sock.recv(65536)
                assert chunk, "the tunnel closed"
                echoed += chunk
            assert echoed == hello
    # A protocol other than TLS goes through as it is.
    sock, _ = connect_tunnel(proxy.port, f"allowed.test:{p}")
    with sock:
        sock.sendall(b"not tls\n")
        assert sock.recv(100) == b"not tls\n"
    assert [e["action"] for e in proxy.events("net.decision")] == ["allow"] * 4


def test_a_server_that_speaks_first_is_not_held_back(make_proxy: ProxyFactory) -> None:
    """SSH and SMTP servers greet before the client says anything: the banner must reach the client."""
    listener = socket.create_server(("127.0.0.1", 0))
    p = listener.getsockname()[1]

    def greet() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"SSH-2.0-test\r\n")
            conn.sendall(conn.recv(100))

    threading.Thread(target=greet, daemon=True).start()
    try:
        proxy = make_proxy(allow(f"ssh.test:{p}", f"127.0.0.1:{p}"), {"ssh.test": ["127.0.0.1"]})
        sock, head = connect_tunnel(proxy.port, f"ssh.test:{p}")
        with sock:
            assert head.startswith(b"HTTP/1.1 200")
            assert sock.recv(100) == b"SSH-2.0-test\r\n"
            sock.sendall(b"SSH-2.0-client\r\n")
            assert sock.recv(100) == b"SSH-2.0-client\r\n"
    finally:
        listener.close()


def test_garbage_pretending_to_be_tls_is_cut(make_proxy: ProxyFactory, recorder: Recorder) -> None:
    p = recorder.port
    proxy = make_proxy(allow(f"allowed.test:{p}", f"127.0.0.1:{p}"), {"allowed.test": ["127.0.0.1"]})
    sock, _ = connect_tunnel(proxy.port, f"allowed.test:{p}")
    with sock:
        sock.sendall(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00")  # a handshake record, not a ClientHello
        assert recv_all(sock) == b""
    assert proxy.events("net.decision")[-1]["rule"] == "tls-unreadable"


# ---------------------------------------------------------------------- redirects
def test_redirects_are_passed_back_never_followed(make_proxy: ProxyFactory, origin: Origin) -> None:
    p = origin.port
    proxy = make_proxy(allow(f"allowed.test:{p}", f"127.0.0.1:{p}"),
                       {"allowed.test": ["127.0.0.1"], "internal.test": ["127.0.0.1"]})  # fmt: skip
    response = http_get(proxy.port, f"http://allowed.test:{p}/redirect?to=http://internal.test:{p}/admin")
    assert status_and_rule(response)[0] == 302
    assert f"Location: http://internal.test:{p}/admin".encode() in response
    assert origin.paths() == [f"/redirect?to=http://internal.test:{p}/admin"]
    # The client follows it itself, as a new request, which is judged on its own:
    assert status_and_rule(http_get(proxy.port, f"http://internal.test:{p}/admin")) == (403, "default-deny")
    assert len(origin.hits) == 1
    assert [(e["action"], e["host"]) for e in proxy.events("net.decision")] == [
        ("allow", "allowed.test"), ("deny", "internal.test")]  # fmt: skip


# ---------------------------------------------------------------------- HTTP details
def test_keep_alive_bodies_and_methods(make_proxy: ProxyFactory, origin: Origin) -> None:
    p = origin.port
    proxy = make_proxy(allow(f"allowed.test:{p}", f"127.0.0.1:{p}"), {"allowed.test": ["127.0.0.1"]})
    u = f"http://allowed.test:{p}"
    requests = (
        f"POST {u}/post HTTP/1.1\r\nHost: allowed.test:{p}\r\nContent-Length: 5\r\n\r\nhello"
        f"PUT {u}/chunk HTTP/1.1\r\nHost: allowed.test:{p}\r\nTransfer-Encoding: chunked\r\n\r\n"
        "3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        f"HEAD {u}/head HTTP/1.1\r\nHost: allowed.test:{p}\r\n\r\n"
        f"GET {u}/chunked HTTP/1.1\r\nHost: allowed.test:{p}\r\n\r\n"
        f"GET {u}/last HTTP/1.1\r\nHost: allowed.test:{p}\r\nConnection: close\r\n\r\n"
    )
    response = exchange(proxy.port, requests.encode())
    assert response.count(b"HTTP/1.1 200") == 5, response
    assert b"POST /post host=allowed.test:%d body=hello" % p in response
    assert b"PUT /chunk host=allowed.test:%d body=abcde" % p in response
    assert b"one \r\n" in response and b"GET /last" in response
    assert origin.paths() == ["/post", "/chunk", "/head", "/chunked", "/last"]


class Scripted:
    """A one-connection server that answers a request head with fixed bytes, then echoes what follows."""

    def __init__(self, answer: bytes) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.request = b""
        threading.Thread(target=self._serve, args=(answer,), daemon=True).start()

    def _serve(self, answer: bytes) -> None:
        conn, _ = self.listener.accept()
        with conn:
            while b"\r\n\r\n" not in self.request:
                self.request += conn.recv(4096)
            conn.sendall(answer)
            try:
                while data := conn.recv(4096):
                    self.request += data
                    conn.sendall(data)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()


def test_upgrade_expect_and_ambiguous_responses(make_proxy: ProxyFactory) -> None:
    upgrade = Scripted(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    both = Scripted(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
    expect = Scripted(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    try:
        ports = (upgrade.port, both.port, expect.port)
        proxy = make_proxy(allow(*(f"s.test:{q}" for q in ports), *(f"127.0.0.1:{q}" for q in ports)),
                           {"s.test": ["127.0.0.1"]})  # fmt: skip
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.sendall(f"GET http://s.test:{upgrade.port}/ws HTTP/1.1\r\nHost: s.test:{upgrade.port}\r\n"
                         "Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n".encode())  # fmt: skip
            head = sock.recv(4096)
            assert head.startswith(b"HTTP/1.1 101") and b"Upgrade: websocket" in head
            sock.sendall(b"frame")
            assert sock.recv(100) == b"frame"
        assert b"Upgrade: websocket" in upgrade.request and b"frame" in upgrade.request

        response = http_get(proxy.port, f"http://s.test:{both.port}/")
        assert b"Content-Length" not in response and b"Transfer-Encoding: chunked" in response

        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.sendall(f"POST http://s.test:{expect.port}/ HTTP/1.1\r\nHost: s.test:{expect.port}\r\n"
                         "Content-Length: 4\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n".encode())  # fmt: skip
            assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
            sock.sendall(b"body")
            assert recv_all(sock).endswith(b"\r\n\r\nok")
        assert expect.request.endswith(b"\r\n\r\nbody") and b"Expect" not in expect.request
    finally:
        for server in (upgrade, both, expect):
            server.close()


@pytest.mark.parametrize(
    ("head", "rule"),
    [("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", "bad-request:framing"),
     ("Transfer-Encoding: gzip\r\n", "bad-request:framing"),
     ("Content-Length: 5\r\nContent-Length: 6\r\n", "bad-request:framing"),
     ("Bad Header: x\r\n", "bad-request:syntax"),
     (" folded\r\n", "bad-request:syntax")],
)  # fmt: skip
def test_ambiguous_requests_are_refused(make_proxy: ProxyFactory, origin: Origin, head: str, rule: str) -> None:
    p = origin.port
    proxy = make_proxy(allow(f"allowed.test:{p}", f"127.0.0.1:{p}"), {"allowed.test": ["127.0.0.1"]})
    request = f"POST http://allowed.test:{p}/ HTTP/1.1\r\nHost: allowed.test:{p}\r\n{head}\r\nhello"
    status, got = status_and_rule(exchange(proxy.port, request.encode()))
    assert status in (400, 501) and got == rule
    assert origin.hits == []


def test_an_oversized_head_is_refused(make_proxy: ProxyFactory, origin: Origin) -> None:
    proxy = make_proxy(allow("127.0.0.1:1"), max_header_bytes=4096)
    request = f"GET http://a.test/ HTTP/1.1\r\nX: {'y' * 8000}\r\n\r\n".encode()
    assert status_and_rule(exchange(proxy.port, request))[0] == 431


# ---------------------------------------------------------------------- slowloris, concurrency
def test_a_slowloris_client_is_cut_off_and_others_are_served(make_proxy: ProxyFactory, origin: Origin) -> None:
    p = origin.port
    proxy = make_proxy(allow(f"allowed.test:{p}", f"127.0.0.1:{p}"), {"allowed.test": ["127.0.0.1"]},
                       header_timeout=1.0)  # fmt: skip
    slow = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(50)]
    request = f"GET http://allowed.test:{p}/ HTTP/1.1\r\nHost: allowed.test:{p}\r\n".encode()
    started = time.monotonic()
    closed_after: list[float] = []

    def dribble(sock: socket.socket) -> None:
        try:
            for byte in request:
                sock.sendall(bytes([byte]))
                time.sleep(0.1)
        except OSError:
            pass
        closed_after.append(time.monotonic() - started)

    threads = [threading.Thread(target=dribble, args=(s,)) for s in slow]
    for t in threads:
        t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    assert status_and_rule(http_get(proxy.port, f"http://allowed.test:{p}/fast"))[0] == 200
    assert time.monotonic() - t0 < 0.5
    # Each slow client gets a 408 and is closed once the head has taken longer than header_timeout.
    answers = []
    for sock in slow:
        sock.settimeout(5)
        answers.append(recv_all(sock))
        sock.close()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    assert elapsed < 4, elapsed
    assert all(status_and_rule(a) == (408, "timeout:head") for a in answers)
    errors = proxy.events("net.error")
    assert len(errors) == 50 and all(e["rule"] == "timeout:head" for e in errors)
    assert origin.paths() == ["/fast"]


def test_a_thousand_concurrent_connections_none_dropped(make_proxy: ProxyFactory) -> None:
    async def main() -> list[bytes]:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0, backlog=4096)
        port = server.sockets[0].getsockname()[1]
        proxy = make_proxy(allow(f"echo.test:{port}", f"127.0.0.1:{port}"), {"echo.test": ["127.0.0.1"]})
        opened: list[asyncio.StreamWriter] = []

        async def one(i: int) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            opened.append(writer)
            if i % 2:
                writer.write(f"CONNECT echo.test:{port} HTTP/1.1\r\nHost: echo.test:{port}\r\n\r\n".encode())
                assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            else:
                writer.write(b"\x05\x01\x00")
                assert await reader.readexactly(2) == b"\x05\x00"
                writer.write(b"\x05\x01\x00\x03\x09echo.test" + port.to_bytes(2, "big"))
                assert (await reader.readexactly(10))[:2] == b"\x05\x00"
            writer.write(f"ping {i}\n".encode())
            return await reader.readline()

        try:
            async with asyncio.timeout(60):
                answers = await asyncio.gather(*(one(i) for i in range(1000)))
            assert len(opened) == 1000  # all open at once
        finally:
            for writer in opened:
                writer.close()
            server.close()
        return answers

    answers = asyncio.run(main())
    assert sorted(answers) == sorted(f"ping {i}\n".encode() for i in range(1000))


def test_max_connections_bounds_a_client(make_proxy: ProxyFactory) -> None:
    proxy = make_proxy(allow("127.0.0.1:1"), max_connections=10)
    held = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(10)]
    try:
        time.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        assert recv_all(extra) == b""
        extra.close()
        assert any("connections" in str(e["error"]) for e in proxy.events("net.error"))
    finally:
        for s in held:
            s.close()


# ---------------------------------------------------------------------- upstream proxy
class FakeUpstream:
    """A minimal upstream forward proxy that records each request head (threads, blocking sockets)."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            head, _, rest = head.partition(b"\r\n\r\n")
            self.heads.append(head)
            method, target, _ = head.split(b"\r\n")[0].split(b" ")
            if method == b"CONNECT":
                host, _, port = target.rpartition(b":")
                if host != b"127.0.0.1":  # never resolve or reach anything else from a test
                    conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                    return
                upstream = socket.create_connection((host.decode(), int(port)))
                conn.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
            else:
                authority = target.split(b"/")[2]
                host, _, port = authority.rpartition(b":")
                assert host == b"127.0.0.1"
                upstream = socket.create_connection((host.decode(), int(port)))
                path = b"/" + target.split(b"/", 3)[3]
                lines = [line for line in head.split(b"\r\n")[1:] if not line.lower().startswith(b"proxy-")]
                upstream.sendall(
                    b"%s %s HTTP/1.1\r\n%s\r\nConnection: close\r\n\r\n" % (method, path, b"\r\n".join(lines))
                )
                upstream.sendall(rest)

            def pump(a: socket.socket, b: socket.socket) -> None:
                try:
                    while data := a.recv(65536):
                        b.sendall(data)
                except OSError:
                    pass
                try:
                    b.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

            t = threading.Thread(target=pump, args=(conn, upstream), daemon=True)
            t.start()
            pump(upstream, conn)
            t.join(5)
            upstream.close()

    def close(self) -> None:
        self.listener.close()


def test_upstream_proxy_gets_the_checked_address(make_proxy: ProxyFactory, origin: Origin) -> None:
    p = origin.port
    upstream = FakeUpstream()
    try:
        proxy = make_proxy(allow(f"allowed.test:{p}", f"127.0.0.1:{p}", "unresolvable.test:443"),
                           {"allowed.test": ["127.0.0.1"]},
                           upstream=f"http://corp%40user:pa%3Ass@127.0.0.1:{upstream.port}")  # fmt: skip
        response = http_get(proxy.port, f"http://allowed.test:{p}/via-upstream")
        assert status_and_rule(response)[0] == 200 and b"host=allowed.test" in response
        sock, head = connect_tunnel(proxy.port, f"allowed.test:{p}")
        with sock:
            assert head.startswith(b"HTTP/1.1 200")
            sock.sendall(f"GET /tunnel HTTP/1.1\r\nHost: allowed.test:{p}\r\nConnection: close\r\n\r\n".encode())
            assert b"GET /tunnel" in recv_all(sock)
        assert status_and_rule(http_get(proxy.port, f"http://denied.test:{p}/"))[1] == "default-deny"
        first, second = upstream.heads[:2]
        assert first.startswith(f"GET http://127.0.0.1:{p}/via-upstream HTTP/1.1".encode())
        assert f"Host: allowed.test:{p}".encode() in first
        assert b"Proxy-Authorization: Basic Y29ycEB1c2VyOnBhOnNz" in first  # corp@user:pa:ss
        assert second.startswith(f"CONNECT 127.0.0.1:{p} HTTP/1.1".encode())
        assert len(upstream.heads) == 2 and origin.paths() == ["/via-upstream", "/tunnel"]
        # A name this host cannot resolve is left to the upstream (by name), its allowlist still applied:
        sock, head = connect_tunnel(proxy.port, "unresolvable.test:443")
        sock.close()
        time.sleep(0.2)
        assert upstream.heads[2].startswith(b"CONNECT unresolvable.test:443 HTTP/1.1")
        assert "resolved by the upstream proxy" in str(proxy.events("net.decision")[-1]["detail"])
    finally:
        upstream.close()
