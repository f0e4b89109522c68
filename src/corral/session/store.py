"""Where sessions live: `$XDG_DATA_HOME/corral/sessions/NAME` (default `~/.local/share/corral/...`).

NAME/
  state.json      the session's settings: project, mount point, backend, policy, excludes
  lock            held (flock) by the one process using the session; released when it dies
  workspace/      the agent's copy of the project: the sandbox's read-write zone
  history.git/    the session's own git repository (in no zone)
  statcache       blob ids of workspace files by stat (a cache; rebuilt if lost)
  manifest        the stat of host files at copy-in / last sync (conflict detection)
  inflight.json   the tool call under way (present only while one runs)
  sync-journal    temporary files a sync is creating in the project (present only during a sync)
  audit.jsonl     the session's audit log (unless another was named)
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time

from corral._record import Record
from corral.errors import ConfigError, SessionError, SessionNameError
from corral.policy.model import Commands, Env, Limits, Network, Policy, Zone

STATE_VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def sessions_dir(data_dir: str | None = None) -> str:
    """The directory holding every session."""
    if data_dir is None:
        base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
        data_dir = os.path.join(base, "corral", "sessions")
    return os.path.abspath(data_dir)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(
            f"a session name is 1-64 letters, digits, '.', '_' or '-' (starting with a letter or digit), not {name!r}",
            where="name",
        )
    return name


def session_path(name: str, data_dir: str | None = None) -> str:
    return os.path.join(sessions_dir(data_dir), check_name(name))


class Lock:
    """An exclusive flock on the session's lock file, held for as long as the session is open."""

    def __init__(self, directory: str, name: str) -> None:
        self.fd = os.open(os.path.join(directory, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip()
            os.close(self.fd)
            who = (
                "this process"
                if holder == str(os.getpid())
                else f"another process{f' (pid {holder})' if holder else ''}"
            )
            raise SessionError(f"session {name!r} is in use by {who}") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def in_use(directory: str) -> bool:
    try:
        fd = os.open(os.path.join(directory, "lock"), os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def write_json(path: str, data: dict[str, object]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_state(directory: str) -> dict[str, object]:
    path = os.path.join(directory, "state.json")
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except FileNotFoundError:
        raise SessionError(f"no session at {directory}") from None
    except (OSError, ValueError) as exc:
        raise SessionError(f"cannot read {path}: {exc}") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise SessionError(f"{path} is not a session state file this corral understands")
    return state


# ---------------------------------------------------------------------------------------- policy
def policy_to_json(policy: Policy) -> dict[str, object]:
    """The policy as plain data (exact: `policy_from_json` gives back an equal Policy)."""
    n, c, e = policy.network, policy.commands, policy.env
    return {
        "zones": [{"mount": z.mount, "mode": z.mode, "host": z.host, "size": z.size} for z in policy.zones],
        "network": {
            "mode": n.mode,
            "allow": list(n.allow),
            "allow_cidrs": list(n.allow_cidrs),
            "deny_cidrs": list(n.deny_cidrs),
            "upstream": n.upstream,
        },
        "commands": {
            "allow": list(c.allow),
            "deny": list(c.deny),
            "ask": list(c.ask),
            "approver": None if c.approver is None else list(c.approver),
            "ask_timeout": c.ask_timeout,
        },
        "limits": policy.limits.as_dict(),
        "env": {"passthrough": list(e.passthrough), "values": dict(e.values)},
        "cwd": policy.cwd,
        "uid": policy.uid,
        "hostname": policy.hostname,
        "profile": policy.profile,
    }


def policy_from_json(data: object) -> Policy:
    if not isinstance(data, dict):
        raise SessionError("the session's saved policy is damaged")
    try:
        return Policy(
            zones=[Zone(**z) for z in data["zones"]],
            network=Network(**data["network"]),
            commands=Commands(**data["commands"]),
            limits=Limits(**data["limits"]),
            env=Env(**data["env"]),
            cwd=data["cwd"],
            uid=data["uid"],
            hostname=data["hostname"],
            profile=data["profile"],
        )
    except (KeyError, TypeError, ConfigError) as exc:
        raise SessionError(f"the session's saved policy is damaged: {exc}") from None


# ---------------------------------------------------------------------------------------- listing
class SessionInfo(Record):
    """A session on disk, as `corral session list` shows it."""

    __slots__ = ("created", "in_use", "name", "path", "project", "steps")
    name: str
    project: str
    created: str
    steps: int  # the number of the last step
    in_use: bool
    path: str

    def __init__(self, *, name: str, project: str, created: str, steps: int, in_use: bool, path: str) -> None:
        self._set(name=name, project=project, created=created, steps=steps, in_use=in_use, path=path)

    def as_json(self) -> dict[str, object]:
        return self.as_dict()


def list_sessions(data_dir: str | None = None) -> list[SessionInfo]:
    """Every session under the data directory, by name."""
    from corral.session.gitstore import BRANCH, GitStore
    from corral.session.history import TRAILER

    base = sessions_dir(data_dir)
    try:
        names = sorted(os.listdir(base))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise SessionError(f"cannot read the sessions directory {base}: {exc.strerror}") from None
    out = []
    for name in names:
        directory = os.path.join(base, name)
        if name.startswith(".") or not os.path.isfile(os.path.join(directory, "state.json")):
            continue
        try:
            state = read_state(directory)
            store = GitStore(os.path.join(directory, "history.git"), os.path.join(directory, "workspace"))
            head = store.read_ref(BRANCH)
            steps = 0
            if head is not None:
                message = store.read_commit(head).message
                for line in message.splitlines():
                    if line.startswith(TRAILER):
                        steps = int(json.loads(line[len(TRAILER) :]).get("step", 0))
        except (SessionError, OSError, ValueError):
            continue
        out.append(
            SessionInfo(
                name=name,
                project=str(state.get("project", "")),
                created=str(state.get("created", "")),
                steps=steps,
                in_use=in_use(directory),
                path=directory,
            )
        )
    return out


def reap_orphaned_temporaries(data_dir: str | None = None, *, older_than: float = 60.0) -> list[str]:
    """Remove the sessions without a name (deleted on close) whose process died before it could
    close them: those no process holds, made more than `older_than` seconds ago (one being made
    now is not held yet). Returns their names."""
    import calendar

    reaped = []
    for info in list_sessions(data_dir):
        try:
            ephemeral = bool(read_state(info.path).get("ephemeral"))
            made = calendar.timegm(time.strptime(info.created, "%Y-%m-%dT%H:%M:%SZ"))
        except (SessionError, OSError, ValueError):
            continue
        if ephemeral and not info.in_use and time.time() - made > older_than:
            try:
                remove_session(info.name, data_dir)
            except SessionError:  # taken meanwhile
                continue
            reaped.append(info.name)
    return reaped


def remove_session(name: str, data_dir: str | None = None) -> None:
    """Delete a session (its workspace and history). Refuses while it is open."""
    from corral.session.fsafe import remove_tree

    directory = session_path(name, data_dir)
    if not os.path.isdir(directory):
        raise SessionNameError(f"no session named {name!r} (corral session list shows them)")
    lock = Lock(directory, name)
    try:
        doomed = os.path.join(os.path.dirname(directory), f".{name}.removing-{os.urandom(4).hex()}")
        os.rename(directory, doomed)
    finally:
        lock.release()
    remove_tree(doomed)
