"""Every attack of the battery against every backend that works here.

A breach fails the test; an attack a backend does not claim to stop is skipped with that reason.
"""

from __future__ import annotations

import pytest

from corral.backends import registry
from corral.selftest.battery import BATTERY, Attack, AttackContext, Breach, NotApplicable

BACKENDS = ["namespace", "landlock"]


def _backend(name: str):  # type: ignore[no-untyped-def]
    backend = registry.create(name)
    caps = registry.probe(backend)
    if not caps.available:
        pytest.skip(f"{name} unavailable here: {caps.reason}")
    return backend, caps


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("attack", BATTERY, ids=[a.name for a in BATTERY])
def test_attack_is_blocked(backend_name: str, attack: Attack, tmp_path_factory: pytest.TempPathFactory) -> None:
    backend, caps = _backend(backend_name)
    missing = attack.requires - caps.enforces
    if missing:
        pytest.skip(f"{backend_name} does not claim {', '.join(sorted(missing))}")
    with AttackContext(backend, base=str(tmp_path_factory.getbasetemp())) as ctx:
        try:
            attack.fn(ctx)
        except NotApplicable as exc:
            pytest.skip(str(exc))
        except Breach as exc:
            pytest.fail(f"{attack.title}: NOT BLOCKED on {backend_name}: {exc}")
        ctx.host_unchanged()


def test_battery_is_large_enough() -> None:
    assert len(BATTERY) >= 40
    assert len({a.name for a in BATTERY}) == len(BATTERY)
