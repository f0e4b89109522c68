"""The `wasm` backend: run WASI (preview 1) modules, and Python through a WASI build of CPython.

A command is a module, not a process: `argv[0]` names a `.wasm` (or `.wat`) file the sandbox can
see (through a zone, or the read-only system directories), or `python` / `python3` for the pinned
WASI CPython (see runtime.py). What the module sees:

- zones as preopened directories at their mount points (`ro` zones refuse every change: wasmtime
  opens them without write rights), tmpfs zones as private host directories removed at stop, the
  working directory as `.` (WASI has no current directory; relative paths resolve there, and so
  does an absolute path no zone covers, as with `wasmtime run --dir .`);
- a clean environment (the policy's), argv, stdin, stdout and stderr;
- nothing else: no other files, no network (WASI preview 1 has no sockets), no processes.

What cannot be enforced is refused rather than ignored: file size and open files limits and any
network mode but `none` are not in `enforces` (so the policy check refuses them); a CPU limit below
one CPU, a file zone, a read-only zone inside a writable one, and a command that is not a module
raise UnsupportedPolicy or ConfigError with the reason. Two limits hold by construction and are
claimed: a module is one thread that cannot start processes, so any pids limit and any CPU limit of
one CPU or more are met.
"""

from __future__ import annotations

import errno
import os
import posixpath
import shutil
import stat
import tempfile
import threading

from corral.backends.base import Backend, Capabilities, LiveSandbox, effective_timeout, file_error
from corral.backends.outcome import not_started
from corral.errors import (
    BackendUnavailable,
    ConfigError,
    PolicyDenied,
    SandboxFileError,
    SandboxLost,
    UnsupportedPolicy,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from corral.backends.base import EventSink, OutputCallback, Result
    from corral.backends.wasm.engine import WasmEngine
    from corral.backends.wasm.run import Preopen
    from corral.policy.resolve import ResolvedPolicy

ENFORCES = frozenset({
    "fs.isolation", "fs.remap", "fs.tmpfs", "proc.isolation", "net.none",
    "limits.memory", "limits.timeout", "limits.output", "limits.cpus", "limits.pids",
})  # fmt: skip
MODULE_SUFFIXES = (".wasm", ".wat")
PROBE_WAT = """(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "corral\\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 7))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
"""


class WasmBackend(Backend):
    """WASI modules under wasmtime, in this process. `fuel` (instructions' worth of work per
    command) turns on wasmtime's fuel metering, a deterministic CPU budget on top of the time limit."""

    name = "wasm"
    strength = 35

    def __init__(self, *, fuel: int | None = None, cache_dir: str | None = None) -> None:
        if fuel is not None and (isinstance(fuel, bool) or not isinstance(fuel, int) or fuel <= 0):
            raise ConfigError(f"must be a positive whole number, got {fuel!r}", where="fuel")
        self.fuel = fuel
        self._cache_dir = cache_dir
        self._engine: WasmEngine | None = None
        self._lock = threading.Lock()

    @property
    def engine(self) -> WasmEngine:
        with self._lock:
            if self._engine is None:
                from corral.backends.wasm.engine import WasmEngine

                self._engine = WasmEngine(fuel=self.fuel is not None, cache_dir=self._cache_dir)
            return self._engine

    def probe(self) -> Capabilities:
        """Compile and run a small WASI module for real."""
        from corral.backends.wasm.engine import WasmEngine

        try:
            engine = WasmEngine(use_cache=False)
            import wasmtime

            from corral.backends.wasm.run import execute

            module = engine.compile_bytes(bytes(wasmtime.wat2wasm(PROBE_WAT)), name="probe")
            result = execute(engine.engine, module, ["probe"], name="probe", preopens=(), env={}, timeout=20)
        except BackendUnavailable as exc:
            return Capabilities(name=self.name, available=False, strength=self.strength, reason=exc.reason,
                                fix=exc.fix)  # fmt: skip
        except Exception as exc:
            return Capabilities(name=self.name, available=False, strength=self.strength,
                                reason=f"wasmtime failed to run a test module: {exc}")  # fmt: skip
        if not result.ok or result.stdout != b"corral\n":
            why = result.detail or repr(result.stdout)
            return Capabilities(name=self.name, available=False, strength=self.strength,
                                reason=f"the test module did not run as expected: {why}")  # fmt: skip
        from corral.backends.wasm import runtime

        try:
            runtime.python_wasm_path()
            python = f"python: {runtime.describe()}"
        except BackendUnavailable as exc:
            python = f"python: not available ({exc.reason}; fix: {exc.fix})"
        from importlib.metadata import PackageNotFoundError, version

        try:
            wasmtime_version = f"wasmtime {version('wasmtime')}"
        except PackageNotFoundError:
            wasmtime_version = "wasmtime"
        return Capabilities(
            name=self.name, available=True, strength=self.strength, enforces=ENFORCES,
            limits_via="wasmtime (store limits, epoch interruption)",
            notes=(
                f"{wasmtime_version}, in this process; runs WASI preview 1 "
                "modules (argv[0] a .wasm or .wat file) and python, not shell commands",
                python,
                "memory limits the module's linear memory",
                "tmpfs zones are private host directories (their size is not enforced)",
                "pids and cpus (>= 1) limits hold by construction: a module is one thread and starts no processes",
                "no file size or open files limits; network 'none' only (WASI preview 1 has no sockets)",
            ),
        )  # fmt: skip

    def start(self, rp: ResolvedPolicy, *, sandbox_id: str, events: EventSink | None = None) -> LiveSandbox:
        check_policy(rp)
        engine = self.engine
        private: dict[str, str] = {}
        try:
            for zone in rp.zones:
                if zone.mode == "tmpfs":
                    label = zone.mount.strip("/").replace("/", "-")
                    private[zone.mount] = tempfile.mkdtemp(prefix=f"corral-wasm-{label}-")
        except OSError:
            _remove(private)
            raise
        return WasmSandbox(backend=self, engine=engine, rp=rp, sandbox_id=sandbox_id, private=private)


def check_policy(rp: ResolvedPolicy) -> None:
    """Refuse what WASI preopens cannot express, naming each part."""
    problems = []
    if rp.limits.cpus is not None and rp.limits.cpus < 1:
        problems.append(f"limits.cpus = {rp.limits.cpus:g} (a module runs on one thread; "
                        "a fraction of a CPU cannot be enforced)")  # fmt: skip
    for zone in rp.zones:
        if zone.host is not None and not os.path.isdir(zone.host):
            problems.append(f"zone {zone.mount} (a file: WASI can preopen only directories)")
    for inner in rp.zones:
        if inner.mode != "ro":
            continue
        for outer in rp.zones:
            if outer.mode != "ro" and inner.mount.startswith(outer.mount.rstrip("/") + "/"):
                problems.append(f"read-only zone {inner.mount} inside the writable zone {outer.mount} "
                                "(a module could reach it through the outer directory)")  # fmt: skip
    if problems:
        raise UnsupportedPolicy("wasm", tuple(problems))


class WasmSandbox(LiveSandbox):
    """Preopened zones and compiled modules, kept; each exec is a fresh instance in a fresh store."""

    def __init__(self, *, backend: WasmBackend, engine: WasmEngine, rp: ResolvedPolicy, sandbox_id: str,
                 private: dict[str, str]) -> None:  # fmt: skip
        self.backend = backend.name
        self.id = sandbox_id
        self.rp = rp
        self._fuel = backend.fuel
        self._engine = engine
        self._private = private  # tmpfs mount -> private host directory
        self._cancel = threading.Event()
        # Sandbox mount -> (host directory, writable): the zones, tmpfs zones at their private directories.
        self._roots: dict[str, tuple[str, bool]] = {}
        for zone in rp.zones:
            host = private.get(zone.mount) if zone.mode == "tmpfs" else zone.host
            assert host is not None
            self._roots[zone.mount] = (host, zone.mode != "ro")

    # ------------------------------------------------------------------ paths
    def _find(self, path: str) -> tuple[str, str, bool] | None:
        """(host root, path below it, writable) for an absolute sandbox path, or None outside every zone."""
        best = None
        for mount in self._roots:
            if (path == mount or path.startswith(mount.rstrip("/") + "/")) and (best is None or len(mount) > len(best)):
                best = mount
        if best is None:
            return None
        host, writable = self._roots[best]
        return host, path[len(best) :].lstrip("/"), writable

    def _host_path(self, path: str) -> str | None:
        """The host file behind a sandbox path (zones, tmpfs zones, the read-only system directories)."""
        found = self._find(path)
        if found is not None:
            return os.path.join(found[0], found[1]) if found[1] else found[0]
        return self.rp.to_host(path)

    def preopens(self, cwd: str) -> list[Preopen]:
        from corral.backends.wasm.run import Preopen

        out = [Preopen(host, mount, writable) for mount, (host, writable) in self._roots.items()]
        found = self._find(cwd)
        if found is not None:
            host = os.path.join(found[0], found[1]) if found[1] else found[0]
            if os.path.isdir(host):
                out.append(Preopen(host, ".", found[2]))
        return out

    # ------------------------------------------------------------------ commands
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
        from corral.backends.wasm import runtime
        from corral.backends.wasm.run import execute

        self._check_exec(argv)
        cwd = posixpath.normpath(cwd or self.rp.cwd)
        program = argv[0]
        if runtime.is_python(program):
            module = self._engine.load(runtime.python_wasm_path(), name=f"{program} (WASI CPython)",
                                       expected_sha256=runtime.SHA256)  # fmt: skip
        else:
            if not program.endswith(MODULE_SUFFIXES) and "/" not in program:
                raise ConfigError(
                    f"the wasm backend runs WebAssembly modules, not commands: argv[0] must be a .wasm or .wat "
                    f"file, or python/python3 (got {program!r}; there is no shell or PATH)",
                    where="argv[0]",
                )
            inside = posixpath.normpath(posixpath.join(cwd, program))
            host = self._host_path(inside)
            if host is None or not os.path.isfile(host):
                return not_started(argv, 2, "No such file or directory", what="command",
                                   subject=f"{program} (a module the sandbox can see)", output=output)  # fmt: skip
            module = self._engine.load(host, name=program)
        full_env = self._command_env({"PWD": cwd, **(env or {})})
        limits = self.rp.limits
        return execute(
            self._engine.engine, module, argv, name=program, preopens=self.preopens(cwd), env=full_env,
            stdin=stdin, timeout=effective_timeout(timeout, limits.timeout), memory=limits.memory,
            output_limit=limits.output, fuel=self._fuel, on_output=on_output, output=output, cancel=self._cancel,
        )  # fmt: skip

    # ------------------------------------------------------------------ files
    def put_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        dir_fd, name = self._open_dir(path, write=True)
        # Written beside the target, then renamed over it: a failed write leaves the old file whole.
        temp = f".{name}.corral-put-{threading.get_ident()}"
        try:
            try:
                if stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode):
                    raise OSError(errno.ELOOP, "is a symbolic link")
            except FileNotFoundError:
                pass
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600,
                         dir_fd=dir_fd)  # fmt: skip
            try:
                os.fchmod(fd, mode)  # the mode asked for, not what the umask leaves of it
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except BaseException:
                os.unlink(temp, dir_fd=dir_fd)
                raise
        except OSError as exc:
            raise file_error("write", path, exc.errno or errno.EIO, exc.strerror or str(exc)) from None
        finally:
            os.close(dir_fd)

    def get_file(self, path: str, *, max_bytes: int = 64 << 20) -> bytes:
        dir_fd, name = self._open_dir(path, write=False)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
            with os.fdopen(fd, "rb") as f:
                mode = os.fstat(fd).st_mode
                if stat.S_ISDIR(mode):
                    raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
                if not stat.S_ISREG(mode):
                    raise OSError(errno.EINVAL, "not a regular file")
                data = f.read(max_bytes + 1)
        except OSError as exc:
            raise file_error("read", path, exc.errno or errno.EIO, exc.strerror or str(exc)) from None
        finally:
            os.close(dir_fd)
        if len(data) > max_bytes:
            raise SandboxFileError(errno.EFBIG, f"cannot read {path} in the sandbox: larger than {max_bytes} bytes",
                                   path=path)  # fmt: skip
        return data

    def _open_dir(self, path: str, *, write: bool) -> tuple[int, str]:
        """The directory holding `path` below a zone's host directory, opened one component at a
        time without following a link, and the file's name in it."""
        if self._stopped:
            raise SandboxLost(f"sandbox {self.id} was stopped")
        absolute = posixpath.normpath(posixpath.join(self.rp.cwd, path))
        found = self._find(absolute)
        if found is None:
            raise PolicyDenied(f"{path} is outside every zone", rule="zones")
        root, below, writable = found
        verb = "write" if write else "read"
        if write and not writable:
            raise PolicyDenied(f"cannot write {path}: the zone is read-only", rule="zones")
        parts = [p for p in below.split("/") if p]
        if not parts:
            raise SandboxFileError(errno.EISDIR, f"cannot {verb} {path} in the sandbox: it is a directory", path=path)
        dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        for part in parts[:-1]:
            try:
                next_fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=dir_fd)
            except OSError as exc:
                os.close(dir_fd)
                raise file_error(verb, path, exc.errno or errno.EIO, f"{part}: {exc.strerror}") from None
            os.close(dir_fd)
            dir_fd = next_fd
        return dir_fd, parts[-1]

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._cancel.set()
        _remove(self._private)


def _remove(private: dict[str, str]) -> None:
    for path in private.values():
        shutil.rmtree(path, ignore_errors=True)
