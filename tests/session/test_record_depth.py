"""Deep trees: recording a step costs time linear in the depth (it was cubic: one exec over a tree 300
deep took 8 s, 3000 deep never returned), paths git cannot name are left out, and the walks that make
it linear keep every link unfollowed."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from corral.session import Session
from corral.session.fsafe import PATH_MAX, Root, Unsafe, walk_dirs

LIMIT = 5.0  # seconds a step over a tree 300 deep may take (a few tenths are expected; it took 8 s)


def _chain(depth: int) -> str:
    return "d/" * depth + "f"


def _timed_write(session: Session, path: str) -> float:
    started = time.monotonic()
    r = session.write_file(path, "x")
    took = time.monotonic() - started
    assert r.changed == (path,) and r.step is not None
    assert took < LIMIT, f"write_file {len(path)} bytes deep took {took:.1f}s"
    return took


def test_a_step_over_a_tree_300_deep_is_quick(session: Session) -> None:
    deep = "n/" + _chain(300)
    started = time.monotonic()
    r = session.exec(["sh", "-c", f"mkdir -p n/{'d/' * 300} && touch {deep}"])
    took = time.monotonic() - started
    assert r.returncode == 0 and r.changed == (deep,)
    assert took < LIMIT, f"exec over a tree 300 deep took {took:.1f}s"
    _timed_write(session, "w/" + _chain(300))
    # The history holds it, and a full scan (as before a review) agrees.
    assert session.read_file(deep).text == ""
    assert {f.path for f in session.changes(patch=False).files} == {deep, "w/" + _chain(300)}


def test_recording_time_grows_about_linearly_with_depth(session: Session) -> None:
    # Best of three each, as the VM is noisy. Linear: 3x from 100 to 300 deep (plus a constant part
    # that makes it less); cubic, as it was: 27x (0.6 s against 8 s). Slack for noise: 9x.
    shallow = min(_timed_write(session, f"a{i}/" + _chain(100)) for i in range(3))
    deep = min(_timed_write(session, f"b{i}/" + _chain(300)) for i in range(3))
    assert deep < 9 * max(shallow, 0.02) + 0.2, f"100 deep: {shallow:.3f}s, 300 deep: {deep:.3f}s"


def test_paths_git_cannot_name_are_left_out(session: Session) -> None:
    name = "x" * 200
    top = "/".join([name] * 20)
    fits, too_long = f"{top}/f", f"{top}/{'y' * 100}"
    assert len(fits) < PATH_MAX <= len(too_long)
    r = session.exec(["sh", "-c", f"mkdir -p {top} && touch {fits} && cd -P {top} && touch {'y' * 100}"])
    assert r.returncode == 0 and r.changed == (fits,)
    assert {f.path for f in session.changes(patch=False).files} == {fits}


def _make_chain(top: str, depth: int, files: tuple[int, ...]) -> None:
    """`top`/d/d/... `depth` deep, with a file `f` in the directories at the depths `files` (made from
    descriptors: the path is longer than PATH_MAX)."""
    fd = os.open(top, os.O_RDONLY)
    try:
        for level in range(1, depth + 1):
            os.mkdir("d", dir_fd=fd)
            fd, parent = os.open("d", os.O_RDONLY, dir_fd=fd), fd
            os.close(parent)
            if level in files:
                os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)


def test_a_tree_3000_deep_does_not_hang(session: Session) -> None:
    # 6 KB of path: never returned before. Nothing PATH_MAX bytes deep or more is recorded. (Made
    # beside the sandbox, as making it inside is slow: the step records it all the same.)
    _make_chain(session.workspace, 3000, (1000, 3000))
    try:
        started = time.monotonic()
        r = session.exec(["true"])
        assert r.changed == (_chain(1000),)
        assert time.monotonic() - started < 3 * LIMIT
    finally:
        _remove_deep(session.workspace, b"d")  # and it can be removed (no recursion, few descriptors)
    assert not os.path.exists(os.path.join(session.workspace, "d"))


def _remove_deep(directory: str | Path, *names: bytes) -> None:
    """Remove trees deeper than shutil.rmtree's recursion (pytest's clean-up of old runs uses it)."""
    root = Root(str(directory))
    try:
        for name in names:
            if root.lstat(name) is not None:
                root.rmtree(name)
    finally:
        root.close()


def test_walks_keep_few_descriptors_and_never_follow_links(tmp_path: Path) -> None:
    top = tmp_path / "top"
    top.mkdir()
    _make_chain(str(top), 1200, ())  # deeper than Python's recursion limit, longer than PATH_MAX from /
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "secret").write_text("s")
    before = len(os.listdir("/proc/self/fd"))  # what earlier tests in this process hold is not ours
    root = Root(str(top))
    try:
        assert sum(1 for _ in walk_dirs(root, b"", lambda name: False)) == 1201
        rel = b"d/" * 1200 + b"f"
        with root.cached():
            root.write_atomic(rel, [b"x"], mode=0o644)
            assert root.read_bytes(rel) == b"x"
            assert len(os.listdir("/proc/self/fd")) - before < 200  # a cache of 128, not one per level
            # A link planted on the way is refused, cached directories or not.
            os.symlink(outside, top / "d" / "d" / "link")
            with pytest.raises(Unsafe):
                root.listdir(b"d/d/link/sub")
            assert root.lstat(b"d/d/link/sub/secret") is None
            # Removed through the root: forgotten, so a directory made again at that place is used.
            root.rmtree(b"d/d/d")
            root.makedirs(b"d/d/d/again")
            root.write_atomic(b"d/d/d/again/g", [b"y"], mode=0o644)
        assert (top / "d" / "d" / "d" / "again" / "g").read_bytes() == b"y"
        # A directory replaced by a link between passes is refused by the next one.
        os.rename(top / "d" / "d" / "d", tmp_path / "moved")
        os.symlink(outside, top / "d" / "d" / "d")
        with root.cached(), pytest.raises(Unsafe):
            root.open_file(b"d/d/d/sub/secret")
        root.rmtree(b"d")
        assert os.listdir(top) == []
    finally:
        root.close()
        _remove_deep(tmp_path, b"top", b"moved")
