"""What the benchmarks share: notebooks.py as a teacher runs it, a free port, the memory of
processes, and a course's folder, roster and config under /tmp.

Importing it puts the project's root first on ``sys.path`` (``import classroom`` works).
"""

from __future__ import annotations

import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MB = 1 << 20


def require_root() -> None:
    if os.geteuid() != 0:
        sys.exit("run as root: it creates and deletes real accounts")


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``notebooks.py ARGS``; with ``check``, a failure ends the benchmark with its output."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "notebooks.py"), *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if check and proc.returncode != 0:
        sys.exit(f"{' '.join(args[:1])} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory(
    pids: list[int], average: Callable[[list[float]], float] = statistics.mean
) -> tuple[float, float]:
    """USS and PSS in MB of the processes, each ``average``d (mean or median)."""
    uss, pss = [], []
    for pid in pids:
        info = psutil.Process(pid).memory_full_info()
        uss.append(info.uss / MB)
        pss.append(info.pss / MB)
    return average(uss), average(pss)


def work_folder(prefix: str) -> Path:
    """A new folder under /tmp (0755) with ``homes/`` (0755) in it, for the course's homes."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(work, 0o755)
    (work / "homes").mkdir(mode=0o755)
    return work


def write_roster(work: Path, names: list[str]) -> None:
    (work / "students.csv").write_text(
        "username,name,surname\n" + "".join(f"{u},N,S\n" for u in names)
    )


def launch_config(work: Path, app: str) -> Path:
    """``work/notebooks.cfg``: a course (roster students.csv, homes under work/homes) whose
    servers run ``app`` on 127.0.0.1, with 600 s to start; remove archives nothing."""
    config = work / "notebooks.cfg"
    config.write_text(
        f"[course]\nname = bench-{secrets.token_hex(3)}\nroster = students.csv\n"
        f"state_dir = {work / 'state'}\n[accounts]\nhome_base = {work / 'homes'}\n"
        f"[launch]\napp = {app}\nroot = home\nip = 127.0.0.1\n"
        # below the ephemeral range, so the probes' own client ports never take a student's port
        f"portal_port = {free_port()}\nfirst_port = {20000 + secrets.randbelow(5000)}\n"
        "start_timeout = 600\n"
        "[remove]\narchive = no\n"
    )
    return config


def set_launch(config: Path, key: str, value: str) -> None:
    """Set ``key = value`` in the config's [launch] section (replacing the key's line)."""
    lines = [ln for ln in config.read_text().splitlines() if not ln.startswith(key)]
    lines.insert(lines.index("[launch]") + 1, f"{key} = {value}")
    config.write_text("\n".join(lines) + "\n")


Figures = tuple[float, float, float]  # seconds, USS MB, PSS MB


def figures_line(n: int, mode: str, figures: Figures) -> str:
    """One round's figures, as each benchmark prints them while it runs."""
    elapsed, uss, pss = figures
    return f"  {n:3d} {mode:5s} {elapsed:7.2f} s  USS {uss:6.1f} MB  PSS {pss:6.1f} MB"


def print_table(
    sizes: list[int],
    modes: list[str],
    results: dict[tuple[int, str], Figures],
    baseline: str,
    failed: dict[str, int] | None = None,
) -> None:
    """The figures of each N and mode, with their ratios to the ``baseline`` mode's; with
    ``failed`` (round "MODE-N": how many failed), a column of those too."""
    tail = f" {'failed':>6}" if failed is not None else ""
    x = f"x {baseline}"
    print(
        f"{'N':>4} {'mode':5} {'time s':>8} {x:>7} {'USS MB':>8} {x:>7} {'PSS MB':>8} {x:>7}{tail}"
    )
    for n in sizes:
        base = results.get((n, baseline))
        for mode in modes:
            elapsed, uss, pss = results[n, mode]
            ratio = (
                (f"{elapsed / base[0]:7.2f}", f"{uss / base[1]:7.2f}", f"{pss / base[2]:7.2f}")
                if base
                else ("", "", "")
            )
            tail = f" {failed.get(f'{mode}-{n}', 0):6d}" if failed is not None else ""
            print(
                f"{n:4d} {mode:5} {elapsed:8.2f} {ratio[0]:>7} {uss:8.1f} {ratio[1]:>7} "
                f"{pss:8.1f} {ratio[2]:>7}{tail}"
            )
