"""The audit log: one JSON object per line for every sandbox, command and policy decision.

Each line is written with a single `write()` on a file opened with O_APPEND, so lines from several
processes never interleave. Values that look like secrets (variables named *TOKEN*, *SECRET*,
*PASSWORD*, *KEY*..., `--password=...` style arguments, credentials in URLs) are redacted.

Events (the `event` field): sandbox.start, sandbox.stop, decision, exec, file.put, file.get, and
the session and network events of later layers. Every event has `time` (UTC, ISO 8601) and `sandbox`.
"""

from __future__ import annotations

import os
import threading
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence

_SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "KEY", "CREDENTIAL", "AUTH", "COOKIE", "SESSION")
REDACTED = "***"


def looks_secret(name: str) -> bool:
    upper = name.upper().replace("-", "_")
    return any(word in upper for word in _SECRET_WORDS)


def redact_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: (REDACTED if looks_secret(k) else v) for k, v in env.items()}


def redact_argv(argv: Sequence[str]) -> list[str]:
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        if arg.startswith("-") and "=" in arg:
            name, _, _value = arg.partition("=")
            if looks_secret(name):
                out.append(f"{name}={REDACTED}")
                continue
        elif arg.startswith("--") and looks_secret(arg):
            hide_next = True
        out.append(_redact_url_credentials(arg))
    return out


def _redact_url_credentials(text: str) -> str:
    scheme = text.find("://")
    if scheme < 0:
        return text
    at = text.find("@", scheme)
    slash = text.find("/", scheme + 3)
    if at < 0 or (0 <= slash < at):
        return text
    userinfo = text[scheme + 3 : at]
    if ":" not in userinfo:
        return text
    user = userinfo.split(":", 1)[0]
    return f"{text[: scheme + 3]}{user}:{REDACTED}{text[at:]}"


def now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


class AuditLog:
    """Appends events to a JSON-lines file (created 0600). Thread-safe; cheap when unused."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(os.path.expanduser(path))
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._lock = threading.Lock()

    def write(self, event: str, **fields: object) -> None:
        import json

        record = {"time": now_iso(), "event": event, **fields}
        line = (json.dumps(record, default=str, separators=(",", ":")) + "\n").encode()
        with self._lock:
            if self._fd < 0:
                return
            os.write(self._fd, line)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_events(path: str) -> Iterator[dict[str, object]]:
    """The events in an audit file, skipping lines that are not JSON objects."""
    import json

    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield record
