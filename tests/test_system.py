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
