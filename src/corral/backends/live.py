"""A live sandbox driven through corral's agent; shared by the namespace, landlock and process backends."""

from __future__ import annotations

import time

from corral.backends.base import LiveSandbox, Result, effective_timeout, file_error
from corral.backends.outcome import classify, not_started
from corral.errors import SandboxLost

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Mapping, Sequence

    from corral.agent.client import AgentClient
    from corral.backends.base import OutputCallback
    from corral.kernel.cgroups import Cgroup
    from corral.policy.resolve import ResolvedPolicy


class AgentSandbox(LiveSandbox):
    def __init__(
        self,
        *,
        backend: str,
        sandbox_id: str,
        rp: ResolvedPolicy,
        client: AgentClient,
        cgroup: Cgroup | None,
        teardown: Callable[[], None],
        path_map: Mapping[str, str] | None = None,
        rlimits: Collection[str] | None = None,
    ) -> None:
        self.backend = backend
        self.id = sandbox_id
        self.rp = rp
        self.client = client
        self.cgroup = cgroup
        self._teardown = teardown
        # Sandbox paths the backend shows elsewhere (a tmpfs emulated by a private host directory).
        self._path_map = dict(path_map or {})
        self._base_env = rp.env_dict  # never changed: the client encodes it once
        # The rlimits commands run under: set on the sandbox by its launcher, else the agent's own (hello).
        self.rlimits = frozenset(rlimits) if rlimits is not None else client.rlimits
        client.on_lost = self.stop

    def exec(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | int | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
        output: tuple[int, int] | None = None,
    ) -> Result:
        self._check_exec(argv)
        full_env = self._command_env(env) if env else self._base_env
        limits = self.rp.limits
        timeout = effective_timeout(timeout, limits.timeout)
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        reply, pumped = self.client.exec(
            argv,
            env=full_env,
            cwd=self._translate(cwd) if cwd else self.rp.cwd,
            stdin=stdin,
            deadline=deadline,
            output_limit=limits.output,
            on_output=on_output,
            output=output,
        )
        wall = time.monotonic() - started
        if reply.lost:
            self.stop()
            raise SandboxLost(f"sandbox {self.id} died while running {argv[0]!r}")
        if reply.error is not None:
            return not_started(argv, reply.errno, reply.error, what=str(reply.raw.get("what", "command")),
                               subject=str(reply.raw.get("subject", argv[0])), pids_limit=limits.pids,
                               output=output)  # fmt: skip
        returncode = reply.returncode
        assert returncode is not None
        # Peak memory per exec comes from the agent's wait4 (the command and what it waited for);
        # the cgroup is shared by the whole sandbox, so it only explains OOM kills and pids refusals.
        return classify(argv, returncode, pumped, limits=limits, timeout=timeout, wall_time=wall,
                        cgroup=self.cgroup, maxrss=reply.maxrss, cgroup_peak=False, rlimits=self.rlimits)  # fmt: skip

    def interrupt(self, thread: int | None = None) -> None:
        self.client.interrupt(thread)

    def put_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        reply = self.client.put_file(self._absolute(path), data, mode)
        if reply.lost:
            self.stop()
            raise SandboxLost(f"sandbox {self.id} is gone")
        if reply.error is not None:
            raise file_error("write", path, reply.errno, reply.error)

    def get_file(self, path: str, *, max_bytes: int = 64 << 20) -> bytes:
        reply, data = self.client.get_file(self._absolute(path), max_bytes)
        if reply.lost:
            self.stop()
            raise SandboxLost(f"sandbox {self.id} is gone")
        if reply.error is not None:
            raise file_error("read", path, reply.errno, reply.error)
        return data

    def _absolute(self, path: str) -> str:
        import posixpath

        return self._translate(posixpath.normpath(posixpath.join(self.rp.cwd, path)))

    def _translate(self, path: str) -> str:
        if not self._path_map:
            return path
        from corral.backends.hostagent import translate

        return translate(self._path_map, path)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            self.client.stop()
        finally:
            self._teardown()
