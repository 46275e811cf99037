"""A whole term through the command line, as a teacher runs it, on real accounts and servers."""

from __future__ import annotations

import json
import pwd
import urllib.error
import urllib.request

import psutil
import pytest
from conftest import needs_root

pytestmark = needs_root


def status(course) -> dict[str, dict]:
    r = course.run("status", "--json")
    assert r.returncode == 0, r.stderr
    return {row["username"]: row for row in json.loads(r.stdout)}


def test_a_whole_term(course):
    u0, u1 = course.usernames
    r = course.run("setup")
    assert r.returncode == 0, r.stdout + r.stderr
    assert course.run("send").returncode == 0
    assert (course.home(u0) / "tutorial" / "lesson.ipynb").exists()

    r = course.run("launch", "--no-portal")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = status(course)
    for u in (u0, u1):
        assert rows[u]["account"] == "ok" and rows[u]["server"] == "running"
        assert isinstance(rows[u]["port"], int) and isinstance(rows[u]["pid"], int)
        proc = psutil.Process(rows[u]["pid"])
        assert proc.uids().real == pwd.getpwnam(u).pw_uid
        port = rows[u]["port"]
        # it answers, and asks for the password rather than serving anything
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/user/{u}/api/contents", timeout=10)
        assert denied.value.code == 403
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/user/{u}/login", timeout=10) as resp:
            assert resp.status == 200 and b"password" in resp.read().lower()
    assert rows[u0]["port"] != rows[u1]["port"]

    # the student works; the teacher collects
    (course.home(u0) / "tutorial" / "answer.py").write_text("print(42)\n")
    r = course.run("retrieve")
    assert r.returncode == 0, r.stdout + r.stderr
    dest = course.base / "submissions"
    assert (dest / u0 / "latest" / "answer.py").read_text() == "print(42)\n"
    rows = status(course)
    assert rows[u0]["last_send"] and rows[u0]["last_retrieve"]

    # end of term with the servers still running: remove stops them first
    pids = [rows[u]["pid"] for u in (u0, u1)]
    r = course.run("remove", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    for u in (u0, u1):
        with pytest.raises(KeyError):
            pwd.getpwnam(u)
    rows = status(course)
    assert {row["account"] for row in rows.values()} == {"missing"}
    assert {row["server"] for row in rows.values()} == {"stopped"}
    # the work survives in the grading area and the archives
    assert (dest / u0 / "latest" / "answer.py").exists()
    assert len(list((course.state_dir / "archive").glob("*.tar.gz"))) == 2
