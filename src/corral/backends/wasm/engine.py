"""The wasmtime engine, what a module must look like, and the compiled-module cache on disk.

Compiling a large module (CPython is 26 MB of WebAssembly) takes seconds; loading the compiled
form takes a millisecond. Compiled modules are kept in `$XDG_CACHE_HOME/corral/wasm` (default
`~/.cache/corral/wasm`), one file per (module content hash, engine fingerprint).

wasmtime's deserialization trusts its input (a forged file is arbitrary native code), so the cache
is used only when the directory is private: a real directory (not a symlink) owned by this user
with no group or other permissions, inside a parent that only this user (or root) can write. Files
are named by the SHA-256 of the module they were compiled from plus the engine's fingerprint
(wasmtime build and settings), written under a temporary name and renamed into place, and read only
when they are regular files owned by this user and writable by nobody else. When the cache cannot
be made private, modules are compiled in memory every time (correct, just slower).

Hashing a 26 MB module costs ~25 ms, so the hash of a module file is remembered next to the cache,
keyed by its device, inode, size, modification and change times (as git's index does).
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat

from corral.errors import BackendUnavailable, ConfigError, LaunchError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import wasmtime

log = logging.getLogger(__name__)

WASM_MAGIC = b"\0asm"
CORE_MODULE_VERSION = b"\x01\x00\x00\x00"
CACHE_FORMAT = "1"
FIX_INSTALL = "pip install 'corral[wasm]' (wasmtime from PyPI)"


def import_wasmtime() -> None:
    """Raise BackendUnavailable unless wasmtime (with the C API corral needs) can be imported."""
    try:
        import wasmtime
        from wasmtime import _ffi
    except ImportError as exc:
        raise BackendUnavailable("wasm", f"wasmtime is not installed ({exc})", fix=FIX_INSTALL) from None
    except (OSError, RuntimeError) as exc:  # the shared library failed to load, or an unsupported platform
        raise BackendUnavailable("wasm", f"wasmtime cannot load here: {exc}", fix=FIX_INSTALL) from None
    for name in ("wasmtime_store_epoch_deadline_callback", "wasi_config_set_stdin_bytes", "wasmtime_error_new"):
        if not hasattr(_ffi, name):
            raise BackendUnavailable("wasm", f"wasmtime {wasmtime.__name__} lacks {name}", fix=FIX_INSTALL)


def check_header(data: bytes, *, name: str) -> None:
    """Refuse what is not a WebAssembly core module, saying what it is instead."""
    if data[:4] != WASM_MAGIC:
        what = "a script" if data[:2] == b"#!" else "an ELF executable" if data[:4] == b"\x7fELF" else "not WebAssembly"
        raise ConfigError(f"{name} is not a WebAssembly module ({what}: it does not start with \\0asm)", where="wasm")
    if data[4:8] != CORE_MODULE_VERSION:
        if data[6:8] == b"\x01\x00":
            raise ConfigError(
                f"{name} is a WebAssembly component (WASI preview 2); the wasm backend runs core modules "
                "(WASI preview 1)",
                where="wasm",
            )
        raise ConfigError(f"{name}: unsupported WebAssembly version {data[4:8].hex()}", where="wasm")


def read_module(path: str, *, name: str) -> bytes:
    """The binary module at `path` (a `.wat` file is assembled). Raises ConfigError for anything else."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except IsADirectoryError:
        raise ConfigError(f"{name} is a directory, not a WebAssembly module", where="wasm") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {name}: {exc.strerror}", where="wasm") from None
    if path.endswith(".wat") and not data.startswith(WASM_MAGIC):
        import wasmtime

        try:
            return bytes(wasmtime.wat2wasm(data.decode("utf-8", "replace")))
        except wasmtime.WasmtimeError as exc:
            raise ConfigError(f"{name} is not valid WebAssembly text: {_first_line(exc)}", where="wasm") from None
    check_header(data, name=name)
    return data


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class WasmEngine:
    """One wasmtime Engine (epoch interruption on; fuel metering when `fuel`), its modules and cache.

    Modules compiled by an engine belong to it; keep one engine for as long as its modules are used.
    """

    def __init__(self, *, fuel: bool = False, cache_dir: str | None = None, use_cache: bool = True) -> None:
        import_wasmtime()
        import wasmtime
        from wasmtime import _ffi

        config = wasmtime.Config()
        config.epoch_interruption = True
        config.consume_fuel = fuel
        self.fuel = fuel
        self.engine = wasmtime.Engine(config)
        self._modules: dict[str, wasmtime.Module] = {}
        lib = str(_ffi.filename)
        try:
            st = os.stat(lib)
            lib_id = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            lib_id = "unknown"
        from corral.backends.wasm.instrument import VERSION

        settings = f"{CACHE_FORMAT}|{lib}|{lib_id}|epoch|fuel={int(fuel)}|instrument={VERSION}"
        self.fingerprint = hashlib.sha256(settings.encode()).hexdigest()[:16]
        self.cache_dir = _private_cache_dir(cache_dir) if use_cache else None

    # ------------------------------------------------------------------ modules
    def load(self, path: str, *, name: str | None = None, expected_sha256: str | None = None) -> wasmtime.Module:
        """The compiled module for the file at `path`: from memory, from the disk cache, or compiled now.

        With `expected_sha256`, a file with any other content is refused (BackendUnavailable).
        """

        name = name or path
        real = os.path.realpath(path)
        digest = self._remembered_digest(real)
        if digest is not None and (expected_sha256 is None or digest == expected_sha256):
            module = self._modules.get(digest)
            if module is not None:
                return module
            module = self._from_cache(digest)
            if module is not None:
                self._modules[digest] = module
                return module
        key = _stat_key(real)  # before reading: a change while we read makes the next lookup miss
        data = read_module(real, name=name)
        digest = hashlib.sha256(data).hexdigest()
        if expected_sha256 is not None and digest != expected_sha256:
            raise BackendUnavailable(
                "wasm",
                f"{name} does not have the pinned SHA-256 {expected_sha256} (it has {digest}); "
                "it may have been modified or replaced",
                fix="reinstall the package that provides it",
            )
        module = self._modules.get(digest) or self._from_cache(digest)
        if module is None:
            module = self._compile(data, name=name)
            self._to_cache(digest, module)
        self._modules[digest] = module
        self._remember_digest(real, key, digest)
        return module

    def compile_bytes(self, data: bytes, *, name: str = "module") -> wasmtime.Module:
        """Compile an in-memory module (not cached on disk)."""

        check_header(data, name=name)
        return self._compile(data, name=name)

    def _compile(self, data: bytes, *, name: str) -> wasmtime.Module:
        """Validate `data`, add the memory-growth flag (see instrument.py) and compile it."""
        import wasmtime

        from corral.backends.wasm.instrument import instrument

        try:
            wasmtime.Module.validate(self.engine, data)
        except wasmtime.WasmtimeError as exc:
            raise ConfigError(f"{name} is not a valid WebAssembly module: {_first_line(exc)}", where="wasm") from None
        try:
            return wasmtime.Module(self.engine, instrument(data) or data)
        except wasmtime.WasmtimeError as exc:
            raise LaunchError(f"wasmtime could not compile {name}: {_first_line(exc)}") from None

    # ------------------------------------------------------------------ the disk cache
    def cached_path(self, digest: str) -> str | None:
        if self.cache_dir is None:
            return None
        return os.path.join(self.cache_dir, f"{digest}-{self.fingerprint}.cwasm")

    def _from_cache(self, digest: str) -> wasmtime.Module | None:
        import wasmtime

        path = self.cached_path(digest)
        if path is None or not _trusted_file(path):
            return None
        try:
            return wasmtime.Module.deserialize_file(self.engine, path)
        except wasmtime.WasmtimeError as exc:  # another wasmtime build or settings: compile again
            log.info("ignoring compiled module %s: %s", path, _first_line(exc))
            _unlink(path)
            return None

    def _to_cache(self, digest: str, module: wasmtime.Module) -> None:
        path = self.cached_path(digest)
        if path is None:
            return
        try:
            _atomic_write(path, bytes(module.serialize()))
        except OSError as exc:
            log.info("cannot cache compiled module in %s: %s", self.cache_dir, exc)

    def _remembered_digest(self, real: str) -> str | None:
        if self.cache_dir is None:
            return None
        index = self._index_path(real)
        if not _trusted_file(index):
            return None
        try:
            with open(index, encoding="ascii") as f:
                key, digest = f.read().split("\n")[:2]
        except (OSError, ValueError, UnicodeDecodeError):
            return None
        return digest if key == _stat_key(real) and len(digest) == 64 else None

    def _remember_digest(self, real: str, key: str, digest: str) -> None:
        if self.cache_dir is None:
            return
        if key:
            try:
                _atomic_write(self._index_path(real), f"{key}\n{digest}\n".encode("ascii"))
            except OSError:
                pass

    def _index_path(self, real: str) -> str:
        assert self.cache_dir is not None
        return os.path.join(self.cache_dir, "sha256-of-" + hashlib.sha256(real.encode()).hexdigest()[:32])


def default_cache_dir() -> str | None:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    if not base.startswith("/"):
        return None
    return os.path.join(base, "corral", "wasm")


def _private_cache_dir(path: str | None) -> str | None:
    """`path` (default: the XDG one) if it is, or can be made, a directory only this user can use."""
    path = path or default_cache_dir()
    if path is None:
        return None
    uid = os.geteuid()
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
            log.warning("not using the wasm cache %s: not a directory owned by uid %d", path, uid)
            return None
        if st.st_mode & 0o077:
            os.chmod(path, 0o700)
        parent = os.stat(os.path.dirname(path))
        if parent.st_uid not in (uid, 0) or (parent.st_mode & 0o022 and not parent.st_mode & stat.S_ISVTX):
            log.warning("not using the wasm cache %s: its parent can be changed by other users", path)
            return None
    except OSError as exc:
        log.info("no wasm cache at %s: %s", path, exc)
        return None
    return path


def _trusted_file(path: str) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _stat_key(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return ""
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
    except BaseException:
        os.close(fd)
        _unlink(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
