"""Per-student limits (``[limits] memory, cpu, tasks``), enforced by the kernel.

The mechanism is chosen at run time (``detect``), in this order:

- **cgroup v2**, where ``/sys/fs/cgroup`` (or the hybrid ``unified`` mount) offers the
  memory, cpu and pids controllers: ``memory.max`` (``memory.swap.max`` 0,
  ``memory.oom.group`` 0 so the out-of-memory killer takes one task, a kernel, not the
  whole student), ``cpu.max``, ``pids.max``. Where systemd is PID 1 only inside a
  subtree it delegated to us (``Delegate=yes``: the ``trusted.delegate`` mark on our
  cgroup or an ancestor); systemd's own tree is never written.
- **cgroup v1**, where the host mounts v1 controllers (and systemd does not run them):
  ``memory.limit_in_bytes`` (and ``memory.memsw.limit_in_bytes``, so no swapping around
  it), ``cpu.cfs_quota_us``/``cpu.cfs_period_us``, ``pids.max``; ``freezer`` to kill.
- **RLIMIT_NPROC** for ``tasks`` where no pids controller can be used: it counts every
  task of the student's uid on the host. Memory and CPU then cannot be enforced;
  ``check`` says so.

Layout: ``BASE/classroom/COURSE/USERNAME`` (one folder per v1 hierarchy). A student's
cgroup is made and limited (``prepare``) before their first process exists; that
process joins it (``enter``: in the forked child, as root, before it becomes the
student), and everything it starts (kernels, terminals) is born inside.

Standard library only: the fork server runs without the ``classroom`` package and
loads this file by its path for ``enter``. Nothing here knows about ``--dry-run``:
the callers only come here when changes are meant.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("classroom")

ROOT = Path("/sys/fs/cgroup")
TOP = "classroom"  # BASE/classroom/COURSE/USERNAME
SUPERVISOR = "supervisor"  # v2, delegated: where our own processes move (no internal processes)
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "freezer")
V2_CONTROLLERS = ("memory", "cpu", "pids")
CPU_PERIOD = 100_000  # microseconds
CPU_MIN_QUOTA = 1_000  # the kernel's smallest quota
KILL_TIMEOUT = 10.0  # seconds kill_all keeps at it (a fork loop included)
FREEZE_WAIT = 1.0  # seconds to wait for a v1 freezer to reach FROZEN in each round
# Names a cgroup folder cannot take (v1 control files without a dot); escaped with "_".
RESERVED = frozenset({"tasks", "notify_on_release", "release_agent"})
WHAT = {"memory": "memory", "cpu": "cpu", "tasks": "pids"}  # limit -> controller


@dataclass(frozen=True)
class Limits:
    """What one student may use in all: bytes of memory, CPUs, tasks. 0: no limit."""

    memory: int = 0
    cpu: float = 0.0
    tasks: int = 0

    @classmethod
    def of(cls, settings: Any) -> Limits:
        return cls(settings.memory_limit, settings.cpu_limit, settings.tasks_limit)

    def set(self) -> list[str]:
        """The names of the limits that are set (``memory``, ``cpu``, ``tasks``)."""
        return [name for name in WHAT if getattr(self, name)]

    def describe(self) -> str:
        shown = {"memory": size_text(self.memory), "cpu": f"{self.cpu:g}", "tasks": str(self.tasks)}
        return ", ".join(f"{name} {shown[name]}" for name in self.set()) or "none"


@dataclass(frozen=True)
class Host:
    """What this host offers: ``kind`` (cgroup2, cgroup1 or none), where, and why not."""

    kind: str
    base: Path | None = None  # cgroup2: the cgroup under which classroom/ goes
    v1: dict[str, Path] = field(default_factory=dict)  # cgroup1: controller -> mount point
    controllers: tuple[str, ...] = ()  # those of V1_CONTROLLERS / V2_CONTROLLERS we can use
    why: str = ""  # what keeps a cgroup mechanism from being used here
    delegated: bool = False  # cgroup2: base is a subtree systemd delegated (it holds our processes)

    def enforces(self) -> dict[str, str | None]:
        """{limit: what enforces it here, or None}."""
        name = {"cgroup2": "cgroup v2", "cgroup1": "cgroup v1"}.get(self.kind)
        found: dict[str, str | None] = {}
        for limit, controller in WHAT.items():
            found[limit] = name if name and controller in self.controllers else None
        if found["tasks"] is None:
            found["tasks"] = "RLIMIT_NPROC"
        return found

    def summary(self) -> str:
        """One line for ``check`` and ``status``."""
        if self.kind == "cgroup2":
            where = f"{self.base}/{TOP}/COURSE/USERNAME"
            return f"cgroup v2 ({', '.join(self.controllers)}) at {where}"
        if self.kind == "cgroup1":
            mounts = sorted({self.v1[c] for c in self.controllers})
            parents = {m.parent for m in mounts}
            where = (
                f"{parents.pop()}/CONTROLLER" if len(parents) == 1 else ", ".join(map(str, mounts))
            )
            return f"cgroup v1 ({', '.join(self.controllers)}) at {where}/{TOP}/COURSE/USERNAME"
        return f"no cgroups ({self.why}); tasks by RLIMIT_NPROC per account"

    def cannot(self, limits: Limits) -> list[str]:
        """Warnings: each limit that is set but cannot be enforced here, and RLIMIT_NPROC's catch."""
        warnings = []
        enforced = self.enforces()
        for name in limits.set():
            how = enforced[name]
            if how is None:
                warnings.append(
                    f"[limits] {name} cannot be enforced on this host: {self.why or 'no ' + WHAT[name] + ' controller'}"
                )
            elif how == "RLIMIT_NPROC":
                warnings.append(
                    "[limits] tasks is enforced by RLIMIT_NPROC: it counts every process and "
                    "thread of the student's account on this host (an SSH login too), not per server"
                )
        return warnings


# --- detection ---------------------------------------------------------------------------


def detect(
    root: Path = ROOT,
    mounts: str | None = None,
    self_cgroup: str | None = None,
    systemd: bool | None = None,
) -> Host:
    """What this host offers. The arguments are for tests: ``/proc/mounts``' text,
    ``/proc/self/cgroup``'s, and whether systemd is PID 1."""
    if mounts is None:
        mounts = _read(Path("/proc/mounts"))
    if self_cgroup is None:
        self_cgroup = _read(Path("/proc/self/cgroup"))
    if systemd is None:
        systemd = Path("/run/systemd/system").is_dir()
    v2_mount, v1 = _mounts(mounts, root)
    why = ""
    if v2_mount is not None:
        host = _detect_v2(v2_mount, self_cgroup, systemd)
        if host.kind == "cgroup2":
            return host
        why = host.why
    if v1:
        if systemd:
            why = why or "systemd manages the cgroup v1 hierarchies of this host"
        else:
            usable = tuple(c for c in V1_CONTROLLERS if c in v1)
            if any(c in usable for c in WHAT.values()):
                return Host("cgroup1", v1=v1, controllers=usable)
    return Host("none", why=why or "no cgroup controllers are mounted")


def _mounts(text: str, root: Path) -> tuple[Path | None, dict[str, Path]]:
    """The cgroup2 mount at or just under ``root``, and {v1 controller: mount point}."""
    v2 = None
    v1: dict[str, Path] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        point, kind, options = Path(fields[1]), fields[2], fields[3].split(",")
        if point != root and point.parent != root:
            continue
        if kind == "cgroup2" and (v2 is None or point == root):
            v2 = point
        elif kind == "cgroup":
            for controller in V1_CONTROLLERS:
                if controller in options:
                    v1.setdefault(controller, point)
    return v2, v1


def _detect_v2(mount: Path, self_cgroup: str, systemd: bool) -> Host:
    if systemd:
        own = _own_v2(mount, self_cgroup)
        base = _delegated(mount, own) if own is not None else None
        if base is None:
            return Host(
                "none",
                why="systemd runs this host and launch does not run in a cgroup it delegated "
                "(run it in a unit with Delegate=yes; see README, 'Limits')",
            )
    else:
        base = mount
    offered = _read(base / "cgroup.controllers").split()
    usable = tuple(c for c in V2_CONTROLLERS if c in offered)
    if not usable:
        return Host("none", why=f"{base} offers none of the memory, cpu, pids controllers")
    return Host("cgroup2", base=base, controllers=usable, delegated=systemd)


def _own_v2(mount: Path, self_cgroup: str) -> Path | None:
    for line in self_cgroup.splitlines():
        if line.startswith("0::"):
            return mount / line[3:].strip().lstrip("/")
    return None


def _delegated(mount: Path, own: Path) -> Path | None:
    """Our unit's cgroup if systemd delegated it to us, else None. (Only ours: a delegated
    ancestor, such as user@.service, belongs to whoever it was delegated to.)"""
    unit = own.parent if own.name == SUPERVISOR else own
    if unit != mount and mount in unit.parents and _is_delegated(unit):
        return unit
    return None


def _is_delegated(path: Path) -> bool:
    for name in ("trusted.delegate", "user.delegate"):
        with contextlib.suppress(OSError):
            if os.getxattr(path, name).strip(b"\0 \n") == b"1":
                return True
    return False


# --- making a student's cgroup -----------------------------------------------------------


def cgroup_name(name: str) -> str:
    """``name`` as a cgroup folder name: never one of the kernel's file names."""
    return f"_{name}" if name in RESERVED or name.startswith("_") else name


def student_dirs(host: Host, course: str, username: str) -> list[Path]:
    """The student's cgroup folders under ``host`` (one per v1 hierarchy, one for v2)."""
    tail = Path(TOP, cgroup_name(course), cgroup_name(username))
    if host.kind == "cgroup2" and host.base is not None:
        return [host.base / tail]
    if host.kind == "cgroup1":
        mounts = dict.fromkeys(host.v1[c] for c in host.controllers)
        return [mount / tail for mount in mounts]
    return []


def prepare(host: Host, course: str, username: str, limits: Limits) -> dict:
    """Make the student's cgroup (idempotent) and write ``limits`` into it; return the
    placement the first process applies with ``enter``: {"procs": [files], "nproc": N}.
    Raises ``OSError`` when the cgroup cannot be made or limited."""
    nproc = limits.tasks if host.enforces()["tasks"] == "RLIMIT_NPROC" else 0
    if host.kind == "cgroup2":
        folder = _prepare_v2(host, course, username, limits)
        return {"procs": [str(folder / "cgroup.procs")], "nproc": nproc}
    if host.kind == "cgroup1":
        folders = _prepare_v1(host, course, username, limits)
        return {"procs": [str(f / "cgroup.procs") for f in folders], "nproc": nproc}
    return {"procs": [], "nproc": nproc}


def _prepare_v2(host: Host, course: str, username: str, limits: Limits) -> Path:
    assert host.base is not None
    base = host.base
    wanted = " ".join(f"+{c}" for c in host.controllers)
    if host.delegated and _procs(base) and not _controllers_on(base, host.controllers):
        _move_out(base)
    course_dir = base / TOP / cgroup_name(course)
    for parent in (base, base / TOP, course_dir):
        parent.mkdir(exist_ok=True)
        if not _controllers_on(parent, host.controllers):
            _write(parent / "cgroup.subtree_control", wanted)
    folder = course_dir / cgroup_name(username)
    folder.mkdir(exist_ok=True)
    if "memory" in host.controllers:
        _write(folder / "memory.max", str(limits.memory) if limits.memory else "max")
        if (folder / "memory.swap.max").exists():
            _write(folder / "memory.swap.max", "0" if limits.memory else "max")
        _write(folder / "memory.oom.group", "0")
    if "cpu" in host.controllers:
        _write(folder / "cpu.max", f"{_quota(limits.cpu) if limits.cpu else 'max'} {CPU_PERIOD}")
    if "pids" in host.controllers:
        _write(folder / "pids.max", str(limits.tasks) if limits.tasks else "max")
    return folder


def _controllers_on(folder: Path, controllers: tuple[str, ...]) -> bool:
    enabled = _read(folder / "cgroup.subtree_control").split()
    return all(c in enabled for c in controllers)


def _move_out(base: Path) -> None:
    """v2 allows no process in a cgroup that hands controllers down: move ours to a leaf."""
    leaf = base / SUPERVISOR
    leaf.mkdir(exist_ok=True)
    for pid in _procs(base):
        with contextlib.suppress(ProcessLookupError):
            _write(leaf / "cgroup.procs", str(pid))


def _prepare_v1(host: Host, course: str, username: str, limits: Limits) -> list[Path]:
    folders = student_dirs(host, course, username)
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    tail = Path(TOP, cgroup_name(course), cgroup_name(username))
    at = {c: host.v1[c] / tail for c in host.controllers}
    if "memory" in at:
        _memory_v1(at["memory"], limits.memory)
    if "cpu" in at:
        _write(at["cpu"] / "cpu.cfs_period_us", str(CPU_PERIOD))
        _write(at["cpu"] / "cpu.cfs_quota_us", str(_quota(limits.cpu)) if limits.cpu else "-1")
    if "pids" in at:
        _write(at["pids"] / "pids.max", str(limits.tasks) if limits.tasks else "max")
    return folders


def _memory_v1(folder: Path, memory: int) -> None:
    """memory.limit_in_bytes, and memsw (memory + swap) as much: it must stay >= the
    memory limit, so the order depends on whether the limit goes up or down."""
    value = str(memory) if memory else "-1"
    memsw = folder / "memory.memsw.limit_in_bytes"
    files = [folder / "memory.limit_in_bytes"]
    if memsw.exists():
        files.append(memsw)
    try:
        for f in files:
            _write(f, value)
    except OSError as exc:
        if exc.errno != errno.EINVAL or len(files) == 1:
            raise
        for f in reversed(files):  # raising the limit: memsw first
            _write(f, value)


def _quota(cpu: float) -> int:
    return max(CPU_MIN_QUOTA, round(cpu * CPU_PERIOD))


# --- in the first process: join, as root, before becoming the student --------------------


def enter(placement: dict) -> None:
    """Put this process into its cgroup and set its task limit. In the forked child, as
    root, before it becomes the student; everything it starts inherits both. Raises
    ``OSError`` (the child must then exit, never run unlimited)."""
    pid = str(os.getpid())
    for procs in placement.get("procs") or ():
        path = os.path.abspath(procs)
        if os.path.basename(path) != "cgroup.procs" or not path.startswith(f"{ROOT}/"):
            raise PermissionError(f"not a cgroup's cgroup.procs: {procs}")
        with open(path, "w") as f:
            f.write(pid)
    nproc = int(placement.get("nproc") or 0)
    if nproc:
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))


# --- finding, measuring, killing, removing -----------------------------------------------


def locate(course: str, username: str, root: Path = ROOT, mounts: str | None = None) -> list[Path]:
    """The student's cgroup folders that exist, wherever launch made them (every v1
    hierarchy; under v2 also inside a delegated subtree, a few levels down)."""
    if mounts is None:
        mounts = _read(Path("/proc/mounts"))
    v2, v1 = _mounts(mounts, root)
    tail = Path(TOP, cgroup_name(course), cgroup_name(username))
    found = [mount / tail for mount in dict.fromkeys(v1.values())]
    if v2 is not None:
        found += [v2 / tail]
        for depth in range(1, 5):
            found += sorted(v2.glob("/".join(["*"] * depth) + f"/{tail}"))
    return [f for f in dict.fromkeys(found) if f.is_dir()]


def memory_used(
    course: str, username: str, root: Path = ROOT, mounts: str | None = None
) -> int | None:
    """Bytes the student's cgroup uses now, without reclaimable file cache; None without one."""
    for folder in locate(course, username, root, mounts):
        stat = _stat(folder / "memory.stat")
        if (folder / "memory.current").exists():  # v2
            used = int(_read(folder / "memory.current") or 0)
            return max(0, used - stat.get("inactive_file", 0))
        if (folder / "memory.usage_in_bytes").exists():  # v1
            used = int(_read(folder / "memory.usage_in_bytes") or 0)
            return max(0, used - stat.get("total_inactive_file", 0))
    return None


def members(folders: list[Path]) -> set[int]:
    """Every process in any of ``folders``."""
    return {pid for folder in folders for pid in _procs(folder)}


def kill_all(course: str, username: str, timeout: float = KILL_TIMEOUT, **where: Any) -> bool:
    """Freeze, then SIGKILL everything in the student's cgroup, until it is empty (a
    process that forks in a loop included). True once empty (or there is none)."""
    folders = locate(course, username, **where)
    if not folders:
        return True
    deadline = time.monotonic() + timeout
    v2 = [f for f in folders if (f / "cgroup.events").exists()]
    for folder in v2:
        if (folder / "cgroup.kill").exists():
            with contextlib.suppress(OSError):
                _write(folder / "cgroup.kill", "1")
    while members(folders):
        freezer = _freeze(folders, deadline)
        for pid in members(folders):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if freezer is not None:  # SIGKILL is delivered on thaw
            _thaw(freezer)
        if time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    left = members(folders)
    if left:
        log.warning(
            "%s: %d process(es) left in its cgroup after %g s", username, len(left), timeout
        )
    return not left


def _freeze(folders: list[Path], deadline: float) -> Path | None:
    """Freeze the student's cgroup where the host can; the folder frozen, else None."""
    for folder in folders:
        with contextlib.suppress(OSError):
            if (folder / "freezer.state").exists():  # v1
                _write(folder / "freezer.state", "FROZEN")
                until = min(deadline, time.monotonic() + FREEZE_WAIT)
                while _read(folder / "freezer.state").strip() == "FREEZING":
                    if time.monotonic() >= until:
                        break
                    time.sleep(0.01)
                return folder
            if (folder / "cgroup.freeze").exists():  # v2
                _write(folder / "cgroup.freeze", "1")
                until = min(deadline, time.monotonic() + FREEZE_WAIT)
                while "frozen 1" not in _read(folder / "cgroup.events"):
                    if time.monotonic() >= until:
                        break
                    time.sleep(0.01)
                return folder
    return None


def _thaw(folder: Path) -> None:
    with contextlib.suppress(OSError):
        if (folder / "freezer.state").exists():
            _write(folder / "freezer.state", "THAWED")
        else:
            _write(folder / "cgroup.freeze", "0")


def release(course: str, username: str, timeout: float = KILL_TIMEOUT, **where: Any) -> bool:
    """Empty the student's cgroup (``kill_all``) and remove it, and the course's when it is
    the last (``classroom/`` stays: another course may be making its own under it now);
    True once nothing of it is left."""
    if not kill_all(course, username, timeout, **where):
        return False
    gone = True
    for folder in locate(course, username, **where):
        try:
            _rmdir_when_empty(folder, timeout)
        except OSError as exc:
            log.warning("cannot remove %s: %s", folder, exc.strerror)
            gone = False
            continue
        # the course's too when it is the last; classroom/ stays, shared by every course
        with contextlib.suppress(OSError):  # another student's is still there
            folder.parent.rmdir()
    return gone


def _rmdir_when_empty(folder: Path, timeout: float) -> None:
    """rmdir, retried briefly: a killed task can stay busy in the kernel for a moment."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            folder.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


# --- small helpers -----------------------------------------------------------------------


def size_text(n: int) -> str:
    """1536 -> '1.5K'; powers of 1024, as the config's sizes."""
    value, unit = float(n), ""
    for bigger in ("K", "M", "G", "T"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.0f}{unit}" if value >= 100 or not unit else f"{value:.3g}{unit}"


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _procs(folder: Path) -> list[int]:
    return [int(x) for x in _read(folder / "cgroup.procs").split()]


def _stat(path: Path) -> dict[str, int]:
    found = {}
    for line in _read(path).splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            found[key] = int(value)
    return found
