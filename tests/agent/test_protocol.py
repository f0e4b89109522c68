"""The agent protocol's JSON: exactly json's output and json's verdicts, through the faster C calls."""

from __future__ import annotations

import json
import os
import random
import socket

import pytest

from corral.agent import protocol
from corral.agent.client import _status

SAMPLES: list[object] = [
    {"op": "exec", "argv": ["/bin/sh", "-c", "echo 'hi' \"there\""], "env": {"PATH": "/usr/bin", "LANG": "C.UTF-8"},
     "cwd": "/tmp/prøject ☃", "id": 7},
    {"status": 0, "maxrss": 123456789012, "error": None, "ok": True, "ratio": 0.25, "big": 10**30},
    {"nested": {"list": [1, [2, [3, {}]], []], "tuple": (1, "two")}, "ctl": "\x00\x1f\x7f\u2028", "": ""},
    {"surrogate": "\udcff", "emoji": "🙂", 5: "int key", None: "null key", True: "bool key"},
]  # fmt: skip


@pytest.mark.parametrize("message", SAMPLES)
def test_encode_is_json_dumps_and_decode_is_json_loads(message: object) -> None:
    data = protocol.encode(message)
    assert data == json.dumps(message, separators=(",", ":")).encode()
    assert protocol.decode(data) == json.loads(data)
    assert protocol.decode(data.decode()) == json.loads(data)


@pytest.mark.parametrize("value", [["/bin/sh", "-c", 'echo "☃"'], '/tmp/dir "quoted"', 7, 0.5, None, True, []])
def test_any_value_encodes_as_json_dumps_does(value: object) -> None:
    # A request is assembled from separately encoded parts (argv, the environment once, cwd).
    assert protocol.encode(value) == json.dumps(value, separators=(",", ":")).encode()


def test_decode_agrees_with_json_loads_on_random_mangled_input() -> None:
    rng = random.Random(1234)
    base = [protocol.encode(m).decode() for m in SAMPLES] + [' {"a": [1, 2]} \n', "[]", "3", '"s"', "null"]
    for _ in range(3000):
        text = list(rng.choice(base))
        for _ in range(rng.randint(0, 3)):
            if text:
                i = rng.randrange(len(text))
                text[i : i + rng.randint(0, 2)] = rng.choice(["", " ", "}", "{", '"', ",", "x", "1", "\n", "\\"])
        mangled = "".join(text)
        try:
            expected: object = json.loads(mangled)
        except ValueError:
            with pytest.raises(ValueError):
                protocol.decode(mangled)
        else:
            assert protocol.decode(mangled) == expected, mangled


def test_unserializable_values_are_refused_as_json_refuses_them() -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        protocol.encode({"fd": object()})


def test_a_message_crosses_a_socket_with_its_descriptors() -> None:
    left, right = socket.socketpair()
    r, w = os.pipe()
    try:
        protocol.send(left, SAMPLES[0], [w])  # type: ignore[arg-type]
        message, fds = protocol.recv(right)
        assert message == json.loads(json.dumps(SAMPLES[0])) and len(fds) == 1
        os.close(fds[0])
        left.sendall(b"\x00\x00\x00\x02[]")
        with pytest.raises(protocol.ProtocolError, match="JSON object"):
            protocol.recv(right)
    finally:
        for fd in (r, w):
            os.close(fd)
        left.close()
        right.close()


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        (b'{"status": 0, "maxrss": 10}\n', {"status": 0, "maxrss": 10}),
        (b'{"status": 256}\n{"ignored": 1}\n', {"status": 256}),
        (b"", None),  # the agent died before it answered
        (b"not json\n", None),  # garbage from an agent a command took over: lost, not trusted
        (b"[1, 2]\n", None),
        (b'{"status": "\xff"}\n', None),
    ],
)
def test_a_status_line_is_the_reply_or_the_sandbox_is_lost(written: bytes, expected: object) -> None:
    assert _status(written) == expected
