"""Resource limits through cgroups, v2 where delegated, v1 where that is what the host has.

A `CgroupHost` finds where this process may create cgroups; each sandbox gets one `Cgroup`
(`corral-<pid>-<n>` under a `corral` directory in every hierarchy it uses). It sets memory, pids
and cpu limits, attaches processes, kills everything inside, reports OOM kills, pids-limit hits and
peak memory, and removes itself. Cgroups left by a crashed corral are reaped on the next start.

On a v1 or hybrid host, the memory, pids and cpu hierarchies hold the limits and the unified (v2)
hierarchy, when mounted, gives `cgroup.kill`; without it the v1 freezer (or a kill loop) does.

Moving a process into a cgroup takes a kernel-wide lock whose first writer waits for an RCU grace
period (6-20 ms on some VMs). A thread moving only itself into a v1 cgroup skips that lock, and
what it spawns next starts inside: so on v1, a sandbox without memory or cpu limits (the default
policy's pids limit) is joined by the launching thread, which spawns bubblewrap and moves back
(`CgroupHost.joins_by_thread`). The others are attached by pid after bubblewrap starts, with the
wait started early (`corral.kernel.cgroupfs.start_attach_prefetch`).
"""

from __future__ import annotations

import errno
import os
import time

from corral.kernel.cgroupfs import V1_CONTROLLERS, cgroup_mounts, join_path, own_cgroups, read_text

TYPE_CHECKING = False
if TYPE_CHECKING:
    from corral.policy.model import Limits

_CPU_PERIOD_US = 100_000


class CgroupHost:
    """Where corral may create cgroups here, or why it cannot (`mode == "none"`)."""

    def __init__(
        self, mode: str, bases: dict[str, str], reason: str = "", *, mounts: dict[str, str] | None = None
    ) -> None:
        self.mode = mode  # "v2" | "v1" | "none"
        self.bases = bases  # hierarchy ("v2", "memory", "pids", "cpu", "freezer", "unified") -> base dir
        self.reason = reason
        self.mounts = mounts or {}  # v1 hierarchy -> mount point: a joining thread's way back
        self._seq = 0

    @property
    def controllers(self) -> frozenset[str]:
        """Which limits this host can enforce: a subset of {memory, pids, cpu}."""
        if self.mode == "v1":
            return frozenset(c for c in ("memory", "pids", "cpu") if c in self.bases)
        if self.mode == "v2":
            return self._v2_controllers
        return frozenset()

    @property
    def describe(self) -> str:
        if self.mode == "none":
            return f"rlimits only ({self.reason})"
        kill = "cgroup.kill" if ("unified" in self.bases or self.mode == "v2") else "freezer"
        if self.mode == "v1" and "unified" in self.bases:
            kill = "cgroup.kill, or the end of the sandbox's pid namespace"
        return f"cgroup {self.mode} ({', '.join(sorted(self.controllers))}; kill via {kill})"

    @classmethod
    def detect(cls) -> CgroupHost:
        try:
            mounts = cgroup_mounts()
            own = own_cgroups()
        except OSError as exc:
            return cls("none", {}, f"cannot read cgroup mounts: {exc.strerror}")
        v1 = {c: path for c, path in mounts.items() if c in V1_CONTROLLERS}
        unified = mounts.get("unified")
        if unified is not None and not v1:
            return cls._detect_v2(unified, own.get("", "/"))
        if v1:
            bases: dict[str, str] = {}
            problems: list[str] = []
            for controller, mount in v1.items():
                base = join_path(mount, own.get(controller, "/"), "corral")
                if _ensure_dir(base):
                    bases[controller] = base
                else:
                    problems.append(f"{controller}: {base} not writable")
            if unified is not None:
                base = join_path(unified, own.get("", "/"), "corral")
                if _ensure_dir(base) and os.path.exists(os.path.join(base, "cgroup.kill")):
                    bases["unified"] = base  # cgroup.kill does the freezer's job (see _needed)
            if not any(c in bases for c in ("memory", "pids", "cpu")):
                return cls("none", {}, "; ".join(problems) or "no usable v1 controller")
            host = cls("v1", bases, mounts=v1)
            host.reap_stale()
            return host
        return cls("none", {}, "no cgroup filesystem mounted")

    @classmethod
    def _detect_v2(cls, mount: str, own: str) -> CgroupHost:
        own_dir = join_path(mount, own)
        # As root at the top of the tree we may use the root cgroup; otherwise we need a delegated
        # subtree (our own cgroup writable by us), and v2's "no internal processes" rule means we
        # first move ourselves into a leaf so our cgroup can hand controllers to its children.
        base = join_path(own_dir, "corral")
        if not _ensure_dir(base):
            return cls("none", {}, f"{own_dir} is not writable (no delegated cgroup v2 subtree)")
        wanted = {"memory", "pids", "cpu"}
        available = set(read_text(os.path.join(own_dir, "cgroup.controllers")).split()) & wanted
        enabled = set(read_text(os.path.join(own_dir, "cgroup.subtree_control")).split())
        if available - enabled and own != "/":
            leaf = join_path(own_dir, "corral-host")
            if _ensure_dir(leaf):
                try:
                    _write(os.path.join(leaf, "cgroup.procs"), "0")
                except OSError:
                    pass
        for controller in sorted(available - enabled):
            try:
                _write(os.path.join(own_dir, "cgroup.subtree_control"), f"+{controller}")
            except OSError:
                pass
        for controller in sorted(available):
            try:
                _write(os.path.join(base, "cgroup.subtree_control"), f"+{controller}")
            except OSError:
                pass
        host = cls("v2", {"v2": base})
        host._v2_controllers = frozenset(set(read_text(os.path.join(base, "cgroup.subtree_control")).split()) & wanted)
        host.reap_stale()
        return host

    _v2_controllers: frozenset[str] = frozenset()

    def joins_by_thread(self, limits: Limits) -> bool:
        """Whether a sandbox with `limits` gets its cgroup by the launching thread joining it.

        Only on v1 (v2 moves whole processes), and only without memory or cpu limits: a thread in
        the cgroup for the ~0.3 ms of a spawn must not be a memory-OOM victim candidate (the whole
        process would be) or be throttled. Such a cgroup is left without limits until the thread
        is back out; the caller then sets them (`Cgroup.set_limits`), before the command runs.
        """
        return self.mode == "v1" and limits.memory is None and limits.cpus is None

    def create(self, limits: Limits | None = None, *, by_thread: bool = False) -> Cgroup:
        """A new, empty cgroup in every hierarchy `limits` needs (all without limits), with `limits`
        applied, unless `by_thread`: a cgroup for `Cgroup.enter_as_thread`, its limits set later."""
        if self.mode == "none":
            raise OSError(errno.ENOTSUP, f"no usable cgroups: {self.reason}")
        self._seq += 1
        name = f"corral-{os.getpid()}-{self._seq}-{time.monotonic_ns() % 1_000_000}"
        dirs: dict[str, str] = {}
        try:
            for hierarchy, base in self.bases.items():
                if limits is not None and not _needed(hierarchy, limits, self.bases, by_thread=by_thread):
                    continue  # each hierarchy costs a mkdir, an attach and an rmdir per sandbox
                path = os.path.join(base, name)
                os.mkdir(path)
                dirs[hierarchy] = path
            cgroup = Cgroup(self.mode, dirs)
            if by_thread:
                # bubblewrap's own process, spawned inside, takes one pid of its own.
                cgroup.pids_extra = 1
            elif limits is not None:
                cgroup.set_limits(limits)
        except OSError:
            for path in dirs.values():
                _rmdir_quiet(path)
            raise
        return cgroup

    def reap_stale(self) -> None:
        """Remove cgroups left behind by corral processes that no longer exist."""
        for base in self.bases.values():
            try:
                names = os.listdir(base)
            except OSError:
                continue
            for name in names:
                parts = name.split("-")
                if len(parts) < 3 or parts[0] != "corral" or not parts[1].isdigit():
                    continue
                if int(parts[1]) == os.getpid() or os.path.exists(f"/proc/{parts[1]}"):
                    continue
                stale = Cgroup(self.mode, {"x": os.path.join(base, name)})
                stale.destroy()


class Cgroup:
    """One sandbox's cgroup, across the hierarchies the host offers."""

    def __init__(self, mode: str, dirs: dict[str, str]) -> None:
        self.mode = mode
        self.dirs = dirs
        self.pids_extra = 0  # processes inside that are not the sandbox's (counted on top of the limit)
        # Set when a thread of ours could not leave (see enter_as_thread): killing or removing the
        # cgroup would then kill this very process, so this object never does either.
        self.holds_caller = False
        self._oom_base = 0
        self._pids_base = 0

    @classmethod
    def of_process(cls, pid: int) -> Cgroup | None:
        """The cgroup `pid` is in (a container's, made by its engine), to read its OOM and pids counters.

        None when that process or its cgroup is not visible from here. The caller does not own it:
        never `destroy()` it.
        """
        try:
            mounts = cgroup_mounts()
            with open(f"/proc/{pid}/cgroup", encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError:
            return None
        paths: dict[str, str] = {}
        for line in lines:
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                paths[controller] = path
        wanted: tuple[str, ...] = ("memory", "pids")
        v1 = {c: join_path(mounts[c], paths[c]) for c in wanted if c in mounts and c in paths}
        if v1:
            dirs = {c: d for c, d in v1.items() if os.path.isdir(d)}
            return cls("v1", dirs) if dirs else None
        if "unified" in mounts and "" in paths:
            d = join_path(mounts["unified"], paths[""])
            return cls("v2", {"v2": d}) if os.path.isdir(d) else None
        return None

    @classmethod
    def create_at(cls, relative: str, limits: Limits | None) -> Cgroup:
        """A cgroup at `relative` below the root of the memory and cpu hierarchies, with the
        memory and cpus of `limits` (None: as it is): for an OCI runtime given `relative` as its
        cgroupsPath, which joins a cgroup that exists without touching its limits. Needs root."""
        from corral.policy.model import Limits as _Limits

        mounts = cgroup_mounts()
        v1: dict[str, str] = {c: join_path(mounts[c], relative) for c in ("memory", "cpu") if c in mounts}
        if v1:
            cgroup = cls("v1", v1)
        elif "unified" in mounts:
            path = join_path(mounts["unified"], relative)
            parent = mounts["unified"]
            for part in relative.strip("/").split("/"):
                for controller in ("memory", "cpu"):
                    _write_if_exists(os.path.join(parent, "cgroup.subtree_control"), f"+{controller}")
                parent = os.path.join(parent, part)
                os.makedirs(parent, exist_ok=True)
            cgroup = cls("v2", {"v2": path})
        else:
            raise OSError(errno.ENOTSUP, "no cgroup filesystem mounted")
        for d in cgroup.dirs.values():
            os.makedirs(d, exist_ok=True)
        if limits is None:
            return cgroup
        try:
            cgroup.set_limits(_Limits(memory=limits.memory, cpus=limits.cpus))
        except OSError:
            cgroup.destroy()
            raise
        return cgroup

    def memory_exhausted(self) -> bool:
        """Whether the memory limit was ever reached (an OOM kill, or a refused charge on v1)."""
        d = self._dir("memory")
        if d is None:
            return False
        if self._counter("memory", "oom_kill") > 0:
            return True
        if self.mode == "v2":
            return self._counter("memory", "max") > 0
        text = read_text(os.path.join(d, "memory.failcnt")).strip()
        return text.isdigit() and int(text) > 0

    def _dir(self, controller: str) -> str | None:
        if self.mode == "v2":
            return self.dirs.get("v2")
        return self.dirs.get(controller)

    def set_limits(self, limits: Limits) -> None:
        if limits.memory is not None:
            d = self._dir("memory")
            if d is None:
                raise OSError(errno.ENOTSUP, "no memory controller")
            if self.mode == "v2":
                _write(os.path.join(d, "memory.max"), str(limits.memory))
                _write_if_exists(os.path.join(d, "memory.swap.max"), "0")
            else:
                _write(os.path.join(d, "memory.limit_in_bytes"), str(limits.memory))
                _write_if_exists(os.path.join(d, "memory.memsw.limit_in_bytes"), str(limits.memory))
        if limits.pids is not None:
            d = self._dir("pids")
            if d is None:
                raise OSError(errno.ENOTSUP, "no pids controller")
            _write(os.path.join(d, "pids.max"), str(limits.pids + self.pids_extra))
        if limits.cpus is not None:
            d = self._dir("cpu")
            if d is None:
                raise OSError(errno.ENOTSUP, "no cpu controller")
            quota = max(1000, int(limits.cpus * _CPU_PERIOD_US))
            if self.mode == "v2":
                _write(os.path.join(d, "cpu.max"), f"{quota} {_CPU_PERIOD_US}")
            else:
                _write(os.path.join(d, "cpu.cfs_period_us"), str(_CPU_PERIOD_US))
                _write(os.path.join(d, "cpu.cfs_quota_us"), str(quota))

    def procs_files(self) -> list[str]:
        """Every cgroup.procs file a process must be written to (one per hierarchy on v1)."""
        return [os.path.join(d, "cgroup.procs") for d in self.dirs.values()]

    def attach(self, pid: int) -> None:
        for path in self.procs_files():
            _write(path, str(pid))

    def enter_as_thread(self, mounts: dict[str, str]) -> list[tuple[str, str]]:
        """Move the calling thread, and only it, into this (v1) cgroup in every hierarchy, so that
        what it spawns next starts inside. Returns its way back for `leave_as_thread`: in each
        hierarchy the `tasks` file of the cgroup it was in, and of the root as a fallback.

        A thread writing 0 to a v1 `tasks` file takes no kernel-wide lock: 0.1 ms, where naming a
        pid waits for an RCU grace period. On failure the thread is back where it was.
        """
        own = own_cgroups("/proc/thread-self/cgroup")
        back = [
            (os.path.join(join_path(mounts[h], own.get(h, "/")), "tasks"), os.path.join(mounts[h], "tasks"))
            for h in self.dirs
        ]
        try:
            for d in self.dirs.values():
                _write(os.path.join(d, "tasks"), "0")
        except OSError:
            self.leave_as_thread(back)
            raise
        return back

    def leave_as_thread(self, back: list[tuple[str, str]]) -> bool:
        """Take the calling thread back out (to its old cgroup, else the root) after `enter_as_thread`.
        False when some hierarchy refused both: this cgroup then holds our process (`holds_caller`)."""
        for own, root in back:
            try:
                _write(own, "0")
            except OSError:
                try:
                    _write(root, "0")
                except OSError:
                    self.holds_caller = True
        return not self.holds_caller

    def pids(self) -> list[int]:
        seen: set[int] = set()
        for path in self.procs_files():
            for line in read_text(path).split():
                seen.add(int(line))
        return sorted(seen)

    def kill(self) -> None:
        """SIGKILL every process inside, including ones forking as we go."""
        if self.holds_caller:
            return
        kill_file = None
        for hierarchy in ("unified", "v2"):
            d = self.dirs.get(hierarchy)
            if d and os.path.exists(os.path.join(d, "cgroup.kill")):
                kill_file = os.path.join(d, "cgroup.kill")
        if kill_file is not None:
            try:
                _write(kill_file, "1")
                return
            except OSError:
                pass
        freezer = self.dirs.get("freezer")
        if freezer is not None:
            _write_if_exists(os.path.join(freezer, "freezer.state"), "FROZEN")
        for _ in range(100):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            if freezer is not None:
                _write_if_exists(os.path.join(freezer, "freezer.state"), "THAWED")
            time.sleep(0.001)

    def oom_kills(self) -> int:
        """OOM kills since the previous call (the first call counts from creation)."""
        value = self._counter("memory", "oom_kill")
        delta, self._oom_base = value - self._oom_base, value
        return delta

    def pids_hits(self) -> int:
        """Times the pids limit refused a fork since the previous call."""
        value = self._counter("pids", "max")
        delta, self._pids_base = value - self._pids_base, value
        return delta

    def peak_memory(self) -> int | None:
        d = self._dir("memory")
        if d is None:
            return None
        name = "memory.peak" if self.mode == "v2" else "memory.max_usage_in_bytes"
        text = read_text(os.path.join(d, name)).strip()
        return int(text) if text.isdigit() else None

    def _counter(self, controller: str, key: str) -> int:
        d = self._dir(controller)
        if d is None:
            return 0
        if controller == "memory":
            name = "memory.events" if self.mode == "v2" else "memory.oom_control"
        else:
            name = "pids.events"
        for line in read_text(os.path.join(d, name)).splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == key and parts[1].isdigit():
                return int(parts[1])
        return 0

    def destroy(self) -> None:
        """Kill what is left and remove the cgroup from every hierarchy. Idempotent."""
        if self.holds_caller:
            return  # left for reap_stale once this process is gone
        if not any(os.path.isdir(d) for d in self.dirs.values()):
            return
        self.kill()
        for d in self.dirs.values():
            # A killed task leaves its cgroup a moment after it dies: retry quickly, then back off.
            pause = 0.0002
            deadline = time.monotonic() + 1.0
            while True:
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        break
                    self.kill()
                    time.sleep(pause)
                    pause = min(pause * 2, 0.005)


def _needed(hierarchy: str, limits: Limits, bases: dict[str, str], *, by_thread: bool = False) -> bool:
    """Whether a v1 hierarchy serves `limits`: memory always (it measures peak memory), pids and
    cpu for their limits. To kill: cgroup2's `cgroup.kill` where mounted, else the freezer. A
    thread can join neither cheaply (cgroup2 moves whole processes; each hierarchy costs ~0.15 ms
    a sandbox), so a cgroup it joins has no kill switch of its own: killing the sandbox's init ends
    its pid namespace, which no process inside can leave, and `Cgroup.kill` loops over the rest."""
    if hierarchy == "pids":
        return limits.pids is not None
    if hierarchy == "cpu":
        return limits.cpus is not None
    if hierarchy == "unified":
        return not by_thread
    if hierarchy == "freezer":
        return not by_thread and "unified" not in bases
    return True


def attach_wait_note(host: CgroupHost) -> str | None:
    """A doctor note when moving a sandbox into its cgroup waits for a normal RCU grace period."""
    if host.mode == "none":
        return None
    if read_text("/sys/kernel/rcu_expedited").strip() not in ("0", ""):
        return None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            if any(" - cgroup2 " in line and "favordynmods" in line for line in f):
                return None
    except OSError:
        pass
    which = "with memory or cpu limits " if host.mode == "v1" else ""
    return (f"moving a sandbox {which}into its cgroup waits for an RCU grace period (6-20 ms on some VMs; "
            "corral starts it early): `echo 1 > /sys/kernel/rcu_expedited`, or cgroup2 mounted with "
            "favordynmods, removes the wait")  # fmt: skip


def _ensure_dir(path: str) -> bool:
    try:
        os.mkdir(path)
    except FileExistsError:
        pass
    except OSError:
        return False
    return os.access(path, os.W_OK) and os.access(os.path.join(path, "cgroup.procs"), os.W_OK)


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _write_if_exists(path: str, value: str) -> None:
    try:
        _write(path, value)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EACCES, errno.EPERM):
            raise


def _rmdir_quiet(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass
