"""Command rules: decide allow / deny / ask for an argv. Pure and fast (a few microseconds).

A rule is a command prefix whose words may hold globs: `git push` matches `git push -f origin`;
`rm -rf *` matches any `rm -rf X...`; the first word matches the program's full path or its
base name. Commands wrapped in `sh -c '...'` (or bash, dash, zsh), `env`, `nice`, `nohup`,
`timeout`, `sudo`, `command`, `exec`, `time`, `stdbuf` and `xargs` are unwrapped and each simple
command of a shell script is decided on its own: one deny denies the whole call.

Rules guard against an agent's mistakes and make its intent visible in the audit log; they are
not the security boundary (the sandbox is). So where a script cannot be understood (a parse
error, or `$(...)` / backticks under an allowlist) the answer is the cautious one.
"""

from __future__ import annotations

import posixpath

from corral._record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    import re
    from collections.abc import Sequence
    from typing import Literal

    from corral.policy.model import Commands

    Action = Literal["allow", "deny", "ask"]

SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "ash", "busybox-sh"})
WRAPPERS = frozenset({"env", "nice", "nohup", "timeout", "sudo", "command", "exec", "time", "stdbuf", "xargs", "doas"})
_SEPARATORS = frozenset({";", "&&", "||", "|", "&", "|&", ";;", "(", ")", "\n"})
_MAX_DEPTH = 4


class Decision(Record):
    """The verdict on one command and the rule that gave it."""

    __slots__ = ("action", "rule")
    action: Action
    rule: str

    def __init__(self, *, action: Action, rule: str) -> None:
        self._set(action=action, rule=rule)


ALLOW_ALL = Decision(action="allow", rule="default: no command rules")


class _Pattern:
    __slots__ = ("matchers", "text", "words")

    def __init__(self, text: str) -> None:
        import fnmatch
        import re
        import shlex

        self.text = text
        words = shlex.split(text)
        if not words:
            raise ValueError("empty command pattern")
        self.words = words
        self.matchers: list[str | re.Pattern[str]] = [
            re.compile(fnmatch.translate(w)) if any(c in w for c in "*?[") else w for w in words
        ]

    def matches(self, argv: Sequence[str]) -> bool:
        # A trailing lone "*" also matches nothing (`rm *` matches `rm`).
        if len(argv) < len(self.matchers) and not (len(argv) == len(self.matchers) - 1 and self.words[-1] == "*"):
            return False
        for i, matcher in enumerate(self.matchers):
            if i >= len(argv):
                return True
            word = argv[i]
            if i == 0:
                if not (_word_matches(matcher, word) or _word_matches(matcher, posixpath.basename(word))):
                    return False
            elif not _word_matches(matcher, word):
                return False
        return True


def _word_matches(matcher: str | re.Pattern[str], word: str) -> bool:
    if isinstance(matcher, str):
        return matcher == word
    return matcher.match(word) is not None


class CommandRules:
    """Compiled `Commands`. `decide(argv)` never raises."""

    def __init__(self, commands: Commands) -> None:
        self.commands = commands
        self.empty = not (commands.allow or commands.deny or commands.ask)
        self.deny = [_compile(p, "commands.deny") for p in commands.deny]
        self.ask = [_compile(p, "commands.ask") for p in commands.ask]
        self.allow = [_compile(p, "commands.allow") for p in commands.allow]

    def decide(self, argv: Sequence[str]) -> Decision:
        if self.empty:
            return ALLOW_ALL
        if not argv:
            return Decision(action="deny", rule="empty command")
        return self._decide(list(argv), 0)

    def _decide(self, argv: list[str], depth: int) -> Decision:
        argv = _unwrap(argv)
        if not argv:
            return Decision(action="allow", rule="empty command")
        script = _shell_script(argv)
        if script is not None and depth < _MAX_DEPTH:
            return self._decide_script(script, depth + 1)
        for pattern in self.deny:
            if pattern.matches(argv):
                return Decision(action="deny", rule=f"deny: {pattern.text}")
        for pattern in self.ask:
            if pattern.matches(argv):
                return Decision(action="ask", rule=f"ask: {pattern.text}")
        for pattern in self.allow:
            if pattern.matches(argv):
                return Decision(action="allow", rule=f"allow: {pattern.text}")
        if self.allow:
            return Decision(action="deny", rule="allowlist: no allow rule matches")
        return Decision(action="allow", rule="default: no rule matches")

    def _decide_script(self, script: str, depth: int) -> Decision:
        if self.allow and ("$(" in script or "`" in script or "<(" in script):
            return Decision(action="deny", rule="allowlist: command substitution cannot be checked")
        commands = split_script(script)
        if commands is None:
            return Decision(action="deny", rule="unparseable shell command")
        verdicts = [self._decide(argv, depth) for argv in commands]
        for action in ("deny", "ask"):
            for verdict in verdicts:
                if verdict.action == action:
                    return verdict
        return verdicts[0] if verdicts else Decision(action="allow", rule="empty command")


def _compile(text: str, where: str) -> _Pattern:
    from corral.errors import ConfigError

    try:
        return _Pattern(text)
    except ValueError as exc:
        raise ConfigError(f"bad command pattern {text!r}: {exc}", where=where) from None


def _unwrap(argv: list[str]) -> list[str]:
    """Strip variable assignments and wrapper commands (env, nice, timeout, sudo, ...)."""
    for _ in range(8):
        while argv and "=" in argv[0] and not argv[0].startswith("=") and argv[0].split("=", 1)[0].isidentifier():
            argv = argv[1:]
        if not argv or posixpath.basename(argv[0]) not in WRAPPERS:
            return argv
        name = posixpath.basename(argv[0])
        rest = argv[1:]
        while rest and (rest[0].startswith("-") or ("=" in rest[0] and name == "env")):
            flag = rest.pop(0)
            takes_value = flag in ("-n", "-u", "-s", "-k", "-o", "-e", "-C", "-g", "-p")
            if takes_value and name in ("nice", "env", "timeout", "stdbuf", "sudo") and rest:
                rest.pop(0)
        if name == "timeout" and rest:
            rest = rest[1:]  # the duration
        argv = rest
    return argv


def _shell_script(argv: list[str]) -> str | None:
    if posixpath.basename(argv[0]) not in SHELLS:
        return None
    for i, arg in enumerate(argv[1:], start=1):
        if arg.startswith("-") and not arg.startswith("--") and "c" in arg[1:]:
            return argv[i + 1] if i + 1 < len(argv) else ""
        if not arg.startswith("-"):
            return None
    return None


def split_script(script: str) -> list[list[str]] | None:
    """The simple commands of a shell script, or None when it cannot be parsed."""
    import shlex

    lexer = shlex.shlex(script.replace("\n", " ; "), posix=True, punctuation_chars=";&|()<>")
    lexer.whitespace_split = True
    commands: list[list[str]] = []
    current: list[str] = []
    try:
        tokens = list(lexer)
    except ValueError:
        return None
    skip_next = False
    for token in tokens:
        if skip_next:
            skip_next = False
            continue
        if token in _SEPARATORS:
            if current:
                commands.append(current)
            current = []
        elif token and set(token) <= set("<>&"):
            skip_next = True  # a redirection and its target
        else:
            current.append(token)
    if current:
        commands.append(current)
    return commands
