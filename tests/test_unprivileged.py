"""The sandbox as an ordinary user: the escape battery, the CLI and the API again, without root.

CI creates the user and names it in CORRAL_TEST_USER; elsewhere this is skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

USER = os.environ.get("CORRAL_TEST_USER", "")


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to the unprivileged user")
@pytest.mark.skipif(not USER, reason="set CORRAL_TEST_USER to an unprivileged user (bash .ci/run does)")
def test_suite_as_unprivileged_user() -> None:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": f"/home/{USER}", "LANG": "C.UTF-8"}
    if os.environ.get("PYTHONPATH"):  # a checkout run with PYTHONPATH=.../src tests that code, not the installed one
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    runuser = shutil.which("runuser", path="/usr/sbin:/sbin:/usr/bin:/bin")
    if runuser is None:
        pytest.skip("runuser (util-linux) is not installed")
    argv = [
        runuser,
        "-u",
        USER,
        "--",
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "tests/escape",
        "tests/agent/test_main.py",
        "tests/cli/test_run.py",
        "tests/test_api.py",
        "tests/backends/test_conformance.py",
        "tests/backends/test_limit_reports.py",
        "tests/session",
        "tests/net/test_sandbox.py",
        "tests/net/test_netns.py",
    ]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800, check=False)
    print(done.stdout[-5000:], done.stderr[-3000:])
    assert done.returncode == 0, done.stdout[-5000:]
    assert " passed" in done.stdout
