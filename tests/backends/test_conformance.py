"""Every backend that works here through the public conformance suite (corral.testing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.backends import registry
from corral.testing import CHECKS, Skip, run_check


@pytest.mark.parametrize("name", ["namespace", "landlock", "process"])
@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
def test_conformance(name: str, check, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    caps = registry.probe(registry.create(name))
    if not caps.available:
        pytest.skip(f"{name} unavailable here: {caps.reason}")
    try:
        run_check(check, lambda: registry.create(name), str(workdir))
    except Skip as exc:
        pytest.skip(str(exc))
