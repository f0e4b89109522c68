"""`corral selftest [--backend B] [--json]`: which attacks each backend stops, on this machine."""

from __future__ import annotations

import argparse
import json
import sys


def selftest_command(args: list[str]) -> int:
    from corral.selftest.runner import ERROR, NOT_BLOCKED, default_backends, run_selftest

    parser = argparse.ArgumentParser(
        prog="corral selftest", description="Run corral's escape battery against the backends on this machine."
    )
    parser.add_argument("--backend", action="append", help="only this backend (repeatable; default: all but process)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    opts = parser.parse_args(args)
    backends = opts.backend or default_backends()
    from corral.backends import registry

    for name in backends:
        registry.strength_of(name)  # unknown names are a ConfigError

    def progress(outcome) -> None:  # type: ignore[no-untyped-def]
        if not opts.json:
            mark = "." if outcome.status == "blocked" else ("F" if outcome.status == NOT_BLOCKED else "s")
            sys.stderr.write(mark)
            sys.stderr.flush()

    outcomes, unavailable = run_selftest(backends, progress=progress)
    failed = [o for o in outcomes if o.status in (NOT_BLOCKED, ERROR)]
    if opts.json:
        print(json.dumps({"results": [o.as_json() for o in outcomes], "unavailable": unavailable,
                          "ok": not failed}, indent=2))  # fmt: skip
        return 1 if failed else 0
    sys.stderr.write("\n")
    from rich.console import Console
    from rich.table import Table

    ran = [b for b in backends if b not in unavailable]
    table = Table(title="corral selftest: attack x backend")
    table.add_column("category")
    table.add_column("attack")
    for name in ran:
        table.add_column(name)
    by_key = {(o.attack, o.backend): o for o in outcomes}
    styles = {"blocked": "green", NOT_BLOCKED: "bold red", ERROR: "bold red", "not claimed": "dim", "skipped": "yellow"}
    seen: list[str] = []
    for o in outcomes:
        if o.attack in seen:
            continue
        seen.append(o.attack)
        cells = []
        for name in ran:
            cell = by_key.get((o.attack, name))
            cells.append(f"[{styles.get(cell.status, '')}]{cell.status}[/]" if cell else "")
        table.add_row(o.category, o.title, *cells)
    console = Console()
    console.print(table)
    for name, why in unavailable.items():
        console.print(f"[yellow]{name}[/]: not run ({why})")
    for o in failed:
        console.print(f"[bold red]{o.status}[/] {o.backend}: {o.title}: {o.detail}")
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    console.print(", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    return 1 if failed else 0
