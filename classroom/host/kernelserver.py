"""The kernel fork server: one pre-imported root process per course that forks students' kernels.

``launch`` starts it (``kernel_mode = fork``) as ``python kernelserver.py SOCKET GID PRELOAD...``
with a clean environment and ``cwd /``; it outlives launch, and ``shutdown`` stops it
once no server of the course runs. It imports ipykernel and ``preload`` once (a module
that is not installed is skipped with a warning), ``gc.freeze()``s, then listens on a Unix
socket that only the course's group can reach.

One connection is one kernel. The student's server (``provisioner.py``) connects and
sends ``REQUEST`` with three descriptors: the launch spec (a memfd: the kernel's argv,
environment, cwd and umask, written by the student's server), and the kernel's stdout and
stderr. The answer is one JSON line, ``{"pid"}`` or ``{"error"}``, then ``{"exit"}`` once
the kernel has ended; closing the connection kills the kernel.

Who the kernel runs as is never asked: it is the uid of the connecting process
(``SO_PEERCRED``), which must not be root and must be in the course's group. Root never
reads the spec: the forked child reads it once it is that student, so nothing of one
student (their connection key above all, which stays in their connection file) passes
through the memory that the next student's kernel is forked from. The fork server holds
no secret and no roster data.

The child, before any of the student's code or settings is read: its own session, the
peer's cgroups and resource limits (so ``[limits]`` hold as for an exec'd kernel), the
student's identity (``identity.become``: groups, gid, uid, checked), a fresh session
keyring, no descriptor of root's, the student's environment, the notebook's folder; then
the state the preloaded modules computed at import as root is recomputed for the student
(``reset_imported_state``) and the IPython kernel starts: the student's ``~/.ipython``
profile and startup files, matplotlib configuration and cache, Jupyter runtime folder.

The child's helpers are in ``kernelchild.py``. Standard library only (with ``identity.py``
and ``kernelchild.py``, loaded by path): it runs without the ``classroom`` package.
"""

from __future__ import annotations

import os
import sys

if (
    __name__ == "__main__"
    and sys.path
    and sys.path[0] == os.path.dirname(os.path.abspath(__file__))
):
    del sys.path[
        0
    ]  # run as a script: its folder's modules must not shadow anything a kernel imports

import contextlib  # noqa: E402
import gc  # noqa: E402
import grp  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import pwd  # noqa: E402
import resource  # noqa: E402
import selectors  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import stat  # noqa: E402
import struct  # noqa: E402
import time  # noqa: E402


def _sibling(name: str):
    """The module ``name``.py next to this file, loaded by path (this runs without the package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_classroom_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __package__:
    from . import identity, kernelchild
else:  # run as a script: no package
    identity = _sibling("identity")
    kernelchild = _sibling("kernelchild")

KERNEL_OOM_SCORE_ADJ = 300  # the out-of-memory killer's preference for kernels (-1000..1000)
REQUEST = b"classroom-kernel 1\n"  # the one request (and the protocol's version)
KERNEL_MODULES = ("ipykernel_launcher", "ipykernel")  # ``python -m X`` that we can fork
# Imported once for every kernel: what a kernel imports until it answers (found by diffing
# sys.modules of a started kernel against these). The debugger (debugpy) included: it is
# most of what a kernel would otherwise import for itself (7 MB of each kernel's own memory).
KERNEL_PRELOAD = (
    "ipykernel.kernelapp",
    "ipykernel.ipkernel",
    "ipykernel.zmqshell",
    "ipykernel.debugger",
    "IPython.core.completerlib",
    "IPython.core.debugger",
    "IPython.core.logger",
    "IPython.core.oinspect",
    "IPython.extensions.storemagic",
    "IPython.utils.wildcard",
    "tornado.platform.asyncio",
    "tornado.gen",
    "tornado.locks",
    "tornado.queues",
    "sqlite3",
    "pdb",
    "pydoc",
    "psutil",
    "http.client",
    "email.parser",
    "mimetypes",
    "unicodedata",
    "gzip",
)
# Set before numpy loads: BLAS and OpenMP start no thread pool (a fork keeps only the
# forking thread, and the fork server must have no other); a room shares the cores anyway.
THREAD_ENV = {
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
    "VECLIB_MAXIMUM_THREADS": "1",
}
IMPORT_ENV: dict[str, str] = {}  # what importing ``preload`` added to the environment
START_TIMEOUT = 10.0  # seconds a connection gets to send its request
BACKLOG = 128
MAX_PER_STUDENT = 64  # connections (kernels) at once per student: the fork server's descriptors
STOP_GRACE = 3.0  # SIGTERM to the kernels when the fork server is stopped, then SIGKILL
# In the child: where the descriptors go (0 /dev/null, 1 and 2 the kernel's output).
READY_FD, SPEC_FD, FIRST_FREE_FD = 3, 4, 5
ARGV_PAD = "--pad=" + "-" * 1024  # room for each kernel's own command line (show_cmdline)
ENV_PAD = "CLASSROOM_ENV_PAD"
ENV_PAD_SIZE = 8192  # room for each kernel's own environment (show_environ)
ERRORS = {  # what the child reports: fixed texts, nothing of the student's request in them
    "become": "the kernel could not become the student",
    "spec": "the kernel's launch request could not be read",
    "argv": "not an IPython kernel of this Python",
    "cwd": "the kernel cannot enter the notebook's folder",
    "reset": "a preloaded module could not be reset for the student",
    "limits": "the student's limits could not be applied to the kernel",
}


def log(message: str) -> None:
    sys.stderr.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} kernelserver: {message}\n")
    sys.stderr.flush()


def threads() -> int:
    """The number of threads of this process (the kernel's count, not just Python's)."""
    return len(os.listdir("/proc/self/task"))


# --- preload --------------------------------------------------------------------------------


def preload(names: list[str]) -> list[str]:
    """Import ipykernel and ``names``; the ones skipped (not installed or failing), each logged."""
    for name in KERNEL_PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    skipped = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            log(f"warning: preload: {name} is not installed, skipped ({exc})")
            skipped.append(name)
        except Exception as exc:  # noqa: BLE001 - a module that fails to import is skipped too
            log(f"warning: preload: importing {name} failed, skipped: {type(exc).__name__}: {exc}")
            skipped.append(name)
    return skipped


# --- the server (root, single-threaded) -------------------------------------------------------


class Kernel:
    """One connection: the student who asked, and the kernel forked for them."""

    def __init__(self, conn: socket.socket, peer_pid: int, uid: int):
        self.conn = conn
        self.peer_pid = peer_pid
        self.uid = uid
        self.deadline = time.monotonic() + START_TIMEOUT
        self.pid: int | None = None
        self.pidfd: int | None = None
        self.ready_fd: int | None = None
        self.ready = b""
        self.exit: int | None = None


class Server:
    def __init__(self, listener: socket.socket, gid: int):
        self.listener = listener
        self.gid = gid
        self.selector = selectors.DefaultSelector()
        self.kernels: dict[socket.socket, Kernel] = {}
        self.stopping = False

    # --- the loop ---

    def serve(self) -> None:
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ, ("accept", None))
        while not self.stopping:
            for key, _ in self.selector.select(timeout=1.0):
                what, kernel = key.data
                try:
                    getattr(self, f"_on_{what}")(kernel)
                except Exception as exc:  # noqa: BLE001 - one request's failure, not ours
                    log(f"error: {type(exc).__name__}: {exc}")
                    if kernel is not None:
                        self._fail(kernel, "the kernel server could not start the kernel")
            self._expire()
        self._stop_kernels()

    def _on_accept(self, _) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(False)
        peer_pid, uid, _gid = struct.unpack(
            "3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        )
        kernel = Kernel(conn, peer_pid, uid)
        self.kernels[conn] = kernel
        self.selector.register(conn, selectors.EVENT_READ, ("request", kernel))
        refusal = self._refusal(uid)
        if refusal:
            if uid != 0:  # root: launch asking whether we listen
                log(f"refused uid {uid}: {refusal}")
            self._fail(kernel, refusal)

    def _refusal(self, uid: int) -> str | None:
        if uid == 0:
            return "no kernels for root"
        try:
            pw = pwd.getpwuid(uid)
        except KeyError:
            return "no such user"
        if self.gid not in os.getgrouplist(pw.pw_name, pw.pw_gid):
            return "not a member of the course"
        if sum(1 for k in self.kernels.values() if k.uid == uid) > MAX_PER_STUDENT:
            return f"more than {MAX_PER_STUDENT} kernels at once"
        return None

    def _on_request(self, kernel: Kernel) -> None:
        if kernel.pid is not None:  # a kernel runs: the connection only says when it is closed
            try:
                data = kernel.conn.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._client_gone(kernel)
            return
        try:
            data, fds, _flags, _ = socket.recv_fds(kernel.conn, len(REQUEST), 3)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, fds = b"", []
        if not data:
            self._close(kernel)
            return
        if data != REQUEST or len(fds) != 3:
            for fd in fds:
                os.close(fd)
            self._fail(kernel, "not a kernel request (or another version of classroom)")
            return
        try:
            self._fork(kernel, fds)
        finally:
            for fd in fds:
                os.close(fd)

    def _on_ready(self, kernel: Kernel, *, until_eof: bool = False) -> None:
        """The child said it is the student and about to start the kernel (or why not)."""
        assert kernel.ready_fd is not None
        while chunk := os.read(kernel.ready_fd, 256):
            kernel.ready += chunk
            if not until_eof or len(kernel.ready) >= 256:
                break
        if chunk and len(kernel.ready) < 256:
            return  # more to come, or the end of it
        self.selector.unregister(kernel.ready_fd)
        os.close(kernel.ready_fd)
        kernel.ready_fd = None
        if kernel.ready == b"ok":
            self._send(kernel, {"pid": kernel.pid})
        else:
            why = ERRORS.get(kernel.ready.decode(errors="replace").partition(":")[0])
            detail = kernel.ready.decode(errors="replace").partition(":")[2]
            self._send(kernel, {"error": f"{why or 'the kernel stopped while starting'}{detail}"})

    def _on_exit(self, kernel: Kernel) -> None:
        assert kernel.pid is not None and kernel.pidfd is not None
        try:
            _, status = os.waitpid(kernel.pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            code = -1
        self.selector.unregister(kernel.pidfd)
        os.close(kernel.pidfd)
        kernel.pidfd = None
        kernel.exit = code
        log(f"kernel {kernel.pid} ended ({code})")
        if kernel.ready_fd is not None:  # it ended before its answer was read: read it now
            self._on_ready(kernel, until_eof=True)
        self._send(kernel, {"exit": code})
        self._close(kernel)

    # --- forking ---

    def _fork(self, kernel: Kernel, fds: list[int]) -> None:
        pw = pwd.getpwuid(kernel.uid)
        if threads() != 1:
            raise RuntimeError("the kernel server has more than one thread; refusing to fork")
        limits, cgroups = kernelchild.peer_confinement(kernel.peer_pid, kernel.uid)
        ready_r, ready_w = os.pipe()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.close(ready_r)
            self._child(pw, fds, ready_w, limits, cgroups)  # never returns
        os.close(ready_w)
        kernel.pid = pid
        kernel.ready_fd = ready_r
        kernel.pidfd = os.pidfd_open(pid)
        self.selector.register(ready_r, selectors.EVENT_READ, ("ready", kernel))
        self.selector.register(kernel.pidfd, selectors.EVENT_READ, ("exit", kernel))
        log(f"kernel {pid} for {pw.pw_name}")

    def _child(self, pw, fds: list[int], ready_w: int, limits: dict, cgroups: list[str]) -> None:
        """Drop everything of the fork server's, become the student, run the kernel. Never returns.

        The order matters: the peer's confinement is taken on as root, then the child becomes
        the student, and only then is anything of the student's (the launch spec) read.
        """
        stage = "become"
        try:
            self._leave_server(fds, ready_w)
            stage = "limits"
            kernelchild.join_cgroups(cgroups)
            os.setpriority(os.PRIO_PROCESS, 0, limits.pop("nice"))
            for res, value in limits.items():
                resource.setrlimit(res, value)
            # Over [limits] memory the OOM killer takes the kernel, not the student's server
            # (a forked kernel counts the preloaded modules it shares; it need not be the
            # largest). Raising the score needs no privilege: the student may raise it too.
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write(str(KERNEL_OOM_SCORE_ADJ))
            stage = "become"
            identity.become(pw)
            kernelchild.join_new_session_keyring()
            stage = "spec"
            spec = kernelchild.read_spec(SPEC_FD)
            stage = "argv"
            argv = spec["argv"]
            if len(argv) < 3 or argv[1] != "-m" or argv[2] not in KERNEL_MODULES:
                raise ValueError("not an ipykernel command line")
            stage = "cwd"
            os.chdir(spec["cwd"])
            os.umask(spec["umask"])
            stage = "reset"
            self._enter_kernel(argv, spec["env"])
        except BaseException as exc:  # noqa: BLE001 - the child must never return into the server
            with contextlib.suppress(Exception):
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else ""
                os.write(READY_FD, f"{stage}:{f' ({reason})' if reason else ''}".encode()[:255])
            os._exit(1)
        self._run_kernel()

    def _leave_server(self, fds: list[int], ready_w: int) -> None:
        """In the child: the kernel's descriptors in place and no other, its own session, signals."""
        # Nothing of the server's may close a descriptor number the kernel reuses later.
        self.listener.detach()
        for conn in list(self.kernels):
            conn.detach()
        self.selector.close()
        spec_fd, out_fd, err_fd = (kernelchild.high_fd(fd) for fd in fds)
        ready_w = kernelchild.high_fd(ready_w)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        os.dup2(ready_w, READY_FD, inheritable=False)
        os.dup2(spec_fd, SPEC_FD, inheritable=False)
        os.closerange(FIRST_FREE_FD, os.sysconf("SC_OPEN_MAX"))
        os.setsid()
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as Python sets it at start-up
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])

    @staticmethod
    def _enter_kernel(argv: list[str], student_env: dict[str, str]) -> None:
        """In the child, as the student: the kernel's environment, command line and module state."""
        env = {**IMPORT_ENV, **student_env}
        env["JPY_PARENT_PID"] = str(os.getppid())  # the kernel ends if the fork server dies
        os.environ.clear()
        os.environ.update(env)
        posix = sys.modules["posix"]
        posix.environ.clear()  # the start-up environment, root's, which os.environ came from
        posix.environ.update({k.encode(): v.encode() for k, v in env.items()})
        identity.show_environ(env)
        identity.show_cmdline(argv)
        kernelchild.reset_imported_state()
        launcher = importlib.util.find_spec("ipykernel_launcher")
        sys.argv = [launcher.origin if launcher and launcher.origin else argv[2], *argv[3:]]
        sys.orig_argv = list(argv)
        identity.set_name("python")
        gc.collect()

    @staticmethod
    def _run_kernel() -> None:
        """In the child, ready: tell the server, run the IPython kernel, exit with its code."""
        code = 1
        try:
            os.write(READY_FD, b"ok")
            os.close(READY_FD)
            # sys.stdin, stdout and stderr stay the interpreter's own, on 0, 1 and 2 (now the
            # kernel's): ipykernel captures those descriptors, as in an exec'd kernel.
            from ipykernel.kernelapp import IPKernelApp

            IPKernelApp.launch_instance()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # noqa: BLE001
            import traceback

            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)

    # --- answers, ends ---

    def _send(self, kernel: Kernel, message: dict) -> None:
        with contextlib.suppress(OSError):
            kernel.conn.send(json.dumps(message).encode() + b"\n")

    def _fail(self, kernel: Kernel, why: str) -> None:
        self._send(kernel, {"error": why})
        if kernel.pid is not None and kernel.exit is None:
            self._kill(kernel)
        else:
            self._close(kernel)

    def _client_gone(self, kernel: Kernel) -> None:
        """The student's server closed the connection (or died): its kernel goes too."""
        if kernel.exit is None:
            self._kill(kernel)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(kernel.conn)

    def _kill(self, kernel: Kernel, sig: int = signal.SIGKILL) -> None:
        # Only while the kernel is our unreaped child: its pid and group cannot be anyone else's.
        if kernel.pid is not None and kernel.exit is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(kernel.pid, sig)
            with contextlib.suppress(ProcessLookupError):
                os.kill(kernel.pid, sig)

    def _close(self, kernel: Kernel) -> None:
        if kernel.pid is not None and kernel.exit is None:
            return  # kept until the kernel is reaped
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(kernel.conn)
        self.kernels.pop(kernel.conn, None)
        kernel.conn.close()

    def _expire(self) -> None:
        now = time.monotonic()
        for kernel in list(self.kernels.values()):
            if kernel.pid is None and now > kernel.deadline:
                self._fail(kernel, "no request")

    def _stop_kernels(self) -> None:
        """The fork server is stopped: so are the kernels it forked (SIGTERM, then SIGKILL)."""
        running = [k for k in self.kernels.values() if k.pid is not None and k.exit is None]
        for kernel in running:
            self._kill(kernel, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        while running and time.monotonic() < deadline:
            for kernel in running:
                with contextlib.suppress(ChildProcessError):
                    if os.waitpid(kernel.pid, os.WNOHANG)[0]:
                        kernel.exit = -1
            running = [k for k in running if k.exit is None]
            time.sleep(0.05)
        for kernel in running:
            self._kill(kernel)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(kernel.pid, 0)


def listen(path: str, gid: int) -> socket.socket:
    """A socket at ``path`` for root and the group ``gid`` only, put in place atomically."""
    folder = os.path.dirname(path)
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise PermissionError(f"{folder} must be root's folder, not writable by others")
    temporary = f"{path}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(temporary)
    finally:
        os.umask(old)
    os.chown(temporary, 0, gid)
    os.chmod(temporary, 0o660)
    listener.listen(BACKLOG)
    os.rename(temporary, path)
    return listener


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        sys.stderr.write("usage: kernelserver.py SOCKET GROUP [MODULE...]\n")
        return 2
    path, group, names = argv[0], argv[1], [a for a in argv[2:] if not a.startswith("--pad=")]
    os.environ.update(THREAD_ENV)  # before anything imports numpy
    os.nice(10)  # the servers launch starts meanwhile come first; back to 0 once ready
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for launch; SIGTERM stops us
    gid = grp.getgrnam(group).gr_gid
    started = time.monotonic()
    before = dict(os.environ)
    try:
        import ipykernel.kernelapp  # noqa: F401
    except ImportError as exc:
        log(f"error: ipykernel cannot be imported ({exc}); kernels start by exec")
        return 1
    skipped = preload(names)
    IMPORT_ENV.update({k: v for k, v in os.environ.items() if k not in before})
    gc.collect()
    gc.freeze()
    if threads() != 1:
        log(f"error: {threads()} threads after importing; a fork server must have one")
        return 1
    listener = listen(path, gid)
    ours = os.stat(path)
    server = Server(listener, gid)

    os.setpriority(os.PRIO_PROCESS, 0, 0)

    def stop(signum, frame):
        server.stopping = True

    signal.signal(signal.SIGTERM, stop)
    loaded = [n for n in names if n not in skipped]
    log(
        f"ready in {time.monotonic() - started:.1f} s: pid {os.getpid()}, preloaded "
        f"{', '.join(loaded) or 'ipykernel only'}"
    )
    try:
        server.serve()
    finally:
        with contextlib.suppress(OSError):
            now = os.stat(path)
            if (now.st_ino, now.st_dev) == (ours.st_ino, ours.st_dev):
                os.unlink(path)  # still ours: a newer fork server may have replaced it
        listener.close()
    log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
