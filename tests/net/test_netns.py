"""Private and metadata addresses with real servers behind them, inside a network namespace this test makes.

The namespace has only its loopback, with 10.1.2.3, 192.168.7.7 and 169.254.169.254 added to it, and
an HTTP server on each: the refusals are shown against servers that really answer (the control
request reaches each one directly), and no packet leaves the namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import corral

SCRIPT = r"""
import http.server, json, socket, subprocess, threading
from corral import Network
from corral.net import decide_url
from corral.net.service import SandboxProxy

subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
ADDRESSES = {"internal.test": "10.1.2.3", "home.test": "192.168.7.7", "meta.test": "169.254.169.254"}
hits = {}
for address in ADDRESSES.values():
    subprocess.run(["ip", "addr", "add", address + "/32", "dev", "lo"], check=True)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.setdefault(self.server.server_address[0], []).append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer((address, 80), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

def fetch(port, host, path):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(("GET http://%s%s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (host, path, host)).encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head = data.split(b"\r\n\r\n")[0].decode()
    rule = [l.split(": ", 1)[1] for l in head.split("\r\n") if l.startswith("X-Corral-Rule")]
    return int(head.split()[1]), rule[0] if rule else None

out = {"control": {}}
for name, address in ADDRESSES.items():
    with socket.create_connection((address, 80), timeout=5) as s:  # the servers really answer
        s.sendall(b"GET /control HTTP/1.0\r\n\r\n")
        out["control"][name] = s.recv(100).split(b" ")[1].decode()

network = Network(mode="allow", allow=list(ADDRESSES), allow_cidrs=["10.1.0.0/16", "169.254.0.0/16"])
events = []
proxy = SandboxProxy.start_tcp(network, events=lambda e, f: events.append(f),
                               resolver=lambda host, port: [ADDRESSES[host]])
out["proxy"] = {name: fetch(proxy.port, name, "/via-proxy") for name in ADDRESSES}
out["literal"] = {a: fetch(proxy.port, a, "/literal") for a in ADDRESSES.values()}
proxy.stop()
out["guard"] = {a: decide_url("http://%s/" % a).rule for a in ADDRESSES.values()}
out["hits"] = hits
out["rules"] = [(e["host"], e["rule"]) for e in events]
print(json.dumps(out))
"""


def test_private_and_metadata_servers_are_refused_inside_a_namespace() -> None:
    unshare = shutil.which("unshare", path="/usr/bin:/bin:/usr/sbin:/sbin")
    ip = shutil.which("ip", path="/usr/sbin:/sbin:/usr/bin:/bin")
    if unshare is None or ip is None:
        pytest.skip("needs unshare (util-linux) and ip (iproute2)")
    src = os.path.dirname(os.path.dirname(corral.__file__))
    env = {"PATH": f"{os.path.dirname(ip)}:/usr/bin:/bin", "PYTHONPATH": src, "LANG": "C.UTF-8"}
    argv = [unshare, "--user", "--map-root-user", "--net", "--", sys.executable, "-c", SCRIPT]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0 and "unshare failed" in done.stderr:
        pytest.skip(f"cannot make a network namespace here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["control"] == {"internal.test": "200", "home.test": "200", "meta.test": "200"}
    assert out["proxy"] == {
        "internal.test": [200, None],  # inside allow_cidrs
        "home.test": [403, "blocked-address:private"],
        "meta.test": [403, "blocked-address:metadata"],  # even inside allow_cidrs
    }
    assert out["literal"] == {
        "10.1.2.3": [200, None],
        "192.168.7.7": [403, "default-deny"],
        "169.254.169.254": [403, "blocked-address:metadata"],
    }
    assert out["guard"] == {"10.1.2.3": "blocked-address:private", "192.168.7.7": "blocked-address:private",
                            "169.254.169.254": "blocked-address:metadata"}  # fmt: skip
    assert out["hits"] == {"10.1.2.3": ["/control", "/via-proxy", "/literal"], "192.168.7.7": ["/control"],
                           "169.254.169.254": ["/control"]}  # fmt: skip
    assert ["home.test", "blocked-address:private"] in out["rules"]
