"""Images for the container backends, without a registry.

corral's own image (`corral-base:<hash>`) is a root of empty directories and the host's top-level
symlinks (`/bin -> usr/bin` on a merged-/usr host): a few kilobytes, imported into the engine with
`docker import` (the Engine API's image create from a tar stream) the first time it is needed.
The system itself comes from the host's `/usr`, `/bin`, `/lib*` mounted read-only at run time, so
a sandbox sees the same system as under the namespace backend, and nothing is downloaded.

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
    repository, _, version = tag.partition(":")
    try:
        engine.api.import_image_from_data(
            skeleton_tar(skel), repository=repository, tag=version, changes=['LABEL corral.image="base"']
        )
    except Exception as exc:
        raise LaunchError(f"could not import corral's base image into the engine: {exc}") from exc
    if not has_image(engine, tag):
        raise LaunchError(f"the engine did not keep the imported image {tag}")
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
