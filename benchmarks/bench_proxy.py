"""access = proxy: N students open JupyterLab at once through the portal, against the same
servers reached directly on their sockets.

Run as root:  python benchmarks/bench_proxy.py [--students 30] [--small 300] [--mb 50]

One course of N students in proxy mode (plain HTTP: TLS is the same either way and
would only blur the proxy's own cost), the servers started by ``launch --no-portal`` and
the portal by ``launch --detach``. Side by side in one run:

  first visit   what a first visit of JupyterLab loads (recorded once in chromium: the
                page, every script, style, font and API call), then a kernel started
                and one execute round trip on its WebSocket, for all N students at
                once (6 connections per student, as a browser); wall time through
                the portal and direct, and the ratio (target: at most 1.3x)
  small         p50 and p99 of GET /user/NAME/api/status, one at a time, through the
                portal and direct: the added latency per small request
  CPU per MB    the portal's CPU seconds per MB of a download of --mb MB

Accounts are created with ``setup`` and deleted with ``remove`` at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import time
import uuid
from pathlib import Path

import aiohttp
import psutil
from common import MB, cli, free_port, require_root, work_folder, write_roster

from classroom.core.launchplan import socket_path  # noqa: E402
from classroom.core.settings import load  # noqa: E402

PER_STUDENT = 6  # parallel connections a browser opens to one host


def make_course(base: Path, n: int, port: int) -> Path:
    write_roster(base, [f"tb{secrets.token_hex(3)}" for _ in range(n)])
    (base / "tutorial").mkdir()
    config = base / "bench.cfg"
    config.write_text(
        "[course]\n"
        f"name = bench-{secrets.token_hex(3)}\nroster = students.csv\n"
        f"state_dir = {base / 'state'}\n"
        f"[accounts]\nhome_base = {base / 'homes'}\n"
        "[material]\nsource = tutorial\n"
        "[launch]\naccess = proxy\nip = 127.0.0.1\n"
        f"portal_port = {port}\nstart_timeout = 600\n"
    )
    return config


def record_first_visit(portal: str, username: str, password: str) -> list[str]:
    """The paths (under /user/NAME/) a first visit of JupyterLab GETs, from chromium."""
    from playwright.sync_api import sync_playwright

    paths: list[str] = []
    prefix = f"/user/{username}/"
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_page()
        page.on(
            "request",
            lambda r: (
                paths.append(r.url.split(portal, 1)[1])
                if r.method == "GET" and r.url.startswith(portal + prefix)
                else None
            ),
        )
        page.goto(portal + "/")
        page.fill("#username", username)
        page.fill("#password", password)
        page.click("button[type=submit]")
        page.wait_for_selector(".jp-LauncherCard", timeout=300_000)
        page.wait_for_load_state("networkidle")
        browser.close()
    return [p[len(prefix) :] for p in dict.fromkeys(paths)]


class Client:
    """One student's browser-like client, through the portal or straight to the socket."""

    def __init__(self, username: str, base: str, connector: aiohttp.BaseConnector, origin: str):
        self.username = username
        self.base = base.rstrip("/") + f"/user/{username}/"
        self.origin = origin
        self.session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.CookieJar(unsafe=True)
        )

    async def login(self, portal: str, password: str) -> None:
        async with self.session.post(
            portal + "/login",
            data={"username": self.username, "password": password},
            allow_redirects=False,
        ) as r:
            assert r.status == 303, r.status

    def xsrf(self) -> str:
        for cookie in self.session.cookie_jar:
            if cookie.key == "_xsrf":
                return cookie.value
        return ""

    async def get(self, path: str) -> int:
        async with self.session.get(self.base + path, headers={"Referer": self.base + "lab"}) as r:
            n = 0
            async for chunk in r.content.iter_chunked(64 * 1024):
                n += len(chunk)
            return n

    async def first_visit(self, paths: list[str]) -> None:
        await self.get("lab")
        queue = list(paths)

        async def worker() -> None:
            while queue:
                await self.get(queue.pop(0))

        await asyncio.gather(*(worker() for _ in range(PER_STUDENT)))
        headers = {"X-XSRFToken": self.xsrf()}
        async with self.session.post(self.base + "api/kernels", json={}, headers=headers) as r:
            kernel = (await r.json())["id"]
        ws_url = self.base.replace("http", "ws", 1) + f"api/kernels/{kernel}/channels"
        async with self.session.ws_connect(ws_url, origin=self.origin or None) as ws:
            msg_id = uuid.uuid4().hex
            await ws.send_json(
                {
                    "header": {
                        "msg_id": msg_id,
                        "msg_type": "execute_request",
                        "username": self.username,
                        "session": uuid.uuid4().hex,
                        "version": "5.3",
                    },
                    "parent_header": {},
                    "metadata": {},
                    "content": {"code": "1+1", "silent": False},
                    "channel": "shell",
                }
            )
            async for message in ws:
                data = json.loads(message.data)
                if data.get("msg_type") == "execute_reply":
                    break
        async with self.session.delete(self.base + f"api/kernels/{kernel}", headers=headers):
            pass

    async def close(self) -> None:
        await self.session.close()


async def clients(settings, names, passwords, portal: str | None) -> list[Client]:
    made = []
    for name in names:
        if portal:
            client = Client(name, portal, aiohttp.TCPConnector(limit=PER_STUDENT), portal)
            await client.login(portal, passwords[name])
        else:
            connector = aiohttp.UnixConnector(path=str(socket_path(settings, name)))
            client = Client(name, "http://localhost", connector, "")
        made.append(client)
    return made


async def first_visits(settings, names, passwords, portal, paths) -> float:
    made = await clients(settings, names, passwords, portal)
    try:
        start = time.perf_counter()
        await asyncio.gather(*(c.first_visit(paths) for c in made))
        return time.perf_counter() - start
    finally:
        for c in made:
            await c.close()


async def small_requests(settings, name, password, portal, count) -> list[float]:
    (client,) = await clients(settings, [name], {name: password}, portal)
    try:
        times = []
        for _ in range(count):
            start = time.perf_counter()
            await client.get("api/status")
            times.append(time.perf_counter() - start)
        return times
    finally:
        await client.close()


async def cpu_per_mb(settings, name, password, portal, mb: int, portal_pid: int) -> float:
    (client,) = await clients(settings, [name], {name: password}, portal)
    folder = Path(settings.home_base) / name / settings.material_folder
    big = folder / "bench.bin"
    big.write_bytes(os.urandom(mb * MB))
    os.chown(big, *(lambda st: (st.st_uid, st.st_gid))(folder.stat()))
    proc = psutil.Process(portal_pid)
    try:
        before = sum(proc.cpu_times()[:2])
        got = await client.get("files/bench.bin")
        after = sum(proc.cpu_times()[:2])
        assert got == mb * MB, got
        return (after - before) / mb
    finally:
        await client.close()
        big.unlink()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--students", type=int, default=30)
    ap.add_argument("--small", type=int, default=300, help="small requests, each way")
    ap.add_argument("--mb", type=int, default=50, help="MB downloaded for the CPU figure")
    args = ap.parse_args()
    require_root()
    port = free_port()
    base = work_folder("bench-proxy-")
    config = make_course(base, args.students, port)
    settings = load(config)
    portal = f"http://127.0.0.1:{port}"
    try:
        cli("setup", str(config), "--yes")
        import csv

        with open(settings.state_dir / "credentials.csv") as f:
            passwords = {r["username"]: r["password"] for r in csv.DictReader(f)}
        names = sorted(passwords)
        started = time.perf_counter()
        cli("launch", str(config), "--no-portal")
        print(f"{len(names)} servers started in {time.perf_counter() - started:.1f} s")
        cli("launch", str(config), "--detach")
        status = json.loads(cli("status", str(config), "--json").stdout)
        supervisor = psutil.Process(status[0]["portal"]["pid"])
        (portal_proc,) = supervisor.children()

        paths = record_first_visit(portal, names[0], passwords[names[0]])
        print(f"a first visit of JupyterLab GETs {len(paths) + 1} paths")

        # warm both ways once (the servers' own caches), then measure each way twice
        asyncio.run(first_visits(settings, names, passwords, None, paths))
        asyncio.run(first_visits(settings, names, passwords, portal, paths))
        direct = min(
            asyncio.run(first_visits(settings, names, passwords, None, paths)) for _ in range(2)
        )
        proxied = min(
            asyncio.run(first_visits(settings, names, passwords, portal, paths)) for _ in range(2)
        )
        print(
            f"first visit, {len(names)} students at once: direct {direct:.2f} s, "
            f"through the portal {proxied:.2f} s, ratio {proxied / direct:.2f}x "
            f"(target <= 1.3x)"
        )
        one = names[-1]
        d = asyncio.run(small_requests(settings, one, passwords[one], None, args.small))
        p = asyncio.run(small_requests(settings, one, passwords[one], portal, args.small))
        for q, label in ((0.5, "p50"), (0.99, "p99")):
            print(
                f"small request {label}: direct {1000 * percentile(d, q):.2f} ms, through the "
                f"portal {1000 * percentile(p, q):.2f} ms, added "
                f"{1000 * (percentile(p, q) - percentile(d, q)):.2f} ms"
            )
        print(
            f"  (means: direct {1000 * statistics.mean(d):.2f} ms, portal "
            f"{1000 * statistics.mean(p):.2f} ms)"
        )
        cpu = asyncio.run(
            cpu_per_mb(settings, one, passwords[one], portal, args.mb, portal_proc.pid)
        )
        print(f"portal CPU per MB forwarded: {1000 * cpu:.2f} ms")
    finally:
        cli("shutdown", str(config), check=False)
        cli("remove", str(config), "--yes", check=False)
        import shutil

        shutil.rmtree(base, ignore_errors=True)  # the homes too


if __name__ == "__main__":
    main()
