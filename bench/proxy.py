"""Network proxy benchmark, all on loopback: latency added per request and throughput, proxy vs direct.

    python bench/proxy.py [--requests 2000] [--megabytes 512]

Paths measured, each against a local origin server on 127.0.0.1:
- direct:           client -> origin
- proxy (http):     client -> proxy (plain HTTP forward, keep-alive) -> origin
- proxy (CONNECT):  client -> proxy (tunnel) -> origin
- sandbox path:     client -> in-sandbox forwarder (TCP -> unix socket) -> proxy -> origin, the way a
                    namespace sandbox reaches the proxy (the forwarder runs here, in a thread)
Latency rows: median and p99 of one small GET on a kept-alive connection, and of a fresh connection
per request (connect + CONNECT + GET). Throughput: one large download through each path.
Also: the start-up cost of a one-shot `corral.run` with network 'allow' against 'none'.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import corral
from corral.agent import forward
from corral.net.service import SandboxProxy

BLOCK = memoryview(b"x" * (1 << 20))


class Origin:
    """A minimal keep-alive HTTP/1.1 origin: GET /big/N sends N bytes, anything else 2 bytes."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            conn, _ = self.listener.accept()
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, _, buf = buf.partition(b"\r\n\r\n")
                path = head.split(b" ", 2)[1]
                size = int(path.rsplit(b"/", 1)[1]) if b"/big/" in path else 2
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
                while size > 0:
                    n = min(size, len(BLOCK))
                    conn.sendall(BLOCK[:n])
                    size -= n


class Client:
    """One keep-alive connection speaking just enough HTTP/1.1."""

    def __init__(self, port: int, *, tunnel_to: int | None = None, absolute: int | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.prefix = ""
        if tunnel_to is not None:
            self.sock.sendall(b"CONNECT bench.test:%d HTTP/1.1\r\nHost: bench.test:%d\r\n\r\n" % (tunnel_to, tunnel_to))
            self._head()
        if absolute is not None:
            self.prefix = f"http://bench.test:{absolute}"
            self.host = f"bench.test:{absolute}"
        else:
            self.host = "bench.test"

    def _head(self) -> bytes:
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        return head

    def get(self, path: str) -> int:
        self.sock.sendall(f"GET {self.prefix}{path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        head = self._head()
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        got = len(self.buf)
        self.buf = b""
        while got < length:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("closed")
            got += len(chunk)
        return length

    def close(self) -> None:
        self.sock.close()


def timed(fn: Callable[[], object], n: int) -> list[float]:
    fn()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def p99(samples: list[float]) -> float:
    return sorted(samples)[int(len(samples) * 0.99) - 1]


def serve_origin() -> int:
    origin = Origin()
    print(origin.port, flush=True)
    sys.stdin.read()
    return 0


def serve_proxy(origin_port: int) -> int:
    """The proxy as corral runs it (its own thread and loop), plus the in-sandbox forwarder in a child."""
    network = corral.Network(mode="allow", allow=[f"bench.test:{origin_port}", f"127.0.0.1:{origin_port}"])
    tcp = SandboxProxy.start_tcp(network, resolver=lambda host, port: ["127.0.0.1"])
    unix = SandboxProxy.start_unix(network, resolver=lambda host, port: ["127.0.0.1"])
    listener = forward.listen(0)
    assert unix.socket_path is not None
    child = os.fork()
    if child == 0:  # the forwarder lives in the sandbox, another process
        os.close(0)
        os.close(1)
        forward.serve(listener, unix.socket_path)
        os._exit(0)
    print(tcp.port, listener.getsockname()[1], flush=True)
    sys.stdin.read()
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
    tcp.stop()
    unix.stop()
    return 0


def spawn(*args: str) -> tuple[subprocess.Popen[str], list[int]]:
    child = subprocess.Popen(
        [sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    return child, [int(x) for x in child.stdout.readline().split()]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--megabytes", type=int, default=512)
    parser.add_argument("--role", choices=("origin", "proxy"), help=argparse.SUPPRESS)
    parser.add_argument("--origin-port", type=int, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.role == "origin":
        return serve_origin()
    if opts.role == "proxy":
        return serve_proxy(opts.origin_port)
    # Origin, proxy and client each in their own process, as in real use (no shared interpreter lock).
    origin_proc, (o,) = spawn("--role", "origin")
    proxy_proc, (proxy_port, fwd) = spawn("--role", "proxy", "--origin-port", str(o))
    try:
        return measure(opts, o, proxy_port, fwd)
    finally:
        for child in (proxy_proc, origin_proc):
            assert child.stdin is not None
            child.stdin.close()
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()


def measure(opts: argparse.Namespace, o: int, proxy_port: int, fwd: int) -> int:
    network = corral.Network(mode="allow", allow=[f"bench.test:{o}", f"127.0.0.1:{o}"])

    paths: dict[str, Callable[[], Client]] = {
        "direct": lambda: Client(o),
        "proxy (http forward)": lambda: Client(proxy_port, absolute=o),
        "proxy (CONNECT tunnel)": lambda: Client(proxy_port, tunnel_to=o),
        "sandbox path (forwarder + unix socket + CONNECT)": lambda: Client(fwd, tunnel_to=o),
    }
    n = opts.requests
    print(f"latency, small GET on a kept-alive connection ({n} requests):")
    base = 0.0
    for name, make in paths.items():
        client = make()
        samples = timed(lambda c=client: c.get("/small"), n)  # type: ignore[misc]
        client.close()
        median = statistics.median(samples) * 1e6
        base = base or median
        print(
            f"  {name:<50} median {median:7.1f} us   p99 {p99(samples) * 1e6:7.1f} us   added {median - base:+7.1f} us"
        )

    print(f"latency, a new connection per request ({n // 4} requests):")
    base = 0.0
    for name, make in paths.items():

        def once(make: Callable[[], Client] = make) -> None:
            client = make()
            client.get("/small")
            client.close()

        samples = timed(once, n // 4)
        median = statistics.median(samples) * 1e6
        base = base or median
        print(
            f"  {name:<50} median {median:7.1f} us   p99 {p99(samples) * 1e6:7.1f} us   added {median - base:+7.1f} us"
        )

    size = opts.megabytes << 20
    print(f"throughput, one {opts.megabytes} MiB download:")
    base = 0.0
    for name, make in paths.items():
        client = make()
        client.get(f"/big/{1 << 20}")
        start = time.perf_counter()
        client.get(f"/big/{size}")
        rate = size / (time.perf_counter() - start) / (1 << 20)
        client.close()
        base = base or rate
        print(f"  {name:<50} {rate:8.0f} MiB/s   ({rate / base:4.0%} of direct)")

    work = tempfile.mkdtemp(prefix="corral-bench-")
    os.chdir(work)
    plain = corral.Policy.workspace(work)
    allowed = plain.replace(network=network)
    print("start-up, one-shot corral.run(['/bin/true']) on the namespace backend (median of 20):")
    for name, policy in (("network 'none'", plain), ("network 'allow' (proxy + forwarder)", allowed)):
        try:
            samples = timed(lambda p=policy: corral.run(["/bin/true"], policy=p, backend="namespace").check(), 20)  # type: ignore[misc]
        except corral.CorralError as exc:
            print(f"  {name:<50} skipped: {exc}")
            continue
        print(f"  {name:<50} {statistics.median(samples) * 1000:7.1f} ms")
    os.chdir("/")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
