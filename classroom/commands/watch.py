"""status --watch: the class at a glance, refreshed every 2 s until Ctrl-C.

One row per student: account, server (running/stopped/died), memory (of the limit when
``[limits] memory`` is set), CPU over the last interval, kernels (busy/idle), last
activity, logged in through the portal. Problems first: a server that died, then
memory near its limit. Without a terminal it prints one table and exits, as
``status`` does. Each server is read at most once per refresh (``host.liveview``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import click

from ..host.liveview import LiveView, Reading
from .course import Course

REFRESH = 2.0  # seconds between two refreshes
NEAR_LIMIT = 0.9  # of the memory limit: shown among the problems
FIRST_WINDOW = 0.5  # seconds CPU is measured over before the first table
HEADERS = ["username", "account", "server", "memory", "cpu", "kernels", "activity", "portal"]


def memory_limit(settings: Any) -> int | None:
    """``[limits] memory`` in bytes when that key exists in this version and is set."""
    for name in ("memory_limit", "limits_memory", "memory"):
        value = getattr(settings, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


Rows = Callable[[], list[dict[str, Any]]]


def watch(course: Course, status_rows: Rows) -> int:
    """Show the live table until Ctrl-C (exit 0); without a terminal, one table.
    ``status_rows()`` gives status's rows (its JSON), read again at every refresh."""
    view = LiveView(course.settings)
    rows = table_rows(course, view, status_rows)  # primes the CPU counters
    time.sleep(FIRST_WINDOW)
    rows = table_rows(course, view, status_rows)
    if not sys.stdout.isatty():
        print_plain(rows)
        return 0
    from rich.console import Console
    from rich.live import Live

    console = Console()
    try:
        with Live(render(rows), console=console, auto_refresh=False, screen=False) as live:
            while True:
                time.sleep(REFRESH)
                live.update(render(table_rows(course, view, status_rows)), refresh=True)
    except KeyboardInterrupt:
        pass
    return 0


def table_rows(course: Course, view: LiveView, status_rows: Rows) -> list[dict[str, Any]]:
    """status's rows with a live reading of each running server, problems first."""
    rows = status_rows()
    running = {r["username"]: (r["pid"], r["port"]) for r in rows if r["server"] == "running"}
    readings = view.read(running)
    limit = memory_limit(course.settings)
    for r in rows:
        reading = readings.get(r["username"], Reading())
        memory = r.get("memory", reading.memory)  # status's own key, where it has one
        r.update(
            live_memory=memory,
            cpu=reading.cpu,
            kernels=reading.kernels,
            busy=reading.busy,
            activity=reading.last_activity,
            limit=limit,
            near_limit=bool(limit and memory and memory >= NEAR_LIMIT * limit),
        )
    order = {r["username"]: i for i, r in enumerate(rows)}
    return sorted(
        rows,
        key=lambda r: (r["server"] != "died", not r["near_limit"], order[r["username"]]),
    )


def cells(r: dict[str, Any], now: datetime | None = None) -> list[str]:
    """One row's texts, in ``HEADERS`` order."""
    server = r["server"]
    if server == "running":
        server = f"running :{r['port']}"
    memory = size(r["live_memory"])
    if r["limit"] and r["live_memory"] is not None:
        memory += f" / {size(r['limit'])}"
    cpu = "-" if r["cpu"] is None else f"{r['cpu']:.0f}%"
    kernels = "-"
    if r["kernels"] is not None:
        kernels = str(r["kernels"])
        if r["busy"] is not None and r["kernels"]:
            kernels += f" ({r['busy']} busy)" if r["busy"] else " (idle)"
    portal = r.get("logged_in")
    portal = "-" if portal is None else ("yes" if portal else "no")
    return [
        r["username"],
        r["account"],
        server,
        memory,
        cpu,
        kernels,
        ago(r["activity"], now),
        portal,
    ]


def size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}G"


def ago(when: datetime | None, now: datetime | None = None) -> str:
    """'12 s ago', '4 min ago', '2 h ago'; '-' when unknown."""
    if when is None:
        return "-"
    seconds = max(0, int(((now or datetime.now(UTC)) - when).total_seconds()))
    if seconds < 60:
        return f"{seconds} s ago"
    if seconds < 3600:
        return f"{seconds // 60} min ago"
    return f"{seconds // 3600} h ago"


def render(rows: list[dict[str, Any]]) -> Any:
    """The rich table of the live view, problems in red or yellow."""
    from rich.table import Table

    running = sum(r["server"] == "running" for r in rows)
    died = sum(r["server"] == "died" for r in rows)
    caption = (
        f"{len(rows)} students, {running} running, {died} died; "
        f"every {REFRESH:g} s, Ctrl-C to stop ({time.strftime('%H:%M:%S')})"
    )
    table = Table(*HEADERS, caption=caption, caption_justify="left", box=None, pad_edge=False)
    for r in rows:
        style = "red" if r["server"] == "died" else "yellow" if r["near_limit"] else None
        table.add_row(*cells(r), style=style)
    return table


def print_plain(rows: list[dict[str, Any]]) -> None:
    """The table once, as aligned columns (no terminal)."""
    table = [HEADERS, *(cells(r) for r in rows)]
    widths = [max(len(x) for x in col) for col in zip(*table, strict=True)]
    for line in table:
        click.echo("  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)).rstrip())
    running = sum(r["server"] == "running" for r in rows)
    click.echo(f"status: {len(rows)} students, {running} servers running")
