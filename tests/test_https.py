"""HTTPS end to end: each server gets the key as its student, and loses it when HTTPS is off."""

from __future__ import annotations

import json
import os
import ssl
import stat
import urllib.request

from conftest import needs_root

pytestmark = needs_root


def test_https_server_and_key_copies(ready_course, certificate):
    course = ready_course
    cert, key = certificate
    u = course.usernames[0]
    course.write_config(launch={"certfile": str(cert), "keyfile": str(key)})
    try:
        r = course.run("launch", "--no-portal", "--only", u)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "private key" in r.stdout
        row = next(
            x for x in json.loads(course.run("status", "--json").stdout) if x["username"] == u
        )
        assert row["url"].startswith("https://")
        context = ssl.create_default_context(cafile=str(cert))
        with urllib.request.urlopen(
            f"https://127.0.0.1:{row['port']}/user/{u}/login", context=context, timeout=10
        ) as resp:
            assert resp.status == 200
        copy = course.home(u) / ".jupyter" / "classroom-tls" / "key.pem"
        st = os.stat(copy)
        assert st.st_uid == course.pw(u).pw_uid and stat.S_IMODE(st.st_mode) == 0o600
    finally:
        course.run("shutdown")
    # HTTPS turned off: the next launch takes the key away from the student
    course.write_config(launch={"certfile": "", "keyfile": ""})
    try:
        r = course.run("launch", "--no-portal", "--only", u)
        assert r.returncode == 0, r.stdout + r.stderr
        assert not (course.home(u) / ".jupyter" / "classroom-tls").exists()
    finally:
        course.run("shutdown")
