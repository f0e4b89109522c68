"""Which cached bytecode a tool's write removes, checked on headers Python itself wrote."""

from __future__ import annotations

import os
import py_compile
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.session.bytecode import drop_stale
from corral.session.fsafe import Root


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[tuple[Root, Path, Path]]:
    """pkg/mod.py compiled by Python (timestamp-checked), with a hash-checked twin beside it."""
    source = tmp_path / "pkg" / "mod.py"
    source.parent.mkdir()
    source.write_text("x = 1\n")
    compiled = Path(py_compile.compile(str(source), doraise=True))
    hashed = str(compiled.with_name("mod.hashed.pyc"))
    py_compile.compile(str(source), cfile=hashed, invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
    root = Root(str(tmp_path))
    yield root, source, compiled
    root.close()


def test_only_bytecode_naming_the_sources_mtime_and_size_goes(tree: tuple[Root, Path, Path]) -> None:
    root, source, compiled = tree
    recorded = os.stat(source)  # what the bytecode's header names
    other = compiled.with_name("module.cpython-311.pyc")  # another module whose name starts alike
    other.write_bytes(compiled.read_bytes())
    # A write that changed the size leaves the bytecode: Python sees that it is stale.
    source.write_text("x = 22\n")
    assert drop_stale(root, b"pkg/mod.py") == [] and compiled.exists()
    # The same size within the same second: the bytecode Python would run by mistake.
    source.write_text("x = 2\n")
    os.utime(source, ns=(recorded.st_atime_ns, recorded.st_mtime_ns))
    assert drop_stale(root, b"pkg/mod.py") == [b"pkg/__pycache__/" + os.fsencode(compiled.name)]
    assert not compiled.exists() and other.exists() and compiled.with_name("mod.hashed.pyc").exists()
    assert drop_stale(root, b"pkg/notes.txt") == [] and drop_stale(root, b"pkg/missing.py") == []


def test_a_cache_it_cannot_read_or_change_is_left_without_an_error(tree: tuple[Root, Path, Path]) -> None:
    root, _, compiled = tree  # the bytecode matches the source as it is
    results = []
    try:
        for mode in (0o000, 0o555):  # unreadable, then not writable
            os.chmod(compiled.parent, mode)
            results.append(drop_stale(root, b"pkg/mod.py"))
    finally:
        os.chmod(compiled.parent, 0o755)
    if os.geteuid() == 0:  # modes do not stop root: the first call removes it
        assert results == [[b"pkg/__pycache__/" + os.fsencode(compiled.name)], []]
    else:
        assert results == [[], []] and compiled.exists()
