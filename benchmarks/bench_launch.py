"""launch of N students' servers against N `jupyter lab` started by hand at once.

Run as root:  python benchmarks/bench_launch.py [--students 30] [--growth 10,30,60] [--app lab]

Side by side in one run, on the same machine, for each N:
  by hand   N `python -m jupyterlab` processes started at once, as the students
  exec      `notebooks.py launch CONFIG --no-portal` with start_mode = exec
  fork      the same with start_mode = fork (the default)
Each is timed from the start until every server answers HTTP; then each server's
USS and PSS (psutil) are read, and everything is stopped before the next one.
It prints the figures and the ratios to the by-hand baseline, and the targets:
exec <= 1.1x by-hand time; fork <= 0.45x by-hand time and <= 0.4x its USS.
Accounts are created with `setup` and deleted with `remove` at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from classroom.core.launchplan import APP_MODULES  # noqa: E402
from classroom.host.identity import student_env  # noqa: E402
from classroom.host.processes import stop_processes  # noqa: E402

MB = 1 << 20


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
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


def answers(port: int) -> bool:
    try:
        requests.get(f"http://127.0.0.1:{port}/api", timeout=2)
    except requests.RequestException:
        return False
    return True


def wait_all(ports: list[int], timeout: float = 600) -> None:
    pending = set(ports)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        pending = {p for p in pending if not answers(p)}
        if pending:
            time.sleep(0.1)
    if pending:
        sys.exit(f"{len(pending)} servers did not answer")


def memory(pids: list[int]) -> tuple[float, float]:
    """Mean USS and PSS in MB of the processes."""
    uss, pss = [], []
    for pid in pids:
        info = psutil.Process(pid).memory_full_info()
        uss.append(info.uss / MB)
        pss.append(info.pss / MB)
    return statistics.mean(uss), statistics.mean(pss)


def by_hand(names: list[str], app: str) -> tuple[float, float, float]:
    module = APP_MODULES[app]
    ports = [free_port() for _ in names]
    procs = []
    t = time.perf_counter()
    for name, port in zip(names, ports, strict=True):
        pw = pwd.getpwnam(name)
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    module,
                    f"--port={port}",
                    "--ServerApp.ip=127.0.0.1",
                    "--ServerApp.port_retries=0",
                    "--no-browser",
                ],
                user=pw.pw_uid,
                group=pw.pw_gid,
                extra_groups=os.getgrouplist(name, pw.pw_gid),
                env=student_env(pw),
                cwd=pw.pw_dir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
    wait_all(ports)
    elapsed = time.perf_counter() - t
    uss, pss = memory([p.pid for p in procs])
    stop_processes([psutil.Process(p.pid) for p in procs], polite=10, term=5, kill=5)
    for p in procs:
        p.wait()
    return elapsed, uss, pss


def with_launch(config: Path, mode: str) -> tuple[float, float, float]:
    set_mode(config, mode)
    t = time.perf_counter()
    cli("launch", str(config), "--no-portal")
    elapsed = time.perf_counter() - t
    rows = json.loads(cli("status", str(config), "--json").stdout)
    uss, pss = memory([r["pid"] for r in rows if r["pid"]])
    cli("shutdown", str(config))
    return elapsed, uss, pss


def set_mode(config: Path, mode: str) -> None:
    text = config.read_text()
    lines = [ln for ln in text.splitlines() if not ln.startswith("start_mode")]
    at = lines.index("[launch]") + 1
    lines.insert(at, f"start_mode = {mode}")
    config.write_text("\n".join(lines) + "\n")


def write_roster(base: Path, names: list[str]) -> None:
    (base / "students.csv").write_text(
        "username,name,surname\n" + "".join(f"{u},N,S\n" for u in names)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--students", type=int, default=30, help="N when --growth is not given")
    ap.add_argument("--growth", default="", help="several N, e.g. 10,30,60")
    ap.add_argument("--app", default="lab", choices=sorted(APP_MODULES))
    ap.add_argument("--modes", default="hand,exec,fork")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: it creates and deletes real accounts")
    sizes = [int(n) for n in args.growth.split(",") if n] or [args.students]
    modes = args.modes.split(",")
    work = Path(tempfile.mkdtemp(prefix="bench-launch-", dir="/tmp"))
    os.chmod(work, 0o755)
    home_base = work / "homes"
    home_base.mkdir(mode=0o755)
    names = [f"bl{secrets.token_hex(3)}{i}" for i in range(max(sizes))]
    config = work / "notebooks.cfg"
    config.write_text(
        f"[course]\nname = bench-{secrets.token_hex(3)}\nroster = students.csv\n"
        f"state_dir = {work / 'state'}\n[accounts]\nhome_base = {home_base}\n"
        f"[launch]\napp = {args.app}\nroot = home\nip = 127.0.0.1\n"
        # below the ephemeral range, so the probes' own client ports never take a student's port
        f"portal_port = {free_port()}\nfirst_port = {20000 + secrets.randbelow(5000)}\n"
        "start_timeout = 600\n"
        "[remove]\narchive = no\n"
    )
    results: dict[tuple[int, str], tuple[float, float, float]] = {}
    try:
        write_roster(work, names)
        t = time.perf_counter()
        cli("setup", str(config))
        print(f"setup of {len(names)} accounts: {time.perf_counter() - t:.1f} s", flush=True)
        for n in sizes:
            write_roster(work, names[:n])
            for mode in modes:
                if mode == "hand":
                    results[n, mode] = by_hand(names[:n], args.app)
                else:
                    results[n, mode] = with_launch(config, mode)
                elapsed, uss, pss = results[n, mode]
                print(
                    f"  {n:3d} {mode:5s} {elapsed:7.2f} s  USS {uss:6.1f} MB  PSS {pss:6.1f} MB",
                    flush=True,
                )
    finally:
        write_roster(work, names)
        cli("shutdown", str(config), check=False)
        cli("remove", str(config), "--yes", check=False)
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\napp = {args.app}, {os.cpu_count()} CPUs; time until every server answers HTTP; mean per server"
    )
    print(
        f"{'N':>4} {'mode':5} {'time s':>8} {'x hand':>7} {'USS MB':>8} {'x hand':>7} {'PSS MB':>8} {'x hand':>7}"
    )
    for n in sizes:
        base = results.get((n, "hand"))
        for mode in modes:
            elapsed, uss, pss = results[n, mode]
            ratio = (
                (f"{elapsed / base[0]:7.2f}", f"{uss / base[1]:7.2f}", f"{pss / base[2]:7.2f}")
                if base
                else ("", "", "")
            )
            print(
                f"{n:4d} {mode:5} {elapsed:8.2f} {ratio[0]:>7} {uss:8.1f} {ratio[1]:>7} {pss:8.1f} {ratio[2]:>7}"
            )
    print("targets: exec <= 1.10x hand time; fork <= 0.45x hand time and <= 0.40x hand USS")


if __name__ == "__main__":
    main()
