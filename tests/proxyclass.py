"""A real class in proxy mode for the tests: two students, HTTPS with a certificate made
here, real accounts and servers on their sockets, the portal as ``launch`` runs it."""

from __future__ import annotations

import contextlib
import http.client
import os
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import requests
from conftest import NOTEBOOKS, PYTHON, TestCourse, make_certificate


class ProxyClass:
    """A course of two students in proxy mode over HTTPS; the portal runs as ``launch`` does."""

    def __init__(self, base: Path):
        self.course = TestCourse(base, n=2)
        self.cert, self.key = make_certificate(base)
        self.course.write_config(
            launch={
                "access": "proxy",
                "certfile": str(self.cert),
                "keyfile": str(self.key),
                "ip": "127.0.0.1",
                "start_mode": "exec",
            }
        )
        self.port = int(self.course.sections["launch"]["portal_port"])
        self.url = f"https://127.0.0.1:{self.port}"
        self.portal: subprocess.Popen | None = None
        self.log = base / "portal.log"

    def start(self) -> None:
        c = self.course
        r = c.run("setup", "--yes")
        assert r.returncode == 0, r.stdout + r.stderr
        r = c.run("launch", "--no-portal")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "private key" not in r.stdout
        self.creds = c.credentials()
        self.start_portal()

    def start_portal(self) -> None:
        with open(self.log, "a") as out:
            self.portal = subprocess.Popen(
                [PYTHON, str(NOTEBOOKS), "launch", str(self.course.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={k: v for k, v in os.environ.items() if k != "NOTEBOOKS_CONFIG"},
                start_new_session=True,  # as from the teacher's own terminal
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.portal.poll() is None, self.log.read_text()
            with contextlib.suppress(requests.RequestException):
                if self.get("/healthz").status_code == 200:
                    return
            time.sleep(0.2)
        raise AssertionError(f"the portal did not answer: {self.log.read_text()}")

    def stop_portal(self) -> None:
        if self.portal is not None and self.portal.poll() is None:
            self.portal.terminate()
            self.portal.wait(30)

    def session(self) -> requests.Session:
        s = requests.Session()
        s.trust_env = False  # no CA bundle from the environment: our own certificate
        s.verify = str(self.cert)
        return s

    def get(self, path: str, **kw) -> requests.Response:
        return self.session().get(self.url + path, timeout=30, allow_redirects=False, **kw)

    def login(self, username: str, password: str | None = None) -> requests.Session:
        s = self.session()
        r = s.post(
            self.url + "/login",
            data={"username": username, "password": password or self.creds[username]["password"]},
            timeout=30,
            allow_redirects=False,
        )
        assert r.status_code == 303, (r.status_code, r.text[:300])
        assert r.headers["Location"] == f"/user/{username}/"
        s.get(f"{self.url}/user/{username}/lab", timeout=30)  # the server sets its _xsrf
        s.headers.update({"X-XSRFToken": s.cookies.get("_xsrf", ""), "Origin": self.url})
        return s

    def raw(self, request_line: str, session: requests.Session | None, extra: str = "") -> int:
        """Send a request line exactly as written (no client-side normalizing); its status."""
        context = ssl.create_default_context(cafile=str(self.cert))
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=context, timeout=30)
        conn.connect()
        cookie = ""
        if session is not None:
            cookie = "Cookie: " + "; ".join(f"{k}={v}" for k, v in session.cookies.items())
        head = f"{request_line}\r\nHost: 127.0.0.1:{self.port}\r\n{cookie}\r\n{extra}"
        conn.sock.sendall(head.encode() + b"Connection: close\r\n\r\n")
        response = http.client.HTTPResponse(conn.sock)
        response.begin()
        response.read()
        conn.close()
        return response.status

    def close(self) -> None:
        self.stop_portal()
        self.course.run("shutdown", timeout=120)
        self.course.cleanup()


def running_class(folder: Path):
    """A module fixture's body: a started ``ProxyClass`` in ``folder``, closed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root: creates real accounts")
    k = ProxyClass(folder)
    try:
        k.start()
        yield k
    finally:
        k.close()
