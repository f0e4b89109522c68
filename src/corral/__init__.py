"""corral: run an AI agent's tool calls inside a sandbox.

    import corral
    r = corral.run(["pytest", "-q"], policy=corral.Policy.workspace("."))
    r = corral.run_code("print(2 + 2)")     # Python in a WebAssembly sandbox (or the system python3)
    with corral.Sandbox(corral.Policy.workspace("."), backend="auto") as sb:
        sb.exec(["make"]); sb.exec(["./a.out"])
    with corral.Session(".", name="fix") as s:         # a copy, a commit per tool call, sync back
        s.bash("make test"); print(s.changes().diff); s.sync()

Names are imported on first use, so `import corral` stays cheap for the CLI.
"""

from __future__ import annotations

__version__ = "0.1.0"

_EXPORTS = {
    "run": "corral.sandbox",
    "run_code": "corral.code",
    "Sandbox": "corral.sandbox",
    "Session": "corral.session.session",
    "AskRequest": "corral.sandbox",
    "Result": "corral.backends.base",
    "CommandFailed": "corral.backends.base",
    "Capabilities": "corral.backends.base",
    "Policy": "corral.policy.model",
    "Zone": "corral.policy.model",
    "Network": "corral.policy.model",
    "Commands": "corral.policy.model",
    "Limits": "corral.policy.model",
    "Env": "corral.policy.model",
    "Container": "corral.policy.model",
    "load_policy": "corral.policy.load",
    "AuditLog": "corral.audit",
    "CorralError": "corral.errors",
    "ConfigError": "corral.errors",
    "PolicyDenied": "corral.errors",
    "BackendError": "corral.errors",
    "BackendUnavailable": "corral.errors",
    "UnsupportedPolicy": "corral.errors",
    "LaunchError": "corral.errors",
    "SandboxLost": "corral.errors",
    "SandboxFileError": "corral.errors",
    "ToolError": "corral.errors",
    "SessionError": "corral.errors",
}

__all__ = [
    "AskRequest", "AuditLog", "BackendError", "BackendUnavailable", "Capabilities", "CommandFailed", "Commands",
    "ConfigError", "Container", "CorralError", "Env", "LaunchError", "Limits", "Network", "Policy", "PolicyDenied",
    "Result", "Sandbox", "SandboxFileError", "SandboxLost", "Session", "SessionError", "ToolError",
    "UnsupportedPolicy", "Zone",
    "__version__", "load_policy", "run", "run_code",
]  # fmt: skip

TYPE_CHECKING = False
if TYPE_CHECKING:
    from corral.audit import AuditLog
    from corral.backends.base import Capabilities, CommandFailed, Result
    from corral.code import run_code
    from corral.errors import (
        BackendError,
        BackendUnavailable,
        ConfigError,
        CorralError,
        LaunchError,
        PolicyDenied,
        SandboxFileError,
        SandboxLost,
        SessionError,
        ToolError,
        UnsupportedPolicy,
    )
    from corral.policy.load import load_policy
    from corral.policy.model import Commands, Container, Env, Limits, Network, Policy, Zone
    from corral.sandbox import AskRequest, Sandbox, run
    from corral.session.session import Session


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'corral' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
