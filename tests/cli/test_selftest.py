from __future__ import annotations

import json
import os
import time

import pytest

from tests.conftest import corral_cli

pytestmark = pytest.mark.usefixtures("namespace_ok")


def test_selftest_namespace_blocks_everything_in_under_a_minute() -> None:
    before = set(os.listdir("/tmp"))
    started = time.monotonic()
    r = corral_cli("selftest", "--backend", "namespace", "--json", timeout=300)
    elapsed = time.monotonic() - started
    data = json.loads(r.stdout)
    statuses = {x["status"] for x in data["results"]}
    assert r.returncode == 0 and data["ok"], [x for x in data["results"] if x["status"] != "blocked"]
    assert statuses <= {"blocked", "skipped"}
    assert len(data["results"]) >= 40
    assert elapsed < 60
    ours = ("corral-selftest-", "corral-attack-", "corral-tmp-", "corral-home-")
    leftovers = {name for name in set(os.listdir("/tmp")) - before
                 if name.startswith(ours) or (name.startswith("corral-") and "-private-" in name)}  # fmt: skip
    assert not leftovers


def test_selftest_refuses_unknown_backend() -> None:
    r = corral_cli("selftest", "--backend", "nope")
    assert r.returncode == 2 and b"unknown backend" in r.stderr


def test_selftest_never_attacks_the_process_backend() -> None:
    r = corral_cli("selftest", "--backend", "process", "--json")
    data = json.loads(r.stdout)
    assert data["results"] == [] and "isolates nothing" in data["unavailable"]["process"]
