"""The kernel provisioners of the students' servers: kernels that bind their own ports, and
kernels forked by the course's kernel server.

``OwnPortsProvisioner`` (entry point ``classroom-exec``, the servers' default with
``kernel_mode = exec``) starts kernels as Jupyter does, except that a new IPython kernel
binds ports of its own choosing (see the class).

``ForkProvisioner`` is registered as the ``jupyter_client.kernel_provisioners`` entry point ``classroom-fork``;
with ``kernel_mode = fork`` launch makes it the servers' default provisioner and gives it
the kernel server's socket (``--ForkProvisioner.kernel_server``). It is jupyter_client's
``LocalProvisioner`` except for the one step that starts the process: the connection file
and its key are written by the student's server as usual (``pre_launch``), then the kernel
server forks the kernel as this student (``kernelserver.py``). The forked kernel is handled
through ``ForkedKernel``, which answers as the ``Popen`` of an exec'd kernel would, so
interrupt (SIGINT to its process group: it is the student's), restart, shutdown and
culling take the ``LocalProvisioner`` paths unchanged.

A kernel that cannot be forked (another kernel spec than this Python's ipykernel, settings
that only a new interpreter would apply, no kernel server, a refusal) is started by exec,
as Jupyter does, and the server's log says why.

This module runs inside the students' servers (the installed copy of the package).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import time
from typing import Any

from jupyter_client.connect import KernelConnectionInfo, LocalPortCache
from jupyter_client.provisioning import LocalProvisioner
from jupyter_core.paths import secure_write
from traitlets import Float, Unicode

from .kernelserver import KERNEL_MODULES, REQUEST

START_REPLY_TIMEOUT = 60.0  # seconds the kernel server gets to answer (a whole room at once)
PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
EXIT_REPORT_WAIT = 2.0  # seconds to wait for the exit status once the process is gone
# Variables that act when an interpreter starts (or libraries load): a kernel that has them
# must start as a new program.
STARTUP_VARIABLES = (
    "PYTHON",
    "LD_",
    "OPENBLAS_",
    "OMP_",
    "MKL_",
    "GOTO_",
    "NUMEXPR_",
    "PYDEVD_",
    "DEBUGPY_",
)


class ForkedKernel:
    """A forked kernel, answering as ``subprocess.Popen`` does for ``LocalProvisioner``.

    Not our child: its exit status comes from the kernel server on the connection that
    asked for it (closing that connection kills the kernel); a pidfd tells that it ended
    even if the kernel server is gone.
    """

    stdin = stdout = stderr = None

    def __init__(self, conn: socket.socket, pid: int, buffer: bytes = b""):
        self.conn = conn
        self.pid = pid
        self.returncode: int | None = None
        self.buffer = buffer
        self.gone_since: float | None = None
        try:
            self.pidfd: int | None = os.pidfd_open(pid)
        except OSError:
            self.pidfd = None

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        self._read()
        if self.returncode is None and self._ended():
            if self.gone_since is None:
                self.gone_since = time.monotonic()
            elif time.monotonic() - self.gone_since > EXIT_REPORT_WAIT:
                self.returncode = -signal.SIGKILL  # the kernel server did not say: it is gone too
        if self.returncode is not None:
            self.close()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"kernel {self.pid} still runs")
            time.sleep(0.05)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def close(self) -> None:
        """Let the connection go (if the kernel still ran, the kernel server kills it)."""
        with contextlib.suppress(OSError):
            self.conn.close()
        if self.pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
            self.pidfd = None

    def _read(self) -> None:
        while self.conn.fileno() >= 0:
            try:
                chunk = self.conn.recv(4096)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                chunk = b""
            if not chunk:
                self.conn.close()  # the kernel server is gone: the pidfd says the rest
                break
            self.buffer += chunk
        while b"\n" in self.buffer:
            line, _, self.buffer = self.buffer.partition(b"\n")
            with contextlib.suppress(ValueError, TypeError):
                message = json.loads(line)
                if "exit" in message:
                    self.returncode = int(message["exit"])

    def _ended(self) -> bool:
        if self.pidfd is not None:
            import select

            return bool(select.select([self.pidfd], [], [], 0)[0])
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


def is_ipykernel(cmd: list[str]) -> bool:
    """``cmd`` is ``PYTHON -m ipykernel_launcher …`` (or ``-m ipykernel``)."""
    return len(cmd) >= 3 and cmd[1] == "-m" and cmd[2] in KERNEL_MODULES


class OwnPortsProvisioner(LocalProvisioner):
    """``LocalProvisioner`` whose new IPython kernels bind ports of their own choosing.

    Jupyter picks five free ports, lets them go, and the kernel binds them later: when a
    room starts its kernels at once, a classmate's kernel may bind them first, and this
    kernel never answers. Given port 0, ipykernel binds ports of its own and writes them
    into the connection file, where the server takes them. A restarted kernel keeps its
    ports, so the browser's open connections still reach it. Other kernel specs start as
    Jupyter starts them. ``kernel_mode = exec`` uses this one (entry point ``classroom-exec``).
    """

    _started = False  # a kernel was started once: a restart keeps its ports

    timeout = Float(
        START_REPLY_TIMEOUT, config=True, help="Seconds a new kernel gets to listen (and fork)."
    )

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        written = self._open_ports() if self._own_ports(cmd) else None
        try:
            info = await super().launch_kernel(cmd, **kwargs)
            if written is not None:
                await self._take_ports(self.process)
                info = self.connection_info
        except BaseException:
            if written is not None:
                self._write_connection_file(written)
            raise
        self._started = True
        return info

    def _own_ports(self, cmd: list[str]) -> bool:
        return self.parent is not None and not self._started and is_ipykernel(cmd)

    def _open_ports(self) -> dict:
        """Rewrite the connection file with port 0 for each channel (ipykernel then binds
        ports of its own and writes them there); what it said before."""
        with open(self.parent.connection_file) as f:
            written = json.load(f)
        self._write_connection_file({**written, **dict.fromkeys(PORT_NAMES, 0)})
        return written

    async def _take_ports(self, kernel: Any) -> None:
        """Wait for the kernel to write its ports into the connection file; use them."""
        km = self.parent
        deadline = time.monotonic() + self.timeout
        while True:
            with contextlib.suppress(OSError, ValueError):
                with open(km.connection_file) as f:
                    info = json.load(f)
                if all(info.get(name) for name in PORT_NAMES):
                    break
            if kernel.poll() is not None:
                raise ValueError("the kernel ended before it listened")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the kernel did not listen within {self.timeout:g} s")
            await asyncio.sleep(0.02)
        if km.cache_ports and self.ports_cached:
            cache = LocalPortCache.instance()
            for name in PORT_NAMES:
                cache.return_port(self.connection_info[name])
        for name in PORT_NAMES:
            setattr(km, name, int(info[name]))
        self.connection_info = km.get_connection_info()
        ports = ", ".join(str(info[name]) for name in PORT_NAMES)
        self.log.info("classroom: kernel %s listens on ports it chose (%s)", self.kernel_id, ports)

    def _write_connection_file(self, info: dict) -> None:
        with secure_write(self.parent.connection_file) as f:
            json.dump(info, f, indent=1)


class ForkProvisioner(OwnPortsProvisioner):
    """``OwnPortsProvisioner`` whose kernels are forked by the course's kernel server."""

    kernel_server = Unicode("", config=True, help="The course's kernel server: its Unix socket.")

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        why = self.not_forkable(cmd, kwargs.get("env") or {})
        if why is None:
            try:
                return await self._fork(cmd, kwargs)
            except (OSError, ValueError, TimeoutError) as exc:
                why = f"the kernel server did not fork it: {exc}"
        self.log.warning("classroom: kernel %s started by exec: %s", self.kernel_id, why)
        return await super().launch_kernel(cmd, **kwargs)

    def not_forkable(self, cmd: list[str], env: dict[str, str]) -> str | None:
        """None if the kernel server can start ``cmd`` with ``env``; else why not."""
        if not self.kernel_server:
            return "no kernel server configured"
        if not is_ipykernel(cmd):
            return "not an IPython kernel (its kernel spec runs something else)"
        found = shutil.which(cmd[0], path=env.get("PATH", os.defpath))
        if not found or not _same_python(found, sys.executable):
            return f"its kernel spec runs another Python ({cmd[0]})"
        startup = sorted(k for k in env if k.startswith(STARTUP_VARIABLES))
        if startup:
            return f"its environment sets {', '.join(startup)}, which only a new Python applies"
        return None

    async def _fork(self, cmd: list[str], kwargs: dict[str, Any]) -> KernelConnectionInfo:
        env = dict(kwargs.get("env") or os.environ)
        cwd = str(kwargs.get("cwd") or os.getcwd())
        spec = {"argv": cmd, "env": env, "cwd": cwd, "umask": _umask()}
        written = self._open_ports() if self._own_ports(cmd) else None
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        spec_fd = os.memfd_create("kernel-launch", os.MFD_CLOEXEC)
        outputs = [_output(1), _output(2)]
        try:
            os.write(spec_fd, json.dumps(spec).encode())
            os.lseek(spec_fd, 0, os.SEEK_SET)
            conn.settimeout(5)
            conn.connect(self.kernel_server)
            socket.send_fds(conn, [REQUEST], [spec_fd, *outputs])
            conn.setblocking(False)
            pid, rest = await self._answer(conn)
            kernel = ForkedKernel(conn, pid, rest)
            if written is not None:
                await self._take_ports(kernel)
        except BaseException:
            conn.close()  # a kernel already forked goes with it
            if written is not None:
                self._write_connection_file(written)
            raise
        finally:
            os.close(spec_fd)
            for fd in outputs:
                if fd > 2:
                    os.close(fd)
        self.process = kernel
        self.pid = self.pgid = pid  # the kernel leads a session of its own
        self.cwd = cwd
        self._started = True
        self.log.info(
            "classroom: kernel %s forked by the kernel server (pid %d)", self.kernel_id, pid
        )
        return self.connection_info

    async def _answer(self, conn: socket.socket) -> tuple[int, bytes]:
        loop = asyncio.get_running_loop()
        buffer = b""
        deadline = loop.time() + self.timeout
        while b"\n" not in buffer:
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"no answer within {self.timeout:g} s")
            chunk = await asyncio.wait_for(loop.sock_recv(conn, 4096), left)
            if not chunk:
                raise ValueError("the kernel server closed the connection")
            buffer += chunk
        line, _, rest = buffer.partition(b"\n")
        answer = json.loads(line)
        if "pid" not in answer:
            raise ValueError(answer.get("error") or f"unexpected answer {answer}")
        return int(answer["pid"]), rest

    async def cleanup(self, restart: bool = False) -> None:
        if isinstance(self.process, ForkedKernel):
            self.process.close()
        await super().cleanup(restart=restart)


def _same_python(found: str, ours: str) -> bool:
    """The same interpreter of the same environment (a venv's ``python`` is a symlink)."""
    try:
        return os.path.dirname(os.path.abspath(found)) == os.path.dirname(
            ours
        ) and os.path.samefile(found, ours)
    except OSError:
        return False


def _umask() -> int:
    """This process's umask, without changing it (another thread may be creating files)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o077


def _output(fd: int) -> int:
    """``fd`` if it is open (the server's log), else a new one on /dev/null (closed after use):
    where the kernel writes."""
    try:
        os.fstat(fd)
    except OSError:
        return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    return fd
