"""The `wasm` backend: WASI (preview 1) modules under wasmtime, in this process.

    engine.py    the wasmtime engine, module checks, the compiled-module cache on disk
    runtime.py   the WASI build of CPython corral runs `python` code with (pinned by hash)
    run.py       one execution: a fresh instance, preopened zones, limits, a Result
    backend.py   WasmBackend and its live sandbox (the contract in corral.backends.base)

Nothing here is imported by `corral run` unless the wasm backend is chosen.
"""
