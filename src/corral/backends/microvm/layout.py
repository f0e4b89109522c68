"""Map a resolved policy onto a VM: which host directories become 9p shares, where the guest mounts
them, and the bubblewrap command line each command runs under inside the guest. Pure: no I/O.

The VM always has the same devices for the same host: one share per read-only system directory
(`sys0`, `sys1`, ...) and `ZONE_SLOTS` zone shares (`z0`...), unused ones pointing at an empty
directory and never mounted. So one saved VM state restores for any policy with at most
`ZONE_SLOTS` directory zones: only the share paths change ("a fresh share layout").

Inside the guest, the policy's view is built exactly as the namespace backend builds it on a host
(`corral.backends.namespace.argv.bwrap_argv`), from the guest's mounts of those shares: the same
zones at the same mount points, the same synthesized /etc, the same seccomp filter and uid.
"""

from __future__ import annotations

from corral._record import Record
from corral.backends.microvm.qemu import Share
from corral.backends.namespace.argv import LaunchFds, bwrap_argv
from corral.policy.resolve import Mount, ResolvedZone

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from corral.policy.resolve import ResolvedPolicy

ZONE_SLOTS = 8
GUEST_BWRAP = "/corral/bin/bwrap"
GUEST_RUN = "/run/corral"
# Must match corral.agent.guest's FD_* numbers.
FD_SECCOMP, FD_STATUS, FD_BLOCK, FD_ETC = 3, 4, 5, 6
MSIZE = 512 * 1024


class GuestMount(Record):
    """One 9p share as the guest mounts it."""

    __slots__ = ("cache", "readonly", "tag", "target")
    tag: str
    target: str
    readonly: bool
    cache: str

    def __init__(self, *, tag: str, target: str, readonly: bool, cache: str) -> None:
        self._set(tag=tag, target=target, readonly=readonly, cache=cache)

    def as_json(self) -> dict[str, object]:
        return {"tag": self.tag, "target": self.target, "ro": self.readonly, "cache": self.cache, "msize": MSIZE}


class Layout(Record):
    """The VM side of one policy."""

    __slots__ = ("guest_rp", "mounts", "shares", "tmpfs")
    shares: tuple[Share, ...]  # every device, in order (the VM's shape)
    mounts: tuple[GuestMount, ...]  # the ones this sandbox mounts
    tmpfs: tuple[dict[str, object], ...]  # guest tmpfs mounts for the tmpfs zones
    guest_rp: ResolvedPolicy  # the policy with guest paths in place of host paths

    def __init__(self, *, shares: tuple[Share, ...], mounts: tuple[GuestMount, ...],
                 tmpfs: tuple[dict[str, object], ...], guest_rp: ResolvedPolicy) -> None:  # fmt: skip
        self._set(shares=shares, mounts=mounts, tmpfs=tmpfs, guest_rp=guest_rp)


def system_dirs(rp: ResolvedPolicy) -> tuple[str, ...]:
    """The host directories of the read-only system view (files and symlinks need no share)."""
    return tuple(str(m.source) for m in rp.system if m.kind == "ro-bind")


def plan(rp: ResolvedPolicy, *, empty_dir: str, zone_slots: int = ZONE_SLOTS) -> Layout:
    """Shares and guest mounts for `rp`. `empty_dir` backs the unused slots. Raises UnsupportedPolicy
    for a zone over a single file (9p shares directories)."""
    shares: list[Share] = []
    mounts: list[GuestMount] = []
    system: list[Mount] = []
    for mount in rp.system:
        if mount.kind != "ro-bind":
            system.append(mount)
            continue
        i = sum(1 for s in shares if s.tag.startswith("sys"))
        tag, target = f"sys{i}", f"{GUEST_RUN}/sys{i}"
        shares.append(Share(tag=tag, path=str(mount.source), readonly=True))
        # The host's system files do not change under a running sandbox: let the guest cache them.
        mounts.append(GuestMount(tag=tag, target=target, readonly=True, cache="loose"))
        system.append(Mount(kind="ro-bind", source=target, dest=mount.dest))
    zones: list[ResolvedZone] = []
    tmpfs: list[dict[str, object]] = []
    host_zones = [z for z in rp.zones if z.host is not None]
    slots = max(zone_slots, len(host_zones))
    j = 0
    for zone in rp.zones:
        if zone.host is None:
            target = f"{GUEST_RUN}/t{len(tmpfs)}"
            mode = "1777" if zone.mount in ("/tmp", "/var/tmp") else "0755"
            tmpfs.append({"target": target, "size": zone.size, "mode": mode})
            zones.append(ResolvedZone(host=target, mount=zone.mount, mode="rw", size=None))
            continue
        tag, target = f"z{j}", f"{GUEST_RUN}/z{j}"
        readonly = zone.mode == "ro"
        shares.append(Share(tag=tag, path=zone.host, readonly=readonly))
        mounts.append(GuestMount(tag=tag, target=target, readonly=readonly, cache="mmap"))
        zones.append(ResolvedZone(host=target, mount=zone.mount, mode=zone.mode, size=None))
        j += 1
    for k in range(j, slots):
        shares.append(Share(tag=f"z{k}", path=empty_dir, readonly=True))
    # The guest gets /etc as contents (in its hello), the host's public copies included.
    guest_rp = rp.replace(zones=tuple(zones), system=tuple(system), etc_copies=(), etc_files=rp.etc_contents())
    return Layout(shares=tuple(shares), mounts=tuple(mounts), tmpfs=tuple(tmpfs), guest_rp=guest_rp)


def file_zones(rp: ResolvedPolicy, isdir: Sequence[bool]) -> tuple[str, ...]:
    """The policy parts naming a zone over a file (`isdir` says, per host zone, whether it is a directory)."""
    host_zones = [z for z in rp.zones if z.host is not None]
    return tuple(f"zone {z.host} (a single file: microvm shares directories only)"
                 for z, is_dir in zip(host_zones, isdir, strict=True) if not is_dir)  # fmt: skip


def guest_command(layout: Layout, argv: Sequence[str], *, cwd: str) -> tuple[str, ...]:
    """The bubblewrap command line the guest agent runs for `argv` (the namespace backend's builder)."""
    rp = layout.guest_rp.replace(cwd=cwd)
    etc = tuple((name, FD_ETC + i) for i, (name, _) in enumerate(rp.etc_files))
    fds = LaunchFds(seccomp=FD_SECCOMP, status=FD_STATUS, block=FD_BLOCK, etc=etc)
    return bwrap_argv(GUEST_BWRAP, rp, argv, fds=fds)
