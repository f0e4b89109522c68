"""The host side of the agent protocol: send requests, collect each reply from its own status pipe."""

from __future__ import annotations

import os
import select
import socket
import threading
import time

from corral.agent import protocol
from corral.errors import LaunchError, SandboxLost
from corral.kernel.pump import Pumped, pump
from corral.kernel.spawn import memfd_with

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence


def _status(text: bytes) -> dict[str, object] | None:
    """The first line an agent wrote on a status pipe; None when it wrote nothing (it died) or
    nothing an agent of ours writes (one a command took over is no longer trusted: lost too)."""
    line = text.strip().split(b"\n", 1)[0]
    try:
        value = protocol.decode(line) if line else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class AgentReply:
    """The agent's answer to one exec: a wait status, or the reason the command never started."""

    def __init__(self, raw: Mapping[str, object] | None) -> None:
        self.raw = dict(raw or {})

    @property
    def lost(self) -> bool:
        return not self.raw

    @property
    def error(self) -> str | None:
        value = self.raw.get("error")
        return None if value is None else str(value)

    @property
    def errno(self) -> int:
        value = self.raw.get("errno", 0)
        return value if isinstance(value, int) else 0

    @property
    def returncode(self) -> int | None:
        status = self.raw.get("status")
        return None if not isinstance(status, int) else os.waitstatus_to_exitcode(status)

    @property
    def maxrss(self) -> int | None:
        value = self.raw.get("maxrss")
        return value if isinstance(value, int) else None


class AgentClient:
    """One connection to one agent. Thread-safe: concurrent execs share the socket, not replies."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()
        self._next_id = 0
        self.info: dict[str, object] = {}
        self.rlimits: frozenset[str] = frozenset()  # the names of those the agent runs under (hello)
        self._env_seen: Mapping[str, str] | None = None
        self._env_encoded = b"{}"
        self._running: dict[int, int] = {}  # exec id -> the thread waiting for it
        # What to do when the agent dies mid-exec (its socket, silent after hello, reads EOF): the
        # sandbox stops it, so that what the dead agent started cannot hold the host waiting.
        self.on_lost: Callable[[], None] = lambda: None

    def handshake(self, hello: dict[str, object], *, fds: Sequence[int] = (), timeout: float = 15.0) -> None:
        """Send the confinement and wait until the agent says it is ready (or why it is not)."""
        rlimits = hello.get("rlimits")
        self.rlimits = frozenset(str(name) for name in rlimits) if isinstance(rlimits, dict) else frozenset()
        protocol.send(self.sock, {"op": "hello", **hello}, list(fds))
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        if not poller.poll(int(timeout * 1000)):
            raise LaunchError(f"the sandbox agent did not start within {timeout:g}s")
        message, extra = protocol.recv(self.sock)
        for fd in extra:
            os.close(fd)
        if message is None:
            raise LaunchError("the sandbox agent exited during start-up")
        if not message.get("ready"):
            raise LaunchError(f"the sandbox agent could not confine itself: {message.get('error')}")
        self.info = message

    def _send(self, message: dict[str, object], fds: Sequence[int]) -> int:
        return self._send_body(lambda exec_id: protocol.encode({**message, "id": exec_id}), fds)

    def _send_body(self, body: Callable[[int], bytes], fds: Sequence[int]) -> int:
        """Send the message `body(id)` encodes, under the next request id."""
        with self._lock:
            self._next_id += 1
            try:
                protocol.send(self.sock, body(self._next_id), list(fds))
            except OSError as exc:
                raise SandboxLost(f"the sandbox is gone ({exc.strerror})") from exc
            return self._next_id

    def _env_json(self, env: Mapping[str, str]) -> bytes:
        # Most execs send the sandbox's own environment, the same object each time: encoded once.
        if env is not self._env_seen:
            self._env_seen, self._env_encoded = env, protocol.encode(dict(env))
        return self._env_encoded

    def exec(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str,
        stdin: bytes | int | None,
        deadline: float | None,
        output_limit: int | None,
        on_output: Callable[[str, bytes], None] | None,
        output: tuple[int, int] | None = None,
    ) -> tuple[AgentReply, Pumped]:
        """Start `argv`, drain its output (unless `output` passes host fds through), wait for its end."""
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        readers: dict[str, int] = {"status": status_r}
        ours = [status_w]  # closed here once sent
        if output is None:
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            readers.update(stdout=out_r, stderr=err_r)
            ours += [out_w, err_w]
            send_fds = [status_w, out_w, err_w]
        else:
            send_fds = [status_w, output[0], output[1]]
        if isinstance(stdin, bytes):
            stdin_fd = memfd_with("corral-stdin", stdin)
            ours.append(stdin_fd)
            send_fds.append(stdin_fd)
        elif isinstance(stdin, int):
            send_fds.append(stdin)
        try:
            head = b'{"op":"exec","argv":%s,"env":%s,"cwd":%s,"id":' % (
                protocol.encode(list(argv)),
                self._env_json(env),
                protocol.encode(cwd),
            )
            exec_id = self._send_body(lambda exec_id: b"%s%d}" % (head, exec_id), send_fds)
        except BaseException:
            for fd in readers.values():
                os.close(fd)
            raise
        finally:
            for fd in ours:
                os.close(fd)

        def kill() -> None:
            try:
                self._send({"op": "signal", "target": exec_id, "signal": 9}, ())
            except SandboxLost:
                pass

        self._running[exec_id] = threading.get_ident()
        try:
            pumped = pump(readers, deadline=deadline, output_limit=output_limit, on_output=on_output, kill=kill,
                          watch=self.sock.fileno(), lost=self.on_lost)  # fmt: skip
        finally:
            del self._running[exec_id]
        text = pumped.get("status").strip()
        reply = AgentReply(_status(text))
        return reply, pumped

    def interrupt(self, thread: int | None = None) -> None:
        """Kill the commands running now (those `thread` waits for, when given)."""
        for exec_id, waiter in list(self._running.items()):
            if thread is None or waiter == thread:
                try:
                    self.signal(exec_id, 9)
                except SandboxLost:
                    return

    def signal(self, exec_id: int, sig: int) -> None:
        self._send({"op": "signal", "target": exec_id, "signal": sig}, ())

    def put_file(self, path: str, data: bytes, mode: int) -> AgentReply:
        data_fd = memfd_with("corral-put", data)
        return self._transfer({"op": "put", "path": path, "mode": mode}, data_fd)

    def get_file(self, path: str, max_bytes: int) -> tuple[AgentReply, bytes]:
        data_fd = os.memfd_create("corral-get", os.MFD_CLOEXEC)
        try:
            reply = self._transfer({"op": "get", "path": path, "max_bytes": max_bytes}, os.dup(data_fd))
            if reply.error is not None or reply.lost:
                return reply, b""
            os.lseek(data_fd, 0, os.SEEK_SET)
            chunks = []
            while chunk := os.read(data_fd, 1 << 20):
                chunks.append(chunk)
            return reply, b"".join(chunks)
        finally:
            os.close(data_fd)

    def _transfer(self, message: dict[str, object], data_fd: int) -> AgentReply:
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        try:
            size = os.fstat(data_fd).st_size or int(message.get("max_bytes", 0))  # type: ignore[call-overload]
            self._send(message, [status_w, data_fd])
        finally:
            os.close(status_w)
            os.close(data_fd)
        text = b""
        # An agent that does not answer in time is taken for lost: a minute, and more for a large
        # file (at 4 MiB/s, far below any disk's speed).
        deadline = time.monotonic() + 60 + size / (4 << 20)
        poller = select.poll()
        poller.register(status_r, select.POLLIN)
        try:
            while time.monotonic() < deadline:
                if not poller.poll(1000):
                    continue
                chunk = os.read(status_r, 65536)
                if not chunk:
                    break
                text += chunk
        finally:
            os.close(status_r)
        return AgentReply(_status(text))

    def stop(self) -> None:
        try:
            with self._lock:
                protocol.send(self.sock, {"op": "stop"})
        except OSError:
            pass
        self.sock.close()
