from __future__ import annotations

import json

from tests.conftest import corral_cli


def test_doctor_json_names_every_backend_with_a_reason() -> None:
    r = corral_cli("doctor", "--json")
    data = json.loads(r.stdout)
    names = {b["name"] for b in data["backends"]}
    assert {"namespace", "landlock", "process"} <= names
    for backend in data["backends"]:
        assert backend["available"] or backend["reason"], backend
    assert r.returncode == (0 if data["auto"] else 1)
    assert "landlock_abi" in data["host"] and "cgroups" in data["host"]


def test_doctor_table() -> None:
    r = corral_cli("doctor")
    assert b"namespace" in r.stdout and b"auto" in r.stdout


def test_doctor_checks_only_the_backends_named() -> None:
    r = corral_cli("doctor", "--json", "process", "namespace")
    data = json.loads(r.stdout)
    assert data["checked"] == ["namespace", "process"] == [b["name"] for b in data["backends"]]
    if isinstance(data["host"].get("max_user_namespaces"), int | str):  # a number, as in /proc/sys
        assert isinstance(data["host"]["max_user_namespaces"], int)
    table = corral_cli("doctor", "process", "landlock")
    assert b"microvm" not in table.stdout and b"gvisor" not in table.stdout
    assert b"among process, landlock" in table.stdout or b"None of" in table.stdout, table.stdout
    bad = corral_cli("doctor", "warp")
    assert bad.returncode == 2 and b"unknown backend 'warp'" in bad.stderr and not bad.stdout


def test_doctor_usage_errors_are_one_line_and_auto_is_understood() -> None:
    """`doctor auto` said "unknown backend 'auto'; expected auto or one of ..."; `--jsn` printed
    argparse's usage and message on two lines."""
    r = corral_cli("doctor", "--jsn")
    assert r.returncode == 2 and not r.stdout
    assert r.stderr.decode() == "corral: doctor: unrecognized arguments: --jsn (see corral doctor --help)\n"
    r = corral_cli("doctor", "--json", "auto")
    data = json.loads(r.stdout)
    assert data["checked"] == ["namespace", "landlock"], data
    bad = corral_cli("doctor", "warp", "auto")
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1 and not bad.stdout
    assert bad.stderr.startswith(b"corral: doctor: unknown backend 'warp'; expected one of process, "), bad.stderr
