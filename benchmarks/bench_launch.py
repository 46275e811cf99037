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
import subprocess
import sys
import time
from pathlib import Path

import psutil
import requests
from common import (
    cli,
    figures_line,
    free_port,
    launch_config,
    memory,
    print_table,
    require_root,
    set_launch,
    work_folder,
    write_roster,
)

from classroom.core.launchplan import APP_MODULES  # noqa: E402
from classroom.host.identity import student_env  # noqa: E402
from classroom.host.processes import stop_processes  # noqa: E402


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
    set_launch(config, "start_mode", mode)
    t = time.perf_counter()
    cli("launch", str(config), "--no-portal")
    elapsed = time.perf_counter() - t
    rows = json.loads(cli("status", str(config), "--json").stdout)
    uss, pss = memory([r["pid"] for r in rows if r["pid"]])
    cli("shutdown", str(config))
    return elapsed, uss, pss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--students", type=int, default=30, help="N when --growth is not given")
    ap.add_argument("--growth", default="", help="several N, e.g. 10,30,60")
    ap.add_argument("--app", default="lab", choices=sorted(APP_MODULES))
    ap.add_argument("--modes", default="hand,exec,fork")
    args = ap.parse_args()
    require_root()
    sizes = [int(n) for n in args.growth.split(",") if n] or [args.students]
    modes = args.modes.split(",")
    work = work_folder("bench-launch-")
    names = [f"bl{secrets.token_hex(3)}{i}" for i in range(max(sizes))]
    config = launch_config(work, args.app)
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
                print(figures_line(n, mode, results[n, mode]), flush=True)
    finally:
        write_roster(work, names)
        cli("shutdown", str(config), check=False)
        cli("remove", str(config), "--yes", check=False)
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\napp = {args.app}, {os.cpu_count()} CPUs; time until every server answers HTTP; mean per server"
    )
    print_table(sizes, modes, results, "hand")
    print("targets: exec <= 1.10x hand time; fork <= 0.45x hand time and <= 0.40x hand USS")


if __name__ == "__main__":
    main()
