"""The `process` backend: a plain child process with the policy's checks, a clean environment,
rlimits, cgroups where available and the timeout. No isolation from the host: the FailCore level.

It refuses a policy it cannot enforce (zones, network 'none') unless the caller accepts the weaker
guarantee, and `auto` never chooses it.
"""

from __future__ import annotations

from corral.backends.base import Capabilities
from corral.backends.hostagent import HostAgentBackend

TYPE_CHECKING = False
if TYPE_CHECKING:
    from corral.policy.resolve import ResolvedPolicy

ENFORCES = frozenset({
    "exec.commands",
    "net.host", "fs.tmpfs", "limits.timeout", "limits.output", "limits.file_size", "limits.open_files",
    "limits.pids", "limits.memory",
})  # fmt: skip


class ProcessBackend(HostAgentBackend):
    name = "process"
    strength = 0

    def probe(self) -> Capabilities:
        enforces = set(ENFORCES)
        if "cpu" in self.cgroups.controllers:
            enforces.add("limits.cpus")
        return Capabilities(
            name=self.name, available=True, strength=self.strength, enforces=frozenset(enforces),
            limits_via=self.cgroups.describe,
            notes=("no isolation: commands see and can change everything the user can",
                   "never chosen by auto; zones and network 'none' need --allow-weaker",
                   "network 'allow' is not enforced: commands are pointed at corral's proxy (HTTP_PROXY, "
                   "HTTPS_PROXY, ALL_PROXY) but can go around it; only the in-process guard applies "
                   "(corral.net.check_url and the requests/httpx transports, for Python code on the host)"),
        )  # fmt: skip

    def hello(
        self, rp: ResolvedPolicy, private: dict[str, str], *, proxy_port: int | None = None
    ) -> tuple[dict[str, object], bytes]:
        return {}, b""
