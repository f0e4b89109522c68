"""The memory.grow rewrite (corral.backends.wasm.instrument): exact bytes, and behaviour under wasmtime."""

from __future__ import annotations

import pytest

from corral.backends.wasm.instrument import GROW_FAILED_EXPORT, _memory_grows, instrument, read_u, write_u

wasmtime = pytest.importorskip("wasmtime", reason="wasmtime is not installed (pip install 'corral[wasm]')")

MODULE = """(module
  (type $t (func (param i32) (result i32)))
  (memory (export "memory") 1 4)
  (table 1 funcref)
  (global $g (mut i64) (i64.const 5))
  (elem (i32.const 0) $id)
  (func $id (type $t) (local.get 0))
  (func (export "grow") (param $pages i32) (result i32) (local $x i64) (local $y f64)
    (local.set $x (i64.const -300))
    (local.set $y (f64.const 1.5))
    (block $b (br_table $b $b (i32.const 1)))
    (memory.fill (i32.const 0) (i32.const 7) (i32.const 4))
    (drop (call_indirect (type $t) (i32.const 3) (i32.const 0)))
    (drop (v128.const i64x2 1 2))
    (memory.grow (local.get $pages)))
  (func (export "size") (result i32) (memory.size)))
"""


def test_leb128() -> None:
    for value in (0, 1, 127, 128, 300, 2**32 - 1):
        assert read_u(write_u(value), 0) == (value, len(write_u(value)))
    assert write_u(624485) == bytes([0xE5, 0x8E, 0x26])


def test_finds_memory_grow_exactly() -> None:
    # (func (result i32) (block (unreachable)) (memory.grow (i32.const 1))): 02 40 00 0b | 41 01 | 40 00 | 0b
    body = bytes([0x02, 0x40, 0x00, 0x0B, 0x41, 0x01, 0x40, 0x00, 0x0B])
    assert _memory_grows(body, 0) == [(6, 8)]


def test_no_memory_grow_no_change() -> None:
    data = bytes(wasmtime.wat2wasm('(module (memory 1) (func (export "f") (block (unreachable))))'))
    assert instrument(data) is None


def test_rewritten_module_behaves_the_same_and_flags_failures() -> None:
    data = bytes(wasmtime.wat2wasm(MODULE))
    out = instrument(data)
    assert out is not None
    engine = wasmtime.Engine()
    wasmtime.Module.validate(engine, out)
    store = wasmtime.Store(engine)
    instance = wasmtime.Instance(store, wasmtime.Module(engine, out), [])
    exports = instance.exports(store)
    flag = exports[GROW_FAILED_EXPORT]
    assert exports["grow"](store, 2) == 1 and flag.value(store) == 0  # grew from 1 to 3 pages
    assert exports["size"](store) == 3
    assert exports["grow"](store, 5) == -1 and flag.value(store) == 1  # past the maximum of 4
    assert exports["size"](store) == 3


def test_unknown_encodings_are_left_alone() -> None:
    assert instrument(b"\0asm\x0d\x00\x01\x00") is None  # a component
    assert instrument(b"not wasm") is None
