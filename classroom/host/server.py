"""A student's server as the course records it: running, stopped or died; forget it."""

from __future__ import annotations

import contextlib
import pwd
from typing import Any

from ..core.errors import StepFailed
from . import hooks
from .processes import find_process, stop_processes
from .state import State


def server_row(state: State, username: str):
    return state.execute("SELECT * FROM servers WHERE username = ?", (username,)).fetchone()


def _row_status(row) -> dict:
    if row is None:
        return {"server": "stopped", "port": None, "pid": None, "url": None}
    proc = find_process(row["pid"], row["start_time"], row["uid"])
    if proc is None:
        return {"server": "died", "port": row["port"], "pid": row["pid"], "url": None}
    return {"server": "running", "port": row["port"], "pid": row["pid"], "url": row["url"]}


def server_status(course: Any, username: str) -> dict:
    """{'server': running|stopped|died, 'port', 'pid', 'url'} from the state and the process table."""
    return _row_status(server_row(course.state, username))


def running_servers(settings: Any) -> dict[str, dict]:
    """{username: {'port', 'url'}} of the servers running now; a fresh read-only look at the state."""
    state = State.peek(settings.state_dir)
    try:
        rows = state.execute("SELECT * FROM servers").fetchall()
    finally:
        state.close()
    running = {}
    for row in rows:
        status = _row_status(row)
        if status["server"] == "running":
            running[row["username"]] = {"port": status["port"], "url": status["url"]}
    return running


def forget(course: Any, username: str, command: str, action: str, detail: dict) -> None:
    with course.state.transaction():
        course.state.execute("DELETE FROM servers WHERE username = ?", (username,))
        course.state.record(command, username, action, detail)


def forget_server(course: Any, username: str, stop: bool = True) -> None:
    """Stop a student's recorded server (if any) and forget it (its port too)."""
    row = server_row(course.state, username)
    if row is not None and stop:
        proc = find_process(row["pid"], row["start_time"], row["uid"])
        if proc is not None:
            stop_processes([proc])
            with contextlib.suppress(StepFailed, KeyError):
                post = hooks.parse(course.settings.post_stop, course.settings.config_file.parent)
                home = pwd.getpwnam(username).pw_dir
                run_hook(course, post, username, home, row["port"])
    with course.state.transaction():
        course.state.execute("DELETE FROM servers WHERE username = ?", (username,))
        course.state.execute("DELETE FROM ports WHERE username = ?", (username,))
        if row is not None:
            course.state.record("shutdown", username, "server forgotten", {"port": row["port"]})


def run_hook(
    course: Any, hook: hooks.Hook | None, username: str, home: str, port: int | None
) -> None:
    s = course.settings
    spawner = hooks.HookSpawner(user=hooks.HookUser(username), home=home, port=port, course=s.name)
    hooks.run_hook(hook, spawner, timeout=s.hook_timeout, base=s.config_file.parent)
