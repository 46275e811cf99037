"""The one way to run a command: argv only, clean environment, no terminal, timeouts kill the group."""

import time

import pytest

from classroom.core.secret import Secret
from classroom.host.system import CommandFailed, run


def test_clean_environment_and_extra_values(monkeypatch):
    monkeypatch.setenv("LEAKY", "root-only")
    out = run(["env"], env={"NB_USER": "ada"}).stdout
    assert "NB_USER=ada" in out and "LEAKY" not in out


def test_no_terminal_and_secrets_on_stdin():
    assert run(["cat"]).stdout == ""  # stdin is /dev/null, not the teacher's terminal
    assert run(["cat"], stdin=Secret("s3cret\n")).stdout == "s3cret\n"


def test_failure_carries_the_output():
    with pytest.raises(CommandFailed) as e:
        run(["sh", "-c", "echo nope >&2; exit 3"])
    assert e.value.returncode == 3 and "nope" in str(e.value)


def test_timeout_kills_the_whole_group(tmp_path):
    marker = tmp_path / "pid"
    t = time.monotonic()
    with pytest.raises(CommandFailed, match="timed out"):
        run(["sh", "-c", f"sleep 60 & echo $! > {marker}; wait"], timeout=1)
    assert time.monotonic() - t < 10
    pid = int(marker.read_text())
    time.sleep(0.2)
    import psutil

    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


SCRIPT = """
import sys
from classroom.host import interrupts, system
folder, catching = sys.argv[1], sys.argv[2] == "catching"
step = "import sys, time; open(sys.argv[1] + '/started', 'w'); time.sleep(1); open(sys.argv[1] + '/finished', 'w')"
cmd = [sys.executable, "-c", step, folder]
try:
    if catching:
        with interrupts.catching():
            system.run(cmd)
            print("went on after the command", flush=True)
    else:
        system.run(cmd)
        print("went on after the command", flush=True)
except KeyboardInterrupt:
    print("stopped after the command", flush=True)
"""


@pytest.mark.parametrize("mode", ["catching", "plain"])
def test_a_stop_signal_lets_the_running_command_finish(tmp_path, mode):
    """Ctrl-C (SIGINT to the group) and SIGTERM to the command itself: the command
    finishes, and the caller stops right after it (issue 15: useradd never cut half-way)."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import psutil

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(tmp_path), mode],
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while not (tmp_path / "started").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    children = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGINT)
    for child in children:  # the command has the stop signals blocked
        child.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert (tmp_path / "finished").exists(), f"the command was cut: {out}"
    assert out.strip() == "stopped after the command", out
