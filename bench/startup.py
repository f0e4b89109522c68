"""Start-up benchmark: medians over N runs, all measured in this one run.

    python bench/startup.py [--runs 30]

Rows: plain fork+exec of /bin/true (subprocess.run), raw bubblewrap (a typical hand-written
sandbox), corral's one-shot API, an exec in a live corral sandbox, the `corral run` CLI, and a
policy decision. Ratios are against the same run's baselines; targets from the core issue.
Then the WebAssembly rows from bench/wasm.py (cold and warm starts), when wasmtime is installed.
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

import corral
from corral.backends.namespace.launch import find_bwrap
from corral.policy.commands import CommandRules


def median_ms(fn, runs: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm up
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    opts = parser.parse_args()
    runs = max(30, opts.runs)
    work = tempfile.mkdtemp(prefix="corral-bench-")
    os.chdir(work)
    policy = corral.Policy.workspace(work)
    bwrap = find_bwrap().path
    corral_cli = shutil.which("corral") or os.path.join(os.path.dirname(sys.executable), "corral")
    raw = [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--ro-bind", "/usr", "/usr",
           "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
           "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--bind", work, work, "--chdir", work,
           "--", "/bin/true"]  # fmt: skip
    rows: dict[str, float] = {}
    rows["plain fork+exec (subprocess.run /bin/true)"] = median_ms(
        lambda: subprocess.run(["/bin/true"], check=True), runs
    )
    rows["raw bwrap /bin/true"] = median_ms(lambda: subprocess.run(raw, check=True), runs)
    rows["corral.run one-shot (namespace)"] = median_ms(
        lambda: corral.run(["/bin/true"], policy=policy, backend="namespace").check(), runs
    )
    with corral.Sandbox(policy, backend="namespace") as sb:
        rows["Sandbox.exec in a live sandbox"] = median_ms(lambda: sb.exec(["/bin/true"]).check(), runs)
    rows["corral run -- true (CLI)"] = median_ms(
        lambda: subprocess.run([corral_cli, "run", "--", "true"], check=True), runs
    )
    rules = CommandRules(corral.Commands(deny=["rm -rf *", "git push", "curl"], ask=["pip install"]))
    argv = ["git", "status", "--short"]
    n = 20000
    start = time.perf_counter()
    for _ in range(n):
        rules.decide(argv)
    decision_us = (time.perf_counter() - start) / n * 1e6

    width = max(map(len, rows))
    print(f"corral start-up, median of {runs} runs, {os.uname().release}, uid {os.getuid()}")
    for name, value in rows.items():
        print(f"  {name:<{width}}  {value:8.2f} ms")
    print(f"  {'policy decision (4 rules)':<{width}}  {decision_us:8.2f} us")
    plain = rows["plain fork+exec (subprocess.run /bin/true)"]
    raw_ms = rows["raw bwrap /bin/true"]
    checks = [
        ("one-shot API / raw bwrap", rows["corral.run one-shot (namespace)"] / raw_ms, 1.3),
        ("live exec / plain fork+exec", rows["Sandbox.exec in a live sandbox"] / plain, 1.5),
    ]
    print("ratios (target):")
    for name, ratio, target in checks:
        print(f"  {name:<30} {ratio:5.2f}x  (<= {target}x)  {'ok' if ratio <= target else 'MISSED'}")
    cli = rows["corral run -- true (CLI)"]
    print(f"  {'CLI corral run -- true':<30} {cli:5.1f} ms (<= 30 ms)  {'ok' if cli <= 30 else 'MISSED'}")
    print(f"  {'policy decision':<30} {decision_us:5.2f} us (<= 10 us)  {'ok' if decision_us <= 10 else 'MISSED'}")
    shutil.rmtree(work, ignore_errors=True)
    wasm_rows(runs)
    return 0


def wasm_rows(runs: int) -> None:
    """bench/wasm.py, beside this file."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wasm.py")
    spec = importlib.util.spec_from_file_location("corral_bench_wasm", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.report(runs)


if __name__ == "__main__":
    sys.exit(main())
