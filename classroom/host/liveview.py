"""What ``status --watch`` reads of each running server: memory, CPU, kernels, activity.

Processes are read with psutil (the server's tree: server, kernels, terminals). The
kernels' busy/idle state and the last activity come from the server's own API. The
servers run with a password and no token, so the view logs in once per server as
Jupyter's login page expects (``POST /login``, with the notebook password from the
course's root-only ``credentials.csv``) and keeps the cookie. Each refresh then makes
at most ONE request per server, alternating ``/api/kernels`` and ``/api/status`` (both
with ``no_track_activity``: watching a student does not count as their activity).
Without the password (not root, or a student who changed it) or when the server does
not answer, those columns stay unknown; the process columns still show.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import ssl
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import psutil

from ..core.addresses import https, probe_host
from . import credentials

HTTP_TIMEOUT = 2.0  # seconds for one request to a student's server
HTTP_WORKERS = 16  # servers asked at the same time


@dataclass
class Reading:
    """One refresh's look at one server (None: unknown)."""

    memory: int | None = None  # bytes, resident, the whole tree
    cpu: float | None = None  # percent of one CPU over the last interval
    kernels: int | None = None
    busy: int | None = None  # kernels busy now
    last_activity: datetime | None = None


@dataclass
class Probe:
    """One student's server, followed across refreshes."""

    username: str
    pid: int
    port: int | None
    password: str | None
    procs: dict[int, psutil.Process] = field(default_factory=dict)  # kept for cpu_percent
    cookies: dict[str, str] = field(default_factory=dict)
    login_failed: bool = False
    turn: int = 0
    kernel_state: tuple[int | None, int | None] = (None, None)  # (count, busy) last read
    activity: datetime | None = None

    def processes(self, table: ProcessTable) -> Reading:
        """Memory and CPU of the server's tree; kernels counted from the processes."""
        memory, cpu, kernels = 0, 0.0, 0
        alive = {}
        for p in table.tree(self.pid):
            p = self.procs.get(p.pid, p)  # the same object: cpu_percent measures since last call
            with contextlib.suppress(psutil.Error):
                memory += p.memory_info().rss
                cpu += p.cpu_percent(None)
                if "ipykernel" in " ".join(p.cmdline()[1:3]):
                    kernels += 1
                alive[p.pid] = p
        self.procs = alive
        if not alive:
            return Reading()
        return Reading(memory=memory, cpu=cpu, kernels=kernels)

    def ask(self, settings: Any) -> None:
        """At most one request: ``/api/kernels`` and ``/api/status`` in turn (after a login
        the first time)."""
        if self.port is None or self.password is None or self.login_failed:
            return
        try:
            conn = _connection(settings, self.port)
            try:
                if not self.cookies and not self._login(conn):
                    self.login_failed = True
                    return
                path = ("/api/kernels", "/api/status")[self.turn % 2]
                self.turn += 1
                conn.request(
                    "GET", f"{path}?no_track_activity=1", headers={"Cookie": self._cookie()}
                )
                resp = conn.getresponse()
                body = resp.read()
            finally:
                conn.close()
        except (OSError, http.client.HTTPException):
            return
        if resp.status == 403 or resp.status == 401:
            self.cookies = {}  # the server restarted: log in again next time
            return
        if resp.status != 200:
            return
        with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):
            data = json.loads(body)
            if path == "/api/kernels":
                busy = sum(k.get("execution_state") == "busy" for k in data)
                self.kernel_state = (len(data), busy)
                times = [_time(k.get("last_activity")) for k in data]
                latest = max((t for t in times if t), default=None)
                if latest and (self.activity is None or latest > self.activity):
                    self.activity = latest
            else:
                self.activity = _time(data.get("last_activity")) or self.activity

    def _login(self, conn: http.client.HTTPConnection) -> bool:
        conn.request("GET", "/login")
        resp = conn.getresponse()
        resp.read()
        self._keep(resp)
        xsrf = self.cookies.get("_xsrf", "")
        body = urllib.parse.urlencode({"_xsrf": xsrf, "password": self.password})
        headers = {
            "Cookie": self._cookie(),
            "Content-Type": "application/x-www-form-urlencoded",
            "X-XSRFToken": xsrf,
        }
        conn.request("POST", "/login", body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        self._keep(resp)
        return resp.status in (302, 303) and any(k.startswith("username-") for k in self.cookies)

    def _keep(self, resp: http.client.HTTPResponse) -> None:
        for header in resp.headers.get_all("Set-Cookie") or []:
            jar = SimpleCookie()
            with contextlib.suppress(Exception):
                jar.load(header)
            for name, morsel in jar.items():
                self.cookies[name] = morsel.value

    def _cookie(self) -> str:
        return "; ".join(f"{k}={v}" for k, v in self.cookies.items())


class ProcessTable:
    """One scan of the process table per refresh (not one per server): who is whose
    child, who is in whose session (kernels run in sessions of their own)."""

    def __init__(self) -> None:
        self.procs: dict[int, psutil.Process] = {}
        self.uid: dict[int, int] = {}
        self.children: dict[int, list[int]] = {}
        self.sessions: dict[int, list[int]] = {}
        for p in psutil.process_iter(["ppid", "uids"]):
            with contextlib.suppress(psutil.Error, OSError, TypeError):
                self.uid[p.pid] = p.info["uids"].real
                self.procs[p.pid] = p
                self.children.setdefault(p.info["ppid"], []).append(p.pid)
                self.sessions.setdefault(os.getsid(p.pid), []).append(p.pid)

    def tree(self, pid: int) -> list[psutil.Process]:
        """The server ``pid``, its descendants and its session, of the server's user
        (as ``processes.server_tree``)."""
        uid = self.uid.get(pid)
        if uid is None:
            return []
        found: set[int] = set()
        todo = [pid, *self.sessions.get(pid, [])]
        while todo:
            current = todo.pop()
            if current not in found:
                found.add(current)
                todo += self.children.get(current, [])
        return [self.procs[q] for q in found if self.uid.get(q) == uid and q in self.procs]


def _connection(settings: Any, port: int) -> http.client.HTTPConnection:
    host = probe_host(settings.ip)
    if https(settings):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # our own server, on this host
        return http.client.HTTPSConnection(host, port, timeout=HTTP_TIMEOUT, context=context)
    return http.client.HTTPConnection(host, port, timeout=HTTP_TIMEOUT)


def _time(text: Any) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


class LiveView:
    """The running servers of a course, read once per refresh."""

    def __init__(self, settings: Any):
        self.settings = settings
        self.probes: dict[str, Probe] = {}
        self._passwords: dict[str, str] | None = None

    def passwords(self) -> dict[str, str]:
        """The notebook passwords (root only); empty when they cannot be read."""
        if self._passwords is None:
            try:
                rows = credentials.read(Path(self.settings.state_dir) / "credentials.csv")
            except OSError:
                rows = {}
            self._passwords = {
                u: r.get("notebook_password") or r.get("password") or "" for u, r in rows.items()
            }
        return self._passwords

    def read(self, running: dict[str, tuple[int, int | None]]) -> dict[str, Reading]:
        """``{username: (pid, port)}`` of the running servers -> a reading of each."""
        for username in list(self.probes):
            probe = self.probes[username]
            if username not in running or running[username][0] != probe.pid:
                del self.probes[username]
        for username, (pid, port) in running.items():
            if username not in self.probes:
                password = self.passwords().get(username) or None
                self.probes[username] = Probe(username, pid, port, password)
        probes = list(self.probes.values())
        if probes:
            with ThreadPoolExecutor(max_workers=min(HTTP_WORKERS, len(probes))) as pool:
                list(pool.map(lambda p: p.ask(self.settings), probes))
        readings = {}
        table = ProcessTable()
        for probe in probes:
            reading = probe.processes(table)
            count, busy = probe.kernel_state
            if count is not None:  # the server's own count: forked kernels included
                reading.kernels, reading.busy = count, busy
            reading.last_activity = probe.activity
            readings[probe.username] = reading
        return readings
