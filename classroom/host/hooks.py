"""The pre_spawn and post_stop hooks (JupyterHub's ``pre_spawn_hook`` / ``post_stop_hook``).

A hook is either an executable, run as root with the username as ``argv[1]`` and
``NB_USER``, ``NB_HOME``, ``NB_PORT``, ``NB_COURSE`` in its environment, or a
``module:function`` called with one ``HookSpawner`` (``.user.name``, ``.home``,
``.port``), so a hook written for JupyterHub as ``hook(spawner)`` works unchanged.
Every hook gets ``[hooks] timeout`` seconds; a failure raises ``HookFailed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import logging
import os
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import InvalidInput, StepFailed
from .system import CommandFailed, dry_run, run

log = logging.getLogger("classroom")

MODULE_FUNCTION = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class HookFailed(StepFailed):
    """A hook failed, timed out or could not be found."""


@dataclass(frozen=True)
class HookUser:
    """The ``spawner.user`` of a JupyterHub hook: just enough of it."""

    name: str


@dataclass
class HookSpawner:
    """What a ``module:function`` hook is called with (a JupyterHub ``Spawner`` look-alike)."""

    user: HookUser
    home: str
    port: int | None
    course: str
    environment: dict[str, str] = field(default_factory=dict)
    log: logging.Logger = field(default=log, repr=False)

    @property
    def name(self) -> str:  # JupyterHub's named-server name: a student has one server
        return ""


@dataclass(frozen=True)
class Hook:
    """A parsed hook: ``kind`` is 'executable' or 'function'."""

    spec: str
    kind: str
    target: str  # absolute path, or module:function

    def __str__(self) -> str:
        return self.spec


def parse(spec: str, base: Path) -> Hook | None:
    """The hook named by ``spec`` ('' for none); a relative path is relative to ``base``."""
    spec = spec.strip()
    if not spec:
        return None
    if MODULE_FUNCTION.match(spec) and "/" not in spec:
        return Hook(spec, "function", spec)
    path = (base / spec).resolve()
    if "=" in path.name:
        raise HookFailed(f"hook {spec}: an executable's name cannot contain '='")
    return Hook(spec, "executable", str(path))


def configured(settings: Any, key: str) -> Hook | None:
    """The course's ``[hooks] KEY`` hook (``pre_spawn`` or ``post_stop``), or None.

    Raises ``InvalidInput`` (naming the config line) when it is malformed.
    """
    try:
        return parse(getattr(settings, key), settings.config_file.parent)
    except HookFailed as exc:
        raise InvalidInput(f"{settings.where('hooks', key)}: {exc}") from None


def run_for(settings: Any, hook: Hook | None, username: str, home: str, port: int | None) -> None:
    """Run ``hook`` for one student of the course, within ``[hooks] timeout``; raise ``HookFailed``."""
    spawner = HookSpawner(user=HookUser(username), home=home, port=port, course=settings.name)
    run_hook(hook, spawner, timeout=settings.hook_timeout, base=settings.config_file.parent)


def run_all(
    settings: Any,
    hook: Hook | None,
    students: list[tuple[str, str, int | None]],
    *,
    workers: int = 16,
) -> list[str | None]:
    """Run ``hook`` for each (username, home, port), ``workers`` at a time, as ``run_for``;
    for each, why its hook failed, or None."""
    if hook is None or not students:
        return [None] * len(students)

    def one(student: tuple[str, str, int | None]) -> str | None:
        try:
            run_for(settings, hook, *student)
        except StepFailed as exc:
            return str(exc)
        return None

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(students)))) as pool:
        return list(pool.map(one, students))


def hook_env(spawner: HookSpawner) -> dict[str, str]:
    return {
        "NB_USER": spawner.user.name,
        "NB_HOME": spawner.home,
        "NB_PORT": "" if spawner.port is None else str(spawner.port),
        "NB_COURSE": spawner.course,
    }


def run_hook(hook: Hook | None, spawner: HookSpawner, *, timeout: float, base: Path) -> None:
    """Run ``hook`` for one student (as root); raise ``HookFailed`` with the reason.

    Under ``--dry-run`` nothing runs (a function is not even imported: importing runs
    the teacher's code); ``check`` is where a hook is checked.
    """
    if hook is None:
        return
    if dry_run():
        log.debug("dry run, not run: hook %s for %s", hook.spec, spawner.user.name)
    elif hook.kind == "executable":
        _run_executable(hook, spawner, timeout)
    else:
        _call_function(hook, spawner, timeout, base)


TIMEOUT_TOOL = "/usr/bin/timeout"  # coreutils: signals the hook's whole process group
TIMED_OUT = 124  # timeout(1)'s status when the time ran out
KILL_AFTER = 5  # seconds between timeout(1)'s SIGTERM and its SIGKILL


def _run_executable(hook: Hook, spawner: HookSpawner, timeout: float) -> None:
    if not os.access(hook.target, os.X_OK) or not os.path.isfile(hook.target):
        raise HookFailed(f"hook {hook.target} is not an executable file (check [hooks])")
    argv = [hook.target, spawner.user.name]
    if os.access(TIMEOUT_TOOL, os.X_OK):
        # timeout(1) stops what the hook started too (its process group), so a slow hook
        # leaves no root process behind; system.run's own timeout is only the backstop.
        argv = [TIMEOUT_TOOL, f"--kill-after={KILL_AFTER}", f"{timeout:g}", *argv]
        limit = timeout + KILL_AFTER + 5
    else:
        limit = timeout
    # system.run gives a clean environment plus the NB_* variables (none is a secret).
    try:
        run(argv, timeout=limit, env=hook_env(spawner))
    except CommandFailed as exc:
        timed_out = exc.returncode == -1 or (len(argv) > 2 and exc.returncode == TIMED_OUT)
        lines = [] if exc.returncode == -1 else exc.output.splitlines()
        last = lines[-1] if lines else ""
        why = f"timed out after {timeout:g} s" if timed_out else f"exit status {exc.returncode}"
        raise HookFailed(
            f"hook {hook.target} failed ({why}){': ' + last if last else ''}"
        ) from None


def load_function(hook: Hook, base: Path) -> Any:
    """Import ``module:function``, with the config file's folder on ``sys.path``."""
    module_name, func_name = hook.target.split(":")
    added = str(base) not in sys.path
    if added:
        sys.path.insert(0, str(base))
    try:
        module = importlib.import_module(module_name)
        func = getattr(module, func_name)
    except Exception as exc:  # any import error is the teacher's to fix, not a traceback
        raise HookFailed(
            f"hook {hook.spec} cannot be loaded: {type(exc).__name__}: {exc}"
        ) from None
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(str(base))
    if not callable(func):
        raise HookFailed(f"hook {hook.spec} is not a function")
    return func


def _call_function(hook: Hook, spawner: HookSpawner, timeout: float, base: Path) -> None:
    func = load_function(hook, base)
    outcome: dict[str, BaseException | None] = {}

    def call() -> None:
        try:
            result = func(spawner)
            if inspect.isawaitable(result):  # JupyterHub hooks may be coroutines
                asyncio.run(_await(result))
            outcome["error"] = None
        except BaseException as exc:  # noqa: BLE001 - reported as the hook's failure
            outcome["error"] = exc

    thread = threading.Thread(target=call, name=f"hook-{spawner.user.name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise HookFailed(f"hook {hook.spec} timed out after {timeout:g} s")
    error = outcome.get("error")
    if error is not None:
        raise HookFailed(f"hook {hook.spec} failed: {type(error).__name__}: {error}")


async def _await(awaitable: Any) -> Any:
    return await awaitable
