"""Make a failed `memory.grow` visible to the host, so a memory hog ends with reason "memory".

wasmtime's store limits make `memory.grow` return -1 past the memory limit; the module sees an
allocation failure (Python raises MemoryError, C aborts) and the host sees only an exit status or
a trap. Before compiling, corral rewrites each `memory.grow` into

    memory.grow M; local.tee $t; i32.const -1; i32.eq; if; i32.const 1; global.set $g; end; local.get $t

with `$g` a new mutable i32 global exported as `corral.grow_failed` and `$t` a new local of the
function. Nothing else changes: no index shifts (the global is appended after the existing ones,
the local after the existing locals), the module behaves as before, and the host reads the flag
after the run. Pure functions over bytes; a module using a feature the decoder does not know
(GC, exception handling, memory64) is left as it is (`instrument` returns None).
"""

from __future__ import annotations

GROW_FAILED_EXPORT = "corral.grow_failed"
VERSION = "1"  # part of the compiled-module cache key


class Unsupported(Exception):
    """The module uses an encoding this decoder does not handle."""


def instrument(data: bytes) -> bytes | None:
    """`data` with every memory.grow flagged on failure, or None when it cannot (or need not) be done."""
    try:
        return _instrument(data)
    except (Unsupported, IndexError):
        return None


# ---------------------------------------------------------------------- LEB128
def read_u(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 70:
            raise Unsupported("LEB128 too long")


def skip_leb(data: bytes, pos: int) -> int:
    while data[pos] & 0x80:
        pos += 1
    return pos + 1


def write_u(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _vec(items: list[bytes]) -> bytes:
    return write_u(len(items)) + b"".join(items)


# ---------------------------------------------------------------------- sections
def sections(data: bytes) -> list[tuple[int, bytes]]:
    if data[:8] != b"\0asm\x01\x00\x00\x00":
        raise Unsupported("not a core module")
    out = []
    pos = 8
    while pos < len(data):
        section_id = data[pos]
        size, pos = read_u(data, pos + 1)
        out.append((section_id, data[pos : pos + size]))
        pos += size
    if pos != len(data):
        raise Unsupported("truncated section")
    return out


def encode(parts: list[tuple[int, bytes]]) -> bytes:
    return b"\0asm\x01\x00\x00\x00" + b"".join(bytes([i]) + write_u(len(c)) + c for i, c in parts)


def _skip_limits(data: bytes, pos: int) -> tuple[int, bool]:
    flags = data[pos]
    pos = skip_leb(data, pos + 1)
    if flags & 1:
        pos = skip_leb(data, pos)
    return pos, bool(flags & 4)


def _skip_valtype(data: bytes, pos: int) -> int:
    byte = data[pos]
    if byte in (0x63, 0x64):  # (ref null? heaptype)
        return skip_leb(data, pos + 1)
    return pos + 1


def _type_params(content: bytes) -> list[int]:
    count, pos = read_u(content, 0)
    params = []
    for _ in range(count):
        if content[pos] != 0x60:
            raise Unsupported("non-function type (GC proposal)")
        n, pos = read_u(content, pos + 1)
        for _ in range(n):
            pos = _skip_valtype(content, pos)
        params.append(n)
        m, pos = read_u(content, pos)
        for _ in range(m):
            pos = _skip_valtype(content, pos)
    return params


def _imports(content: bytes) -> tuple[list[int], int, int, bool]:
    """(type index of each imported function, imported globals, imported memories, any 64-bit memory)."""
    count, pos = read_u(content, 0)
    funcs: list[int] = []
    globals_ = memories = 0
    memory64 = False
    for _ in range(count):
        for _ in range(2):
            n, pos = read_u(content, pos)
            pos += n
        kind = content[pos]
        pos += 1
        if kind == 0:
            idx, pos = read_u(content, pos)
            funcs.append(idx)
        elif kind == 1:
            pos = _skip_valtype(content, pos)
            pos, _ = _skip_limits(content, pos)
        elif kind == 2:
            pos, is64 = _skip_limits(content, pos)
            memory64 = memory64 or is64
            memories += 1
        elif kind == 3:
            pos = _skip_valtype(content, pos) + 1
            globals_ += 1
        elif kind == 4:
            pos = skip_leb(content, pos + 1)
        else:
            raise Unsupported(f"import kind {kind}")
    return funcs, globals_, memories, memory64


def _instrument(data: bytes) -> bytes | None:
    parts = sections(data)
    by_id = {i: c for i, c in parts if i != 0}
    code = by_id.get(10)
    if code is None or b"\x40" not in code:
        return None
    params = _type_params(by_id.get(1, b"\x00"))
    _funcs, imported_globals, memories, memory64 = _imports(by_id.get(2, b"\x00"))
    if 5 in by_id:
        count, pos = read_u(by_id[5], 0)
        memories += count
        for _ in range(count):
            pos, is64 = _skip_limits(by_id[5], pos)
            memory64 = memory64 or is64
    if memory64:
        raise Unsupported("memory64")
    func_types = []
    if 3 in by_id:
        count, pos = read_u(by_id[3], 0)
        for _ in range(count):
            idx, pos = read_u(by_id[3], pos)
            func_types.append(idx)
    # With one memory, memory.grow is `40 00` (canonical LEB): bodies without those bytes need no decoding.
    marker = b"\x40\x00" if memories <= 1 else b"\x40"
    defined_globals = read_u(by_id[6], 0)[0] if 6 in by_id else 0
    flag = imported_globals + defined_globals

    count, pos = read_u(code, 0)
    if count != len(func_types):
        raise Unsupported("function and code sections disagree")
    bodies: list[bytes] = []
    changed = False
    for i in range(count):
        size, pos = read_u(code, pos)
        body = code[pos : pos + size]
        pos += size
        new = _rewrite_body(body, params[func_types[i]], flag) if marker in body else None
        if new is not None:
            changed = True
        bodies.append(new if new is not None else body)
    if not changed:
        return None
    new_code = write_u(count) + b"".join(write_u(len(b)) + b for b in bodies)
    global_entry = b"\x7f\x01\x41\x00\x0b"  # (global (mut i32) (i32.const 0))
    if 6 in by_id:
        old = by_id[6]
        new_globals = write_u(defined_globals + 1) + old[len(write_u(defined_globals)) :] + global_entry
        if read_u(old, 0)[1] != len(write_u(defined_globals)):
            raise Unsupported("non-canonical global count")
    else:
        new_globals = write_u(1) + global_entry
    name = GROW_FAILED_EXPORT.encode()
    export_entry = write_u(len(name)) + name + b"\x03" + write_u(flag)
    if 7 in by_id:
        n, start = read_u(by_id[7], 0)
        new_exports = write_u(n + 1) + by_id[7][start:] + export_entry
    else:
        new_exports = write_u(1) + export_entry
    out: list[tuple[int, bytes]] = []
    placed_global = placed_export = False
    order = [1, 2, 3, 4, 5, 13, 6, 7, 8, 9, 12, 10, 11]  # the binary format's section order

    def rank(section_id: int) -> int:
        return order.index(section_id) if section_id in order else -1

    for section_id, content in parts:
        if section_id != 0:
            if not placed_global and rank(section_id) > rank(6):
                out.append((6, new_globals))
                placed_global = True
            if not placed_export and rank(section_id) > rank(7):
                out.append((7, new_exports))
                placed_export = True
        if section_id == 6:
            out.append((6, new_globals))
            placed_global = True
        elif section_id == 7:
            out.append((7, new_exports))
            placed_export = True
        elif section_id == 10:
            out.append((10, new_code))
        else:
            out.append((section_id, content))
    if not placed_global:
        out.append((6, new_globals))
    if not placed_export:
        out.append((7, new_exports))
    return encode(out)


def _rewrite_body(body: bytes, nparams: int, flag: int) -> bytes | None:
    ngroups, pos = read_u(body, 0)
    groups = []
    nlocals = 0
    for _ in range(ngroups):
        n, type_start = read_u(body, pos)
        pos = _skip_valtype(body, type_start)
        groups.append(write_u(n) + body[type_start:pos])
        nlocals += n
    grows = _memory_grows(body, pos)
    if not grows:
        return None
    tmp = write_u(nparams + nlocals)
    out = bytearray(_vec([*groups, b"\x01\x7f"]))  # the locals, and one more i32
    last = pos
    for _start, end in grows:
        out += body[last:end]
        # local.tee $t; i32.const -1; i32.eq; if; i32.const 1; global.set $g; end; local.get $t
        out += b"\x22" + tmp + b"\x41\x7f\x46\x04\x40\x41\x01\x24" + write_u(flag) + b"\x0b\x20" + tmp
        last = end
    out += body[last:]
    return bytes(out)


_VALTYPES = (0x7F, 0x7E, 0x7D, 0x7C, 0x7B, 0x70, 0x6F)
_NO_IMMEDIATE = frozenset([0x00, 0x01, 0x05, 0x0A, 0x0B, 0x0F, 0x19, 0x1A, 0x1B, 0xD1, 0xD3, 0xD4, *range(0x45, 0xC5)])
_ONE_INDEX = frozenset([0x07, 0x08, 0x09, 0x0C, 0x0D, 0x10, 0x12, 0x14, 0x15, 0x18, *range(0x20, 0x27), 0x3F,
                        0xD2, 0xD5, 0xD6])  # fmt: skip
_FC_TWO = frozenset([8, 10, 12, 14])
_FC_ONE = frozenset([9, 11, 13, 15, 16, 17])


def _memory_grows(body: bytes, pos: int) -> list[tuple[int, int]]:
    """(start, end) of each memory.grow instruction in the expression starting at `pos`."""
    found = []
    end = len(body)
    while pos < end:
        op = body[pos]
        start = pos
        pos += 1
        if op in _NO_IMMEDIATE:
            continue
        if op == 0x40:  # memory.grow memidx
            pos = skip_leb(body, pos)
            found.append((start, pos))
        elif op in _ONE_INDEX:
            pos = skip_leb(body, pos)
        elif op in (0x02, 0x03, 0x04, 0x06):  # block, loop, if, try: blocktype
            byte = body[pos]
            if byte == 0x40 or byte in _VALTYPES:
                pos += 1
            elif byte in (0x63, 0x64):
                pos = skip_leb(body, pos + 1)
            else:
                pos = skip_leb(body, pos)
        elif op in (0x11, 0x13):  # call_indirect, return_call_indirect
            pos = skip_leb(body, skip_leb(body, pos))
        elif op == 0x0E:  # br_table
            n, pos = read_u(body, pos)
            for _ in range(n + 1):
                pos = skip_leb(body, pos)
        elif op == 0x1C:  # select t*
            n, pos = read_u(body, pos)
            for _ in range(n):
                pos = _skip_valtype(body, pos)
        elif 0x28 <= op <= 0x3E:  # loads and stores: memarg
            pos = _skip_memarg(body, pos)
        elif op in (0x41, 0x42):
            pos = skip_leb(body, pos)
        elif op == 0x43:
            pos += 4
        elif op == 0x44:
            pos += 8
        elif op == 0xD0:  # ref.null heaptype
            pos = skip_leb(body, pos)
        elif op == 0xFC:
            sub, pos = read_u(body, pos)
            if sub in _FC_TWO:
                pos = skip_leb(body, skip_leb(body, pos))
            elif sub in _FC_ONE:
                pos = skip_leb(body, pos)
            elif sub > 7:
                raise Unsupported(f"0xFC {sub}")
        elif op == 0xFD:
            sub, pos = read_u(body, pos)
            if sub <= 11 or sub in (92, 93):
                pos = _skip_memarg(body, pos)
            elif sub in (12, 13):
                pos += 16
            elif 21 <= sub <= 34:
                pos += 1
            elif 84 <= sub <= 91:
                pos = _skip_memarg(body, pos) + 1
        elif op == 0xFE:
            sub, pos = read_u(body, pos)
            pos = pos + 1 if sub == 0x03 else _skip_memarg(body, pos)
        else:
            raise Unsupported(f"opcode {op:#x}")
    return found


def _skip_memarg(body: bytes, pos: int) -> int:
    align, pos = read_u(body, pos)
    if align & 0x40:
        pos = skip_leb(body, pos)
    return skip_leb(body, pos)
