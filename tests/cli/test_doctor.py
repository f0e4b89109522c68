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
