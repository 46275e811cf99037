"""What launch decides before touching the host: each server's command line and port.

The command line carries no secret (the password hash stays in the student's own
``~/.jupyter``, written by setup). A student keeps their port while it is free.

Every server runs under the base URL ``/user/USERNAME/``. With ``access = redirect``
it listens on its own TCP port and asks for the student's notebook password; with
``access = proxy`` it listens on a Unix socket in a folder only the student (and root)
can enter, and asks for nothing: the socket is the access control, and the portal,
which logged the student in, is the only one that forwards to it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import entry_points
from pathlib import Path

from .addresses import https, listen_address, proxied, server_path
from .errors import StepFailed
from .settings import Settings

APP_MODULES = {"lab": "jupyterlab", "notebook": "notebook", "server": "jupyter_server"}
TLS_DIR = ".jupyter/classroom-tls"  # the student's copies of the certificate and key
# Root-owned, on tmpfs: RUN_BASE/COURSE/servers/USERNAME/ (the student's, 0700) holds the
# server's socket in proxy mode; RUN_BASE/COURSE/lab-settings/ JupyterLab's overrides.
RUN_BASE = Path("/run/classroom")
SOCKET_NAME = "server.sock"
# The class does not need JupyterLab asking to fetch news or to check for updates.
LAB_OVERRIDES = {
    "@jupyterlab/apputils-extension:notification": {
        "checkForUpdates": False,
        "fetchNews": "false",
    }
}
# The apps that read JupyterLab settings (with app = notebook, JupyterLab's extension
# is loaded beside Notebook's: both are told).
LAB_SETTINGS_APPS = {"lab": ("LabApp",), "notebook": ("JupyterNotebookApp", "LabApp")}
PROVISIONER = "classroom-fork"  # the entry points of host/provisioner.py
EXEC_PROVISIONER = "classroom-exec"


def root_dir(settings: Settings, home: str) -> str:
    """Where the server opens: HOME/FOLDER (``root = folder``) or HOME."""
    if settings.root == "home":
        return home
    return str(Path(home) / settings.material_folder)


def tls_paths(settings: Settings, home: str) -> tuple[str, str] | None:
    """The student's copies of the certificate and key: when HTTPS is on in redirect mode
    (in proxy mode TLS ends at the portal)."""
    if not https(settings) or proxied(settings):
        return None
    folder = Path(home) / TLS_DIR
    return str(folder / "cert.pem"), str(folder / "key.pem")


def kernel_socket(settings: Settings) -> Path:
    """The course's kernel server (``kernel_mode = fork``): a socket for the course's group."""
    return RUN_BASE / settings.name / "kernels" / "kernels.sock"


@functools.cache
def provisioners_installed() -> bool:
    """Whether this package is installed (not only run from a checkout), so the servers,
    which run with this Python, find its kernel provisioners' entry points."""
    found = entry_points(group="jupyter_client.kernel_provisioners")
    return {PROVISIONER, EXEC_PROVISIONER} <= {e.name for e in found}


def kernel_args(settings: Settings) -> list[str]:
    """The servers' kernel provisioner: with ``kernel_mode = fork`` the fork provisioner,
    which starts by exec what it cannot fork; else one whose IPython kernels bind their own
    ports (both in ``host/provisioner.py``)."""
    if not provisioners_installed():
        return []  # Jupyter's own provisioner (check and launch say so for fork mode)
    if settings.kernel_mode != "fork":
        return [f"--KernelProvisionerFactory.default_provisioner_name={EXEC_PROVISIONER}"]
    return [
        f"--KernelProvisionerFactory.default_provisioner_name={PROVISIONER}",
        f"--ForkProvisioner.kernel_server={kernel_socket(settings)}",
    ]


def run_dir(settings: Settings) -> Path:
    """The course's root-owned folder under /run (sockets' folders, JupyterLab's overrides)."""
    return RUN_BASE / settings.name


def socket_dir(settings: Settings, username: str) -> Path:
    """The folder of a student's server socket (proxy mode): the student's, 0700."""
    return run_dir(settings) / "servers" / username


def socket_path(settings: Settings, username: str) -> Path:
    return socket_dir(settings, username) / SOCKET_NAME


def lab_settings_dir(settings: Settings) -> Path:
    """Where the servers read JupyterLab's settings overrides (root-owned, readable)."""
    return run_dir(settings) / "lab-settings"


def server_args(settings: Settings, home: str, port: int, username: str | None = None) -> list[str]:
    """The server's command-line settings. No secret: the password hash stays in ~/.jupyter.

    ``username`` (default: the home's last part) names the base URL and, in proxy mode,
    the socket; ``port`` is used in redirect mode only.
    """
    username = username or Path(home).name
    args = [
        f"--ServerApp.base_url={server_path(username)}",
        f"--ServerApp.root_dir={root_dir(settings, home)}",
        "--ServerApp.open_browser=False",
    ]
    if proxied(settings):
        args += [
            f"--ServerApp.sock={socket_path(settings, username)}",
            "--ServerApp.sock_mode=0600",
            # Browsers' Host is the class host; only the portal can reach the socket.
            "--ServerApp.allow_remote_access=True",
            # No password, no token: only the student and root can connect to the socket,
            # and the portal has logged the student in. Without a token the server's own
            # XSRF and Origin checks stay on behind the portal's.
            "--IdentityProvider.token=",
            "--IdentityProvider.hashed_password=",
            "--PasswordIdentityProvider.hashed_password=",
            "--PasswordIdentityProvider.password_required=False",
        ]
    else:
        args += [
            f"--ServerApp.ip={listen_address(settings.ip)}",
            f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0",
            # A password is set (setup); no token. Refuse to run at all without a password.
            "--IdentityProvider.token=",
            "--PasswordIdentityProvider.password_required=True",
            "--PasswordIdentityProvider.allow_password_change=False",
        ]
        tls = tls_paths(settings, home)
        if tls:
            args += [f"--ServerApp.certfile={tls[0]}", f"--ServerApp.keyfile={tls[1]}"]
    # Kernels listen on 127.0.0.1, which every user of the host can reach: CurveZMQ keeps
    # a classmate from reading a kernel's code and output off its IOPub channel (the keys
    # are in the student's own 0600 connection file). "auto": every kernel spec that says
    # it can (ipykernel's does); one that cannot still starts, in the clear.
    args.append("--KernelManager.transport_encryption=auto")
    args += kernel_args(settings)
    for app in LAB_SETTINGS_APPS.get(settings.app, ()):
        args.append(f"--{app}.app_settings_dir={lab_settings_dir(settings)}")
    if settings.idle_timeout > 0:
        t = settings.idle_timeout
        interval = max(1, min(300, t // 4))
        args += [
            f"--MappingKernelManager.cull_idle_timeout={t}",
            f"--MappingKernelManager.cull_interval={interval}",
            "--MappingKernelManager.cull_connected=True",
            f"--TerminalManager.cull_inactive_timeout={t}",
            f"--TerminalManager.cull_interval={interval}",
            f"--ServerApp.shutdown_no_activity_timeout={t}",
        ]
    return args


def exec_argv(settings: Settings, args: list[str], python: str) -> list[str]:
    """The whole command that starts a server as a new program with ``python``."""
    return [python, "-m", APP_MODULES[settings.app], *args]


def choose_port(
    wanted: int | None, reserved: set[int], first: int, is_free: Callable[[int], bool]
) -> int:
    """The student's previous port if it is free, else the first free one from ``first`` up."""
    if wanted and wanted not in reserved and is_free(wanted):
        return wanted
    port = max(first, 1024)
    while port <= 65535:
        if port not in reserved and is_free(port):
            return port
        port += 1
    raise StepFailed(f"no free port from {first} upward: set [launch] first_port lower")


def assign_ports(
    usernames: Iterable[str],
    previous: Mapping[str, int],
    reserved: set[int],
    settings: Settings,
    is_free: Callable[[int], bool],
) -> dict[str, int]:
    """{username: port}: each keeps their previous port while it is free (and not the
    portal's); the others, in the given (roster) order, get the first free ones from
    ``first_port`` up, none of ``reserved``. Raises ``StepFailed`` when none is left."""
    usernames = list(usernames)
    ports: dict[str, int] = {}
    for name in usernames:  # first: previous ports, so nobody takes another student's
        wanted = previous.get(name)
        if wanted and wanted != settings.portal_port and is_free(wanted):
            ports[name] = wanted
    taken = set(reserved)
    for name in usernames:
        if name not in ports:
            ports[name] = choose_port(None, taken, settings.first_port, is_free)
            taken.add(ports[name])
    return ports
