"""Fixtures for session tests: a sample project (a git repository with a small C program), a private
session data directory, and sessions over them. Real git, the real namespace backend: no mocks."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.session import Session

MAIN_C = """#include <stdio.h>
#include "calc.h"

int main(void) {
    printf("%d\\n", add(2, 3));
    return 0;
}
"""
CALC_H = "int add(int a, int b);\n"
CALC_C = '#include "calc.h"\n\nint add(int a, int b) { return a + b; }\n'
MAKEFILE = 'app: main.c calc.c calc.h\n\tcc -o app main.c calc.c\n\ntest: app\n\ttest "$$(./app)" = 5\n'


def git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}
    done = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, env=env,
                          capture_output=True, check=True)  # fmt: skip
    return done.stdout.decode()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A git project: sources, a Makefile, a README, an ignored build output and a secret."""
    root = tmp_path / "project"
    root.mkdir()
    os.chmod(tmp_path, 0o755)
    (root / "main.c").write_text(MAIN_C)
    (root / "calc.h").write_text(CALC_H)
    (root / "calc.c").write_text(CALC_C)
    (root / "Makefile").write_text(MAKEFILE)
    (root / "README.md").write_text("# calc\n\nAdds numbers.\n")
    (root / ".gitignore").write_text("app\n*.o\nbuild/\n")
    (root / "scripts").mkdir()
    (root / "scripts" / "run.sh").write_text("#!/bin/sh\n./app\n")
    os.chmod(root / "scripts" / "run.sh", 0o755)
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "initial")
    (root / ".env").write_text("API_TOKEN=hunter2\n")  # untracked, not ignored: excluded by the tests that care
    return root.resolve()


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Sessions live here (XDG_DATA_HOME points at it, for the CLI too)."""
    xdg = tmp_path / "xdg"
    xdg.mkdir()
    monkeypatch.setenv("XDG_DATA_HOME", str(xdg))
    return xdg / "corral" / "sessions"


@pytest.fixture
def session(project: Path, data_dir: Path, namespace_ok: None) -> Iterator[Session]:
    with Session(str(project), name="s1", excludes=[".env"], backend="namespace") as s:
        yield s


def tree_state(root: Path, *, skip: tuple[str, ...] = ("app",)) -> dict[str, tuple[str, bytes]]:
    """Every file and link under `root` (kind or mode, content), .git excluded: for byte-for-byte checks."""
    out: dict[str, tuple[str, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".git"]
        for name in filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if rel in skip:
                continue
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path).encode())
            else:
                out[rel] = (oct(path.stat().st_mode & 0o777), path.read_bytes())
    return out
