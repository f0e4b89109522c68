"""`corral doctor [--json]`: every backend, whether it works here, the exact reason and the fix."""

from __future__ import annotations

import argparse
import json


def doctor_command(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="corral doctor", description="Which sandbox backends work on this host.")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    opts = parser.parse_args(args)
    from corral.doctor import auto_choice, host_facts, probe_all

    caps = probe_all()
    facts = host_facts()
    chosen = auto_choice(caps)
    if opts.json:
        print(json.dumps({"host": facts, "auto": chosen, "backends": [c.as_json() for c in caps]}, indent=2))
        return 0 if chosen else 1
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="corral backends on this host", show_lines=True)
    table.add_column("backend", style="bold")
    table.add_column("works")
    table.add_column("details")
    for c in caps:
        if c.available:
            works = "[green]yes[/green]"
            details = "\n".join([f"limits: {c.limits_via}"] * bool(c.limits_via) + list(c.notes))
        else:
            works = "[red]no[/red]"
            details = f"[red]{c.reason}[/red]" + (f"\nfix: {c.fix}" if c.fix else "")
        table.add_row(c.name, works, details)
    console.print(table)
    for key, value in facts.items():
        console.print(f"  {key}: {value}", highlight=False)
    if chosen:
        console.print(f"\n[bold]auto[/bold] uses [bold green]{chosen}[/bold green] here.")
        return 0
    console.print("\n[bold red]No sandbox backend works here[/bold red]: corral will refuse to run commands.")
    return 1
