"""`corral mcp` with the real MCP client from the same SDK, over stdio and streamable HTTP."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp.client.stdio import StdioServerParameters

from mcp import Client
from tests.conftest import corral_cli

pytestmark = [pytest.mark.usefixtures("namespace_ok"), pytest.mark.anyio]

CALC = "def add(a, b):\n    return a - b\n"
TEST = "from calc import add\nassert add(2, 3) == 5, f'add(2, 3) = {add(2, 3)}'\nprint('tests pass')\n"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    p = tmp_path / "project"
    p.mkdir()
    (p / "calc.py").write_text(CALC)
    (p / "test_calc.py").write_text(TEST)
    os.chmod(tmp_path, 0o755)
    return p


@pytest.fixture
def data_dir(tmp_path: Path) -> dict[str, str]:
    return {"XDG_DATA_HOME": str(tmp_path / "data")}


def stdio(project: Path, env: dict[str, str], *flags: str) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable, args=["-m", "corral", "mcp", "--project", str(project), *flags],
        env={**os.environ, **env}, cwd=str(project),
    )  # fmt: skip


def text(result: types.CallToolResult) -> str:
    return "".join(c.text for c in result.content if isinstance(c, types.TextContent))


async def test_tools_have_schemas_and_descriptions(project: Path, data_dir: dict[str, str]) -> None:
    async with Client(stdio(project, data_dir)) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == {"read_file", "write_file", "edit_file", "list_dir", "search", "bash", "changes", "log",
                          "rollback"}  # fmt: skip
    for tool in tools.values():
        assert tool.description and len(tool.description) > 20
        assert tool.input_schema["type"] == "object"
    assert tools["edit_file"].input_schema["required"] == ["path", "old", "new"]
    assert tools["read_file"].annotations.read_only_hint is True
    assert tools["bash"].annotations.read_only_hint is False


async def test_scripted_agent_session(project: Path, data_dir: dict[str, str]) -> None:
    """Edit, run the tests, see them fail, fix, roll back one step, read the changes."""
    async with Client(stdio(project, data_dir)) as c:
        r = await c.call_tool("bash", {"command": "python3 test_calc.py"})
        assert not r.is_error and "add(2, 3) = -1" in text(r) and r.structured_content["returncode"] == 1
        r = await c.call_tool("edit_file", {"path": "calc.py", "old": "a - b", "new": "a * b"})
        assert not r.is_error
        broken_step = r.structured_content["step"]
        r = await c.call_tool("bash", {"command": "python3 test_calc.py"})
        assert "add(2, 3) = 6" in text(r)
        r = await c.call_tool("rollback", {"step": broken_step - 1})
        assert not r.is_error
        r = await c.call_tool("read_file", {"path": "calc.py"})
        assert "a - b" in text(r)
        r = await c.call_tool("edit_file", {"path": "calc.py", "old": "a - b", "new": "a + b"})
        r = await c.call_tool("bash", {"command": "python3 test_calc.py"})
        assert "tests pass" in text(r) and r.structured_content["returncode"] == 0
        r = await c.call_tool("changes", {})
        assert "1 modified" in text(r) and "+    return a + b" in text(r)
        steps = (await c.call_tool("log", {})).structured_content["steps"]
        assert [s["tool"] for s in steps][:3] == ["copy-in", "bash", "edit_file"]
        assert any(s["tool"] == "rollback" for s in steps)
        resources = {str(r.uri) for r in (await c.list_resources()).resources}
        assert resources == {"corral://session/changes", "corral://session/audit"}
        audit = (await c.read_resource("corral://session/audit")).contents[0].text
        assert '"edit_file"' in audit or "edit_file" in audit
    assert (project / "calc.py").read_text() == CALC  # the host project is untouched until sync


async def test_bad_calls_are_tool_errors_and_the_server_survives(project: Path, data_dir: dict[str, str]) -> None:
    flags = ("--memory", "64M", "--output", "64K", "--pids", "64", "--file-size", "1M")
    async with Client(stdio(project, data_dir, *flags)) as c:
        for name, args, message in (
            ("nope", {}, "unknown tool"),
            ("read_file", {}, "needs path"),
            ("read_file", {"path": 3}, "must be a string"),
            ("read_file", {"path": "x", "colour": "red"}, "no argument 'colour'"),
            ("read_file", {"path": "../../etc/shadow"}, "leaves the workspace"),
            ("edit_file", {"path": "calc.py", "old": "absent", "new": "x"}, "not found"),
            ("rollback", {"step": 999}, "step"),
            ("changes", {"step": "one"}, "integer"),
            ("log", {"extra": 1}, "log has no argument 'extra' (it takes none)"),
            ("rollback", {"step": 0, "to": 1}, "rollback has no argument 'to' (it takes step)"),
        ):
            r = await c.call_tool(name, args)
            assert r.is_error, (name, args, text(r))
            assert message in text(r), (name, text(r))
        limits = {
            "timeout": await c.call_tool("bash", {"command": "sleep 30", "timeout": 1}),
            "memory": await c.call_tool("bash", {"command": "python3 -c 'b = bytearray(512 * 2**20)'"}),
            "output": await c.call_tool("bash", {"command": "yes"}),
            "file_size": await c.call_tool("bash", {"command": "head -c 5000000 /dev/zero > big.bin"}),
        }
        bomb = await c.call_tool("bash", {"command": "for i in $(seq 200); do sleep 5 & done; wait", "timeout": 20})
        assert bomb.structured_content["reason"] in ("pids", "exited"), text(bomb)
        assert "fork" in text(bomb) or "Resource temporarily unavailable" in text(bomb), text(bomb)
        for reason, r in limits.items():
            assert r.structured_content["reason"] == reason, (reason, text(r))
        r = await c.call_tool("bash", {"command": "echo still alive"})
        assert "still alive" in text(r)


async def test_ask_rules_use_elicitation(project: Path, data_dir: dict[str, str]) -> None:
    asked: list[str] = []

    async def elicit(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.append(params.message)
        return types.ElicitResult(action="accept", content={"approve": "ok.txt" in params.message})

    for mode in ("auto", "legacy"):  # 2026-07-28 input-required round trip, and the older mid-call request
        asked.clear()
        async with Client(stdio(project, data_dir, "--ask-command", "rm"), elicitation_callback=elicit,
                          mode=mode) as c:  # fmt: skip
            r = await c.call_tool("bash", {"command": "touch ok.txt no.txt && rm ok.txt"})
            assert not r.is_error and r.structured_content["returncode"] == 0, text(r)
            r = await c.call_tool("bash", {"command": "rm no.txt"})
            assert r.is_error and "said no" in text(r)
        assert len(asked) == 2 and "rm ok.txt" in asked[0], mode
    async with Client(stdio(project, data_dir, "--ask-command", "rm")) as c:  # cannot elicit: fail closed
        r = await c.call_tool("bash", {"command": "rm -f anything"})
        assert r.is_error and "denied by policy" in text(r)


# ------------------------------------------------------------------------------ HTTP
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def http_server(project: Path, env: dict[str, str], *flags: str) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral", "mcp", "--project", str(project), "--http", f"127.0.0.1:{port}", *flags],
        env={**os.environ, **env}, cwd=str(project), stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_http_two_clients_one_session_no_lost_commits(project: Path, data_dir: dict[str, str]) -> None:
    with http_server(project, data_dir) as url:

        async def agent(client_id: int, count: int) -> None:
            async with Client(url) as c:
                for i in range(count):
                    r = await c.call_tool(
                        "write_file", {"path": f"c{client_id}-{i}.txt", "content": f"{client_id}/{i}"}
                    )
                    assert not r.is_error, text(r)

        async with anyio.create_task_group() as tg:
            tg.start_soon(agent, 1, 10)
            tg.start_soon(agent, 2, 10)
        async with Client(url) as c:
            steps = (await c.call_tool("log", {})).structured_content["steps"]
            listing = text(await c.call_tool("list_dir", {"path": "."}))
    writes = [s for s in steps if s["tool"] == "write_file"]
    assert len(writes) == 20 and len({s["step"] for s in steps}) == len(steps)
    for client_id in (1, 2):
        for i in range(10):
            assert f"c{client_id}-{i}.txt" in listing


async def test_http_bearer_token(project: Path, data_dir: dict[str, str]) -> None:
    import httpx

    with http_server(project, data_dir, "--token", "s3cret-token") as url:
        r = httpx.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
        assert r.status_code == 401
        r = httpx.post(url, json={}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401


def test_non_loopback_bind_is_refused_without_a_token(project: Path) -> None:
    r = corral_cli("mcp", "--project", str(project), "--http", "0.0.0.0:8765")
    assert r.returncode == 2 and b"not a loopback address" in r.stderr
    r = corral_cli("mcp", "--project", str(project), "--http", "0.0.0.0:8765", "--allow-remote")
    assert r.returncode == 2 and b"bearer token" in r.stderr and b"need --allow-remote" not in r.stderr, r.stderr
    r = corral_cli("mcp", "--project", str(project), "--http", "0.0.0.0:8765", "--token", "t")
    assert r.returncode == 2 and b"need --allow-remote" in r.stderr and b"bearer token" not in r.stderr, r.stderr


def test_a_wrong_flag_names_the_mcp_command(project: Path) -> None:
    r = corral_cli("mcp", "--project", str(project), "--bogus")
    assert r.returncode == 2 and b"corral: mcp: unknown flag '--bogus' (see corral mcp --help)" in r.stderr, r.stderr


async def test_sync_tool_only_when_allowed(project: Path, data_dir: dict[str, str]) -> None:
    async with Client(stdio(project, data_dir, "--allow-sync")) as c:
        assert "sync" in {t.name for t in (await c.list_tools()).tools}
        await c.call_tool("edit_file", {"path": "calc.py", "old": "a - b", "new": "a + b"})
        r = await c.call_tool("sync", {})
        assert not r.is_error, text(r)
    assert "a + b" in (project / "calc.py").read_text()


@contextlib.contextmanager
def raw_server(project: Path, env: dict[str, str], *flags: str) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """`corral mcp` on pipes this test writes JSON-RPC to by hand, and its workspace (from its banner)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral", "mcp", "--project", str(project), *flags], env={**os.environ, **env},
        cwd=str(project), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stderr is not None
    try:
        banner = proc.stderr.readline().decode()
        yield proc, Path(banner.split("workspace ")[1].split(",")[0])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def start_a_long_command(proc: subprocess.Popen[bytes], workspace: Path) -> None:
    """Initialize, call bash with a minute-long command, and return once it runs."""
    import json

    assert proc.stdin is not None
    for message in (
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18",
         "capabilities": {}, "clientInfo": {"name": "test", "version": "0"}}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
         "params": {"name": "bash", "arguments": {"command": "touch started; sleep 60"}}},
    ):  # fmt: skip
        proc.stdin.write(json.dumps(message).encode() + b"\n")
    proc.stdin.flush()
    deadline = time.monotonic() + 30
    while not (workspace / "started").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)


@pytest.mark.parametrize("mode", ["idle", "running-a-command", "http"])
def test_sigterm_ends_the_server_and_removes_its_temporary_session(
    project: Path, data_dir: dict[str, str], mode: str
) -> None:
    import signal

    http = ["--http", f"127.0.0.1:{free_port()}"] if mode == "http" else []
    sessions = Path(data_dir["XDG_DATA_HOME"]) / "corral" / "sessions"
    with raw_server(project, data_dir, *http) as (proc, workspace):
        assert workspace.is_dir() and len(list(sessions.iterdir())) == 1
        if http:
            assert proc.stderr is not None and b"serving http" in proc.stderr.readline()
        if mode == "running-a-command":
            start_a_long_command(proc, workspace)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 128 + signal.SIGTERM
        assert time.monotonic() - started < 10  # a running command does not hold the server up
        assert list(sessions.iterdir()) == [], "the temporary session was left behind"


async def test_a_cancelled_call_kills_its_command(project: Path, data_dir: dict[str, str]) -> None:
    async with Client(stdio(project, data_dir)) as c:
        with anyio.move_on_after(2):
            await c.call_tool("bash", {"command": "touch started; sleep 30"})
        started = time.monotonic()
        r = await c.call_tool("bash", {"command": "echo next"})
        assert "next" in text(r) and time.monotonic() - started < 10, text(r)
        r = await c.call_tool("bash", {"command": "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"})
        assert "sleep 30" not in text(r), text(r)


def test_a_client_that_goes_away_mid_call_ends_the_server(project: Path, data_dir: dict[str, str]) -> None:
    with raw_server(project, data_dir) as (proc, workspace):
        start_a_long_command(proc, workspace)
        assert proc.stdin is not None
        proc.stdin.close()  # the client is gone
        assert proc.wait(timeout=20) == 0
        assert not list((Path(data_dir["XDG_DATA_HOME"]) / "corral" / "sessions").iterdir())


def test_flags_that_would_change_a_resumed_session_are_refused(
    project: Path, data_dir: dict[str, str], tmp_path: Path
) -> None:
    r = corral_cli("session", "start", "--name", "m1", "--project", str(project), env=data_dir)
    assert r.returncode == 0, r.stderr
    other = tmp_path / "other"
    other.mkdir()
    for flags, named in ((["--deny-command", "echo"], "policy flags"), (["--project", str(other)], "--project"),
                         (["--exclude", "*.log"], "--exclude")):  # fmt: skip
        r = corral_cli("mcp", "--session", "m1", *flags, cwd=project, env=data_dir, input=b"")
        assert r.returncode == 2, r.stderr
        assert f"session 'm1' exists, for {project} with the policy it was started with; {named}".encode() in r.stderr
    r = corral_cli("mcp", "--session", "m1", "--project", str(project), cwd=project, env=data_dir, input=b"")
    assert r.returncode == 0, r.stderr  # the same project, no policy flags: resumed (and ended at once: no client)


def test_the_instructions_name_the_sandbox_s_real_limits() -> None:
    import corral
    from corral.mcp.server import instructions

    plain = instructions(corral.Policy.workspace("/tmp"))
    assert "inside a sandbox (no network)" in plain and "memory" not in plain
    tight = instructions(corral.Policy.workspace("/tmp").with_limits(memory="512M", timeout="2m"))
    assert "(no network, memory 512M, each command stopped after 120s)" in tight, tight
