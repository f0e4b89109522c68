"""corral's errors: one root, a few clear branches.

    CorralError                      anything corral itself refuses or fails at
    ├── ConfigError                  bad input: a policy, a TOML file, a CLI flag (nothing ran)
    ├── PolicyDenied                 the policy refused a command or a path (expected, audited)
    ├── ToolError                    an agent tool could not do what was asked (missing file, text not found)
    ├── SandboxFileError             put_file/get_file failed for a reason other than the policy (also an OSError)
    ├── SessionError                 a workspace session cannot be created, opened or changed as asked
    └── BackendError                 the isolation layer
        ├── BackendUnavailable       this backend cannot work on this host (reason + fix)
        ├── UnsupportedPolicy        this backend cannot enforce part of the policy (names the part)
        ├── LaunchError              the sandbox failed to start
        └── SandboxLost              a live sandbox died or stopped answering

A command that runs and exits non-zero, times out or hits a limit is a `Result`, not an exception.
Each error carries `exit_code`, the code the CLI exits with (see docs/cli.md).
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BackendUnavailable",
    "ConfigError",
    "CorralError",
    "LaunchError",
    "PolicyDenied",
    "SandboxFileError",
    "SandboxLost",
    "SessionError",
    "ToolError",
    "UnsupportedPolicy",
]

EXIT_CORRAL_FAILURE = 125
EXIT_DENIED = 122
EXIT_USAGE = 2


class CorralError(Exception):
    """Root of every error corral raises."""

    exit_code: int = EXIT_CORRAL_FAILURE


class ConfigError(CorralError):
    """A policy, config file or flag is malformed. `where` names the key or flag at fault."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, *, where: str | None = None) -> None:
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class PolicyDenied(CorralError):
    """The policy refused an action. `rule` is the rule that decided."""

    exit_code = EXIT_DENIED

    def __init__(self, message: str, *, rule: str) -> None:
        self.rule = rule
        super().__init__(message)


class ToolError(CorralError):
    """An agent tool (read_file, edit_file, ...) could not do what was asked; the message says why,
    in words meant for the agent. `tool` names the tool."""

    exit_code = 1

    def __init__(self, message: str, *, tool: str = "") -> None:
        self.tool = tool
        super().__init__(message)


class SandboxFileError(CorralError, OSError):
    """`put_file` or `get_file` failed for a reason other than the policy: the file is missing, a
    directory, larger than asked for, over the file size limit, or the sandbox's disk is full. Also an
    OSError with `errno` and `filename` set (policy refusals are `PolicyDenied`)."""

    exit_code = 1

    def __init__(self, errno: int, message: str, *, path: str) -> None:
        super().__init__(errno, message, path)
        self.message = message

    def __str__(self) -> str:
        return self.message


class SessionError(CorralError):
    """A workspace session cannot be created, opened or changed as asked (in use, damaged, ...)."""


class SessionNameError(SessionError):
    """The caller named a session or a step that does not exist, or a name that is taken: bad usage."""

    exit_code = EXIT_USAGE


class BackendError(CorralError):
    """The isolation layer failed."""


class BackendUnavailable(BackendError):
    """The backend cannot run on this host."""

    def __init__(self, backend: str, reason: str, *, fix: str = "") -> None:
        self.backend = backend
        self.reason = reason
        self.fix = fix
        text = f"backend '{backend}' is not available here: {reason}"
        super().__init__(f"{text} (fix: {fix})" if fix else text)


class UnsupportedPolicy(BackendError):
    """The backend cannot enforce some part of the policy; `parts` names each one."""

    def __init__(self, backend: str, parts: tuple[str, ...]) -> None:
        self.backend = backend
        self.parts = parts
        super().__init__(
            f"backend '{backend}' cannot enforce: {'; '.join(parts)}"
            " (choose a backend that does: `corral doctor` lists what each enforces; or change the policy;"
            " or accept the weaker guarantee with allow_weaker / --allow-weaker)"
        )


class LaunchError(BackendError):
    """The sandbox did not start."""


class SandboxLost(BackendError):
    """A live sandbox died or stopped answering."""
