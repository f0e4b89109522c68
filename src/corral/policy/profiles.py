"""Named policies. Each is a starting point; a config file or flags refine it.

- strict:    the workspace read-only, a small /tmp, no network, tight limits.
- workspace: the default. The workspace read-write at its own path, /tmp a tmpfs, no network.
- fs_safe:   like workspace (the filesystem confined) but with the host network.
- net_safe:  like workspace, with outbound traffic only through the allowlist proxy
             (name the domains with `network.allow`; with none, nothing is reachable).
- dev:       like workspace, with the host network, generous limits and a few developer variables.
"""

from __future__ import annotations

from corral.errors import ConfigError
from corral.policy.model import Env, Limits, Network, Policy, Zone

PROFILES = ("strict", "workspace", "fs_safe", "net_safe", "dev")
DEFAULT_PROFILE = "workspace"


def make_profile(name: str, *, workspace: str = ".") -> Policy:
    """The policy named `name`, with `workspace` (a host directory) as its workspace zone."""
    if name not in PROFILES:
        raise ConfigError(f"unknown profile {name!r}; expected one of {', '.join(PROFILES)}", where="profile")
    tmp_size = 64 << 20 if name == "strict" else 1 << 30
    work = Zone.ro(workspace) if name == "strict" else Zone.rw(workspace)
    zones = (work, Zone.tmpfs("/tmp", size=tmp_size))
    if name == "strict":
        limits = Limits(memory=512 << 20, pids=256, timeout=300.0, output=1 << 20, file_size=64 << 20, open_files=256)
    elif name == "dev":
        limits = Limits(pids=8192)
    else:
        limits = Limits(pids=4096)
    network = {
        "fs_safe": Network(mode="host"),
        "dev": Network(mode="host"),
        "net_safe": Network(mode="allow"),
    }.get(name, Network())
    env = Env(passthrough=("COLORTERM", "CI", "NO_COLOR", "FORCE_COLOR")) if name == "dev" else Env()
    return Policy(zones=zones, network=network, limits=limits, env=env, profile=name)
