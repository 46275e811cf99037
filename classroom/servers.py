"""Students' Jupyter servers: launch, shutdown, status. (Being built: issue 4.)"""

from __future__ import annotations

from .course import Course
from .errors import NotImplementedYet


def server_status(course: Course, username: str) -> dict:
    """{'server': running|stopped|died, 'port', 'pid', 'url'} from the state and the process table."""
    return {"server": "stopped", "port": None, "pid": None, "url": None}


def forget_server(course: Course, username: str, stop: bool = True) -> None:
    """Stop a student's recorded server (if any) and forget it."""


def launch(course: Course, *, only=(), portal=True, stop_on_exit=False) -> int:
    raise NotImplementedYet("launch is not built yet")


def shutdown(course: Course, *, only=(), all_jupyter=False) -> int:
    raise NotImplementedYet("shutdown is not built yet")
