"""What the kernel server's forked child uses before it becomes the kernel (``kernelserver.py``).

Before forking, the kernel server (root) reads the confinement of the student's server
that asked (``peer_confinement``: its resource limits, niceness and cgroups). The child
moves its descriptors out of the way (``high_fd``), takes that confinement on
(``join_cgroups``) and, once it is the student, joins a fresh session keyring
(``join_new_session_keyring``), reads the launch spec (``read_spec``) and recomputes what
the preloaded modules computed at import as root (``reset_imported_state``).

Standard library only: the kernel server loads it by path when it runs as a script.
"""

from __future__ import annotations

import json
import os
import resource
import sys

# --- resetting what the preloaded modules computed at import, as root ---------------------------


def reset_imported_state() -> None:
    """In the child, as the student: recompute what imports computed from root's process.

    The environment is the student's already. Raises if a module cannot be reset
    (the kernel then fails and the student's server starts it by exec instead).
    """
    import random
    import site
    import sysconfig
    import tempfile

    tempfile.tempdir = None  # gettempdir() caches its first answer
    site.USER_BASE = site.USER_SITE = None  # computed from root's HOME when first asked
    config_vars = getattr(sysconfig, "_CONFIG_VARS", None)
    if config_vars and "userbase" in config_vars:
        config_vars["userbase"] = site.getuserbase()
    random.seed()  # random does this at fork itself; kept for other Pythons
    mp = sys.modules.get("multiprocessing.process")
    if mp is not None:  # the authkey of multiprocessing's connections: every kernel its own
        mp.current_process().authkey = os.urandom(32)
    numpy = sys.modules.get("numpy")
    if numpy is not None and hasattr(numpy, "random"):
        numpy.random.seed()  # the legacy global RandomState: seeded once at import otherwise
    if "matplotlib" in sys.modules:
        _reset_matplotlib(sys.modules["matplotlib"])
    # Settings whose defaults were read from the environment when their class was made.
    kernelapp = sys.modules.get("ipykernel.kernelapp")
    if kernelapp is not None:  # the kernel ends when its parent (the fork server) does
        parent = int(os.environ.get("JPY_PARENT_PID") or 0)
        _set_trait_default(kernelapp.IPKernelApp, "parent_handle", parent)
    session = sys.modules.get("jupyter_client.session")
    if session is not None:  # the name in the kernel's message headers
        _set_trait_default(session.Session, "username", os.environ.get("USER", "username"))
    paths = sys.modules.get("jupyter_core.paths")
    if paths is not None:
        insecure = os.getenv("JUPYTER_ALLOW_INSECURE_WRITES", "false").lower() in ("true", "1")
        paths.allow_insecure_writes = insecure
    jedi_settings = sys.modules.get("jedi.settings")
    if jedi_settings is not None:
        base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
        jedi_settings.cache_directory = os.path.expanduser(os.path.join(base, "jedi"))


def _set_trait_default(cls, name: str, value) -> None:
    """Give the traitlet ``name`` of ``cls`` (and its subclasses) a new static default."""
    cls.class_traits()[name].default_value = value
    classes = [cls]
    while classes:
        klass = classes.pop()
        initial = klass.__dict__.get("_static_immutable_initial_values")
        if initial is not None and name in initial:
            initial[name] = value
        classes.extend(klass.__subclasses__())


def _forget_memoised(function) -> None:
    """Make a ``matplotlib._logged_cached`` function compute its answer again."""
    names = function.__code__.co_freevars
    cells = dict(zip(names, function.__closure__ or (), strict=True))
    if "called" not in cells or "ret" not in cells:
        raise RuntimeError(f"matplotlib.{function.__name__} is not memoised as expected")
    cells["called"].cell_contents = False
    cells["ret"].cell_contents = None


def _reset_matplotlib(mpl) -> None:
    """The student's configuration folder, cache, matplotlibrc, styles and fonts."""
    from pathlib import Path

    _forget_memoised(mpl.get_configdir)
    _forget_memoised(mpl.get_cachedir)
    # rcParams as ``import matplotlib`` makes them, from the student's matplotlibrc; the
    # object stays (modules hold it), its contents are replaced.
    params = mpl.RcParams()
    params._update_raw(mpl.rcParamsDefault)
    params._update_raw(mpl._rc_params_in_file(mpl.matplotlib_fname()))
    dict.clear(mpl.rcParams)
    mpl.rcParams._update_raw(params)
    mpl.rcParamsOrig = mpl.rcParams.copy()
    # The kernel makes the inline backend the default (ipykernel's init_gui_pylab): matplotlib
    # reads MPLBACKEND when imported, which here was before the kernel set it.
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    mpl.rcParams["backend"] = os.environ["MPLBACKEND"]
    style = sys.modules.get("matplotlib.style")
    if style is not None:
        style.USER_LIBRARY_PATHS[:] = [os.path.join(mpl.get_configdir(), "stylelib")]
        style.reload_library()
    fm = sys.modules.get("matplotlib.font_manager")
    if fm is not None:
        old, new = str(fm._HOME), str(Path.home())
        fm._HOME = Path(new)
        for folders in (fm.X11FontDirectories, fm.MSUserFontDirectories, fm.OSXFontDirectories):
            folders[:] = [new + f[len(old) :] if f.startswith(old + "/") else f for f in folders]
        fm._get_fontconfig_fonts.cache_clear()  # fc-list as root
        fm._get_font.cache_clear()
        fm.fontManager = fm._load_fontmanager()  # the student's font cache (made if missing)
        fm.findfont = fm.fontManager.findfont
        fm.get_font_names = fm.fontManager.get_font_names
    texmanager = sys.modules.get("matplotlib.texmanager")
    if texmanager is not None:
        texmanager.TexManager._cache_dir = Path(mpl.get_cachedir(), "tex.cache")


# --- the child's confinement and launch spec ---------------------------------------------------


def high_fd(fd: int) -> int:
    """A copy of ``fd`` numbered above anything the child puts in place (the original stays)."""
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_DUPFD, 64)


def read_spec(fd: int) -> dict:
    """The launch spec the student's server wrote (read as the student); checked for shape."""
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
        if len(data) > 1 << 20:
            raise ValueError("launch spec too long")
    os.close(fd)
    spec = json.loads(data)
    argv, env = spec["argv"], spec["env"]
    if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)):
        raise ValueError("argv")
    if not (
        isinstance(env, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
    ):
        raise ValueError("env")
    if not isinstance(spec["cwd"], str) or not isinstance(spec["umask"], int):
        raise ValueError("cwd, umask")
    return spec


def peer_confinement(peer_pid: int, uid: int) -> tuple[dict, list[str]]:
    """The resource limits, niceness and cgroups of the process that asked (the student's server).

    Read by root from the kernel's records of that process, not from the request. The
    forked kernel takes them on, as a kernel started by that server would inherit them.
    """
    with open(f"/proc/{peer_pid}/status") as f:
        uids = next(line.split()[1:] for line in f if line.startswith("Uid:"))
    if int(uids[0]) != uid:
        raise PermissionError("the asking process went away")
    with open(f"/proc/{peer_pid}/limits") as f:
        limits: dict = read_limits(f.read())
    limits["nice"] = os.getpriority(os.PRIO_PROCESS, peer_pid)
    with open(f"/proc/{peer_pid}/cgroup") as f:
        theirs = f.read().splitlines()
    with open("/proc/self/cgroup") as f:
        ours = set(f.read().splitlines())
    return limits, [line for line in theirs if line not in ours]


LIMIT_NAMES = {  # /proc/PID/limits (prlimit(2) on another process needs CAP_SYS_RESOURCE)
    "Max cpu time": "RLIMIT_CPU",
    "Max file size": "RLIMIT_FSIZE",
    "Max data size": "RLIMIT_DATA",
    "Max stack size": "RLIMIT_STACK",
    "Max core file size": "RLIMIT_CORE",
    "Max resident set": "RLIMIT_RSS",
    "Max processes": "RLIMIT_NPROC",
    "Max open files": "RLIMIT_NOFILE",
    "Max locked memory": "RLIMIT_MEMLOCK",
    "Max address space": "RLIMIT_AS",
    "Max file locks": "RLIMIT_LOCKS",
    "Max pending signals": "RLIMIT_SIGPENDING",
    "Max msgqueue size": "RLIMIT_MSGQUEUE",
    "Max nice priority": "RLIMIT_NICE",
    "Max realtime priority": "RLIMIT_RTPRIO",
    "Max realtime timeout": "RLIMIT_RTTIME",
}


def read_limits(text: str) -> dict[int, tuple[int, int]]:
    """{resource: (soft, hard)} from the text of ``/proc/PID/limits``; every known one or an error."""
    found = {}
    for line in text.splitlines()[1:]:
        for label, name in LIMIT_NAMES.items():
            if line.startswith(label + " ") and hasattr(resource, name):
                soft, hard = line[len(label) :].split()[:2]
                found[getattr(resource, name)] = tuple(
                    resource.RLIM_INFINITY if v == "unlimited" else int(v) for v in (soft, hard)
                )
    wanted = {getattr(resource, n) for n in LIMIT_NAMES.values() if hasattr(resource, n)}
    if set(found) != wanted:
        raise ValueError("unexpected /proc/PID/limits")
    return found


def join_cgroups(lines: list[str]) -> None:
    """In the child, as root: move into each cgroup of ``lines`` (``/proc/PID/cgroup`` lines)."""
    if not lines:
        return
    mounts = cgroup_mounts()
    for line in lines:
        _, controllers, path = line.split(":", 2)
        mount = mounts.get(controllers)
        if mount is None:
            raise RuntimeError(f"no mount for cgroup {controllers or 'v2'}")
        procs = os.path.join(mount, path.lstrip("/"), "cgroup.procs")
        with open(procs, "w") as f:
            f.write(str(os.getpid()))


def cgroup_mounts() -> dict[str, str]:
    """{hierarchy as /proc/PID/cgroup names it: mount point}: '' for v2, 'cpu,cpuacct' for v1."""
    found = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            head, _, tail = line.partition(" - ")
            fields, extra = head.split(), tail.split()
            if not extra or extra[0] not in ("cgroup", "cgroup2"):
                continue
            point = fields[4]
            if extra[0] == "cgroup2":
                found.setdefault("", point)
                continue
            options = extra[2].split(",") if len(extra) > 2 else []
            names = [
                o
                for o in options
                if o not in ("rw", "ro") and "=" not in o or o.startswith("name=")
            ]
            known = (
                "cpu",
                "cpuacct",
                "cpuset",
                "memory",
                "devices",
                "freezer",
                "net_cls",
                "blkio",
                "perf_event",
                "net_prio",
                "hugetlb",
                "pids",
                "rdma",
                "misc",
            )
            names = [o for o in names if o in known or o.startswith("name=")]
            found.setdefault(",".join(names), point)
    return found


def join_new_session_keyring() -> None:
    """A fresh, empty session keyring: the fork server's (root's) is not the student's to use."""
    import ctypes

    numbers = {"x86_64": 250, "aarch64": 219, "i686": 288, "armv7l": 311, "riscv64": 219}
    number = numbers.get(os.uname().machine)
    if number is None:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    if libc.syscall(number, 1, None) < 0:  # KEYCTL_JOIN_SESSION_KEYRING, anonymous
        errno = ctypes.get_errno()
        if errno not in (1, 13, 38):  # EPERM, EACCES (seccomp), ENOSYS: no keyrings here at all
            raise OSError(errno, os.strerror(errno))
