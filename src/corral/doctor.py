"""What works on this host and why not: every backend probed for real, plus the kernel facts behind it."""

from __future__ import annotations

import os

from corral.backends import registry

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from corral.backends.base import Capabilities


def host_facts() -> dict[str, object]:
    from corral.agent.confine import landlock_abi
    from corral.kernel.cgroups import CgroupHost

    facts: dict[str, object] = {
        "kernel": os.uname().release,
        "machine": os.uname().machine,
        "uid": os.getuid(),
        "landlock_abi": landlock_abi(),
        "cgroups": CgroupHost.detect().describe,
        "in_container": os.path.exists("/.dockerenv") or os.path.exists("/run/.containerenv"),
    }
    for name in ("user/max_user_namespaces", "kernel/apparmor_restrict_unprivileged_userns"):
        path = f"/proc/sys/{name}"
        name = name.split("/", 1)[1]
        try:
            with open(path) as f:
                text = f.read().strip()
            facts[name] = int(text) if text.isdigit() else text
        except OSError:
            pass
    try:
        from corral.backends.namespace.launch import find_bwrap

        bwrap = find_bwrap()
        facts["bwrap"] = f"{bwrap.version_text} ({bwrap.path})"
    except Exception as exc:
        facts["bwrap"] = f"not found: {exc}"
    return facts


def probe_all(names: Sequence[str] = ()) -> list[Capabilities]:
    """Every backend (or those named), probed afresh (no cache), strongest first."""
    for name in names:
        registry.strength_of(name)  # an unknown name is a ConfigError naming the known ones
    out = []
    for name in sorted(names or registry.known_backends(), key=registry.strength_of, reverse=True):
        try:
            backend = registry.create(name)
            out.append(registry.probe(backend, fresh=True))
        except Exception as exc:  # a broken backend must not hide the others
            from corral.backends.base import Capabilities

            out.append(Capabilities(name=name, available=False, strength=registry.strength_of(name),
                                    reason=f"probe failed: {type(exc).__name__}: {exc}"))  # fmt: skip
    return out


def auto_choice(caps: list[Capabilities]) -> str | None:
    by_name = {c.name: c for c in caps}
    for name in registry.AUTO_ORDER:
        if name in by_name and by_name[name].available:
            return name
    return None
