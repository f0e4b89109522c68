"""`corral doctor [BACKEND...] [--json]`: each backend, whether it works here, the exact reason and the fix."""

from __future__ import annotations

import argparse
import json
from typing import NoReturn

from corral.errors import ConfigError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One `corral: doctor: ...` line, as every corral error, not argparse's usage and message.
        raise ConfigError(f"{message} (see corral doctor --help)", where="doctor")


def doctor_command(args: list[str]) -> int:
    about = "Which sandbox backends work on this host; each is checked by starting a real sandbox (microvm boots a VM)."
    parser = _Parser(prog="corral doctor", description=about)
    parser.add_argument("backends", nargs="*", metavar="BACKEND",
                        help="check only these (default: all; auto: those auto picks from)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    opts = parser.parse_args(args)
    from corral.backends.registry import AUTO_ORDER, known_backends
    from corral.doctor import auto_choice, host_facts, probe_all

    names: list[str] = []
    for name in opts.backends:
        if name not in (*known_backends(), "auto"):
            raise ConfigError(f"unknown backend {name!r}; expected one of {', '.join(known_backends())}, or auto "
                              f"(the backends auto picks from: {', '.join(AUTO_ORDER)})", where="doctor")  # fmt: skip
        names += [n for n in (AUTO_ORDER if name == "auto" else (name,)) if n not in names]
    opts.backends = names
    caps = probe_all(opts.backends)
    facts = host_facts()
    chosen = auto_choice(caps)
    # auto's choice among a subset is only that: a stronger backend left out may work too.
    among = f" (among {', '.join(opts.backends)})" if opts.backends else ""
    if opts.json:
        print(json.dumps({"host": facts, "auto": chosen, "checked": [c.name for c in caps],
                          "backends": [c.as_json() for c in caps]}, indent=2))  # fmt: skip
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
        console.print(f"\n[bold]auto[/bold] uses [bold green]{chosen}[/bold green] here{among}.")
        return 0
    if opts.backends:
        console.print(f"\n[bold red]None of {', '.join(opts.backends)} works here[/bold red].")
        return 1
    console.print("\n[bold red]No sandbox backend works here[/bold red]: corral will refuse to run commands.")
    return 1
