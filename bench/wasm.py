"""WebAssembly start-up: cold (first compile) and warm (compiled module cached) starts.

    python bench/wasm.py [--runs 20]      (also run at the end of bench/startup.py)

Rows, for a WASI hello (WAT) and for `python -c pass` under the pinned WASI CPython:
- cold: a new engine with an empty cache: validate, instrument, compile, write the cache, run;
- warm, new engine: what a new process pays once wasmtime is imported (stat-keyed hash lookup,
  deserialize the cached module, instantiate, run);
- warm, live sandbox: an exec in a live wasm sandbox (module in memory: instantiate and run);
- CLI: `corral run --backend wasm -- hello.wat` and `corral run-code -c pass`, whole processes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HELLO = """(module
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hello\\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16)) (i32.store (i32.const 4) (i32.const 6))
    (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
"""


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def median_ms(fn, runs: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    return statistics.median(timed(fn) for _ in range(runs))


def rows(runs: int) -> list[tuple[str, float]]:
    import corral
    from corral.backends.wasm import runtime
    from corral.backends.wasm.engine import WasmEngine
    from corral.backends.wasm.run import execute
    from corral.policy.resolve import resolve

    work = tempfile.mkdtemp(prefix="corral-bench-wasm-")
    os.chdir(work)  # the caller's directory may be gone (bench/startup.py removes its own)
    cache = os.path.join(work, "corral", "wasm")  # where the CLI looks with XDG_CACHE_HOME=work
    hello = os.path.join(work, "hello.wat")
    with open(hello, "w") as f:
        f.write(HELLO)
    programs = [("WASI hello", hello, ["hello"], None)]
    try:
        programs.append(("python -c pass", runtime.python_wasm_path(), ["python", "-c", "pass"], runtime.SHA256))
    except corral.BackendUnavailable as exc:
        print(f"  (no WASI CPython: {exc.reason})")
    out: list[tuple[str, float]] = []
    for label, path, argv, sha in programs:

        def start(path: str = path, argv: list[str] = argv, sha: str | None = sha, label: str = label) -> None:
            engine = WasmEngine(cache_dir=cache)
            module = engine.load(path, expected_sha256=sha)
            r = execute(engine.engine, module, argv, name=label, preopens=(), env={})
            assert r.ok, r

        shutil.rmtree(cache, ignore_errors=True)
        out.append((f"{label}: cold (compile + cache + run)", timed(start)))
        out.append((f"{label}: warm, new engine (cache + run)", median_ms(start, runs)))
    policy = corral.Policy.workspace(work)
    rp = resolve(policy)
    from corral.backends.wasm.backend import WasmBackend

    backend = WasmBackend(cache_dir=cache)
    live = backend.start(rp, sandbox_id="bench")
    try:
        out.append(("WASI hello: exec in a live sandbox", median_ms(lambda: live.exec([hello]).check(), runs)))
        if len(programs) > 1:
            out.append(("python -c pass: exec in a live sandbox",
                        median_ms(lambda: live.exec(["python", "-c", "pass"]).check(), runs)))  # fmt: skip
    finally:
        live.stop()
    cli = [sys.executable, "-m", "corral"]
    env = {**os.environ, "XDG_CACHE_HOME": work}
    runs_cli = max(5, runs // 2)
    out.append(("CLI: corral run --backend wasm -- hello.wat", median_ms(
        lambda: subprocess.run([*cli, "run", "--backend", "wasm", "--", hello], cwd=work, env=env, check=True,
                               capture_output=True), runs_cli)))  # fmt: skip
    if len(programs) > 1:
        out.append(("CLI: corral run-code -c pass", median_ms(
            lambda: subprocess.run([*cli, "run-code", "--backend", "wasm", "-c", "pass"], cwd=work, env=env,
                                   check=True, capture_output=True), runs_cli)))  # fmt: skip
    out.append(("CLI: python -c 'import wasmtime' (floor)", median_ms(
        lambda: subprocess.run([sys.executable, "-c", "import wasmtime"], check=True), runs_cli)))  # fmt: skip
    os.chdir(tempfile.gettempdir())
    shutil.rmtree(work, ignore_errors=True)
    return out


def report(runs: int) -> None:
    try:
        import wasmtime  # noqa: F401
    except ImportError:
        print("wasm: skipped (wasmtime is not installed: pip install 'corral[wasm]')")
        return
    measured = rows(runs)
    width = max(len(name) for name, _ in measured)
    print(f"wasm start-up (cold: one run; warm: median of {runs}), {os.uname().release}")
    for name, value in measured:
        print(f"  {name:<{width}}  {value:9.2f} ms")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    report(max(5, parser.parse_args().runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
