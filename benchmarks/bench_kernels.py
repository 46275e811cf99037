"""A room opening its notebooks at once: kernel_mode = exec against kernel_mode = fork.

Run as root:  python benchmarks/bench_kernels.py [--growth 1,10,20,30]

For each kernel mode, ``launch`` starts the servers of the largest class (app = server);
then, for each N, N students at once open a notebook (a session: a kernel) and run the
usual first cell, ``import pandas, matplotlib.pyplot as plt``, over the server's
websocket, as JupyterLab does. Timed from the moment they all ask until the last reply;
then each kernel's USS and PSS (psutil) are read and the kernels shut down. N = 1 is
one kernel alone. A first round (exec, not measured) fills the students' caches
(matplotlib's font list), as any lesson after the first finds them.
It prints the figures, fork's ratios to exec, and the targets: fork <= 0.25x exec's time
to the last reply and <= 0.35x its USS per kernel.
Accounts are created with ``setup`` and deleted with ``remove`` at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import secrets
import shutil
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import requests
import websocket
from common import (
    MB,
    cli,
    figures_line,
    launch_config,
    memory,
    print_table,
    require_root,
    set_launch,
    work_folder,
    write_roster,
)

FAILED: dict[str, int] = {}  # round: kernels that did not reply
CELL = "import pandas, matplotlib.pyplot as plt\nimport os\nprint(os.getpid())"


class Student:
    """One student's server, logged in; ``open`` runs the first cell in a new notebook."""

    def __init__(self, port: int, username: str, password: str, log: Path):
        self.log = log
        self.path = f"/user/{username}"  # every server's base URL
        self.base = f"http://127.0.0.1:{port}{self.path}"
        self.port = port
        self.http = requests.Session()
        self.http.get(f"{self.base}/login", timeout=30)
        xsrf = self.http.cookies.get("_xsrf", "")
        r = self.http.post(
            f"{self.base}/login?next={self.path}/api/status",
            data={"password": password, "_xsrf": xsrf},
            timeout=30,
            allow_redirects=False,
        )
        if r.status_code not in (302, 303):
            sys.exit(f"cannot log in on port {port}: {r.status_code}")
        self.http.headers["X-XSRFToken"] = xsrf
        self.session_ids: list[str] = []

    def open(self, notebook: str) -> int:
        """Open ``notebook`` (a new kernel), run the first cell; the kernel's pid."""
        r = self.http.post(
            f"{self.base}/api/sessions",
            json={"path": notebook, "type": "notebook", "kernel": {"name": "python3"}},
            timeout=600,
        )
        r.raise_for_status()
        body = r.json()
        self.session_ids.append(body["id"])
        cookies = "; ".join(f"{k}={v}" for k, v in self.http.cookies.items())
        session = uuid.uuid4().hex
        ws = websocket.create_connection(
            f"ws://127.0.0.1:{self.port}{self.path}/api/kernels/{body['kernel']['id']}/channels"
            f"?session_id={session}",
            cookie=cookies,
            timeout=600,
        )
        try:
            msg_id = uuid.uuid4().hex
            ws.send(
                json.dumps(
                    {
                        "header": {
                            "msg_id": msg_id,
                            "username": "bench",
                            "session": session,
                            "msg_type": "execute_request",
                            "version": "5.3",
                        },
                        "parent_header": {},
                        "metadata": {},
                        "content": {"code": CELL, "silent": False, "store_history": True},
                        "channel": "shell",
                        "buffers": [],
                    }
                )
            )
            out, replied, idle = "", False, False
            while not (replied and idle):  # the reply (shell) and the output (iopub) both
                message = json.loads(ws.recv())
                if message.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                kind, content = message["msg_type"], message["content"]
                if kind == "stream":
                    out += content["text"]
                elif kind == "error":
                    raise RuntimeError(content["evalue"])
                elif kind == "execute_reply":
                    replied = True
                elif kind == "status" and content["execution_state"] == "idle":
                    idle = True
        finally:
            ws.close()
        return int(out.split()[-1])

    def close_all(self) -> None:
        for sid in self.session_ids:
            with contextlib.suppress(requests.RequestException):
                self.http.delete(f"{self.base}/api/sessions/{sid}", timeout=120)
        self.session_ids.clear()


def room(students: list[Student], round_name: str) -> tuple[float, list[int]]:
    """Every student opens a notebook at once; seconds until the last reply, the pids of the
    kernels that replied."""
    start = threading.Barrier(len(students) + 1)
    pids: list[int | None] = [None] * len(students)
    errors: list[str] = []

    def one(i: int, student: Student) -> None:
        start.wait()
        try:
            pids[i] = student.open(f"{round_name}.ipynb")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"{type(exc).__name__}: {exc} (see {student.log})")

    threads = [threading.Thread(target=one, args=(i, s)) for i, s in enumerate(students)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    FAILED[round_name] = len(errors)
    if errors:  # an overloaded host: said, not hidden (the time counts until the failure)
        print(f"  {round_name}: {len(errors)} of {len(students)} failed: {errors[0]}", flush=True)
        log = Path(errors[0].rpartition("(see ")[2].rstrip(")"))
        with contextlib.suppress(OSError):
            print("    " + "\n    ".join(log.read_text().splitlines()[-15:]), flush=True)
    return elapsed, [p for p in pids if p is not None]


def close(students: list[Student], pids: list[int]) -> None:
    for s in students:
        s.close_all()
    psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=30)


def kernel_server_memory(config: Path) -> str:
    from classroom.core.settings import load
    from classroom.host.kernels import KernelServer
    from classroom.host.state import State

    state = State.peek(load(config).state_dir)
    try:
        server = KernelServer.recorded(state)
    finally:
        state.close()
    proc = server.process() if server else None
    if proc is None:
        return "no kernel server"
    info = proc.memory_full_info()
    return f"kernel server: RSS {info.rss / MB:.0f} MB, USS {info.uss / MB:.0f} MB (shared by all)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--growth", default="1,10,20", help="class sizes, e.g. 1,10,20,30")
    ap.add_argument("--modes", default="exec,fork")
    ap.add_argument("--keep-logs", default="", help="copy the servers' logs here at the end")
    args = ap.parse_args()
    require_root()
    sizes = [int(n) for n in args.growth.split(",") if n]
    modes = args.modes.split(",")
    work = work_folder("bench-kernels-")
    names = [f"bk{secrets.token_hex(3)}{i}" for i in range(max(sizes))]
    config = launch_config(work, "server")
    write_roster(work, names)
    results: dict[tuple[int, str], tuple[float, float, float]] = {}
    notes = []
    try:
        for attempt in range(3):  # useradd can lose races with other tools making accounts
            if cli("setup", str(config), check=attempt == 2).returncode == 0:
                break
        for m, mode in enumerate(modes):
            set_launch(config, "kernel_mode", mode)
            cli("launch", str(config), "--no-portal")
            rows = {
                r["username"]: r for r in json.loads(cli("status", str(config), "--json").stdout)
            }
            with open(work / "state" / "credentials.csv", encoding="utf-8") as f:
                creds = {r["username"]: r["notebook_password"] for r in csv.DictReader(f)}
            logs = work / "state" / "logs"
            students = [Student(rows[u]["port"], u, creds[u], logs / f"{u}.log") for u in names]
            if m == 0:  # fill the students' caches: not measured
                _, pids = room(students, "warm-up")
                close(students, pids)
            if mode == "fork":
                notes.append(kernel_server_memory(config))
            for n in sizes:
                elapsed, pids = room(students[:n], f"{mode}-{n}")
                uss, pss = memory(pids, statistics.median)
                results[n, mode] = (elapsed, uss, pss)
                load = f"  (load {os.getloadavg()[0]:.1f})"
                print(figures_line(n, mode, results[n, mode]) + load, flush=True)
                close(students[:n], pids)
            cli("shutdown", str(config))
    finally:
        cli("shutdown", str(config), check=False)
        if args.keep_logs:
            shutil.copytree(work / "state" / "logs", args.keep_logs, dirs_exist_ok=True)
        cli("remove", str(config), "--yes", check=False)
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\n{os.cpu_count()} CPUs; N students open a notebook at once and run "
        "`import pandas, matplotlib.pyplot as plt`:\ntime until the last reply; median per kernel"
    )
    print_table(sizes, modes, results, "exec", FAILED)
    for note in notes:
        print(note)
    print("targets: fork <= 0.25x exec's time to the last reply, <= 0.35x its USS per kernel")


if __name__ == "__main__":
    main()
