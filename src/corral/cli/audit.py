"""`corral audit FILE`: read and filter an audit log."""

from __future__ import annotations

import argparse
import json


def audit_command(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="corral audit", description="Read a corral audit log (JSON lines).")
    parser.add_argument("file", help="the audit log")
    parser.add_argument("--event", action="append", help="only these events (exec, decision, sandbox.start, ...)")
    parser.add_argument("--sandbox", help="only this sandbox id")
    parser.add_argument("--denied", action="store_true", help="only refusals (denied decisions and results)")
    parser.add_argument("--json", action="store_true", help="print matching events as JSON lines")
    opts = parser.parse_args(args)
    from corral.audit import read_events
    from corral.errors import ConfigError

    try:
        events = list(read_events(opts.file, strict=True))  # a line that is no event: say so, show nothing
    except OSError as exc:
        raise ConfigError(f"cannot read {opts.file}: {exc.strerror}", where="corral audit") from None
    shown = 0
    for event in events:
        if opts.event and event.get("event") not in opts.event:
            continue
        if opts.sandbox and event.get("sandbox") != opts.sandbox:
            continue
        if (
            opts.denied
            and event.get("action") != "deny"
            and event.get("reason") != "denied"
            and event.get("decision") != "deny"
        ):
            continue
        shown += 1
        if opts.json:
            print(json.dumps(event))
            continue
        what = event.get("argv") or event.get("path") or event.get("host") or ""
        if isinstance(what, list):
            what = " ".join(str(w) for w in what)
        extra = " ".join(
            f"{k}={event[k]}"
            for k in ("action", "rule", "returncode", "reason", "detail")
            if event.get(k) not in (None, "")
        )
        print(f"{event.get('time')} {event.get('sandbox', '-')} {event.get('event')}: {what} {extra}".rstrip())
    return 0
