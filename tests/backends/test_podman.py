"""The docker backend through Podman's Docker-compatible API (a private `podman system service`)."""

from __future__ import annotations

from pathlib import Path

import pytest

import corral
from corral.backends import registry
from corral.testing import CHECKS, Skip, run_check

from .conftest import PodmanService

PODMAN_CHECKS = [c for c in CHECKS if c.__name__ != "check_timeout_kills_everything"]  # the slowest; same code path


@pytest.fixture
def podman_host(podman: PodmanService, monkeypatch: pytest.MonkeyPatch) -> PodmanService:
    monkeypatch.setenv("DOCKER_HOST", podman.url)
    caps = registry.probe(registry.create("docker"), fresh=True)
    if not caps.available:
        pytest.skip(f"docker backend through podman unavailable: {caps.reason}")
    assert caps.notes[0].startswith("podman "), caps.notes
    return podman


@pytest.mark.parametrize("check", PODMAN_CHECKS, ids=[c.__name__ for c in PODMAN_CHECKS])
def test_conformance_through_podman(check, podman_host: PodmanService, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    try:
        run_check(check, lambda: registry.create("docker"), str(workdir))
    except Skip as exc:
        pytest.skip(str(exc))


def test_named_image_through_podman(podman_host: PodmanService, workdir: Path) -> None:
    from corral.backends.engine import connect
    from corral.backends.images import host_rootfs_tar, import_image

    engine = connect("docker")
    tag = import_image(engine, host_rootfs_tar(("sh", "cat", "python3")), "corral-test-podman:1")
    assert tag == "corral-test-podman:1", "Podman ignores an import's tag: corral tags it again"
    policy = corral.Policy.workspace(str(workdir)).replace(container=corral.Container(image=tag))
    r = corral.run(["python3", "-c", "open('made', 'w').write('podman')"], policy=policy, backend="docker")
    assert r.ok, r
    assert (workdir / "made").read_text() == "podman"
    assert engine.api.containers(all=True, filters={"label": "corral.sandbox"}) == []
