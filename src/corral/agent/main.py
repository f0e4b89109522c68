"""corral's agent: the process that lives inside a sandbox and starts commands on request.

Started once per live sandbox (inside bubblewrap for the namespace backend, as a confined child
for landlock/process, as a container's only process for docker/gvisor), it receives a `hello`
with its confinement, then `exec`, `signal`, `put`, `get` and `stop` requests over an inherited
socket, or one it connects to (CORRAL_AGENT_SOCKET) when an engine cannot pass one (protocol.py).
Every command it starts inherits its namespaces, seccomp filter, Landlock domain and limits, so
starting one costs a posix_spawn rather than a new sandbox.

When a command's main process exits, the agent kills what is left of its session; when no command
is running, it kills every other descendant too (a double-forked, setsid'd child included), so
nothing a command started outlives it. Stdlib only, Python >= 3.8.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import sys
import time

if __package__:
    from corral.agent import confine, processes, protocol
else:  # run as a script inside the sandbox: its siblings are on sys.path
    import confine  # type: ignore[import-not-found,no-redef]
    import processes  # type: ignore[import-not-found,no-redef]
    import protocol  # type: ignore[import-not-found,no-redef]

# Caught rather than ignored, so that exec itself puts them back to their default in a command.
# SIGPIPE and SIGXFSZ come in ignored by Python; caught, our writes still just fail with EPIPE/EFBIG.
_CAUGHT_SIGNALS = (
    signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP,
    signal.SIGUSR1, signal.SIGUSR2,
)  # fmt: skip
# glibc's posix_spawn child resets every signal it is not told to default: it asks for each one's
# handler, then sets it (two system calls each, ~120 a command, every one through the seccomp
# filter). Naming them all as "set to default" makes that one call each.
_SPAWN_DEFAULTS = tuple(sorted(set(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}))


def _ignore(signum: int, frame: object) -> None:
    """As the pid namespace's init we must not die of a signal a command sends us."""


class Exec:
    __slots__ = ("id", "output_fds", "pid", "pidfd", "started", "status_fd")

    def __init__(self, exec_id: int, pid: int, status_fd: int, output_fds: tuple, pidfd: int) -> None:  # type: ignore[type-arg]
        self.id = exec_id
        self.pid = pid
        self.pidfd = pidfd  # -1 when reaping runs on SIGCHLD
        self.status_fd = status_fd
        # Our copies of the command's stdout and stderr, closed only after the status is written:
        # the host then sees the end of all three at once (one wake-up instead of three).
        self.output_fds = output_fds
        self.started = time.monotonic()


class Agent:
    def __init__(self, sock: socket.socket, *, pidfds: bool = True) -> None:
        self.sock = sock
        self.running: dict[int, Exec] = {}  # pid -> exec
        self.by_id: dict[int, Exec] = {}
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.null_fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        self.poller = select.poll()
        # A command's end wakes us through its pidfd: no signal to deliver, no wake-up pipe to drain.
        # Without pidfds (Python < 3.9, Linux < 5.3, some gVisor versions) SIGCHLD does it.
        self.use_pidfd = pidfds and _pidfds_work()
        self.command_rlimits: dict[str, int] = {}  # set on each command, not on us (hello)
        self.rusage_is_ours = True  # see serve()

    # ---------------------------------------------------------------- set-up
    def hello(self, message: dict, seccomp_program: bytes) -> None:  # type: ignore[type-arg]
        """Confine ourselves as the host asks, then say we are ready. Any failure propagates."""
        info = {"ready": True, "pid": os.getpid(), "landlock": 0}
        self.command_rlimits = {str(k): int(v) for k, v in (message.get("command_rlimits") or {}).items()}
        confine.set_child_subreaper()
        if message.get("rlimits"):
            processes.set_rlimits(0, message["rlimits"])
        if message.get("drop_capabilities"):
            confine.drop_capabilities()
        landlock = message.get("landlock")
        if landlock:
            info["landlock"] = confine.apply_landlock(
                landlock.get("ro", []),
                landlock.get("rw", []),
                connect_ports=landlock.get("connect_ports"),
                restrict_net=bool(landlock.get("restrict_net")),
                scope=bool(landlock.get("scope")),
            )
        if seccomp_program:
            confine.load_seccomp(seccomp_program)
        proxy = message.get("proxy")
        if proxy:
            # Started after confinement: a thread inherits its creator's Landlock domain and seccomp filter.
            import threading

            if __package__:
                from corral.agent import forward
            else:
                import forward  # type: ignore[import-not-found,no-redef]

            listener = forward.listen(int(proxy["port"]))
            threading.Thread(target=forward.serve, args=(listener, str(proxy["socket"])), daemon=True).start()
        protocol.send(self.sock, info)

    # ---------------------------------------------------------------- requests
    def own_peak(self) -> int:
        """Our memory's peak resident size, in bytes."""
        if not self.rusage_is_ours:
            return _memory_peak()
        import resource  # loaded by serve(), once the host has its answer to hello

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def serve(self) -> None:
        import resource

        # getrusage's peak is also that of the memory we were exec'd from: bubblewrap's (small), or
        # a host program's when the host started us (landlock, process). Then only /proc says ours.
        self.rusage_is_ours = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 <= _memory_peak() + (1 << 20)
        for sig in _CAUGHT_SIGNALS:
            signal.signal(sig, _ignore)
        poller = self.poller
        poller.register(self.sock.fileno(), select.POLLIN)
        if not self.use_pidfd:
            signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
            signal.signal(signal.SIGCHLD, lambda *_: None)
            poller.register(self.wake_r, select.POLLIN)
        sock_fd = self.sock.fileno()
        while True:
            for fd, _ in poller.poll():
                if fd != sock_fd:
                    if fd == self.wake_r:
                        try:
                            os.read(self.wake_r, 4096)
                        except BlockingIOError:
                            pass
                    self.reap()
                    continue
                message, fds = protocol.recv(self.sock)
                if message is None:
                    self.shutdown()
                    return
                op = message.get("op")
                handler = getattr(self, "op_" + str(op), None)
                if handler is None:
                    for fd_ in fds:
                        os.close(fd_)
                    continue
                if op == "stop":
                    self.shutdown()
                    return
                handler(message, fds)

    def op_exec(self, message: dict, fds: list) -> None:  # type: ignore[type-arg]
        status_fd, stdout_fd, stderr_fd = fds[0], fds[1], fds[2]
        stdin_fd = fds[3] if len(fds) > 3 else None
        started = False
        try:
            started = self._start(message, status_fd, stdin_fd, stdout_fd, stderr_fd)
        finally:
            for fd in (stdin_fd,) if started else (stdin_fd, stdout_fd, stderr_fd):
                if fd is not None:
                    os.close(fd)

    def _start(self, message: dict, status_fd: int, stdin_fd, stdout_fd: int, stderr_fd: int) -> bool:  # type: ignore[type-arg,no-untyped-def]
        """Start the command; False (and the reason on the status pipe) when it could not start."""
        argv = [str(a) for a in message["argv"]]
        env = {str(k): str(v) for k, v in message.get("env", {}).items()}
        cwd = message.get("cwd") or "/"
        search = env.get("PATH")
        if search is not None and not self.command_rlimits:
            # posix_spawnp searches PATH in C (from our own environment, so it gets the command's),
            # with the same verdicts as _find_program: the first executable file, else EACCES or ENOENT.
            path, spawn = argv[0], os.posix_spawnp
            if os.environ.get("PATH") != search:
                os.environ["PATH"] = search
        else:
            path, spawn = _find_program(argv[0], search or "", cwd), os.posix_spawn
            if isinstance(path, int):
                self._fail(status_fd, path, argv[0])
                return False
        try:
            os.chdir(cwd)
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte
            self._fail(status_fd, getattr(exc, "errno", None) or errno.ENOENT, cwd, what="working directory")
            return False
        actions = [
            (os.POSIX_SPAWN_DUP2, stdin_fd if stdin_fd is not None else self.null_fd, 0),
            (os.POSIX_SPAWN_DUP2, stdout_fd, 1),
            (os.POSIX_SPAWN_DUP2, stderr_fd, 2),
        ]
        try:
            if self.command_rlimits:
                pid = self._fork_exec(path, argv, env, stdin_fd, stdout_fd, stderr_fd)
            else:
                pid = spawn(path, argv, env, file_actions=actions, setsid=True, setsigmask=(),
                            setsigdef=_SPAWN_DEFAULTS)  # fmt: skip
        except OSError as exc:
            self._fail(status_fd, exc.errno or errno.EIO, argv[0])
            return False
        except (TypeError, ValueError):  # an argument no program can receive (a NUL byte): never our end
            self._fail(status_fd, errno.EINVAL, argv[0])
            return False
        finally:
            os.chdir("/")
        pidfd = -1
        if self.use_pidfd:
            try:
                pidfd = os.pidfd_open(pid)
            except OSError as exc:  # out of descriptors: a command we could not watch must not run
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                self._fail(status_fd, exc.errno or errno.EMFILE, argv[0])
                return False
            self.poller.register(pidfd, select.POLLIN)
        running = Exec(int(message["id"]), pid, status_fd, (stdout_fd, stderr_fd), pidfd)
        self.running[pid] = running
        self.by_id[running.id] = running
        return True

    def _fork_exec(self, path: str, argv: list, env: dict, stdin_fd, stdout_fd: int, stderr_fd: int) -> int:  # type: ignore[type-arg,no-untyped-def]
        """posix_spawn's work plus the command's rlimits, set in the child before it execs (posix_spawn
        cannot set them, and set on us they would bind the agent too). A failed exec comes back as OSError."""
        import resource  # noqa: F401  (loaded before the fork: the child only makes system calls)

        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # the child: only system calls from here to execve
            code = errno.EIO
            try:
                os.setsid()
                os.dup2(stdin_fd if stdin_fd is not None else self.null_fd, 0)
                os.dup2(stdout_fd, 1)
                os.dup2(stderr_fd, 2)
                processes.set_rlimits(0, self.command_rlimits)
                signal.pthread_sigmask(signal.SIG_SETMASK, ())
                os.execve(path, argv, env)
            except OSError as exc:
                code = exc.errno or errno.EIO
            finally:
                try:
                    os.write(err_w, str(code).encode())
                finally:
                    os._exit(127)
        os.close(err_w)
        try:
            failed = os.read(err_r, 16)
        finally:
            os.close(err_r)
        if failed:
            os.waitpid(pid, 0)
            code = int(failed)
            raise OSError(code, os.strerror(code))
        return pid

    def _fail(self, status_fd: int, err: int, subject: str, what: str = "command") -> None:
        try:
            _answer(status_fd, {"error": os.strerror(err), "errno": err, "subject": subject, "what": what})
        finally:
            os.close(status_fd)

    def op_signal(self, message: dict, fds: list) -> None:  # type: ignore[type-arg]
        running = self.by_id.get(int(message["target"]))
        if running is None:
            return
        sig = int(message.get("signal", signal.SIGKILL))
        if sig == signal.SIGKILL:
            _kill_session(running.pid)
        else:
            try:
                os.killpg(running.pid, sig)
            except OSError:
                pass

    def op_put(self, message: dict, fds: list) -> None:  # type: ignore[type-arg]
        status_fd, data_fd = fds[0], fds[1]
        temp = None
        try:
            path = str(message["path"])
            if os.path.islink(path):
                raise OSError(errno.ELOOP, "is a symbolic link")
            # Written beside the target, then renamed over it: a write that fails (the file size
            # limit, a full tmpfs) leaves the old file whole and no partial one.
            head, name = os.path.split(path)
            name = os.path.join(head, ".%s.corral-put-%d" % (name, int(message.get("id", 0))))
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
            mode = int(message.get("mode", 0o644))
            out = os.open(name, flags, 0o600)
            temp = name
            try:
                os.fchmod(out, mode)  # the mode asked for, not what the umask leaves of it
                os.lseek(data_fd, 0, os.SEEK_SET)
                while True:
                    chunk = os.read(data_fd, 1 << 20)
                    if not chunk:
                        break
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(out, view) :]
            finally:
                os.close(out)
            os.rename(temp, path)
            temp = None
            _answer(status_fd, {"ok": True})
        except Exception as exc:  # answered, whatever it is: never our end
            _answer_error(status_fd, exc)
        finally:
            if temp is not None:
                try:
                    os.unlink(temp)
                except OSError:
                    pass
            os.close(data_fd)
            os.close(status_fd)

    def op_get(self, message: dict, fds: list) -> None:  # type: ignore[type-arg]
        status_fd, data_fd = fds[0], fds[1]
        try:
            limit = int(message.get("max_bytes", 64 << 20))
            src = os.open(str(message["path"]), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            try:
                import stat

                st = os.fstat(src)
                if stat.S_ISDIR(st.st_mode):
                    raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
                if not stat.S_ISREG(st.st_mode):
                    raise OSError(errno.EINVAL, "not a regular file")
                if st.st_size > limit:
                    raise OSError(errno.EFBIG, "file is %d bytes, more than the %d allowed" % (st.st_size, limit))
                copied = 0
                while copied <= limit:
                    chunk = os.read(src, 1 << 20)
                    if not chunk:
                        break
                    copied += len(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(data_fd, view) :]
                if copied > limit:
                    raise OSError(errno.EFBIG, "file grew past the %d bytes allowed" % limit)
            finally:
                os.close(src)
            _answer(status_fd, {"ok": True, "size": copied})
        except Exception as exc:  # answered, whatever it is: never our end
            _answer_error(status_fd, exc)
        finally:
            os.close(data_fd)
            os.close(status_fd)

    # ---------------------------------------------------------------- children
    def reap(self) -> None:
        """Collect every child that ended; report the commands among them once their leftovers are gone."""
        finished = []
        children_left = True
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                children_left = False
                break
            if pid == 0:
                break
            running = self.running.pop(pid, None)
            if running is None:
                continue  # an orphan that came back to us
            self.by_id.pop(running.id, None)
            if running.pidfd >= 0:
                self.poller.unregister(running.pidfd)
                os.close(running.pidfd)
            finished.append((running, status, usage.ru_maxrss * 1024))
        # A spawned child shares our memory until it execs, and the kernel counts our peak into its
        # own: a peak no higher than ours says only that the command's was at most that (unknown).
        own_peak = self.own_peak() if finished else 0
        for running, status, maxrss in finished:
            # No child left at all (the usual case) means the command left nothing behind.
            if children_left:
                self._clean_up_after(running.pid)
            try:
                reply = {"status": status, "maxrss": maxrss} if maxrss > own_peak else {"status": status}
                protocol.write_status(running.status_fd, reply)
            except OSError:
                pass
            os.close(running.status_fd)
            for fd in running.output_fds:
                os.close(fd)

    def _clean_up_after(self, sid: int) -> None:
        """Kill what the finished command left behind: its session, and any orphan when we are idle.

        Whatever a command leaves behind is reparented to us (we are a subreaper), so it is
        enough to look at our own children before scanning /proc. The killed are reaped here:
        with pidfds no SIGCHLD comes to reap them later.
        """
        mains = set(self.running)
        if not (_own_children() - mains):
            return
        _kill_session(sid)
        if not self.running:
            _kill_descendants(os.getpid())
        _reap_orphans(mains)

    def shutdown(self) -> None:
        for running in list(self.running.values()):
            _kill_session(running.pid)
        _kill_descendants(os.getpid())


def _pidfds_work() -> bool:
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return False
    return True


def _reap_orphans(keep: set) -> None:  # type: ignore[type-arg]
    """Reap the ended children that are not running commands (a command's status is reap()'s to take)."""
    for pid in _own_children() - keep:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def _find_program(name: str, path_var: str, cwd: str):  # type: ignore[no-untyped-def]
    """The path to execute, or an errno (ENOENT, EACCES) when there is none."""
    if "/" in name:
        candidate = name if name.startswith("/") else os.path.join(cwd, name)
        try:
            mode = os.stat(candidate).st_mode
        except OSError:
            return errno.ENOENT
        if mode & 0o170000 == 0o040000 or not os.access(candidate, os.X_OK):  # a directory, or not executable
            return errno.EACCES
        return candidate
    denied = False
    for directory in path_var.split(":"):
        candidate = os.path.join(directory or cwd, name)
        if os.path.isfile(candidate):
            if os.access(candidate, os.X_OK):
                return candidate
            denied = True
    return errno.EACCES if denied else errno.ENOENT


def _own_children() -> set:  # type: ignore[type-arg]
    pid = os.getpid()
    children = processes.children_of(pid)
    if children is None:  # gVisor, kernels without CONFIG_PROC_CHILDREN: scan /proc
        return {p for p, ppid, _sid in _processes() if ppid == pid}
    return set(children)


def _processes() -> list:  # type: ignore[type-arg]
    """(pid, ppid, session) of every process we can see."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2 :].split()
        out.append((int(name), int(fields[1]), int(fields[3])))
    return out


def _kill_session(sid: int) -> None:
    for _ in range(50):
        victims = [pid for pid, _ppid, session in _processes() if session == sid and pid != os.getpid()]
        victims = [pid for pid in victims if _state(pid) != b"Z"]  # zombies wait for reap(), not for us
        if not victims:
            return
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _answer(status_fd: int, reply: dict) -> None:  # type: ignore[type-arg]
    try:
        protocol.write_status(status_fd, reply)
    except OSError:  # the host stopped waiting (interrupted): nothing to tell
        pass


def _answer_error(status_fd: int, exc: Exception) -> None:
    """A failed put or get: the errno of an OSError; EINVAL for a value no file call takes (a NUL
    byte, a mode out of range, a request that is not what a host of ours sends)."""
    if isinstance(exc, OSError):
        _answer(status_fd, {"error": exc.strerror or str(exc), "errno": exc.errno or errno.EIO})
    else:
        _answer(status_fd, {"error": os.strerror(errno.EINVAL), "errno": errno.EINVAL})


def _memory_peak() -> int:
    """The peak resident size of our memory (VmHWM), in bytes; 0 when /proc does not say."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _kill_descendants(root: int) -> None:
    for _ in range(50):
        table = _processes()
        children: dict = {}  # type: ignore[type-arg]
        for pid, ppid, _sid in table:
            children.setdefault(ppid, []).append(pid)
        victims, stack = [], list(children.get(root, []))
        while stack:
            pid = stack.pop()
            victims.append(pid)
            stack.extend(children.get(pid, []))
        victims = [pid for pid in victims if _state(pid) != b"Z"]
        if not victims:
            return
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _state(pid: int) -> bytes:
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
        return data[data.rfind(b")") + 2 :].split()[0]
    except OSError:
        return b"X"


def main() -> int:
    path = os.environ.pop("CORRAL_AGENT_SOCKET", "")
    if path:  # a container engine cannot hand us a descriptor: connect to the host's socket instead
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.connect(path)
    else:
        fd = int(os.environ.pop("CORRAL_AGENT_FD", "3"))
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
    # CORRAL_AGENT_REAP=signal: reap on SIGCHLD even where pidfds work (the tests cover both ways).
    agent = Agent(sock, pidfds=os.environ.pop("CORRAL_AGENT_REAP", "") != "signal")
    message, fds = protocol.recv(sock)
    if message is None or message.get("op") != "hello":
        return 2
    try:
        program = b""
        for fd_ in fds:  # a seccomp program to load ourselves (backends without bubblewrap)
            os.lseek(fd_, 0, os.SEEK_SET)
            while True:
                chunk = os.read(fd_, 65536)
                if not chunk:
                    break
                program += chunk
            os.close(fd_)
        agent.hello(message, program)
    except Exception as exc:  # report, then fail closed: the host refuses to use this sandbox
        protocol.send(sock, {"ready": False, "error": "%s: %s" % (type(exc).__name__, exc)})
        return 3
    # Everything allocated so far lives as long as we do: keep it out of the collector's full
    # passes, which would otherwise walk it every few hundred commands.
    import gc

    gc.freeze()
    agent.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
