"""`corral image`: images for the docker and gvisor backends, built locally without a registry.

corral image base                      import corral's own image (done on first use anyway)
corral image build [--tag T] [PROG...] a standalone image from this host's programs and Python
"""

from __future__ import annotations

import argparse


def image_command(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="corral image", description="Images for the docker and gvisor backends.")
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("base", help="import corral's own image (an empty root; the host's /usr is mounted at run time)")
    build = sub.add_parser(
        "build",
        help="import a standalone image copied from this host: programs, their libraries, Python's standard library",
    )
    build.add_argument("--tag", default="corral-host:latest", help="image name (default corral-host:latest)")
    build.add_argument("--dir", action="append", default=[], help="also copy this host directory (repeatable)")
    build.add_argument("programs", nargs="*", help="programs to include (default: a shell, coreutils, python3)")
    opts = parser.parse_args(args)

    from corral.backends.engine import connect
    from corral.backends.images import DEFAULT_PROGRAMS, build_base_image, host_rootfs_tar, import_image

    engine = connect("docker")
    if opts.action == "base":
        from corral.policy.model import Policy
        from corral.policy.resolve import resolve

        tag = build_base_image(engine, resolve(Policy(), host_env={}, host_cwd="/"))
        print(f"{tag} is in {engine.describe}")
        return 0
    programs = tuple(opts.programs) or DEFAULT_PROGRAMS
    data = host_rootfs_tar(programs, dirs=opts.dir)
    tag = import_image(engine, data, opts.tag)
    print(f"imported {tag} ({len(data) >> 20} MiB) into {engine.describe}")
    print(f"use it with: corral run --backend docker --image {tag} -- CMD, or [container] image = {tag!r}")
    return 0
