"""`corral selftest`: run the escape battery against the backends on this machine.

Each attack ends as one of: blocked; NOT BLOCKED (the backend claims to stop it and it got
through); not claimed (the backend does not claim the feature the attack tests; it is not run);
skipped (it cannot be tried here, with the reason); error (the attack itself failed to run).
The battery is never aimed at a backend that isolates nothing (`process`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from corral.backends import registry
from corral.selftest.battery import BATTERY, AttackContext, Breach, NotApplicable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

BLOCKED = "blocked"
NOT_BLOCKED = "NOT BLOCKED"
NOT_CLAIMED = "not claimed"
SKIPPED = "skipped"
ERROR = "error"


class Outcome:
    def __init__(self, *, attack: str, title: str, category: str, backend: str, status: str, detail: str = "",
                 seconds: float = 0.0) -> None:  # fmt: skip
        self.attack = attack
        self.title = title
        self.category = category
        self.backend = backend
        self.status = status
        self.detail = detail
        self.seconds = seconds

    def as_json(self) -> dict[str, object]:
        return {"attack": self.attack, "title": self.title, "category": self.category, "backend": self.backend,
                "status": self.status, "detail": self.detail, "seconds": round(self.seconds, 3)}  # fmt: skip


def default_backends() -> list[str]:
    return [name for name in registry.known_backends() if registry.strength_of(name) > 0]


def run_selftest(
    backends: Sequence[str], *, progress: Callable[[Outcome], None] | None = None
) -> tuple[list[Outcome], dict[str, str]]:
    """Every attack against every named backend. Returns outcomes and {backend: why unavailable}."""
    outcomes: list[Outcome] = []
    unavailable: dict[str, str] = {}
    base = tempfile.mkdtemp(prefix="corral-selftest-")
    os.chmod(base, 0o755)
    try:
        for name in backends:
            if registry.strength_of(name) <= 0:
                unavailable[name] = "isolates nothing: the battery is never run against it"
                continue
            backend = registry.create(name)
            caps = registry.probe(backend, fresh=True)
            if not caps.available:
                unavailable[name] = caps.reason
                continue
            if "exec.commands" not in caps.enforces:
                unavailable[name] = (
                    "runs WebAssembly modules, not commands: the battery (shell and python3) does not apply"
                )
                continue
            for attack in BATTERY:
                outcome = _one(attack, backend, caps.enforces, base)
                outcomes.append(outcome)
                if progress is not None:
                    progress(outcome)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return outcomes, unavailable


def _one(attack, backend, enforces: frozenset[str], base: str) -> Outcome:  # type: ignore[no-untyped-def]
    fields = {"attack": attack.name, "title": attack.title, "category": attack.category, "backend": backend.name}
    missing = attack.requires - enforces
    if missing:
        return Outcome(
            **fields, status=NOT_CLAIMED, detail=f"{backend.name} does not claim {', '.join(sorted(missing))}"
        )
    started = time.monotonic()
    try:
        with AttackContext(backend, base=base) as ctx:
            attack.fn(ctx)
            ctx.host_unchanged()
    except Breach as exc:
        return Outcome(**fields, status=NOT_BLOCKED, detail=str(exc), seconds=time.monotonic() - started)
    except NotApplicable as exc:
        return Outcome(**fields, status=SKIPPED, detail=str(exc), seconds=time.monotonic() - started)
    except Exception as exc:
        return Outcome(
            **fields, status=ERROR, detail=f"{type(exc).__name__}: {exc}", seconds=time.monotonic() - started
        )
    return Outcome(**fields, status=BLOCKED, seconds=time.monotonic() - started)
