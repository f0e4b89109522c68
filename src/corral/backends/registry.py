"""Backend names, how to build each, and how `auto` chooses.

`auto` tries the general-purpose backends from the strongest down and takes the first that works
here; it never picks `process`, and with `min_backend` it refuses rather than go below that
strength. A backend that works is remembered in a small cache file (only success is cached: a
forged entry can only make corral try a backend, and a launch that fails still refuses to run).
"""

from __future__ import annotations

import os
import sys

from corral.errors import BackendUnavailable, ConfigError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from corral.backends.base import Backend, Capabilities

# name -> (module, class, strength). Strength orders isolation, weakest first.
BACKENDS: dict[str, tuple[str, str, int]] = {
    "process": ("corral.backends.process", "ProcessBackend", 0),
    "landlock": ("corral.backends.landlock", "LandlockBackend", 20),
    "namespace": ("corral.backends.namespace.backend", "NamespaceBackend", 30),
    # WASI modules, not shell commands: never chosen by `auto`.
    "wasm": ("corral.backends.wasm.backend", "WasmBackend", 35),
    # Container backends are chosen explicitly (backend = "docker" / "gvisor"), never by `auto`.
    "docker": ("corral.backends.docker", "DockerBackend", 40),
    "gvisor": ("corral.backends.gvisor", "GVisorBackend", 50),
    "microvm": ("corral.backends.microvm.backend", "MicrovmBackend", 60),
}
AUTO_ORDER = ("namespace", "landlock")
PROBE_CACHE_VERSION = "3"  # 2: net.allow joined the namespace and landlock capabilities; 3: and microvm's


def known_backends() -> tuple[str, ...]:
    return tuple(BACKENDS)


def strength_of(name: str) -> int:
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; expected auto or one of {', '.join(BACKENDS)}", where="backend")
    return BACKENDS[name][2]


def create(name: str) -> Backend:
    """A backend instance by name (no probing)."""
    strength_of(name)
    module, cls, _ = BACKENDS[name]
    # __import__ rather than importlib.import_module: importlib (and warnings) cost 0.5 ms a start.
    __import__(module)
    backend: Backend = getattr(sys.modules[module], cls)()
    return backend


def choose(name: str = "auto", *, min_backend: str | None = None, fresh: bool = False) -> tuple[Backend, Capabilities]:
    """The backend to use and what it can do here; raises BackendUnavailable (with every reason) if none fits."""
    floor = strength_of(min_backend) if min_backend else -1
    if name != "auto":
        if strength_of(name) < floor:
            raise ConfigError(f"{name!r} is weaker than the required minimum {min_backend!r}", where="backend")
        backend = create(name)
        caps = probe(backend, fresh=fresh)
        if not caps.available:
            raise BackendUnavailable(name, caps.reason, fix=caps.fix)
        return backend, caps
    if min_backend:
        check_auto_reaches(min_backend)
    reasons: list[str] = []
    for candidate in AUTO_ORDER:
        if strength_of(candidate) < floor:
            continue
        backend = create(candidate)
        caps = probe(backend, fresh=fresh)
        if caps.available:
            return backend, caps
        reasons.append(f"{candidate}: {caps.reason}" + (f" (fix: {caps.fix})" if caps.fix else ""))
    raise BackendUnavailable("auto", f"no sandbox backend works here: {'; '.join(reasons)}")


def probe(backend: Backend, *, fresh: bool = False) -> Capabilities:
    """`backend.probe()`, remembered across runs while the host stays the same."""
    key = _cache_key(backend.name)
    name = f"probe-{backend.name}"
    if not fresh:
        lines = cached_lines(name, key)
        if lines is not None and len(lines) >= 4:
            from corral.backends.base import Capabilities

            enforces = frozenset(x for x in lines[2].split(",") if x)
            return Capabilities(name=lines[0], available=True, strength=int(lines[1]), enforces=enforces,
                                limits_via=lines[3], notes=tuple(lines[4:]))  # fmt: skip
    caps = backend.probe()
    if caps.available:
        remember_lines(name, key, [caps.name, str(caps.strength), ",".join(sorted(caps.enforces)), caps.limits_via,
                                   *caps.notes])  # fmt: skip
    return caps


def _cache_key(name: str) -> str:
    import sys

    from corral import __version__

    parts = [PROBE_CACHE_VERSION, __version__, name, os.uname().release, str(os.getuid()), sys.prefix]
    return "|".join(parts)


def _cache_path(name: str) -> str | None:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    if not base.startswith("/"):
        return None
    return os.path.join(base, "corral", f"{name}.txt")


def cached_lines(name: str, key: str) -> list[str] | None:
    """The lines `remember_lines(name, key, ...)` kept, or None when none were kept under `key`.

    Only what worked is ever kept: a forged entry can make corral try something (a backend, a
    gVisor platform, a bubblewrap it believes newer), never skip a check, and what fails still refuses.
    """
    path = _cache_path(name)
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    return lines[1:] if lines and lines[0] == key else None


def remember_lines(name: str, key: str, lines: list[str]) -> None:
    """Keep `lines` under `key` in the user's cache directory (best effort: without it corral is only slower)."""
    path = _cache_path(name)
    if path is None:
        return
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n".join([key, *lines]) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass


def check_auto_reaches(min_backend: str, *, where: str = "min_backend", option: str = "backend=") -> None:
    """Auto picks only the general-purpose backends: a stronger minimum needs one named (`option`
    is how the caller names one: "--backend " on the command line)."""
    floor = strength_of(min_backend)
    if all(strength_of(name) < floor for name in AUTO_ORDER):
        stronger = [name for name, (_, _, strength) in BACKENDS.items() if strength >= floor]
        raise ConfigError(f"auto picks only among {', '.join(AUTO_ORDER)}, none as strong as {min_backend!r}; "
                          f"name one that is: {option}{' | '.join(stronger)}", where=where)  # fmt: skip
