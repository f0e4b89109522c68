"""One execution of a WASI (preview 1) module: a fresh store and instance, preopened zones, limits.

How each limit is held:

- time: epoch interruption. A ticker thread advances the engine's epoch every `TICK` seconds
  while the module runs; at every tick wasmtime calls back into corral, which traps the module
  once the deadline has passed (a CPU spin ends within a tick). The one WASI call that can block
  for long, `poll_oneoff` (sleep, select), is replaced by corral's own, which sleeps no further
  than the deadline. Standard input is bytes in memory or a regular file, so reads never block.
- memory: wasmtime's store limits cap the module's linear memories and tables; a growth past
  the cap fails inside the module (malloc returns NULL, Python raises MemoryError).
- output: stdout and stderr go through callbacks that count bytes; past the limit nothing more is
  kept and the module is trapped at the next tick.
- fuel (optional, per engine): wasmtime counts executed instructions and traps when they run out.
"""

from __future__ import annotations

import os
import struct
import threading
import time

from corral.backends.base import Result
from corral.errors import ConfigError, LaunchError
from corral.units import format_duration, format_size

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    import wasmtime

    from corral.backends.base import OutputCallback, Reason

TICK = 0.01  # seconds between epoch ticks
DEFAULT_CAPTURE = 64 << 20  # bytes kept per stream when there is no output limit
EXIT_TRAP = 134  # what `wasmtime run` exits with when a module traps (128 + SIGABRT)
EXIT_STOPPED = 137  # a module corral stopped (time, output, fuel): what a SIGKILL would give
WASI = "wasi_snapshot_preview1"

# WASI preview 1 errno values.
_EINVAL = 28
_EFAULT = 21
_ENOTSUP = 58
_SUBSCRIPTION = 48
_EVENT = 32


class Preopen:
    """A host directory the module sees at `guest` (read-only unless `writable`)."""

    __slots__ = ("guest", "host", "writable")

    def __init__(self, host: str, guest: str, writable: bool) -> None:
        self.host = host
        self.guest = guest
        self.writable = writable

    def __repr__(self) -> str:
        return f"Preopen({self.host!r}, {self.guest!r}, {'rw' if self.writable else 'ro'})"


class _State:
    """What the callbacks of one execution share: the deadline, the output and why it stopped."""

    def __init__(
        self,
        *,
        deadline: float | None,
        output_limit: int | None,
        on_output: OutputCallback | None,
        output: tuple[int, int] | None,
        cancel: threading.Event,
    ) -> None:
        self.deadline = deadline
        self.output_limit = output_limit
        self.on_output = on_output
        self.output_fds = output
        self.capture = output_limit if output_limit is not None else DEFAULT_CAPTURE
        self.data = {"stdout": bytearray(), "stderr": bytearray()}
        self.truncated = {"stdout": False, "stderr": False}
        self.total = 0
        self.timed_out = False
        self.output_exceeded = False
        self.cancel = cancel  # set by LiveSandbox.stop() (shared) ...
        self.wake = threading.Event()  # ... and this one only for this execution

    def should_stop(self) -> bool:
        if self.output_exceeded or self.cancel.is_set():
            return True
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.timed_out = True
            return True
        return False

    def write(self, name: str, chunk: bytes) -> None:
        before = self.total
        self.total += len(chunk)
        limit = self.output_limit
        visible = chunk if limit is None else chunk[: max(0, limit - before)]
        if self.output_fds is None:
            room = self.capture - len(self.data[name])
            if room > 0:
                self.data[name] += visible[:room]
            if len(visible) < len(chunk) or len(visible) > room:
                self.truncated[name] = True
        elif visible:  # straight to the caller's descriptors, as a process would write them
            _write_all(self.output_fds[0 if name == "stdout" else 1], visible)
        if self.on_output is not None and visible and self.output_fds is None:
            try:
                self.on_output(name, visible)
            except Exception:  # a broken consumer must not break the module's write
                pass
        if limit is not None and self.total > limit and not self.output_exceeded:
            self.output_exceeded = True
            self.wake.set()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError:
        pass


def execute(
    engine: wasmtime.Engine,
    module: wasmtime.Module,
    argv: Sequence[str],
    *,
    name: str,
    preopens: Sequence[Preopen],
    env: Mapping[str, str],
    stdin: bytes | int | None = None,
    timeout: float | None = None,
    memory: int | None = None,
    output_limit: int | None = None,
    fuel: int | None = None,
    on_output: OutputCallback | None = None,
    output: tuple[int, int] | None = None,
    cancel: threading.Event | None = None,
) -> Result:
    """Instantiate `module` afresh and run its `_start` with `argv`; never raises for what the module does."""
    import wasmtime

    started = time.monotonic()
    deadline = None if timeout is None else started + timeout
    state = _State(deadline=deadline, output_limit=output_limit, on_output=on_output, output=output,
                   cancel=cancel or threading.Event())  # fmt: skip
    if not any(e.name == "_start" for e in module.exports):
        raise ConfigError(f"{name} has no _start function: it is a library (reactor), not a WASI command",
                          where="wasm")  # fmt: skip

    store = wasmtime.Store(engine)
    if memory is not None:
        store.set_limits(memory_size=memory)
    if fuel is not None:
        store.set_fuel(fuel)
    store.set_epoch_deadline(1)
    callback, finalizer = _epoch_callback(state)
    from wasmtime import _ffi

    _ffi.wasmtime_store_epoch_deadline_callback(store.ptr(), callback, None, finalizer)

    wasi = wasmtime.WasiConfig()
    wasi.argv = list(argv)
    wasi.env = sorted(env.items())
    _set_stdin(wasi, stdin, deadline)
    wasi.stdout_custom = lambda chunk: state.write("stdout", chunk)
    wasi.stderr_custom = lambda chunk: state.write("stderr", chunk)
    for p in preopens:
        try:
            wasi.preopen_dir(p.host, p.guest, p.writable)
        except wasmtime.WasmtimeError as exc:
            raise LaunchError(f"cannot open {p.host} for the module: {exc}") from None
    store.set_wasi(wasi)

    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    linker.allow_shadowing = True
    i32 = wasmtime.ValType.i32()
    linker.define_func(WASI, "poll_oneoff", wasmtime.FuncType([i32, i32, i32, i32], [i32]),
                       _poll_oneoff(state), access_caller=True)  # fmt: skip

    try:
        instance = linker.instantiate(store, module)
    except wasmtime.WasmtimeError as exc:
        message = str(exc)
        if "unknown import" in message:
            raise ConfigError(f"{name} needs imports that WASI preview 1 does not provide: "
                              f"{_first_line(message)}", where="wasm") from None  # fmt: skip
        if memory is not None and ("memory" in message and ("limit" in message or "minimum" in message)):
            return _stopped(argv, "memory", f"killed: the module needs more than the memory limit "
                            f"{format_size(memory)} to start", state, started, peak=None)  # fmt: skip
        return _trapped(argv, message, state, started, peak=None)

    ticker_done = threading.Event()
    ticker = threading.Thread(target=_tick, args=(engine, state, ticker_done), name="corral-wasm-epoch", daemon=True)
    ticker.start()
    code: int | None = None
    trap: str | None = None
    trap_code: object = None
    try:
        start = instance.exports(store)["_start"]
        assert isinstance(start, wasmtime.Func)
        start(store)
        code = 0
    except wasmtime.ExitTrap as exc:
        code = exc.code
    except wasmtime.Trap as exc:
        trap, trap_code = str(exc), exc.trap_code
    except wasmtime.WasmtimeError as exc:
        trap = str(exc)
    finally:
        ticker_done.set()
        state.wake.set()
        ticker.join()
    peak = _memory_size(instance, store)
    if state.output_exceeded:
        return _stopped(argv, "output", f"killed: output limit {format_size(output_limit or 0)} exceeded",
                        state, started, peak)  # fmt: skip
    if state.timed_out:  # trapped at a tick, or woken from a sleep by the deadline
        return _stopped(argv, "timeout", f"timed out after {format_duration(timeout or 0)}", state, started, peak)
    if code is not None:
        if code != 0 and memory is not None and _grow_failed(instance, store):
            return _result(argv, code, "memory", f"memory limit {format_size(memory)} reached (exit status {code})",
                           state, started, peak)  # fmt: skip
        return _result(argv, code, "exited", "" if code == 0 else f"exit status {code}", state, started, peak)
    assert trap is not None
    if state.cancel.is_set():
        return _stopped(argv, "signal", "stopped: the sandbox was stopped", state, started, peak)
    if trap_code is not None and getattr(trap_code, "name", "") == "OUT_OF_FUEL":
        return _stopped(argv, "timeout", f"ran out of fuel ({fuel} units)", state, started, peak)
    if memory is not None and _grow_failed(instance, store):
        return _stopped(argv, "memory", f"killed: memory limit {format_size(memory)} reached, then the module "
                        f"trapped: {_first_line(trap)}", state, started, peak)  # fmt: skip
    return _trapped(argv, trap, state, started, peak)


def _first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0].strip() if lines else "error"


def _result(argv: Sequence[str], code: int, reason: Reason, detail: str, state: _State, started: float,
            peak: int | None) -> Result:  # fmt: skip
    return Result(
        argv=argv, returncode=code, reason=reason, detail=detail,
        stdout=bytes(state.data["stdout"]), stderr=bytes(state.data["stderr"]),
        stdout_truncated=state.truncated["stdout"], stderr_truncated=state.truncated["stderr"],
        wall_time=time.monotonic() - started, peak_memory=peak,
    )  # fmt: skip


def _stopped(argv: Sequence[str], reason: Reason, detail: str, state: _State, started: float,
             peak: int | None) -> Result:  # fmt: skip
    return _result(argv, EXIT_STOPPED, reason, detail, state, started, peak)


def _trapped(argv: Sequence[str], message: str, state: _State, started: float, peak: int | None) -> Result:
    # The whole trap message (with its wasm backtrace) goes to stderr; the detail keeps its cause.
    text = message.strip()
    state.write("stderr", f"corral: the module trapped: {text}\n".encode())
    return _result(argv, EXIT_TRAP, "trap", f"trapped: {trap_cause(text)}", state, started, peak)


def trap_cause(text: str) -> str:
    """The line of a wasmtime error that says what went wrong (not the backtrace)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("wasm trap:"):
            return line
    if "Caused by:" in lines:
        cause = lines[lines.index("Caused by:") + 1 :]
        if cause:
            return cause[0].split(": ", 1)[1] if cause[0][:1].isdigit() and ": " in cause[0] else cause[0]
    return lines[0] if lines else "error"


def _memory_size(instance: wasmtime.Instance, store: wasmtime.Store) -> int | None:
    import wasmtime

    memory = instance.exports(store).get("memory")
    return memory.data_len(store) if isinstance(memory, wasmtime.Memory) else None


def _grow_failed(instance: wasmtime.Instance, store: wasmtime.Store) -> bool:
    """Whether a memory growth failed: corral's instrumentation exports a flag for it."""
    import wasmtime

    from corral.backends.wasm.instrument import GROW_FAILED_EXPORT

    flag = instance.exports(store).get(GROW_FAILED_EXPORT)
    return isinstance(flag, wasmtime.Global) and bool(flag.value(store))


def _tick(engine: wasmtime.Engine, state: _State, done: threading.Event) -> None:
    while not done.is_set():
        engine.increment_epoch()
        if state.should_stop():
            state.wake.set()
        done.wait(TICK)


def _epoch_callback(state: _State) -> tuple[object, object]:
    """The per-tick check: trap once the execution must stop, otherwise continue for one more tick.

    Returns the callback (kept alive by `state`) and a finalizer that does nothing (shared: wasmtime
    may call it whenever the store is dropped)."""
    global _NO_FINALIZER
    from wasmtime import _bindings, _ffi

    argtypes = _bindings._wasmtime_store_epoch_deadline_callback.argtypes
    callback_type = argtypes[1]
    if _NO_FINALIZER is None:
        _NO_FINALIZER = argtypes[3](lambda data: None)

    def check(context: object, data: object, delta: object, kind: object) -> int:
        try:
            if state.should_stop():
                error = _ffi.wasmtime_error_new(b"corral: execution stopped")
                import ctypes

                return ctypes.cast(error, ctypes.c_void_p).value or 0
            delta[0] = 1  # type: ignore[index]
            kind[0] = 0  # type: ignore[index]  # WASMTIME_UPDATE_DEADLINE_CONTINUE
            return 0
        except BaseException:  # never let an exception cross into wasmtime
            return 0

    callback: object = callback_type(check)
    state.keepalive = callback  # type: ignore[attr-defined]
    return callback, _NO_FINALIZER


_NO_FINALIZER: object = None  # a constant, created on first use (ctypes callbacks must outlive their callers)


def _set_stdin(wasi: wasmtime.WasiConfig, stdin: bytes | int | None, deadline: float | None) -> None:
    """Bytes, or a host descriptor: a regular file is opened by path; a pipe is read now (to EOF or the
    deadline); a terminal gives nothing (a WASI read from it could not be interrupted)."""
    import ctypes
    import stat

    from wasmtime import _ffi

    if isinstance(stdin, int):
        st = os.fstat(stdin)
        if stat.S_ISREG(st.st_mode):
            wasi.stdin_file = f"/proc/self/fd/{stdin}"
            return
        stdin = b"" if os.isatty(stdin) else _read_to_eof(stdin, deadline)
    data = stdin or b""
    vec = _ffi.wasm_byte_vec_t()
    buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data) if data else None
    _ffi.wasm_byte_vec_new(ctypes.byref(vec), len(data), buffer)
    _ffi.wasi_config_set_stdin_bytes(wasi.ptr(), ctypes.byref(vec))


def _read_to_eof(fd: int, deadline: float | None) -> bytes:
    import select

    chunks = []
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP)
    while True:
        wait = -1 if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
        if not poller.poll(wait):
            break  # the deadline passed: the module starts with what arrived
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _poll_oneoff(state: _State) -> Callable[..., int]:
    """WASI `poll_oneoff` that never sleeps past the deadline (and wakes when the execution must stop).

    Clock subscriptions sleep; fd subscriptions (stdin is in memory, output goes to callbacks, files
    are always ready) complete at once, as wasmtime's own implementation does for files.
    """

    def poll_oneoff(caller: wasmtime.Caller, in_ptr: int, out_ptr: int, nsubs: int, nevents_ptr: int) -> int:
        import wasmtime

        memory = caller.get("memory")
        if not isinstance(memory, wasmtime.Memory):
            return _ENOTSUP
        in_ptr, out_ptr, nevents_ptr = in_ptr & 0xFFFFFFFF, out_ptr & 0xFFFFFFFF, nevents_ptr & 0xFFFFFFFF
        nsubs &= 0xFFFFFFFF
        size = memory.data_len(caller)
        if nsubs == 0:
            return _EINVAL
        if in_ptr + nsubs * _SUBSCRIPTION > size or out_ptr + nsubs * _EVENT > size or nevents_ptr + 4 > size:
            return _EFAULT
        raw = bytes(memory.read(caller, in_ptr, in_ptr + nsubs * _SUBSCRIPTION))
        now_mono = time.monotonic_ns()
        ready: list[tuple[int, int]] = []  # (userdata, type)
        clocks: list[tuple[int, int]] = []  # (wake at, monotonic ns; userdata)
        for i in range(nsubs):
            userdata, tag = struct.unpack_from("<QB", raw, i * _SUBSCRIPTION)
            if tag == 0:  # clock
                clock_id, timeout, _precision, flags = struct.unpack_from("<IQQH", raw, i * _SUBSCRIPTION + 16)
                if flags & 1:  # absolute time on clock_id
                    now = time.time_ns() if clock_id == 0 else now_mono
                    wake = now_mono + max(0, timeout - now)
                else:
                    wake = now_mono + timeout
                clocks.append((wake, userdata))
            elif tag in (1, 2):  # fd_read, fd_write: ready now
                ready.append((userdata, tag))
            else:
                return _EINVAL
        if not ready and clocks:
            wake = min(w for w, _ in clocks)
            while True:
                remaining = (wake - time.monotonic_ns()) / 1e9
                if remaining <= 0 or state.should_stop():
                    break  # on a stop, the next epoch check traps the module
                state.wake.wait(min(remaining, 0.05))
            now_mono = time.monotonic_ns()
            ready = [(userdata, 0) for w, userdata in clocks if w <= now_mono] or [(clocks[0][1], 0)]
        events = bytearray()
        for userdata, kind in ready:
            event = bytearray(_EVENT)
            struct.pack_into("<QHB", event, 0, userdata, 0, kind)
            events += event
        memory.write(caller, bytes(events), out_ptr)
        memory.write(caller, struct.pack("<I", len(ready)), nevents_ptr)
        return 0

    return poll_oneoff
