"""The audit log: one JSON object per line for every sandbox, command and policy decision.

Each line is written with a single `write()` on a file opened with O_APPEND, so lines from several
processes never interleave. Values that look like secrets are redacted (see `redact_text`).

Events (the `event` field): sandbox.start, sandbox.stop, decision, exec, file.put, file.get, and
the session and network events of later layers. Every event has `time` (UTC, ISO 8601) and `sandbox`.
"""

from __future__ import annotations

import os
import re
import threading
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Mapping, Sequence

    from corral.policy.resolve import ResolvedZone

_SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "KEY", "CREDENTIAL", "AUTH", "COOKIE", "SESSION")
# Ordinary names that merely contain a secret word (GIT_AUTHOR_NAME, TOKENIZERS_PARALLELISM).
_INNOCENT = re.compile(r"AUTHOR(?!I[SZ])|TOKENIZ|KEYBOARD")
# A name ending so holds where a secret is (--password-file=PATH) or how it is read, not the secret.
_NOT_A_VALUE = ("FILE", "PATH", "DIR", "STDIN")
REDACTED = "***"
_SECRET = re.compile("|".join(_SECRET_WORDS), re.IGNORECASE)


def looks_secret(name: str) -> bool:
    if _SECRET.search(name) is None:  # the common case, quickly
        return False
    words = re.findall(r"[A-Z0-9]+", _INNOCENT.sub(" ", name.upper()))
    if not words or words[-1] in _NOT_A_VALUE or words[0] == "NO":  # --no-password is a switch
        return False
    return any(secret in word for word in words for secret in _SECRET_WORDS)


def redact_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: (REDACTED if looks_secret(k) else v) for k, v in env.items()}


def redact_argv(argv: Sequence[str]) -> list[str]:
    """`argv` with secrets replaced: the argument after `--token`-like flags, and within every
    argument (a shell script included) what `redact_text` finds."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next and not arg.startswith("-"):
            out.append(REDACTED)
            hide_next = False
            continue
        hide_next = _takes_secret(arg)
        out.append(redact_text(arg))
    return out


# A shell word: quoted parts (an unterminated quote runs to the end), escapes, plain characters.
_WORD = re.compile(r"""(?:[^\s;&|()<>'"`\\]+|'[^']*'?|"(?:[^"\\]|\\.)*"?|\\.)+""")
_QUOTED = re.compile(r"""(')([^']*)('?)|(")((?:[^"\\]|\\.)*)("?)""", re.S)
_ASSIGNMENT = re.compile(r"(-{0,2}[A-Za-z_][\w.-]*)=(.*)", re.S)  # NAME=VALUE, --flag=VALUE
_LISTED = re.compile(r"""(?<=[?&,])([A-Za-z_][\w.-]*)=([^&,\s'"]+)""")  # URL queries, a=1,b=2 lists
_HEADER = re.compile(r"([A-Za-z][\w-]*):([ \t]*)(\S[^\n]*)")  # Authorization: Bearer ...
_URL_CREDENTIALS = re.compile(r"""([A-Za-z][A-Za-z0-9+.-]*://[^\s/@:'"]*):[^\s/@'"]+@""")


def redact_text(text: str) -> str:
    """`text` (one argument or a whole shell script) with secret values replaced by `***` and the
    rest left as it was: NAME=VALUE, --flag=VALUE and --flag VALUE where the name `looks_secret`
    (a value starting with `$` is a reference, kept), the same in URL queries and quoted strings,
    a header line such as `Authorization: Bearer ...`, and passwords in URLs. Names ending in FILE,
    PATH, DIR or STDIN (`--password-file=PATH`) say where a secret is, not what: they are kept."""
    if "=" not in text and "-" not in text and ":" not in text and "@" not in text:  # nothing to redact
        return text
    header = _HEADER.fullmatch(text)
    if header is not None and looks_secret(header[1]):
        return f"{header[1]}:{header[2]}{REDACTED}"
    out: list[str] = []
    last = 0
    hide = False
    for word in _WORD.finditer(text):
        gap = text[last : word.start()]
        out.append(gap)
        if hide and not gap.strip(" \t") and not word[0].startswith(("-", "$")):
            out.append(REDACTED)
            hide = False
        else:
            hide = _takes_secret(word[0])
            out.append(_redact_word(word[0]))
        last = word.end()
    out.append(text[last:])
    return _URL_CREDENTIALS.sub(rf"\1:{REDACTED}@", "".join(out))


def _takes_secret(word: str) -> bool:
    """`--token` (its value the next word) rather than `--token=...` or `--verbose`."""
    return word.startswith("-") and "=" not in word and looks_secret(word)


def _redact_word(word: str) -> str:
    if "=" not in word and "'" not in word and '"' not in word:
        return word
    assignment = _ASSIGNMENT.match(word)
    if assignment is not None:
        name, value = assignment[1], assignment[2]
        if value and not value.startswith("$") and looks_secret(name):
            return f"{name}={REDACTED}"
        return f"{name}={_redact_word(value)}"  # --env=API_KEY=x
    # Quoted strings may hold commands of their own (ssh HOST 'cmd', sh -c "...").
    word = _QUOTED.sub(lambda q: f"{q[1]}{redact_text(q[2])}{q[3]}" if q[1] else f"{q[4]}{redact_text(q[5])}{q[6]}",
                       word)  # fmt: skip
    return _LISTED.sub(lambda p: f"{p[1]}={REDACTED}" if looks_secret(p[1]) else p[0], word)


def now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def check_outside_zones(path: str | os.PathLike[str], zones: Iterable[ResolvedZone], *, where: str = "audit") -> None:
    """A `ConfigError` at `where` when the audit file `path` lies in one of `zones` that is
    read-write: the sandboxed command could then rewrite or forge the log. Both the path as given
    and the file it leads to (through symlinks) are checked; a tmpfs zone holds no host file."""
    given = os.fspath(path)
    absolute = os.path.abspath(os.path.expanduser(given))
    seen = {absolute}
    try:
        seen.add(os.path.realpath(absolute))
    except ValueError:  # a NUL byte: AuditLog says it cannot open the file
        pass
    for zone in zones:
        host = zone.host
        if zone.mode != "rw" or not host:
            continue
        if any(p == host or p.startswith(host.rstrip("/") + "/") for p in seen):
            from corral.errors import ConfigError

            at = "" if zone.mount == host else f" (mounted at {zone.mount})"
            raise ConfigError(f"{given} is inside the read-write zone {host}{at}: the sandboxed command could "
                              "rewrite the log; put it outside every writable zone", where=where)  # fmt: skip


class AuditLog:
    """Appends events to a JSON-lines file (created 0600). Thread-safe; cheap when unused.

    `close()` releases the descriptor; a later `write` still appends its line (through a
    descriptor of its own, closed at once): an audit log never drops an event, and a closed log
    is no reason for a write to fail (backends report events from their own threads). A write the
    file refuses (a full disk) raises `CorralError` rather than lose the event in silence."""

    def __init__(self, path: str | os.PathLike[str], *, where: str = "audit") -> None:
        """Opens (or creates) the file now; its directory must exist. A path that cannot be opened
        is a `ConfigError` at `where` (the flag or key that named it) saying why."""
        given = os.fspath(path)
        self.path = os.path.abspath(os.path.expanduser(given))
        self._where = where
        try:
            self._fd = self._open()
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the name
            from corral.errors import ConfigError

            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(f"cannot open {given}: {reason}", where=where) from None
        self._lock = threading.Lock()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def write(self, event: str, **fields: object) -> None:
        import json

        record = {"time": now_iso(), "event": event, **fields}
        line = (json.dumps(record, default=str, separators=(",", ":")) + "\n").encode()
        try:
            with self._lock:
                if self._fd >= 0:
                    os.write(self._fd, line)
                    return
            fd = self._open()
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as exc:  # a file that opens but refuses writes (/proc/version), a full disk
            from corral.errors import CorralError

            raise CorralError(f"{self._where}: cannot write {self.path}: {exc.strerror}") from None

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_events(path: str, *, strict: bool = False) -> Iterator[dict[str, object]]:
    """The events in an audit file. Lines that are not events (JSON objects with an `event`) are
    skipped, or with `strict` raise a `ConfigError` naming the line."""
    import json

    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict) and isinstance(record.get("event"), str):
                yield record
            elif strict:
                from corral.errors import ConfigError

                raise ConfigError('not an audit event (expected a JSON object with an "event" field)',
                                  where=f"{path}:{number}")  # fmt: skip
