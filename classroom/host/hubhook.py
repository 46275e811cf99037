"""JupyterHub's ``pre_spawn_hook`` for a class that ``notebooks setup`` made: the material.

The exported ``jupyterhub_config.py`` sets::

    c.Spawner.pre_spawn_hook = material_hook('/path/to/notebooks.cfg')

Before each start, the hook runs ``notebooks send CONFIG --only USERNAME --yes`` (the
same Python, the same classroom package): send's rules, the course lock and the course
state all apply as when the teacher runs it, so an edited file is never lost. It runs
in the hub's process, as root, in a thread so the hub keeps serving meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ..core.addresses import valid_username
from ..core.errors import EXIT_REFUSED
from .system import run

log = logging.getLogger("classroom")

PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent.parent)
SEND_TIMEOUT = 300.0  # seconds one send may take
LOCK_WAIT = 120.0  # seconds to wait while another command (another student's send) holds the course


class MaterialNotSent(RuntimeError):
    """``notebooks send`` failed for this user: JupyterHub does not start the server."""


def send_argv(config: Path, username: str) -> list[str]:
    """The command the hook runs: ``notebooks send`` of this very package, for one user."""
    return [
        sys.executable,
        "-m",
        "classroom",
        "-q",
        "send",
        str(config),
        "--only",
        username,
        "--yes",
    ]


def send_material(
    config: Path, username: str, *, timeout: float = SEND_TIMEOUT, lock_wait: float = LOCK_WAIT
) -> None:
    """Send the material to ``username``; wait while the course is locked; raise ``MaterialNotSent``."""
    if not valid_username(username):
        raise MaterialNotSent(f"{username!r} is not a valid user name")
    argv = send_argv(config, username)
    deadline = time.monotonic() + lock_wait
    while True:
        # PYTHONPATH: the same classroom this hook was imported from, wherever that is.
        proc = run(argv, check=False, timeout=timeout, env={"PYTHONPATH": PACKAGE_PARENT})
        if proc.returncode == 0:
            return
        output = ((proc.stdout or "") + (proc.stderr or "")).strip()
        # Many students log in at the start of a class: their sends take turns.
        if proc.returncode == EXIT_REFUSED and "locked" in output and time.monotonic() < deadline:
            time.sleep(0.5 + random.random())
            continue
        last = output.splitlines()[-1] if output else ""
        raise MaterialNotSent(
            f"notebooks send {config} --only {username} failed (exit {proc.returncode})"
            + (f": {last}" if last else "")
        )


def material_hook(
    config: str | Path, *, timeout: float = SEND_TIMEOUT, lock_wait: float = LOCK_WAIT
) -> Callable[[Any], Awaitable[None]]:
    """A ``pre_spawn_hook(spawner)`` that sends the course's material to ``spawner.user.name``."""
    config_path = Path(config).resolve()

    async def hook(spawner: Any) -> None:
        username = spawner.user.name
        await asyncio.to_thread(
            send_material, config_path, username, timeout=timeout, lock_wait=lock_wait
        )
        logger = getattr(spawner, "log", log)
        logger.info("classroom: material sent to %s (%s)", username, config_path)

    return hook
