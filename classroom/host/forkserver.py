"""The fork server: one pre-imported root process that forks each student's Jupyter server.

``launch`` starts it as ``python -I forkserver.py APP``. It imports the server
application (``lab``, ``notebook`` or ``server``) and its heavy dependencies,
``gc.freeze()``s, then answers one JSON request per line on stdin with one JSON
line on stdout: ``{"username", "uid", "argv", "log", "placement", "exec"}`` ->
``{"pid"}`` or ``{"error"}``. With ``exec`` (a whole command line) the child runs that
program instead; ``python -I forkserver.py exec`` imports nothing and only does that
(``start_mode = exec``).

It is also the class's supervisor: the servers (and their log writers) are its
children, orphaned to it by the intermediate process that forked them; it is their
subreaper (``PR_SET_CHILD_SUBREAPER``: a kernel whose server died is adopted by it,
not by PID 1) and it reaps every one of them, whatever the host's PID 1 does. EOF on
stdin ends the requests; it then stays until the last process it started or adopted
has ended, so servers keep running after launch exits, as before.

A server's stdout and stderr are a pipe into a small root log writer (``logwriter.py``)
that appends to its log: the student never holds a descriptor of root's.

Each child joins the student's cgroup (``limits.enter``: the placement launch made)
as root, before it becomes the student: no student code runs outside the limits.

It holds no secret and no roster data: a request carries only a username, the
uid launch expects, the server's arguments (no secret in them) and the log path.
The child becomes the student before any Jupyter code runs, then reads its own
settings (the password hash included) from the student's ``~/.jupyter``.

The script side imports only the standard library, ``identity.py``, ``limits.py`` and
``logwriter.py`` (stdlib-only, loaded by path when run as a script), so it runs without the ``classroom`` package;
``ForkServer`` is the client ``launch`` uses.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import pwd
import random
import select
import signal
import subprocess
import sys
import time


def _sibling(name: str):
    """The module ``name``.py next to this file, loaded by path (this runs without the package)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_classroom_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


if __package__:
    from . import identity, limits, logwriter
else:  # ``python -I forkserver.py``: no package, and its folder is not on sys.path
    identity = _sibling("identity")
    limits = _sibling("limits")
    logwriter = _sibling("logwriter")

APPS = {
    "lab": ("jupyterlab.labapp", "LabApp", "jupyter-lab"),
    "notebook": ("notebook.app", "JupyterNotebookApp", "jupyter-notebook"),
    "server": ("jupyter_server.serverapp", "ServerApp", "jupyter-server"),
}
# Imported once here so that every child shares their pages instead of importing them again.
PRELOAD = (
    "jupyter_server.serverapp",
    "jupyter_server.services.contents.largefilemanager",
    "jupyter_server.services.contents.filemanager",
    "jupyter_server.services.kernels.kernelmanager",
    "jupyter_server.services.sessions.sessionmanager",
    "jupyter_server.services.kernels.websocket",
    "jupyter_server.services.kernels.connection.channels",
    "jupyter_server.gateway.managers",
    "jupyter_server.auth.identity",
    "jupyter_server.auth.login",
    "jupyter_server.extension.manager",
    "jupyter_server.extension.serverextension",
    "jupyter_server.files.handlers",
    "jupyter_server.nbconvert.handlers",
    "jupyter_server.view.handlers",
    "jupyter_server_terminals",
    "jupyter_server_terminals.app",
    "jupyter_server_terminals.handlers",
    "jupyter_server_terminals.api_handlers",
    "terminado",
    "jupyter_lsp",
    "jupyter_lsp.serverextension",
    "notebook_shim",
    "notebook_shim.shim",
    "jupyterlab_server",
    "jupyterlab_server.app",
    "jupyterlab_server.handlers",
    "jupyterlab_server.workspaces_handler",
    "jupyterlab_server.settings_handler",
    "jupyterlab_server.themes_handler",
    "jupyterlab_server.translations_handler",
    "jupyterlab_server.licenses_handler",
    "jupyterlab_server.listings_handler",
    "nbconvert",
    "nbformat",
    "jupyter_client",
    "jupyter_client.ioloop",
    "jupyter_events",
    "jsonschema",
    "jinja2",
    "argon2",
    "prometheus_client",
    "send2trash",
    "babel",
    "json5",
    # imported while a server initialises (found by diffing sys.modules after initialize())
    "jupyter_server.kernelspecs.handlers",
    "jupyter_server.services.api.handlers",
    "jupyter_server.services.config.handlers",
    "jupyter_server.services.contents.handlers",
    "jupyter_server.services.events.handlers",
    "jupyter_server.services.kernels.handlers",
    "jupyter_server.services.kernelspecs.handlers",
    "jupyter_server.services.nbconvert.handlers",
    "jupyter_server.services.security.handlers",
    "jupyter_server.services.sessions.handlers",
    "jupyter_server.services.shutdown",
    "jupyter_core.migrate",
    "notebook_shim.nbserver",
    "tornado.platform.asyncio",
    "jinja2.ext",
    "codeop",
    "getopt",
    "IPython",
    "IPython.core.completer",
    "IPython.core.inputtransformer2",
    "IPython.utils.tokenutil",
    "httpx",
    "httpcore",
    "h11",
)
BECAME_FD = 3  # the child's end of the pipe that says "I am the student now" (then closed)
FIRST_FD = 4  # every descriptor from here up is closed in the child
BECAME = b"ok"
EXEC = "exec"  # the "app" of a fork server that imports nothing and only starts programs
PR_SET_CHILD_SUBREAPER = 36
BECOME_TIMEOUT = 10  # seconds a child gets from fork to "I am the student now"
# The fork server's environment carries this padding so that each child can write its own
# (clean) environment over the block the kernel shows as /proc/PID/environ.
ENV_PAD = "CLASSROOM_ENV_PAD"
ENV_PAD_SIZE = 4096


# --- the server (runs as root, single-threaded) ----------------------------------------------


def preload(app: str) -> None:
    """Import the app and its heavy dependencies; a missing optional module is fine."""
    module, _, _ = APPS[app]
    importlib.import_module(module)
    extra = (
        ("jupyterlab", "jupyterlab.labapp", "notebook", "notebook.app") if app != "server" else ()
    )
    for name in (*PRELOAD, *extra):
        with contextlib.suppress(Exception):
            importlib.import_module(name)


def threads() -> int:
    """The number of threads of this process (the kernel's count, not just Python's)."""
    return len(os.listdir("/proc/self/task"))


def reply(message: dict) -> None:
    with contextlib.suppress(OSError):  # launch is gone: the requests end with EOF anyway
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()


def serve(app: str) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for launch; EOF on stdin ends us
    become_subreaper()
    try:
        if app != EXEC:
            preload(app)
    except Exception as exc:  # reported to launch, which falls back to exec
        reply({"error": f"cannot import the {app} application: {type(exc).__name__}: {exc}"})
        return 1
    gc.collect()
    gc.freeze()
    if threads() != 1:
        reply(
            {"error": f"the fork server has {threads()} threads after importing; it must have one"}
        )
        return 1
    signal.signal(signal.SIGCHLD, reap)  # only now: an import may wait for a child of its own
    reply({"ready": True, "pid": os.getpid(), "app": app})
    for line in sys.stdin.buffer:
        try:
            request = json.loads(line)
            reply({"pid": spawn(app, request)})
        except Exception as exc:  # one bad request is that student's failure, not ours
            reply({"error": f"{type(exc).__name__}: {exc}"})
    supervise()
    return 0


def become_subreaper() -> None:
    """Orphans of our servers (their kernels) become our children, not PID 1's."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        sys.stderr.write(f"classroom: PR_SET_CHILD_SUBREAPER failed: {os.strerror(err)}\n")


def reap(*_: object) -> None:
    """Collect every child that has ended (SIGCHLD): no zombie waits for PID 1."""
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def supervise() -> None:
    """After the last request: reap until no child of ours (started or adopted) is left."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return
        except InterruptedError:
            continue


def spawn(app: str, request: dict) -> int:
    """Fork the student's server and return its pid once it is the student.

    An intermediate child starts the server's log writer, forks the server and exits: the
    server and the writer are then orphans the kernel gives to us, their subreaper (we
    reap them). The intermediate gives up on a server not the student within
    ``BECOME_TIMEOUT``, so a student who stops it cannot hold up the next request."""
    username = str(request["username"])
    uid = int(request["uid"])
    args = [str(a) for a in request["argv"]]
    log_path = str(request["log"])
    placement = dict(request.get("placement") or {})
    program = request.get("exec")
    if program is None and app == EXEC:
        raise ValueError("this fork server only starts programs (no exec command given)")
    pw = pwd.getpwnam(username)
    if pw.pw_uid != uid or uid == 0:
        raise PermissionError(f"{username} has uid {pw.pw_uid}, not {uid}: refused")
    if threads() != 1:
        raise RuntimeError("the fork server has more than one thread; refusing to fork")
    sys.stdout.flush()
    sys.stderr.flush()
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # intermediate: start the log writer, fork the server, tell its pid, vanish
        code = 1
        try:
            # Its own children are waited for here, not reaped behind its back by reap().
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            os.close(rfd)
            output = log_output(log_path)
            became_r, became_w = os.pipe()
            server = os.fork()
            if server == 0:
                os.close(wfd)
                os.close(became_r)
                if program is not None:
                    become_program(pw, [str(a) for a in program], output, became_w, placement)
                become_server(app, pw, args, output, became_w, placement)  # never returns
            os.close(became_w)
            os.close(output)
            # Once it is the student's the student can stop it before it says so: give up
            # then, or one student would hold up the fork server and every student after.
            if read_all(became_r, BECOME_TIMEOUT) == BECAME:
                os.write(wfd, str(server).encode())
            else:
                with contextlib.suppress(OSError):
                    os.kill(server, signal.SIGKILL)
                os.write(wfd, b"!")
            code = 0
        except BaseException as exc:  # noqa: BLE001 - told to the fork server, never raised here
            with contextlib.suppress(Exception):
                os.write(wfd, f"?{type(exc).__name__}: {exc}".encode()[:500])
        finally:
            # The server and its log writer are orphaned: the kernel gives them to the
            # nearest subreaper, this fork server, which reaps them (supervise).
            os._exit(code)
    os.close(wfd)
    data = read_all(rfd)
    with contextlib.suppress(ChildProcessError):  # reap() may have collected it already
        os.waitpid(pid, 0)
    if not data:
        raise RuntimeError("fork failed")
    if data == b"!":
        raise RuntimeError(f"the server stopped before it became {username} (see its log)")
    if data.startswith(b"?"):
        raise RuntimeError(data[1:].decode(errors="replace"))
    return int(data)


def log_output(log_path: str) -> int:
    """The write end of a pipe into a new log writer that appends to ``log_path``."""
    log_fd = os.open(
        log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
    )
    try:
        _, output = logwriter.spawn_writer(sys.executable, log_fd)
    finally:
        os.close(log_fd)
    return output


def read_all(fd: int, timeout: float | None = None) -> bytes:
    """Everything until EOF, or what came within ``timeout`` seconds; the descriptor is closed."""
    data = b""
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    break
            chunk = os.read(fd, 64)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    return data


def become_student(pw: pwd.struct_passwd, output: int, became: int, placement: dict) -> None:
    """In the child: stdout and stderr on ``output`` (the log writer's pipe), join the
    student's cgroup, drop everything of root's, become the student, then say so on
    ``became`` (and close it), so the pid launch records is never that of a process still
    running as root. Raises on any failure."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.dup2(became, BECAME_FD)
    os.closerange(FIRST_FD, os.sysconf("SC_OPEN_MAX"))  # every inherited descriptor
    os.setsid()
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a freshly started Python
    limits.enter(placement)  # as root, before any code of the student's can run
    identity.become(pw)
    os.write(BECAME_FD, BECAME)
    os.close(BECAME_FD)


def become_program(
    pw: pwd.struct_passwd, argv: list[str], output: int, became: int, placement: dict
) -> None:
    """In the child: become the student, then ``execve`` ``argv`` (exec mode). Never returns."""
    try:
        become_student(pw, output, became, placement)
        os.chdir(pw.pw_dir)
        os.umask(0o077)
        os.execve(argv[0], argv, identity.student_env(pw))
    except BaseException as exc:  # noqa: BLE001 - the child must never return into the server
        with contextlib.suppress(Exception):
            os.write(2, f"classroom: cannot start {pw.pw_name}'s server: {exc}\n".encode())
    os._exit(127)


def become_server(
    app: str, pw: pwd.struct_passwd, args: list[str], output: int, became: int, placement: dict
) -> None:
    """In the child: become the student (``become_student``), run the server with stdout
    and stderr on ``output``. Never returns."""
    try:
        become_student(pw, output, became, placement)
        env = identity.student_env(pw)
        os.environ.clear()
        os.environ.update(env)
        identity.show_environ(env)
        os.chdir(pw.pw_dir)
        os.umask(0o077)
        random.seed()  # nothing seeded in the fork server is shared between students
        add_user_site()
        identity.set_name(APPS[app][2])
        module, cls, prog = APPS[app]
        sys.argv = [prog, *args]
        application = getattr(importlib.import_module(module), cls)
    except BaseException as exc:  # noqa: BLE001 - the child must never return into the server
        with contextlib.suppress(Exception):
            os.write(2, f"classroom: cannot start {pw.pw_name}'s server: {exc}\n".encode())
        os._exit(1)
    code = 0
    try:
        sys.stdout = os.fdopen(1, "w", buffering=1, encoding="utf-8", errors="replace")
        sys.stderr = os.fdopen(2, "w", buffering=1, encoding="utf-8", errors="replace")
        sys.stdin = open(os.devnull, encoding="utf-8")  # noqa: SIM115
        application.launch_instance(argv=args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def add_user_site() -> None:
    """The student's ``~/.local`` site-packages, as a fresh Python would have (``-I`` left it out)."""
    import site

    site.USER_BASE = None
    site.USER_SITE = None
    path = site.getusersitepackages()
    if os.path.isdir(path):
        site.addsitedir(path)


# --- the client (runs in launch) -------------------------------------------------------------


class ForkServerError(Exception):
    """The fork server could not start, or stopped answering."""


class ForkServer:
    """Start, ask and stop the fork server. Not thread-safe: call it from one thread."""

    def __init__(self, proc: subprocess.Popen, app: str):
        self.proc = proc
        self.app = app
        self.buffer = b""
        self.ready = False
        self.spawned = 0  # servers it started: once it has any, it stays to supervise them

    @classmethod
    def start(
        cls, app: str, *, python: str | None = None, log_path: str | None = None
    ) -> ForkServer:
        """Start it (it imports in the background); ``wait_ready`` before ``spawn``.
        ``app`` ``exec``: one that imports nothing and only starts programs."""
        if app not in APPS and app != EXEC:
            raise ForkServerError(f"unknown app {app!r}")
        python = python or sys.executable
        stderr = subprocess.DEVNULL
        if log_path:
            stderr = os.open(
                log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600
            )
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "HOME": "/nonexistent",
            ENV_PAD: "-" * ENV_PAD_SIZE,  # room for each child's environment (show_environ)
        }
        from .system import spawn  # client side only: the script side stays stdlib-only

        try:
            proc = spawn(
                [python, "-I", os.path.abspath(__file__), app],
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                cwd="/",
            )
        except OSError as exc:
            raise ForkServerError(f"cannot start {python}: {exc.strerror}") from None
        finally:
            if isinstance(stderr, int) and stderr >= 0:
                os.close(stderr)
        if proc is None:
            raise ForkServerError("not started: dry run")
        return cls(proc, app)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read_reply(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ForkServerError(f"no answer within {timeout:g} s")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                code = self.proc.poll()
                raise ForkServerError(
                    f"it stopped (status {code})" if code is not None else "it closed its output"
                )
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        try:
            return json.loads(line)
        except ValueError:
            raise ForkServerError(f"garbled answer: {line[:80]!r}") from None

    def wait_ready(self, timeout: float) -> None:
        if self.ready:
            return
        message = self._read_reply(timeout)
        if not message.get("ready"):
            raise ForkServerError(message.get("error") or f"unexpected answer {message}")
        self.ready = True

    def spawn(
        self,
        username: str,
        uid: int,
        argv: list[str],
        log_path: str,
        timeout: float = 30,
        *,
        placement: dict | None = None,
        program: list[str] | None = None,
    ) -> int:
        """Ask for one student's server; return its pid. ``placement``: the student's cgroup
        (``limits.prepare``); ``program``: run this command instead of the preloaded app.
        ``ForkServerError`` if the fork server is gone; ``ValueError`` if this request failed."""
        self.wait_ready(timeout)
        request = {"username": username, "uid": uid, "argv": argv, "log": log_path}
        if placement:
            request["placement"] = placement
        if program is not None:
            request["exec"] = program
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
        except OSError as exc:
            raise ForkServerError(f"it stopped ({exc.strerror or exc})") from None
        message = self._read_reply(timeout)
        if "pid" in message:
            self.spawned += 1
            return int(message["pid"])
        raise ValueError(message.get("error") or f"unexpected answer {message}")

    def close(self, timeout: float = 5) -> None:
        """EOF on its stdin: no more requests. With servers started it stays, their
        supervisor, until the last has ended; without, it ends now (killed after
        ``timeout`` if it does not)."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        if not self.spawned:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        with contextlib.suppress(OSError):
            self.proc.stdout.close()


if __name__ == "__main__":
    if len(sys.argv) != 2 or (sys.argv[1] not in APPS and sys.argv[1] != EXEC):
        sys.stderr.write(f"usage: forkserver.py {{{'|'.join([*APPS, EXEC])}}}\n")
        sys.exit(2)
    sys.exit(serve(sys.argv[1]))
