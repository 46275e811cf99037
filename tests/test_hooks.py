"""Hooks: an executable, or a module:function written for JupyterHub as hook(spawner)."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from conftest import answers, needs_root, status
from students import write_as

from classroom.host import hooks


def spawner(name: str = "alice", port: int | None = 8123) -> hooks.HookSpawner:
    return hooks.HookSpawner(
        user=hooks.HookUser(name), home=f"/home/{name}", port=port, course="demo"
    )


def script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


def test_parse():
    base = Path("/etc/course")
    assert hooks.parse("", base) is None
    assert hooks.parse("myhooks:pre_spawn", base).kind == "function"
    hook = hooks.parse("bin/prepare", base)
    assert hook.kind == "executable" and hook.target == "/etc/course/bin/prepare"


def test_executable_gets_username_and_environment(tmp_path):
    out = tmp_path / "seen"
    exe = script(tmp_path / "hook.sh", f'echo "$1 $NB_USER $NB_HOME $NB_PORT $NB_COURSE" > {out}\n')
    hooks.run_hook(hooks.parse(str(exe), tmp_path), spawner(), timeout=10, base=tmp_path)
    assert out.read_text().split() == ["alice", "alice", "/home/alice", "8123", "demo"]


def test_failing_and_slow_executables_fail_with_the_reason(tmp_path):
    bad = script(tmp_path / "bad.sh", 'echo "quota server down for $1" >&2\nexit 3\n')
    with pytest.raises(hooks.HookFailed, match=r"exit status 3.*quota server down for alice"):
        hooks.run_hook(hooks.parse(str(bad), tmp_path), spawner(), timeout=10, base=tmp_path)
    slow = script(tmp_path / "slow.sh", "sleep 5\n")
    with pytest.raises(hooks.HookFailed, match="timed out after 0.5 s"):
        hooks.run_hook(hooks.parse(str(slow), tmp_path), spawner(), timeout=0.5, base=tmp_path)
    with pytest.raises(hooks.HookFailed, match="not an executable"):
        hooks.run_hook(hooks.parse("missing.sh", tmp_path), spawner(), timeout=1, base=tmp_path)


def test_a_hook_that_times_out_leaves_nothing_running(tmp_path):
    marker = f"{time.time() % 1000 + 100:.3f}"  # a sleep only this test starts
    slow = script(tmp_path / "slow.sh", f"sleep {marker} &\nsleep {marker}\n")
    with pytest.raises(hooks.HookFailed) as info:
        hooks.run_hook(hooks.parse(str(slow), tmp_path), spawner(), timeout=0.5, base=tmp_path)
    assert str(info.value) == f"hook {slow} failed (timed out after 0.5 s)"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        left = [
            p
            for p in psutil.process_iter(["cmdline"])
            if marker in " ".join(p.info["cmdline"] or [])
        ]
        if not left:
            break
        time.sleep(0.1)
    for p in left:
        p.kill()
    assert not left, "the hook's children outlived its timeout"


def test_dry_run_runs_no_hook(tmp_path):
    """Under --dry-run neither kind runs; a function hook's module is not even imported."""
    from classroom.host import system

    out = tmp_path / "ran"
    exe = script(tmp_path / "hook.sh", f"touch {out}\n")
    module = f"dryhook_{os.getpid()}"
    (tmp_path / f"{module}.py").write_text(
        f"open({str(out)!r}, 'w').close()\n\ndef hook(spawner):\n    pass\n"
    )
    system.set_dry_run(True)
    try:
        for spec in (str(exe), f"{module}:hook"):
            hooks.run_hook(hooks.parse(spec, tmp_path), spawner(), timeout=10, base=tmp_path)
    finally:
        system.set_dry_run(False)
        sys.modules.pop(module, None)
    assert not out.exists()


JUPYTERHUB_STYLE = """\
import asyncio
import os

SEEN = os.path.join(os.path.dirname(__file__), "seen.txt")


def pre_spawn_hook(spawner):
    # written for JupyterHub: only spawner.user.name is used
    with open(SEEN, "a") as f:
        f.write(f"pre {spawner.user.name} {spawner.home} {spawner.port}\\n")


async def post_stop_hook(spawner):
    await asyncio.sleep(0)
    with open(SEEN, "a") as f:
        f.write(f"post {spawner.user.name}\\n")


def refuse(spawner):
    raise RuntimeError(f"no quota for {spawner.user.name}")


def slow(spawner):
    import time
    time.sleep(5)
"""


def test_module_function_hooks_jupyterhub_style(tmp_path):
    module = f"hookmod_{os.getpid()}"
    (tmp_path / f"{module}.py").write_text(JUPYTERHUB_STYLE)
    try:
        hooks.run_hook(
            hooks.parse(f"{module}:pre_spawn_hook", tmp_path), spawner(), timeout=5, base=tmp_path
        )
        hooks.run_hook(
            hooks.parse(f"{module}:post_stop_hook", tmp_path), spawner(), timeout=5, base=tmp_path
        )
        assert (tmp_path / "seen.txt").read_text() == "pre alice /home/alice 8123\npost alice\n"
        with pytest.raises(hooks.HookFailed, match="RuntimeError: no quota for alice"):
            hooks.run_hook(
                hooks.parse(f"{module}:refuse", tmp_path), spawner(), timeout=5, base=tmp_path
            )
        with pytest.raises(hooks.HookFailed, match="timed out"):
            hooks.run_hook(
                hooks.parse(f"{module}:slow", tmp_path), spawner(), timeout=0.3, base=tmp_path
            )
        with pytest.raises(hooks.HookFailed, match="cannot be loaded"):
            hooks.run_hook(
                hooks.parse(f"{module}:nothing", tmp_path), spawner(), timeout=5, base=tmp_path
            )
    finally:
        sys.modules.pop(module, None)
    assert str(tmp_path) not in sys.path


@needs_root
def test_failing_pre_spawn_skips_that_student_and_post_stop_runs(ready_course):
    c = ready_course
    refused, welcome = c.usernames
    seen = c.base / "pre.txt"
    script(
        c.base / "prepare.sh",
        f"""\
        echo "$1 $NB_USER $NB_HOME $NB_PORT $NB_COURSE" >> {seen}
        [ "$1" = "{refused}" ] && {{ echo "no quota for $1" >&2; exit 1; }}
        exit 0
        """,
    )
    module = f"posthooks_{os.getpid()}"
    (c.base / f"{module}.py").write_text(JUPYTERHUB_STYLE)
    c.write_config(
        launch={"app": "server"},
        hooks={"pre_spawn": "prepare.sh", "post_stop": f"{module}:post_stop_hook", "timeout": "10"},
    )
    try:
        r = c.run("launch", "--no-portal")
        assert r.returncode == 1, r.stdout + r.stderr
        assert f"{refused}: FAILED: pre_spawn hook" in r.stdout and "no quota for" in r.stdout
        st = status(c)
        assert st[refused]["server"] == "stopped"
        assert st[welcome]["server"] == "running" and answers(st[welcome]["port"])
        lines = dict(line.split(" ", 1) for line in seen.read_text().splitlines())
        assert lines[welcome].split() == [
            welcome,
            str(c.home(welcome)),
            str(st[welcome]["port"]),
            c.name,
        ]
        down = c.run("shutdown")
        assert down.returncode == 0, down.stdout + down.stderr
        assert (c.base / "seen.txt").read_text() == f"post {welcome}\n"
    finally:
        c.run("shutdown")


@needs_root
def test_post_stop_runs_when_a_start_fails_after_pre_spawn(ready_course, tmp_path):
    course = ready_course
    broken, fine = course.usernames
    log = tmp_path / "hooks.log"
    pre = script(tmp_path / "pre.sh", f'echo "pre $1" >> {log}\n')
    post = script(tmp_path / "post.sh", f'echo "post $1" >> {log}\n')
    course.write_config(
        launch={"app": "server", "start_timeout": "20"},
        hooks={"pre_spawn": str(pre), "post_stop": str(post)},
    )
    write_as(course, broken, ".jupyter/jupyter_server_config.py", "raise SystemExit('broken')\n")
    try:
        r = course.run("launch", "--no-portal")
        assert r.returncode == 1, r.stdout + r.stderr
        lines = log.read_text().split("\n")
        assert f"pre {broken}" in lines and f"pre {fine}" in lines
        assert f"post {broken}" in lines  # the failed start is torn down like a stop
        assert f"post {fine}" not in lines  # the running one is not
    finally:
        course.run("shutdown")
