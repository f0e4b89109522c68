"""Finding a local container engine (Docker or Podman's Docker-compatible API) and saying why not.

`connect()` returns an `Engine` (a low-level `docker.APIClient` plus what the engine told us about
itself) or raises `BackendUnavailable` with the exact reason and the fix: the `docker` package is
missing, no engine is installed, the daemon is not running, the socket is not ours to use, the
engine is remote (a remote engine cannot mount this host's directories, which zones need).

Where it looks: `DOCKER_HOST` when set (only there), else Docker's socket, rootless Docker's,
then Podman's (rootless, then system-wide).
"""

from __future__ import annotations

import errno
import os
import shutil
import socket

from corral.errors import BackendUnavailable

TYPE_CHECKING = False
if TYPE_CHECKING:
    import docker  # type: ignore[import-untyped]

API_TIMEOUT = 60
MIN_API = "1.41"  # Docker 20.10, Podman 4 (what corral is tested against); newer engines still speak it


class Engine:
    """A connected engine: its API client, its socket, its name and version, its runtimes.

    Connecting costs one `/_ping` (whose headers name the engine and its API version); the full
    `info` and `version` documents are fetched when first needed (Podman takes a few hundred
    milliseconds to answer each, a sandbox start needs neither).
    """

    def __init__(
        self,
        api: docker.APIClient,
        *,
        url: str,
        info: dict[str, object] | None = None,
        version: dict[str, object] | None = None,
        server: str = "",
    ) -> None:
        self.api = api
        self.url = url
        self._info = info
        self._version = version
        self.server = server  # the ping's Server header: "Docker/20.10.24 (linux)", "Libpod/4.3.1 (linux)"

    @property
    def info(self) -> dict[str, object]:
        if self._info is None:
            self._info = self.api.info()
        return self._info

    @property
    def version(self) -> dict[str, object]:
        if self._version is None:
            self._version = self.api.version()
        return self._version

    @property
    def socket_path(self) -> str:
        return self.url[len("unix://") :]

    @property
    def kind(self) -> str:
        """ "podman" or "docker"."""
        if self.server:
            return "podman" if self.server.lower().startswith("libpod") else "docker"
        components = self.version.get("Components")
        names = (
            [str(c.get("Name", "")) for c in components if isinstance(c, dict)] if isinstance(components, list) else []
        )
        if any("podman" in n.lower() for n in names) or "podman" in str(self.version.get("Version", "")).lower():
            return "podman"
        return "docker"

    @property
    def describe(self) -> str:
        if self.server:
            version = self.server.split("/", 1)[-1].split(" ", 1)[0]
            return f"{self.kind} {version} (API {self.api.api_version}) at {self.url}"
        return (
            f"{self.kind} {self.version.get('Version', '?')} (API {self.version.get('ApiVersion', '?')}) at {self.url}"
        )

    @property
    def runtimes(self) -> dict[str, dict[str, object]]:
        raw = self.info.get("Runtimes")
        return {str(k): (v if isinstance(v, dict) else {}) for k, v in raw.items()} if isinstance(raw, dict) else {}

    @property
    def rootless(self) -> bool:
        """A rootless engine (rootless Docker, Podman as a user): the caller is root in its containers.

        From `info` when it is at hand, else from the socket's owner (a rootless engine's socket
        belongs to its user, a system daemon's to root)."""
        if self._info is not None:
            options = self._info.get("SecurityOptions")
            return isinstance(options, list) and any("rootless" in str(o) for o in options)
        try:
            return os.stat(self.socket_path).st_uid != 0
        except OSError:
            return False

    @property
    def cgroup_version(self) -> str:
        return str(self.info.get("CgroupVersion", "1"))

    def close(self) -> None:
        self.api.close()


def candidates(env: dict[str, str] | None = None) -> list[str]:
    """Engine URLs to try, in order."""
    env = dict(os.environ) if env is None else env
    host = env.get("DOCKER_HOST") or env.get("CONTAINER_HOST")
    if host:
        return [host]
    runtime_dir = env.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    paths = [
        "/var/run/docker.sock",
        f"{runtime_dir}/docker.sock",
        f"{runtime_dir}/podman/podman.sock",
        "/run/podman/podman.sock",
    ]
    return [f"unix://{p}" for p in paths]


def connect(name: str, *, env: dict[str, str] | None = None) -> Engine:
    """The first engine that answers, or BackendUnavailable saying why none does (and the fix)."""
    try:
        import docker
    except ImportError:
        raise BackendUnavailable(
            name,
            "the 'docker' Python package is not installed",
            fix="pip install 'corral[docker]' (or pip install docker)",
        ) from None
    urls = candidates(env)
    explicit = len(urls) == 1
    problems: list[tuple[str, str, str]] = []  # (url, reason, fix)
    for url in urls:
        if not url.startswith("unix://"):
            raise BackendUnavailable(
                name,
                f"the engine at {url} is not local: zones are directories of this host, which a remote engine "
                "cannot mount",
                fix="unset DOCKER_HOST to use a local engine, or use --backend namespace",
            )
        path = url[len("unix://") :]
        if not os.path.exists(path):
            if explicit:
                problems.append((url, f"no engine socket at {path} (DOCKER_HOST)", _start_fix(path)))
            continue
        problem = _check_socket(path)
        if problem is not None:
            problems.append((url, *problem))
            continue
        try:
            api = docker.APIClient(base_url=url, version=MIN_API, timeout=API_TIMEOUT)
            pong = api._get(api._url("/_ping"))
            pong.raise_for_status()
            offered = pong.headers.get("Api-Version", MIN_API)
            api.close()
            api = docker.APIClient(base_url=url, version=_api_version(offered), timeout=API_TIMEOUT)
        except Exception as exc:
            problems.append((url, f"the engine at {path} did not answer: {_short(exc)}", _start_fix(path)))
            continue
        return Engine(api, url=url, server=str(pong.headers.get("Server", "")))
    if problems:
        _url, reason, fix = problems[0]
        raise BackendUnavailable(name, reason, fix=fix)
    reason, fix = no_engine_found()
    raise BackendUnavailable(name, reason, fix=fix)


def _check_socket(path: str) -> tuple[str, str] | None:
    """Why `path` cannot be used (permission, nobody listening), or None when a connect works."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(5)
    try:
        sock.connect(path)
    except PermissionError:
        return _permission_problem(path)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return (
                f"nothing is listening on {path}: the engine's daemon is not running (a stale socket)",
                _start_fix(path),
            )
        return f"cannot connect to {path}: {exc.strerror or exc}", _start_fix(path)
    finally:
        sock.close()
    return None


def _permission_problem(path: str) -> tuple[str, str]:
    owner = ""
    try:
        import grp
        import pwd

        st = os.stat(path)
        group = grp.getgrgid(st.st_gid).gr_name
        owner = f" (owned by {pwd.getpwuid(st.st_uid).pw_name}:{group}, mode {st.st_mode & 0o777:o})"
    except (OSError, KeyError):
        group = "docker"
    user = os.environ.get("USER") or str(os.getuid())
    if "podman" in path:
        fix = "use your own rootless Podman socket: systemctl --user start podman.socket"
    else:
        fix = (
            f"add yourself to the {group} group: sudo usermod -aG {group} {user}, then log in again "
            "(or use rootless Docker / Podman, or run corral as root)"
        )
    return f"no permission to use the engine socket {path}{owner}", fix


def _start_fix(path: str) -> str:
    if "podman" in path:
        return (
            "start Podman's API service: systemctl --user start podman.socket (or podman system service "
            "--time=0 &), and export DOCKER_HOST=unix://" + path
        )
    return "start the Docker daemon: sudo systemctl start docker (or sudo dockerd &)"


def no_engine_found(search: str = "/usr/bin:/usr/sbin:/usr/local/bin:/bin:/sbin") -> tuple[str, str]:
    """Why no engine socket exists, and the fix: installed but not running, or not installed (in `search`)."""
    if shutil.which("dockerd", path=search):
        return (
            "Docker is installed but its daemon is not running (no socket at /var/run/docker.sock)",
            "sudo systemctl start docker (or sudo dockerd &); for a daemon elsewhere, set DOCKER_HOST=unix://PATH",
        )
    if shutil.which("podman", path=search):
        return (
            "Podman is installed but its API service is not running",
            "systemctl --user start podman.socket (or podman system service --time=0 &), then "
            "export DOCKER_HOST=unix://$XDG_RUNTIME_DIR/podman/podman.sock",
        )
    return (
        "no container engine is installed (neither Docker nor Podman)",
        "sudo apt-get install docker.io (or podman), or use --backend namespace",
    )


def _api_version(offered: str) -> str:
    """The engine's API version, capped at the newest the docker package speaks."""
    from docker.constants import DEFAULT_DOCKER_API_VERSION  # type: ignore[import-untyped]

    def key(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in v.split(".") if p.isdigit())

    newest = str(DEFAULT_DOCKER_API_VERSION)
    try:
        return min(str(offered), newest, key=key)
    except ValueError:
        return MIN_API


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]
