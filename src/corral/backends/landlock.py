"""The `landlock` backend: no namespaces; Landlock + seccomp + no capabilities + rlimits + cgroups.

For hosts where user namespaces are blocked (unprivileged containers, Ubuntu 24.04's AppArmor
rule). The agent confines itself before it runs anything: Landlock allows the zones (read-only or
read-write), the system directories and the public parts of /etc; network rules (ABI >= 4) refuse
TCP bind and connect; scoping (ABI >= 6) keeps signals and abstract sockets inside; the seccomp
filter refuses the dangerous syscalls and, with network 'none', every socket family (so no host
daemon's unix socket is reachable either). Host processes stay visible in /proc, though their
memory and environment are not (Landlock refuses ptrace-class access to them).

Network 'allow' (Landlock ABI >= 4): the sandbox's proxy listens on an ephemeral port of the host's
loopback; Landlock allows TCP connect() to that port only, and seccomp allows only TCP sockets
(IPv4, IPv6), no listen() and no TCP Fast Open sends, which Landlock does not see. Landlock rules
name ports, not addresses: a process could reach another host's service on that same port number.
"""

from __future__ import annotations

import os
import sys

from corral.backends.base import Capabilities
from corral.backends.hostagent import HostAgentBackend, agent_main_path
from corral.kernel.seccomp import AF_INET, AF_INET6, FAMILIES_NETNS, build_filter
from corral.policy.resolve import ETC_PUBLIC

TYPE_CHECKING = False
if TYPE_CHECKING:
    from corral.policy.resolve import ResolvedPolicy

ENFORCES = frozenset({
    "exec.commands",
    "fs.isolation", "fs.tmpfs", "net.none", "net.host", "syscall.filter", "limits.timeout",
    "limits.output", "limits.file_size", "limits.open_files", "limits.pids", "limits.memory",
})  # fmt: skip
# Files the landlock backend cannot synthesize, so it shows the host's (they hold no secrets).
ETC_HOST_FILES = ("passwd", "group", "hosts", "resolv.conf", "nsswitch.conf", "hostname")
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty", "/dev/pts",
           "/dev/ptmx", "/dev/shm")  # fmt: skip
PROBE_SCRIPT = "cat /etc/shadow >/dev/null 2>&1 && echo LEAK; grep -E '^(Seccomp|NoNewPrivs|CapEff):' /proc/self/status"


class LandlockBackend(HostAgentBackend):
    name = "landlock"
    strength = 20

    def probe(self) -> Capabilities:
        """Start a real confined agent and check from inside that the walls are up."""
        from corral.agent.confine import landlock_abi
        from corral.policy.model import Policy, Zone
        from corral.policy.resolve import resolve

        abi = landlock_abi()
        if abi < 1:
            return Capabilities(name=self.name, available=False, strength=self.strength,
                                reason="the kernel has no Landlock (or it is disabled)",
                                fix="use a kernel >= 5.13 with landlock in its lsm= list")  # fmt: skip
        try:
            rp = resolve(Policy(zones=(Zone.tmpfs("/tmp"),)), host_env={}, host_cwd="/")
            live = self.start(rp, sandbox_id="probe")
            try:
                result = live.exec(["/bin/sh", "-c", PROBE_SCRIPT], timeout=20)
            finally:
                live.stop()
        except Exception as exc:
            return Capabilities(name=self.name, available=False, strength=self.strength,
                                reason=f"the confined agent could not start: {exc}",
                                fix="check that seccomp and Landlock are enabled")  # fmt: skip
        fields = dict(line.split(":", 1) for line in result.stdout_text.splitlines() if ":" in line)
        problems = []
        if "LEAK" in result.stdout_text:
            problems.append("/etc/shadow was readable")
        if fields.get("Seccomp", "").strip() != "2":
            problems.append("seccomp filter not active")
        if fields.get("CapEff", "").strip().strip("0"):
            problems.append("capabilities not dropped")
        if problems:
            return Capabilities(name=self.name, available=False, strength=self.strength,
                                reason="; ".join(problems), fix="report this as a corral bug")  # fmt: skip
        enforces = set(ENFORCES)
        if "cpu" in self.cgroups.controllers:
            enforces.add("limits.cpus")
        notes = [f"Landlock ABI {abi}",
                 "zones appear only at their own host paths; /tmp and HOME are private directories (TMPDIR, HOME) "
                 "on the host's disk, whose tmpfs size is not enforced",
                 "commands run as the user who runs corral (no user namespace: the policy's uid is not applied)",
                 "host processes are visible in /proc (not their memory or environment)"]  # fmt: skip
        if abi < 4:
            notes.append("no Landlock network rules on this kernel: network 'none' relies on seccomp alone, "
                         "network 'allow' cannot be enforced")  # fmt: skip
        else:
            enforces.add("net.allow")
            notes.append("network 'allow': connect() only to the proxy's port (Landlock matches ports, not "
                         "addresses); UDP, listen() and TCP Fast Open refused by seccomp")  # fmt: skip
        return Capabilities(name=self.name, available=True, strength=self.strength, enforces=frozenset(enforces),
                            limits_via=self.cgroups.describe, notes=tuple(notes))  # fmt: skip

    def hello(
        self, rp: ResolvedPolicy, private: dict[str, str], *, proxy_port: int | None = None
    ) -> tuple[dict[str, object], bytes]:
        mode = rp.network.mode
        rules = landlock_paths(rp, private)
        rules["restrict_net"] = mode != "host"
        rules["scope"] = True
        if mode == "allow" and proxy_port is not None:
            rules["connect_ports"] = [proxy_port]
            program = build_filter(families=(AF_INET, AF_INET6), tcp_client_only=True)
        else:
            program = build_filter(families=FAMILIES_NETNS if mode == "host" else ())
        return {"landlock": rules, "drop_capabilities": True}, program


def landlock_paths(rp: ResolvedPolicy, private: dict[str, str]) -> dict[str, object]:
    """Host paths the agent may read (and execute) and write."""
    ro = [m.dest for m in rp.system if m.dest.startswith("/etc/") or not m.dest.startswith("/etc")]
    ro += [f"/etc/{name}" for name in ETC_HOST_FILES if f"/etc/{name}" not in ro]
    ro += [f"/etc/{name}" for name in ETC_PUBLIC if f"/etc/{name}" not in ro]
    # What the agent itself needs: its interpreter and standard library, and its own code.
    ro += [os.path.realpath(sys.base_prefix), os.path.dirname(agent_main_path()), "/proc"]
    ro.append(os.path.dirname(os.path.realpath(sys.executable)))
    rw = list(DEVICES)
    for zone in rp.zones:
        if zone.mode == "tmpfs":
            if zone.mount in private:
                rw.append(private[zone.mount])
        elif zone.host is not None:
            (rw if zone.mode == "rw" else ro).append(zone.host)
    return {"ro": ro, "rw": rw}
