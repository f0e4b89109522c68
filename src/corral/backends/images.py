"""Images for the container backends, without a registry.

corral's own image (`corral-base:<hash>`) is a root of empty directories and the host's top-level
symlinks (`/bin -> usr/bin` on a merged-/usr host): a few kilobytes, imported into the engine with
`docker import` (the Engine API's image create from a tar stream) the first time it is needed.
The system itself comes from the host's `/usr`, `/bin`, `/lib*` mounted read-only at run time, so
a sandbox sees the same system as under the namespace backend, and nothing is downloaded.

`host_rootfs_tar` assembles a standalone root filesystem from the host's own programs, their
libraries and Python's standard library (`corral image build` imports it): an image with no
registry behind it, for a machine that has none.

A named image (`[container] image = "..."`, `--image`) is used as it is: it must already be in
the engine (`docker pull`, `docker load`, `docker import`, `docker build`) unless `auto_pull` is
set, in which case the engine pulls it.
"""

from __future__ import annotations

import hashlib
import io
import tarfile

from corral.errors import ConfigError, LaunchError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from corral.backends.engine import Engine
    from corral.backends.oci import Skeleton
    from corral.policy.resolve import ResolvedPolicy

BASE_REPOSITORY = "corral-base"
IMAGE_FORMAT = "2"  # bump when the skeleton's shape changes


def base_skeleton(rp: ResolvedPolicy) -> Skeleton:
    from corral.backends.oci import skeleton

    return skeleton(rp, ())


def base_tag(skel: Skeleton) -> str:
    """`corral-base:<hash of the layout>`: a host with another layout gets another image."""
    digest = hashlib.sha256(repr((IMAGE_FORMAT, skel.dirs, skel.symlinks)).encode()).hexdigest()[:12]
    return f"{BASE_REPOSITORY}:{digest}"


def skeleton_tar(skel: Skeleton) -> bytes:
    """A tar of the skeleton (root-owned, /tmp sticky), deterministic so its import is repeatable."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        root = tarfile.TarInfo(".")
        root.type = tarfile.DIRTYPE
        root.mode = 0o755
        tar.addfile(root)
        for d in skel.dirs:
            info = tarfile.TarInfo(d.lstrip("/"))
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if d in ("/tmp", "/var/tmp") else 0o755
            tar.addfile(info)
        for path, target in skel.symlinks:
            info = tarfile.TarInfo(path.lstrip("/"))
            info.type = tarfile.SYMTYPE
            info.linkname = target
            info.mode = 0o777
            tar.addfile(info)
        for path, content in skel.files:
            info = tarfile.TarInfo(path.lstrip("/"))
            info.size = len(content)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def has_image(engine: Engine, name: str) -> bool:
    import docker  # type: ignore[import-untyped]

    try:
        engine.api.inspect_image(name)
    except docker.errors.ImageNotFound:
        return False
    except docker.errors.NotFound:
        return False
    return True


def build_base_image(engine: Engine, rp: ResolvedPolicy) -> str:
    """Import corral's own image into the engine (idempotent); returns its tag."""
    skel = base_skeleton(rp)
    tag = base_tag(skel)
    if has_image(engine, tag):
        return tag
    import_image(engine, skeleton_tar(skel), tag, changes=['LABEL corral.image="base"'])
    return tag


def ensure_image(engine: Engine, rp: ResolvedPolicy) -> tuple[str, bool]:
    """The image to run and whether the host's system is mounted into it (corral's own image)."""
    container = rp.policy.container
    if container.image is None:
        return build_base_image(engine, rp), True
    name = container.image
    if has_image(engine, name):
        return name, False
    if not container.auto_pull:
        raise ConfigError(
            f"image {name!r} is not in the engine ({engine.describe}); pull or load it first "
            f"(docker pull {name}, docker load -i FILE, docker import ROOTFS.tar {name}), or set auto_pull = true",
            where="container.image",
        )
    repository, tag = _split(name)
    try:
        engine.api.pull(repository, tag=tag)
    except Exception as exc:
        raise LaunchError(f"could not pull {name}: {exc}") from exc
    return name, False


def _split(name: str) -> tuple[str, str]:
    if "@" in name:
        repository, _, digest = name.partition("@")
        return repository, digest
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        repository, _, tag = name.rpartition(":")
        return repository, tag
    return name, "latest"


# ------------------------------------------------------------------ standalone images from host files
DEFAULT_PROGRAMS = (
    "sh", "bash", "env", "cat", "echo", "ls", "cp", "mv", "rm", "mkdir", "touch", "head", "tail", "grep", "sed",
    "sort", "wc", "id", "sleep", "yes", "true", "false", "test", "python3",
)  # fmt: skip
_SKIP_DIRS = ("__pycache__", "test", "tests", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3")


def host_rootfs_tar(programs: Sequence[str] = DEFAULT_PROGRAMS, *, dirs: Sequence[str] = ()) -> bytes:
    """A standalone root filesystem copied from this host: each program (looked up in PATH), the
    shared libraries it loads (as `ldd` says), the host's top-level symlinks (`/bin -> usr/bin`),
    the standard library of the host's python3 when python3 is among the programs, and `dirs`.

    Missing programs are skipped; the result is deterministic for a given host.
    """
    import os
    import shutil

    paths: list[str] = []
    for program in programs:
        found = shutil.which(program, path="/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
        if found is None:
            continue
        paths.append(found)
        paths.extend(_shared_libraries(found))
        if os.path.basename(os.path.realpath(found)).startswith("python3"):
            stdlib = _python_stdlib(os.path.realpath(found))
            if stdlib:
                paths.append(stdlib)
                dynload = os.path.join(stdlib, "lib-dynload")
                if os.path.isdir(dynload):  # C extensions load libraries of their own (libffi, ...)
                    modules = [os.path.join(dynload, n) for n in sorted(os.listdir(dynload)) if n.endswith(".so")]
                    paths.extend(_shared_libraries(*modules))
    paths.extend(dirs)
    if os.path.isfile("/etc/ld.so.cache"):
        paths.append("/etc/ld.so.cache")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        seen: set[str] = set()
        root = tarfile.TarInfo(".")
        root.type = tarfile.DIRTYPE
        root.mode = 0o755
        tar.addfile(root)
        for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(top):
                _add(tar, top, seen, recurse=False)
        for d in ("/tmp", "/etc", "/proc", "/dev", "/sys", "/home", "/root", "/run", "/var/tmp"):
            info = tarfile.TarInfo(d.lstrip("/"))
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if d.endswith("tmp") else 0o755
            tar.addfile(info)
            seen.add(f"w:{d}")
        for path in paths:
            _add(tar, path, seen)
    return buf.getvalue()


def import_image(engine: Engine, data: bytes, tag: str, *, changes: Sequence[str] = ()) -> str:
    """`docker import` of a root filesystem tar under `tag` (NAME[:VERSION]); returns the full tag.

    The image is tagged again by its id afterwards: Podman's compatible API ignores the tag of an
    import (it names the image NAME:latest)."""
    import re

    repository, _, version = tag.partition(":")
    version = version or "latest"
    full = f"{repository}:{version}"
    try:
        reply = engine.api.import_image_from_data(data, repository=repository, tag=version, changes=list(changes))
    except Exception as exc:
        raise LaunchError(f"could not import {full} into the engine: {exc}") from exc
    if not has_image(engine, full):
        found = re.findall(r"sha256:[0-9a-f]{64}", str(reply))
        if found:
            try:
                engine.api.tag(found[-1], repository, version)
            except Exception as exc:
                raise LaunchError(f"could not tag the imported image as {full}: {exc}") from exc
    if not has_image(engine, full):
        raise LaunchError(f"the engine did not keep the imported image {full} (it answered {str(reply)[:200]!r})")
    return full


def _shared_libraries(*paths: str) -> list[str]:
    import subprocess

    if not paths:
        return []
    try:
        out = subprocess.run(["ldd", *paths], capture_output=True, text=True, timeout=60, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    libs = []
    for line in out.splitlines():
        parts = line.split()
        if line.endswith(":"):
            continue  # "FILE:" headers when ldd is given several files
        if "=>" in parts:
            target = parts[parts.index("=>") + 1]
            if target.startswith("/"):
                libs.append(target)
        elif parts and parts[0].startswith("/"):
            libs.append(parts[0])  # the dynamic loader
    return libs


def _python_stdlib(executable: str) -> str | None:
    import os

    name = os.path.basename(executable)  # python3.11
    prefix = os.path.dirname(os.path.dirname(executable))
    candidate = os.path.join(prefix, "lib", name)
    return candidate if os.path.isdir(candidate) else None


def _add(tar: tarfile.TarFile, path: str, seen: set[str], *, recurse: bool = True) -> None:
    """Add `path` (a whole directory when `recurse`) with its parent directories (bare entries),
    following symlinks: each link and what it points to. `seen` holds what is written ("w:PATH")
    and what is walked or followed ("r:PATH")."""
    import os
    import stat

    path = os.path.normpath(path)
    if path == "/" or f"r:{path}" in seen or (not recurse and f"w:{path}" in seen):
        return
    parent = os.path.dirname(path)
    real_parent = os.path.realpath(parent)
    if real_parent != parent:
        # a path through a symlinked directory (/lib/x86_64-linux-gnu on merged /usr): add the
        # link, then the entry under its real directory
        _add(tar, parent, seen, recurse=False)
        _add(tar, os.path.join(real_parent, os.path.basename(path)), seen, recurse=recurse)
        return
    _add(tar, parent, seen, recurse=False)
    try:
        st = os.lstat(path)
    except OSError:
        return
    if f"w:{path}" not in seen:
        seen.add(f"w:{path}")
        info = tarfile.TarInfo(path.lstrip("/"))
        info.mode = stat.S_IMODE(st.st_mode)
        info.mtime = int(st.st_mtime)
        if stat.S_ISLNK(st.st_mode):
            info.type = tarfile.SYMTYPE
            info.linkname = os.readlink(path)
            tar.addfile(info)
        elif stat.S_ISDIR(st.st_mode):
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        elif stat.S_ISREG(st.st_mode):
            info.size = st.st_size
            with open(path, "rb") as f:
                tar.addfile(info, f)
        else:
            return  # devices, sockets, fifos: never copied
    if recurse:
        seen.add(f"r:{path}")
    if stat.S_ISLNK(st.st_mode):
        _add(tar, os.path.join(os.path.dirname(path), os.readlink(path)), seen, recurse=recurse)
    elif stat.S_ISDIR(st.st_mode) and recurse:
        for name in sorted(os.listdir(path)):
            if name not in _SKIP_DIRS:
                _add(tar, os.path.join(path, name), seen, recurse=True)
