"""Container backends' start-up: docker and gvisor, one-shot and live exec, beside their baselines.

    python bench/containers.py [--runs 10]      (also run at the end of bench/startup.py)

Rows per backend that works here (an engine through DOCKER_HOST or the default socket; runsc):
- docker: the engine alone starting and removing a container (`docker run --rm`, through the same
  Python client) and its exec API in a running container, against corral's one-shot `run` and
  an exec in a live corral sandbox (the agent inside the container);
- gvisor: `runsc run` of a minimal bundle (/bin/true, the host's /usr), against corral's one-shot
  and live exec with runsc directly.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import corral
from corral.backends import registry


def median_ms(fn: Callable[[], object], runs: int) -> float:
    fn()  # warm up
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def docker_rows(policy: corral.Policy, runs: int) -> dict[str, float]:
    import docker  # type: ignore[import-untyped]

    from corral.backends.engine import connect
    from corral.backends.images import build_base_image
    from corral.policy.resolve import resolve

    engine = connect("docker")
    image = build_base_image(engine, resolve(policy))
    client = docker.DockerClient(base_url=engine.url)
    usr = docker.types.Mount("/usr", "/usr", type="bind", read_only=True)
    rows: dict[str, float] = {}
    rows["docker: engine alone, run --rm /bin/true"] = median_ms(
        lambda: client.containers.run(image, ["/bin/true"], remove=True, network_mode="none", mounts=[usr]), runs
    )
    keeper = client.containers.run(image, ["/bin/sleep", "infinity"], detach=True, network_mode="none", mounts=[usr])
    try:
        rows["docker: engine alone, exec API /bin/true"] = median_ms(lambda: keeper.exec_run(["/bin/true"]), runs)
    finally:
        keeper.remove(force=True)
    rows["docker: corral.run one-shot"] = median_ms(
        lambda: corral.run(["/bin/true"], policy=policy, backend="docker").check(), runs
    )
    with corral.Sandbox(policy, backend="docker") as sb:
        rows["docker: Sandbox.exec in a live sandbox"] = median_ms(lambda: sb.exec(["/bin/true"]).check(), runs * 3)
    client.close()
    engine.close()
    return rows


def gvisor_rows(policy: corral.Policy, runs: int) -> dict[str, float]:
    from corral.backends.gvisor import GVisorBackend

    backend = GVisorBackend()
    runsc, platform = backend.runsc, backend.platform()
    bundle = tempfile.mkdtemp(prefix="corral-bench-runsc-")
    rootfs = os.path.join(bundle, "rootfs")
    for d in ("usr", "proc", "dev", "tmp"):
        os.makedirs(os.path.join(rootfs, d))
    for link in ("bin", "lib", "lib64", "sbin"):
        if os.path.islink(f"/{link}"):
            os.symlink(os.readlink(f"/{link}"), os.path.join(rootfs, link))
    subprocess.run([runsc.path, "spec", "--", "/bin/true"], cwd=bundle, check=True)
    with open(os.path.join(bundle, "config.json")) as f:
        config = json.load(f)
    config["mounts"].append({"destination": "/usr", "type": "bind", "source": "/usr", "options": ["rbind", "ro"]})
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(config, f)
    state = os.path.join(bundle, "state")
    counter = iter(range(1_000_000))
    rows: dict[str, float] = {}

    def raw() -> None:
        argv = [runsc.path, "--root", state, "--platform", platform, "--network", "none", "run", "--bundle", bundle,
                f"bench-{next(counter)}"]  # fmt: skip
        subprocess.run(argv, check=True)

    try:
        rows[f"gvisor: runsc run alone, /bin/true ({platform})"] = median_ms(raw, runs)
    finally:
        shutil.rmtree(bundle, ignore_errors=True)
    rows["gvisor: corral.run one-shot"] = median_ms(
        lambda: corral.run(["/bin/true"], policy=policy, backend="gvisor").check(), runs
    )
    with corral.Sandbox(policy, backend="gvisor") as sb:
        rows["gvisor: Sandbox.exec in a live sandbox"] = median_ms(lambda: sb.exec(["/bin/true"]).check(), runs * 3)
    return rows


def report(runs: int) -> None:
    runs = max(10, runs // 3)
    work = tempfile.mkdtemp(prefix="corral-bench-")
    policy = corral.Policy.workspace(work)
    rows: dict[str, float] = {}
    unavailable: dict[str, str] = {}
    for name, measure in (("docker", docker_rows), ("gvisor", gvisor_rows)):
        caps = registry.probe(registry.create(name))
        if not caps.available:
            unavailable[name] = f"{caps.reason} (fix: {caps.fix})"
            continue
        try:
            rows.update(measure(policy, runs))
        except corral.CorralError as exc:  # it worked once (the probe is remembered) but not now: a daemon stopped
            unavailable[name] = str(exc)
    shutil.rmtree(work, ignore_errors=True)
    print(f"container backends, median of {runs} runs ({runs * 3} for live exec)")
    width = max((len(name) for name in rows), default=0)
    for name, value in rows.items():
        print(f"  {name:<{width}}  {value:8.2f} ms")
    for name, why in unavailable.items():
        print(f"  {name}: not measured: {why}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    report(parser.parse_args().runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
