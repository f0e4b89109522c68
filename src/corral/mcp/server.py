"""corral as an MCP server: a session's sandboxed tools for any MCP client (an agent).

Built on the official `mcp` SDK's low-level server, so every tool's schema comes from the same
specs the CLI and the Python API use (`corral.session.tools.SPECS`). Each call runs in a worker
thread against one `corral.Session`, which serializes calls and records each change as a step.
Failures are MCP tool errors carrying the reason (a policy denial names its rule); the server
itself never falls over because of a call.

`ask` rules are answered by the client through MCP elicitation when it supports it, else by the
policy's approver command, else refused: fail closed.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import mcp_types as types
from mcp.server.lowlevel.server import Server

from corral import __version__
from corral.errors import CorralError, PolicyDenied
from corral.session import Session
from corral.session.tools import SPECS

log = logging.getLogger(__name__)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from corral.policy.model import Policy

READ_ONLY = ("read_file", "list_dir", "search")
INSTRUCTIONS = (
    "These tools work on a copy of the user's project inside a sandbox ({limits}). Paths are relative "
    "to the project's top directory. Every change is recorded as a numbered step: call `changes` to "
    "review them and `rollback` to return to a step. The user reviews and syncs the changes back to "
    "their project."
)


def instructions(policy: Policy) -> str:
    """The server's instructions, naming the sandbox's real network mode and limits."""
    from corral.units import format_duration, format_size

    network = {"none": "no network", "host": "the host's network"}.get(policy.network.mode,
                                                                       "network only to allowed hosts")  # fmt: skip
    limits = policy.limits
    parts = [network]
    if limits.memory is not None:
        parts.append(f"memory {format_size(limits.memory)}")
    if limits.timeout is not None:
        parts.append(f"each command stopped after {format_duration(limits.timeout)}")
    return INSTRUCTIONS.format(limits=", ".join(parts))


EXTRA_TOOLS: dict[str, tuple[str, dict[str, object], bool]] = {
    "changes": (
        "Summarize what changed (files added, modified, deleted, lines +/-) with a unified diff: for one "
        "step, or everything since a step (default: since the project was copied in).",
        {
            "type": "object",
            "properties": {
                "step": {"type": "integer", "description": "only what this step changed"},
                "since": {"type": "integer", "description": "everything after this step (default 0)"},
                "patch": {"type": "boolean", "description": "include the unified diff", "default": True},
            },
            "additionalProperties": False,
        },
        False,
    ),
    "log": (
        "List the steps recorded so far (number, tool, summary), for choosing a step to review or roll back to.",
        {"type": "object", "properties": {}, "additionalProperties": False},
        False,
    ),
    "rollback": (
        "Return the workspace to what it was at an earlier step (the rollback is itself a new step).",
        {
            "type": "object",
            "properties": {"step": {"type": "integer", "description": "the step to return to"}},
            "required": ["step"],
            "additionalProperties": False,
        },
        True,
    ),
}
SYNC_TOOL = (
    "Write the session's changes back to the user's project (never .git, never through links); files the "
    "user changed meanwhile are reported as conflicts and left alone.",
    {
        "type": "object",
        "properties": {
            "paths": {"type": "array", "items": {"type": "string"}, "description": "only these paths"},
            "delete": {"type": "boolean", "description": "also delete files the session deleted", "default": False},
        },
        "additionalProperties": False,
    },
    True,
)
APPROVAL_KEY = "approve"
APPROVAL_SCHEMA: dict[str, object] = {
    "type": "object",
    "properties": {"approve": {"type": "boolean", "title": "Allow this command"}},
    "required": ["approve"],
}
TOOL_ORDER = ("read_file", "write_file", "edit_file", "list_dir", "search", "bash", "changes", "log", "rollback")


class _Asking(threading.local):
    """The MCP request a worker thread is serving, so an `ask` rule can elicit from that client, and
    the answer the client already gave for this call (2026-07-28 input-required round trip)."""

    context: Any = None
    answer: bool | None = None


class CorralMCP:
    """An MCP server over one session. `allow_sync` adds the `sync` tool (by default the human syncs)."""

    def __init__(self, session: Session, *, allow_sync: bool = False) -> None:
        self.session = session
        self.allow_sync = allow_sync
        self._asking = _Asking()
        from corral.policy.commands import CommandRules

        self.rules = CommandRules(session.policy.commands)
        self._portal_token: Any = None
        self.server: Server[Any] = Server(
            "corral",
            version=__version__,
            instructions=instructions(session.policy),
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
            on_list_resources=self._list_resources,
            on_read_resource=self._read_resource,
        )

    # --------------------------------------------------------------------------- approval
    def approve(self, request: Any) -> bool:
        """The session's approver for `ask` rules: elicitation, else the policy's command, else no."""
        if self._asking.answer is not None:
            return self._asking.answer
        context = self._asking.context
        if context is not None and _client_can_elicit(context) and not _modern(context):
            message = _approval_message(request.argv, request.rule)
            try:
                answer = anyio.from_thread.run(
                    lambda: context.session.elicit_form(message, APPROVAL_SCHEMA, related_request_id=context.request_id)
                )
            except Exception as exc:  # a client that fails to answer means no
                log.warning("elicitation failed: %r", exc)
                return False
            content = getattr(answer, "content", None) or {}
            return getattr(answer, "action", "") == "accept" and content.get("approve") is True
        approver = self.session.policy.commands.approver
        if approver is not None:
            from corral.sandbox import _external_approval

            return _external_approval(approver, request, self.session.policy.commands.ask_timeout)
        return False

    # --------------------------------------------------------------------------- tools
    def tool_specs(self) -> list[types.Tool]:
        tools: list[types.Tool] = []
        for name in TOOL_ORDER:
            if name in SPECS:
                spec = SPECS[name]
                tools.append(_tool(name, spec.description, spec.json_schema(), mutating=spec.mutating))
            else:
                description, schema, mutating = EXTRA_TOOLS[name]
                tools.append(_tool(name, description, schema, mutating=mutating))
        if self.allow_sync:
            description, schema, mutating = SYNC_TOOL
            tools.append(_tool("sync", description, schema, mutating=mutating))
        return tools

    async def _list_tools(self, ctx: Any, params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=self.tool_specs())

    async def _call_tool(self, ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        name = params.name
        args = dict(params.arguments or {})
        known = {t.name for t in self.tool_specs()}
        if name not in known:
            return _error(f"unknown tool {name!r}; the tools are {', '.join(sorted(known))}")
        answer: bool | None = None
        argv = self.session.tool_argv(name, args)
        if argv is not None and _modern(ctx) and self.rules.decide(argv).action == "ask":
            # 2026-07-28 has no server-to-client requests mid-call: ask in the result, and the
            # client calls again with the answer.
            responses = getattr(params, "input_responses", None) or {}
            given = responses.get(APPROVAL_KEY)
            if given is not None:
                content = getattr(given, "content", None) or {}
                answer = getattr(given, "action", "") == "accept" and content.get("approve") is True
            elif _client_can_elicit(ctx):
                return types.InputRequiredResult(  # type: ignore[return-value]
                    input_requests={
                        APPROVAL_KEY: types.ElicitRequest(
                            params=types.ElicitRequestFormParams(
                                message=_approval_message(argv, self.rules.decide(argv).rule),
                                requested_schema=APPROVAL_SCHEMA,
                            )
                        )
                    }
                )

        def work() -> tuple[str, dict[str, object]]:
            self._asking.context = ctx
            self._asking.answer = answer
            try:
                return self.dispatch(name, args)
            finally:
                self._asking.context = None
                self._asking.answer = None

        worker: list[int] = []

        def work_in(ident: list[int]) -> tuple[str, dict[str, object]]:
            ident.append(threading.get_ident())
            return work()

        try:
            text, structured = await anyio.to_thread.run_sync(work_in, worker, abandon_on_cancel=True)
        except anyio.get_cancelled_exc_class():
            # The client cancelled the call, or left: its command must not run on, holding the session.
            if worker:
                self.session.interrupt(worker[0])
            raise
        except PolicyDenied as exc:
            return _error(f"denied by policy ({exc.rule}): {exc}")
        except CorralError as exc:
            return _error(str(exc))
        except Exception as exc:  # the server must survive anything a call does
            log.exception("tool %s failed", name)
            return _error(f"internal error in {name}: {type(exc).__name__}: {exc}")
        denied = structured.get("reason") == "denied"
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=text)], structured_content=structured, is_error=denied
        )

    def dispatch(self, name: str, args: dict[str, object]) -> tuple[str, dict[str, object]]:
        """Run one tool synchronously: (text for the model, structured result)."""
        s = self.session
        schema = (SYNC_TOOL if name == "sync" else EXTRA_TOOLS.get(name, (None, None)))[1]
        if isinstance(schema, dict):  # the session's own tools check theirs
            properties = schema.get("properties")
            known = [str(key) for key in properties] if isinstance(properties, dict) else []
            unknown = [key for key in args if key not in known]
            if unknown:
                takes = ", ".join(known) or "none"
                raise CorralError(f"{name} has no argument {unknown[0]!r} (it takes {takes})")
        if name in SPECS:
            result = s.call(name, args)
            data = result.as_json()
            if name in ("bash", "exec"):
                data.pop("result", None)
                return _bash_text(data), data
            if name == "read_file":
                return str(data.get("text", "")), data
            return json.dumps(data, indent=1, default=str), data
        if name == "changes":
            step, since = _opt_int(args, "step"), _opt_int(args, "since")
            patch = args.get("patch", True)
            if not isinstance(patch, bool):
                raise CorralError("changes: patch must be a boolean")
            changes = s.changes(step, since=since, patch=patch)
            data = changes.as_json()
            text = changes.summary() + (("\n\n" + changes.diff) if patch and changes.diff else "")
            return text, data
        if name == "log":
            steps = [step.as_json() for step in s.log()]
            text = "\n".join(f"{st['step']:>4}  {st.get('tool', '')}: {st.get('summary', '')}" for st in steps)
            return text, {"steps": steps}
        if name == "rollback":
            step = _opt_int(args, "step")
            if step is None:
                raise CorralError("rollback needs a step")
            new = s.rollback(step)
            return f"the workspace is back at step {step} (recorded as step {new})", {"step": new, "to": step}
        if name == "sync" and self.allow_sync:
            paths = args.get("paths")
            if paths is not None and (not isinstance(paths, list) or not all(isinstance(p, str) for p in paths)):
                raise CorralError("sync: paths must be a list of strings")
            delete = args.get("delete", False)
            if not isinstance(delete, bool):
                raise CorralError("sync: delete must be a boolean")
            report = s.sync(paths, delete=delete)
            data = report.as_json() if hasattr(report, "as_json") else {"ok": report.ok}
            return json.dumps(data, indent=1, default=str), data
        raise CorralError(f"unknown tool {name!r}")

    # --------------------------------------------------------------------------- resources
    async def _list_resources(self, ctx: Any, params: Any) -> types.ListResourcesResult:
        return types.ListResourcesResult(
            resources=[
                types.Resource(
                    uri="corral://session/changes",
                    name="changes",
                    description="The session's change summary (files and lines changed since copy-in).",
                    mime_type="text/plain",
                ),
                types.Resource(
                    uri="corral://session/audit",
                    name="audit",
                    description="The session's audit log: every tool call and policy decision (JSON lines).",
                    mime_type="application/jsonl",
                ),
            ]
        )

    async def _read_resource(self, ctx: Any, params: types.ReadResourceRequestParams) -> types.ReadResourceResult:
        uri = str(params.uri)
        if uri == "corral://session/changes":
            text = await anyio.to_thread.run_sync(lambda: self.session.changes(patch=False).summary())
            mime = "text/plain"
        elif uri == "corral://session/audit":
            text = await anyio.to_thread.run_sync(self._audit_text)
            mime = "application/jsonl"
        else:
            from mcp.shared.exceptions import MCPError

            raise MCPError(code=-32002, message=f"unknown resource {uri}")
        return types.ReadResourceResult(contents=[types.TextResourceContents(uri=uri, mime_type=mime, text=text)])

    def _audit_text(self, limit: int = 1 << 20) -> str:
        path = self.session.audit.path
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - limit))
            data = f.read()
        return data.decode("utf-8", "replace")


def _tool(name: str, description: str, schema: dict[str, object], *, mutating: bool) -> types.Tool:
    return types.Tool(
        name=name,
        description=description,
        input_schema=schema,
        annotations=types.ToolAnnotations(read_only_hint=not mutating, destructive_hint=name in ("rollback", "sync")),
    )


def _error(text: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)], is_error=True)


def _opt_int(args: dict[str, object], key: str) -> int | None:
    value = args.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise CorralError(f"{key} must be an integer, not {value!r}")
    return value


def _bash_text(data: dict[str, object]) -> str:
    detail = f": {data['detail']}" if data.get("detail") else ""
    parts = [f"exit status: {data.get('returncode')}  ({data.get('reason')}{detail})"]
    if data.get("note"):
        parts.append(f"note: {data['note']}")
    if data.get("stdout"):
        parts.append(f"--- stdout ---\n{data['stdout']}")
    if data.get("stderr"):
        parts.append(f"--- stderr ---\n{data['stderr']}")
    if data.get("step") is not None:
        changed = data.get("changed")
        names = ", ".join(str(c) for c in changed) if isinstance(changed, list | tuple) else ""
        parts.append(f"(recorded as step {data['step']}; changed: {names or 'nothing'})")
    return "\n".join(parts)


def _approval_message(argv: list[str] | tuple[str, ...], rule: str) -> str:
    return f"The agent wants to run: {' '.join(argv)}\nThis needs your approval ({rule}). Allow it?"


def _modern(context: Any) -> bool:
    from mcp_types.version import MODERN_PROTOCOL_VERSIONS

    return getattr(context, "protocol_version", None) in MODERN_PROTOCOL_VERSIONS


def _client_can_elicit(context: Any) -> bool:
    try:
        caps = context.session.client_capabilities
        return caps is not None and getattr(caps, "elicitation", None) is not None
    except Exception:
        return False
