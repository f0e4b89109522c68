"""The wasm backend: WASI modules written in WAT here, and Python in the pinned WASI CPython.

Everything runs for real under wasmtime; nothing is mocked. Tests that need the WASI CPython skip
(saying why) when its package is not installed.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from pathlib import Path

import pytest

import corral
from corral.backends.base import Result
from corral.errors import ConfigError, PolicyDenied, SandboxFileError, UnsupportedPolicy
from corral.policy.resolve import resolve
from tests.conftest import corral_cli

wasmtime = pytest.importorskip("wasmtime", reason="wasmtime is not installed (pip install 'corral[wasm]')")

from corral.backends.wasm import runtime  # noqa: E402
from corral.backends.wasm.backend import WasmBackend  # noqa: E402
from corral.backends.wasm.engine import WasmEngine  # noqa: E402


def _python_available() -> str:
    try:
        runtime.python_wasm_path()
    except corral.BackendUnavailable as exc:
        return exc.reason
    return ""


needs_python = pytest.mark.skipif(bool(_python_available()), reason=f"no WASI CPython: {_python_available()}")

WASI = '(import "wasi_snapshot_preview1" "{0}" (func ${0} {1}))'
IMPORTS = "\n".join(
    WASI.format(name, sig)
    for name, sig in [
        ("fd_write", "(param i32 i32 i32 i32) (result i32)"),
        ("fd_read", "(param i32 i32 i32 i32) (result i32)"),
        ("path_open", "(param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)"),
        ("poll_oneoff", "(param i32 i32 i32 i32) (result i32)"),
        ("proc_exit", "(param i32)"),
    ]
)
# Helpers shared by the programs: $print(ptr, len) writes to stdout; memory 0..64 is scratch.
PRELUDE = (
    IMPORTS
    + """
  (memory (export "memory") 2)
  (func $print (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))
"""
)


def wat(body: str) -> str:
    return f"(module {PRELUDE}\n{body})"


HELLO = wat("""
  (data (i32.const 100) "hello from wasm\\n")
  (func (export "_start") (call $print (i32.const 100) (i32.const 16)) (call $proc_exit (i32.const 7)))
""")
# cat: open "data.txt" in the first preopen (fd 3), copy it to stdout; exit with path_open's errno.
CAT = wat("""
  (data (i32.const 100) "data.txt")
  (func (export "_start") (local $err i32)
    (local.set $err (call $path_open (i32.const 3) (i32.const 0) (i32.const 100) (i32.const 8)
      (i32.const 0) (i64.const 0x1fffffff) (i64.const 0x1fffffff) (i32.const 0) (i32.const 16)))
    (if (local.get $err) (then (call $proc_exit (local.get $err))))
    (i32.store (i32.const 20) (i32.const 1024))
    (i32.store (i32.const 24) (i32.const 4096))
    (drop (call $fd_read (i32.load (i32.const 16)) (i32.const 20) (i32.const 1) (i32.const 28)))
    (call $print (i32.const 1024) (i32.load (i32.const 28))))
""")
# write: create "out.txt" in the first preopen and write to it; exit with the first errno.
WRITE = wat("""
  (data (i32.const 100) "out.txt")
  (data (i32.const 200) "written by wasm\\n")
  (func (export "_start") (local $err i32)
    (local.set $err (call $path_open (i32.const 3) (i32.const 0) (i32.const 100) (i32.const 7)
      (i32.const 9) (i64.const 0x1fffffff) (i64.const 0x1fffffff) (i32.const 0) (i32.const 16)))
    (if (local.get $err) (then (call $proc_exit (local.get $err))))
    (i32.store (i32.const 20) (i32.const 200))
    (i32.store (i32.const 24) (i32.const 16))
    (call $proc_exit (call $fd_write (i32.load (i32.const 16)) (i32.const 20) (i32.const 1) (i32.const 28))))
""")
SPIN = wat('(func (export "_start") (loop $l (br $l)))')
TRAP = wat('(func (export "_start") unreachable)')
# grow: take memory a page at a time until growth fails, then exit 1 (as malloc returning NULL would).
GROW = wat("""
  (func (export "_start")
    (loop $l (br_if $l (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
    (call $proc_exit (i32.const 1)))
""")
# sleep: one clock subscription of 60 s through poll_oneoff.
SLEEP = wat("""
  (func (export "_start")
    (i64.store (i32.const 100) (i64.const 1))
    (i32.store8 (i32.const 108) (i32.const 0))
    (i32.store (i32.const 116) (i32.const 1))
    (i64.store (i32.const 124) (i64.const 60000000000))
    (drop (call $poll_oneoff (i32.const 100) (i32.const 200) (i32.const 1) (i32.const 300))))
""")
IMPORTS_UNKNOWN = '(module (import "env" "launch_missiles" (func)) (func (export "_start") (call 0)))'


@pytest.fixture
def project(tmp_path: Path) -> Path:
    work = tmp_path / "project"
    work.mkdir()
    return work


def write_module(directory: Path, name: str, text: str) -> str:
    path = directory / name
    path.write_text(text)
    return str(path)


def policy_for(work: Path, *zones: corral.Zone, **limits: object) -> corral.Policy:
    return corral.Policy(zones=(corral.Zone.rw(str(work)), *zones), cwd=str(work),
                         limits=corral.Limits(**limits))  # type: ignore[arg-type]  # fmt: skip


def run(work: Path, argv: list[str], policy: corral.Policy | None = None, **kwargs: object) -> Result:
    return corral.run(argv, policy=policy or policy_for(work), backend="wasm", **kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- WASI modules from WAT
def test_hello_exit_code_and_stdout(project: Path) -> None:
    prog = write_module(project, "hello.wat", HELLO)
    r = run(project, [prog])
    assert r.returncode == 7 and r.reason == "exited", r
    assert r.stdout == b"hello from wasm\n"


def test_binary_module_by_relative_path(project: Path) -> None:
    (project / "hello.wasm").write_bytes(bytes(wasmtime.wat2wasm(HELLO)))
    r = run(project, ["./hello.wasm"])
    assert r.returncode == 7 and r.stdout == b"hello from wasm\n", r


def test_file_round_trip_through_a_zone(project: Path) -> None:
    (project / "data.txt").write_text("from the host\n")
    cat = write_module(project, "cat.wat", CAT)
    r = run(project, [cat])
    assert r.ok and r.stdout == b"from the host\n", r
    writer = write_module(project, "write.wat", WRITE)
    r = run(project, [writer])
    assert r.ok, r
    assert (project / "out.txt").read_text() == "written by wasm\n"


def test_read_only_zone_refuses_writes(project: Path, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "out.txt").write_text("original\n")
    writer = write_module(project, "write.wat", WRITE)
    # /data sorts first among the zones, so it is the module's first preopen (fd 3).
    policy = corral.Policy(zones=(corral.Zone.ro(str(ro), "/data"), corral.Zone.ro(str(project))), cwd="/data")
    r = corral.run([writer], policy=policy, backend="wasm")
    assert r.returncode not in (0, None) and r.reason == "exited", r  # a WASI errno (EPERM/ENOTCAPABLE)
    assert (ro / "out.txt").read_text() == "original\n"
    assert sorted(os.listdir(ro)) == ["out.txt"]


def test_cpu_spin_ends_on_time(project: Path) -> None:
    r = run(project, [write_module(project, "spin.wat", SPIN)], policy=policy_for(project, timeout=1))
    assert r.reason == "timeout" and r.returncode == 137, r
    assert 0.9 < r.wall_time < 5, r.wall_time


def test_sleep_ends_on_time(project: Path) -> None:
    r = run(project, [write_module(project, "sleep.wat", SLEEP)], policy=policy_for(project, timeout=1))
    assert r.reason == "timeout", r
    assert r.wall_time < 5, r.wall_time


def test_memory_growth_past_the_limit_is_reason_memory(project: Path) -> None:
    r = run(project, [write_module(project, "grow.wat", GROW)], policy=policy_for(project, memory=16 << 20))
    assert r.reason == "memory" and r.returncode == 1, r
    assert r.peak_memory is not None and r.peak_memory <= 16 << 20


def test_trap_is_a_result_with_a_clear_reason(project: Path) -> None:
    r = run(project, [write_module(project, "trap.wat", TRAP)])
    assert r.reason == "trap" and r.returncode == 134, r
    assert "unreachable" in r.detail, r.detail
    assert b"corral: the module trapped" in r.stderr


def test_stdin_reaches_the_module(project: Path) -> None:
    echo = wat("""
      (func (export "_start")
        (i32.store (i32.const 20) (i32.const 1024)) (i32.store (i32.const 24) (i32.const 100))
        (drop (call $fd_read (i32.const 0) (i32.const 20) (i32.const 1) (i32.const 28)))
        (call $print (i32.const 1024) (i32.load (i32.const 28))))
    """)
    r = run(project, [write_module(project, "echo.wat", echo)], input=b"piped in")
    assert r.ok and r.stdout == b"piped in", r


def test_stdin_from_host_descriptors(project: Path) -> None:
    echo = wat("""
      (func (export "_start")
        (i32.store (i32.const 20) (i32.const 1024)) (i32.store (i32.const 24) (i32.const 100))
        (drop (call $fd_read (i32.const 0) (i32.const 20) (i32.const 1) (i32.const 28)))
        (call $print (i32.const 1024) (i32.load (i32.const 28))))
    """)
    prog = write_module(project, "echo.wat", echo)
    rp = resolve(policy_for(project))
    (project / "in.txt").write_bytes(b"from a file")
    with open(project / "in.txt", "rb") as f:
        r = WasmBackend().run(rp, [prog], sandbox_id="t", stdin=f.fileno())
    assert r.stdout == b"from a file", r
    read_end, write_end = os.pipe()
    os.write(write_end, b"from a pipe")
    os.close(write_end)
    try:
        r = WasmBackend().run(rp, [prog], sandbox_id="t", stdin=read_end)
    finally:
        os.close(read_end)
    assert r.stdout == b"from a pipe", r


# ---------------------------------------------------------------------- bad input
def test_not_a_module_is_a_config_error(project: Path) -> None:
    (project / "fake.wasm").write_text("#!/bin/sh\necho hi\n")
    with pytest.raises(ConfigError, match="not a WebAssembly module"):
        run(project, [str(project / "fake.wasm")])
    (project / "broken.wasm").write_bytes(b"\0asm\x01\x00\x00\x00\x01\xff")
    with pytest.raises(ConfigError, match="not a valid WebAssembly module"):
        run(project, [str(project / "broken.wasm")])
    (project / "component.wasm").write_bytes(b"\0asm\x0d\x00\x01\x00")
    with pytest.raises(ConfigError, match="component"):
        run(project, [str(project / "component.wasm")])


def test_shell_commands_are_refused(project: Path) -> None:
    with pytest.raises(ConfigError, match="not commands"):
        run(project, ["sh", "-c", "echo hi"])


def test_missing_module_is_127(project: Path) -> None:
    r = run(project, [str(project / "nope.wasm")])
    assert r.returncode == 127, r


def test_module_outside_every_zone_cannot_run(project: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    prog = write_module(elsewhere, "hello.wat", HELLO)
    r = run(project, [prog])
    assert r.returncode == 127, r


def test_unknown_import_is_a_config_error(project: Path) -> None:
    prog = write_module(project, "imports.wat", IMPORTS_UNKNOWN)
    with pytest.raises(ConfigError, match="launch_missiles"):
        run(project, [prog])


def test_library_module_without_start_is_refused(project: Path) -> None:
    prog = write_module(project, "lib.wat", '(module (func (export "add")))')
    with pytest.raises(ConfigError, match="_start"):
        run(project, [prog])


# ---------------------------------------------------------------------- what the policy cannot say here
@pytest.mark.parametrize(
    ("change", "part"),
    [
        ({"limits": corral.Limits(file_size=1 << 20)}, "limits.file_size"),
        ({"limits": corral.Limits(open_files=64)}, "limits.open_files"),
        ({"network": corral.Network(mode="host")}, "network mode 'host'"),
    ],
)
def test_unenforceable_parts_are_refused(project: Path, change: dict[str, object], part: str) -> None:
    policy = policy_for(project).replace(**change)
    with pytest.raises(UnsupportedPolicy, match=part):
        run(project, [write_module(project, "hello.wat", HELLO)], policy=policy)


def test_shapes_wasi_cannot_express_are_refused(project: Path, tmp_path: Path) -> None:
    (project / "sub").mkdir()
    nested = policy_for(project, corral.Zone.ro(str(project / "sub")))
    with pytest.raises(UnsupportedPolicy, match="inside the writable zone"):
        run(project, [write_module(project, "hello.wat", HELLO)], policy=nested)
    (tmp_path / "file.txt").write_text("x")
    file_zone = policy_for(project, corral.Zone.ro(str(tmp_path / "file.txt"), "/f"))
    with pytest.raises(UnsupportedPolicy, match="only directories"):
        run(project, [str(project / "hello.wat")], policy=file_zone)
    with pytest.raises(UnsupportedPolicy, match="limits.cpus"):
        run(project, [str(project / "hello.wat")], policy=policy_for(project, cpus=0.5))


def test_pids_limit_holds_by_construction(project: Path) -> None:
    r = run(project, [write_module(project, "hello.wat", HELLO)], policy=policy_for(project, pids=1))
    assert r.returncode == 7, r


# ---------------------------------------------------------------------- live sandboxes
def test_live_sandbox_files_and_fresh_instances(project: Path) -> None:
    counter = wat("""
      (global $n (mut i32) (i32.const 0))
      (data (i32.const 100) "0123456789")
      (func (export "_start")
        (global.set $n (i32.add (global.get $n) (i32.const 1)))
        (call $print (i32.add (i32.const 100) (global.get $n)) (i32.const 1)))
    """)
    write_module(project, "counter.wat", counter)
    scratch_mount = str(project / "scratch")  # deeper than the project zone, so the project stays fd 3
    with corral.Sandbox(policy_for(project, corral.Zone.tmpfs(scratch_mount)), backend="wasm") as sb:
        # Each exec is a new instance: module globals start over.
        assert sb.exec(["counter.wat"]).stdout == b"1"
        assert sb.exec(["counter.wat"]).stdout == b"1"
        sb.put_file("scratch/data.txt", b"kept between commands\n")
        assert sb.get_file(f"{scratch_mount}/data.txt") == b"kept between commands\n"
        assert not (project / "scratch").exists()  # a tmpfs zone is not the host directory below it
        sb.put_file("data.txt", b"in the project\n")
        assert (project / "data.txt").read_bytes() == b"in the project\n"
        assert sb.exec([write_module(project, "cat.wat", CAT)]).stdout == b"in the project\n"
        with pytest.raises(PolicyDenied):
            sb.get_file("/etc/passwd")
        os.symlink("/etc/passwd", project / "link")
        with pytest.raises(PolicyDenied):
            sb.get_file("link")
        with pytest.raises(PolicyDenied):
            sb.get_file("scratch/../../../../../../../../etc/passwd")
        with pytest.raises(PolicyDenied):
            sb.put_file("link", b"not through a link")
        assert (project / "link").is_symlink()
        with pytest.raises(SandboxFileError) as missing:
            sb.get_file("no-such-file")
        assert missing.value.errno == errno.ENOENT and "cannot read no-such-file in the sandbox" in str(missing.value)
        with pytest.raises(SandboxFileError) as directory:
            sb.get_file("scratch")
        assert directory.value.errno == errno.EISDIR
        with pytest.raises(SandboxFileError) as large:
            sb.get_file("data.txt", max_bytes=3)
        assert large.value.errno == errno.EFBIG
        with pytest.raises(SandboxFileError) as no_dir:
            sb.put_file("no-such-dir/x", b"x")
        assert no_dir.value.errno == errno.ENOENT
        sb.put_file("data.txt", b"replaced")
        assert (project / "data.txt").read_bytes() == b"replaced"
        assert not [p for p in os.listdir(project) if "corral-put" in p]
        scratch = sb._live._private[scratch_mount]  # type: ignore[attr-defined]
        assert os.path.isdir(scratch)
    assert not os.path.exists(scratch)


# ---------------------------------------------------------------------- Python
@needs_python
def test_python_imports_the_standard_library(project: Path) -> None:
    code = (
        "import json, re, sqlite3, decimal, zlib, hashlib, datetime, collections, csv, textwrap, sys\n"
        "db = sqlite3.connect(':memory:'); db.execute('create table t (x)'); db.execute('insert into t values (42)')\n"
        "print(json.dumps({'sum': str(decimal.Decimal('0.1') + decimal.Decimal('0.2')),"
        " 'sql': db.execute('select x from t').fetchone()[0], 'platform': sys.platform,"
        " 'sha': hashlib.sha256(zlib.compress(b'x')).hexdigest()[:8]}))\n"
    )
    r = corral.run_code(code, policy=policy_for(project), backend="wasm")
    assert r.ok, r.stderr_text
    import json

    out = json.loads(r.stdout)
    assert out["sum"] == "0.3" and out["sql"] == 42 and out["platform"] == "wasi", out


@needs_python
def test_python_files_zones_and_outside(project: Path, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "input.txt").write_text("read me\n")
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret\n")
    os.symlink(secret, project / "escape")
    code = f"""
import os
print(open('/data/input.txt').read().strip())
open('{project}/made.txt', 'w').write('made inside')
open('relative.txt', 'w').write('relative')
attempts = [
    lambda: open('/data/new.txt', 'w'),
    lambda: open('/data/input.txt', 'a'),
    lambda: os.truncate('/data/input.txt', 0),
    lambda: os.mkdir('/data/dir'),
    lambda: os.remove('/data/input.txt'),
    lambda: os.rename('/data/input.txt', '{project}/moved.txt'),
    lambda: os.link('/data/input.txt', '{project}/hardlink.txt'),
    lambda: open('/etc/passwd'),
    lambda: open('{secret}'),
    lambda: open('{project}/escape'),
    lambda: open('{project}/../secret.txt'),
    lambda: open('/proc/self/environ'),
]
for attempt in attempts:
    try:
        attempt()
        print('ALLOWED')
    except OSError as exc:
        print('refused', type(exc).__name__)
# WASI's '.' preopen (the working directory) matches any path no other zone does: '/' shows the project.
print(sorted(os.listdir('/')))
"""
    r = corral.run_code(code, policy=policy_for(project, corral.Zone.ro(str(ro), "/data")), backend="wasm")
    assert r.ok, r.stderr_text
    assert r.stdout_text.startswith("read me\n"), r.stdout_text
    assert "ALLOWED" not in r.stdout_text and r.stdout_text.count("refused") == 12, r.stdout_text
    assert r.stdout_text.splitlines()[-1] == str(sorted(os.listdir(project))), r.stdout_text
    assert (project / "made.txt").read_text() == "made inside"
    assert (project / "relative.txt").read_text() == "relative"
    assert sorted(os.listdir(ro)) == ["input.txt"] and (ro / "input.txt").read_text() == "read me\n"
    assert not (project / "moved.txt").exists() and not (project / "hardlink.txt").exists()


@needs_python
def test_python_memory_hog_and_cpu_spin(project: Path) -> None:
    hog = corral.run_code("b = bytearray(512 * 2**20)", policy=policy_for(project, memory=64 << 20), backend="wasm")
    assert hog.reason == "memory", hog
    assert b"MemoryError" in hog.stderr
    spin = corral.run_code("while True: pass", policy=policy_for(project, timeout=1), backend="wasm")
    assert spin.reason == "timeout" and spin.wall_time < 5, spin
    sleeper = corral.run_code("import time; time.sleep(60)", policy=policy_for(project, timeout=1), backend="wasm")
    assert sleeper.reason == "timeout" and sleeper.wall_time < 5, sleeper


@needs_python
def test_python_output_limit_env_stdin_and_args(project: Path) -> None:
    flood = corral.run_code("while True: print('x' * 1000)", policy=policy_for(project, output=50_000),
                            backend="wasm")  # fmt: skip
    assert flood.reason == "output" and len(flood.stdout) <= 50_000, flood.detail
    os.environ["CORRAL_WASM_SECRET"] = "s3cret"
    try:
        r = corral.run_code(
            "import os, sys; print(sorted(os.environ)); print(sys.argv[1:]); print(sys.stdin.read())",
            policy=policy_for(project), backend="wasm", args=["a", "b c"], input=b"from stdin",
        )  # fmt: skip
    finally:
        del os.environ["CORRAL_WASM_SECRET"]
    assert r.ok, r.stderr_text
    assert "CORRAL_WASM_SECRET" not in r.stdout_text and "['a', 'b c']" in r.stdout_text
    assert "from stdin" in r.stdout_text


def test_fuel_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="fuel"):
        WasmBackend(fuel=0)


@needs_python
def test_python_fuel(project: Path) -> None:
    r = corral.run_code("while True: pass", policy=policy_for(project, timeout=60), backend="wasm", fuel=2_000_000)
    assert r.reason == "timeout" and "fuel" in r.detail, r


def test_run_code_on_the_namespace_backend(project: Path, namespace_ok: None) -> None:
    r = corral.run_code("import sys; print(sys.platform, sys.argv[1:])", policy=policy_for(project),
                        backend="namespace", args=["x"])  # fmt: skip
    assert r.ok and r.stdout_text == "linux ['x']\n", r
    with pytest.raises(ConfigError, match="fuel"):
        corral.run_code("pass", policy=policy_for(project), backend="namespace", fuel=10)
    with pytest.raises(ConfigError, match="language"):
        corral.run_code("1", language="cobol", policy=policy_for(project))


# ---------------------------------------------------------------------- the compiled-module cache
def test_cache_is_private_and_reused(tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "wasm"
    prog = write_module(tmp_path, "hello.wat", HELLO)
    engine = WasmEngine(cache_dir=str(cache))
    engine.load(prog)
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    files = list(cache.glob("*.cwasm"))
    assert len(files) == 1 and stat.S_IMODE(files[0].stat().st_mode) == 0o600
    digest = files[0].name.split("-")[0]
    again = WasmEngine(cache_dir=str(cache))
    assert again._remembered_digest(os.path.realpath(prog)) == digest
    assert again._from_cache(digest) is not None  # loaded, not compiled
    # A cache entry another user could have written is not trusted.
    if os.geteuid() == 0:
        os.chown(files[0], 65534, 65534)
        assert again._from_cache(digest) is None
    # A garbage entry of ours is discarded and the module compiled again.
    files[0].unlink()
    files[0].write_bytes(b"garbage")
    os.chmod(files[0], 0o600)
    fresh = WasmEngine(cache_dir=str(cache))
    assert fresh._from_cache(digest) is None and not files[0].exists()
    fresh.load(prog)
    assert files[0].exists()


def test_cache_directory_others_can_write_is_not_used(tmp_path: Path) -> None:
    parent = tmp_path / "shared"
    parent.mkdir()
    os.chmod(parent, 0o777)
    assert WasmEngine(cache_dir=str(parent / "wasm")).cache_dir is None
    os.chmod(parent, 0o755)
    loose = parent / "loose"
    loose.mkdir(mode=0o777)
    os.chmod(loose, 0o777)
    assert WasmEngine(cache_dir=str(loose)).cache_dir == str(loose)
    assert stat.S_IMODE(os.stat(loose).st_mode) == 0o700  # tightened


def test_pinned_runtime_hash_is_checked(tmp_path: Path) -> None:
    prog = tmp_path / "python.wasm"
    prog.write_bytes(bytes(wasmtime.wat2wasm(HELLO)))
    engine = WasmEngine(cache_dir=str(tmp_path / "cache"))
    with pytest.raises(corral.BackendUnavailable, match="pinned SHA-256"):
        engine.load(str(prog), expected_sha256=runtime.SHA256)


# ---------------------------------------------------------------------- the command line
def test_cli_run_wasm_module(project: Path) -> None:
    prog = write_module(project, "hello.wat", HELLO)
    done = corral_cli("run", "--backend", "wasm", "--", prog, cwd=project)
    assert done.returncode == 7 and done.stdout == b"hello from wasm\n", done.stderr
    done = corral_cli("run", "--backend", "wasm", "--", "sh", "-c", "true", cwd=project)
    assert done.returncode == 2 and b"not commands" in done.stderr, done.stderr
    done = corral_cli("run", "--backend", "wasm", "--timeout", "1s", "--", write_module(project, "s.wat", SPIN),
                      cwd=project)  # fmt: skip
    assert done.returncode == 124 and b"timed out" in done.stderr, done.stderr


@needs_python
def test_cli_run_code(project: Path) -> None:
    (project / "script.py").write_text("import sys; print('args', sys.argv[1:]); sys.exit(4)\n")
    done = corral_cli("run-code", "--backend", "wasm", "script.py", "one", cwd=project)
    assert done.returncode == 4 and done.stdout == b"args ['one']\n", done.stderr
    done = corral_cli("run-code", "--backend", "wasm", "-c", "print(input()[::-1])", cwd=project, input=b"olleh\n")
    assert done.returncode == 0 and done.stdout == b"hello\n", done.stderr
    done = corral_cli("run-code", "--backend", "wasm", "--memory", "32M", "-c", "x = 'a' * 2**30", cwd=project)
    assert done.returncode == 1 and b"memory limit" in done.stderr, done.stderr


def test_doctor_lists_wasm() -> None:
    done = corral_cli("doctor", "--json")
    assert b'"wasm"' in done.stdout, done.stdout[:500]
    assert sys.executable
