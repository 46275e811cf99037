"""Shared fixtures: a throw-away course with real accounts under a temporary home base.

Usernames and the course name are random; the home base and state folder are
temporary; every account, group and process a test made is removed afterwards,
also when the test fails. The host's existing users are never touched.
"""

from __future__ import annotations

import contextlib
import grp
import http.server
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
import warnings
from pathlib import Path

import pytest
import requests
from chromium import CHROMIUM, CHROMIUM_ARGS

from classroom.core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks.py"
PYTHON = sys.executable

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates real accounts")


# Accounts the tests make by hand (foreign accounts, strangers) use ``useradd -N``: no group
# of their own. Debian 12's ``useradd --user-group`` can give its group the gid of a group
# that another worker's setup makes at the same moment; setup and remove cope with that
# (tests in test_accounts_hostile.py), but a by-hand account would then share a course
# group's gid and upset that other worker's test.
def random_name(prefix: str = "t") -> str:
    return prefix + secrets.token_hex(4)


def shadow_hash(username: str) -> str:
    """The password hash of ``username`` in /etc/shadow."""
    for line in open("/etc/shadow"):
        name, hashed, *_ = line.split(":")
        if name == username:
            return hashed
    raise KeyError(username)


def run_cli(
    *args: str,
    input: str | None = None,
    env: dict | None = None,
    timeout: float = 300,
    check_traceback: bool = True,
) -> subprocess.CompletedProcess:
    """Run ``notebooks.py ARGS`` as a teacher would; return the completed process (text)."""
    full_env = {k: v for k, v in os.environ.items() if k != "NOTEBOOKS_CONFIG"}
    full_env.update(env or {})
    proc = subprocess.run(
        [PYTHON, str(NOTEBOOKS), *args],
        input=input if input is not None else "",
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        check=False,
    )
    if check_traceback and "-v" not in args:
        assert "Traceback" not in proc.stderr, proc.stderr
    return proc


CONFIG_TEMPLATE = {
    "course": {"name": None, "roster": "students.csv", "state_dir": None},
    "accounts": {"home_base": None, "password_length": "12"},
    "material": {"source": "tutorial", "folder": "tutorial"},
    "retrieve": {"destination": "submissions"},
    "launch": {"title": "Test course", "portal_port": "0", "first_port": "0"},
    "hooks": {},
    "remove": {"archive": "yes"},
}


class TestCourse:
    """A course in a temporary folder: config, roster, tutorial; helpers to run commands."""

    __test__ = False  # a fixture's helper, not a test class

    def __init__(self, base: Path, n: int = 2):
        self.base = base
        self.name = random_name("test-")
        self.home_base = Path(tempfile.mkdtemp(prefix="classroom-homes-", dir="/tmp"))
        os.chmod(self.home_base, 0o755)
        self.state_dir = base / "state"
        self.usernames = [random_name() for _ in range(n)]
        self.extra_users: list[str] = []
        self.config = base / "notebooks.cfg"
        self.roster = base / "students.csv"
        tutorial = base / "tutorial"
        (tutorial / "data").mkdir(parents=True)
        (tutorial / "lesson.ipynb").write_text(
            '{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}\n'
        )
        (tutorial / "data" / "numbers.csv").write_text("a,b\n1,2\n")
        self.sections = {k: dict(v) for k, v in CONFIG_TEMPLATE.items()}
        self.sections["course"]["name"] = self.name
        self.sections["course"]["state_dir"] = str(self.state_dir)
        self.sections["accounts"]["home_base"] = str(self.home_base)
        # Ports: pick free ones so tests can run next to a live class.
        self.sections["launch"]["portal_port"] = str(free_port())
        self.sections["launch"]["first_port"] = str(free_port())
        self.write_roster()
        self.write_config()

    def write_roster(self, rows: list[str] | None = None) -> None:
        if rows is None:
            rows = [f"{u},Surname{i},Name{i},{u}@example.org" for i, u in enumerate(self.usernames)]
        self.roster.write_text("username,surname,name,email\n" + "\n".join(rows) + "\n")

    def write_config(self, **sections: dict) -> None:
        for section, values in sections.items():
            self.sections.setdefault(section, {}).update(values)
        lines = []
        for section, values in self.sections.items():
            lines.append(f"[{section}]")
            lines += [f"{k} = {v}" for k, v in values.items() if v is not None]
            lines.append("")
        self.config.write_text("\n".join(lines))

    def run(self, command: str, *args: str, **kw) -> subprocess.CompletedProcess:
        return run_cli(command, str(self.config), *args, **kw)

    def home(self, username: str) -> Path:
        return self.home_base / username

    def pw(self, username: str) -> pwd.struct_passwd:
        return pwd.getpwnam(username)

    def credentials(self) -> dict[str, dict[str, str]]:
        import csv

        with open(self.state_dir / "credentials.csv", encoding="utf-8") as f:
            return {r["username"]: r for r in csv.DictReader(f)}

    def cleanup(self) -> None:
        stop_kernel_server(self.state_dir, self.name)
        for username in [*self.usernames, *self.extra_users]:
            remove_account(username)
        with contextlib.suppress(KeyError):
            grp.getgrnam(self.name)
            subprocess.run(["groupdel", self.name], capture_output=True, check=False)
        with contextlib.suppress(KeyError):
            grp.getgrnam(f"{self.name}-staff")
            subprocess.run(["groupdel", f"{self.name}-staff"], capture_output=True, check=False)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"/etc/sudoers.d/classroom-{self.name}")
        shutil.rmtree(self.home_base, ignore_errors=True)
        shutil.rmtree(Path("/run/classroom") / self.name, ignore_errors=True)


def free_port() -> int:
    """A free port below the kernel's range for outgoing connections (those come and go).

    Each pytest-xdist worker takes its ports from a range of its own: a course's portal
    port, free when chosen, is not taken by another worker's servers before (or while)
    its portal listens there.
    """
    import random
    import socket

    try:
        low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    first, last = 20000, min(low, 30000) - 100
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    width = (last - first) // max(1, workers)
    first += worker * width
    last = first + width - 200  # room above for the last course's servers
    for _ in range(200):
        port = random.randrange(first, last)
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def stop_kernel_server(state_dir: Path, name: str) -> None:
    """Kill a course's kernel server (a root process launch leaves running) and its socket folder."""
    import psutil

    database = state_dir / "state.db"
    with contextlib.suppress(sqlite3.Error, TypeError, ValueError, KeyError):
        if not database.exists():
            raise ValueError("no state")
        with sqlite3.connect(database) as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'kernelserver'").fetchone()
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(json.loads(row[0])["pid"])
            if any("kernelserver.py" in part for part in proc.cmdline()):
                proc.kill()
                proc.wait(5)
    shutil.rmtree(Path("/run/classroom") / name, ignore_errors=True)


def kill_user_processes(uid: int) -> None:
    import psutil

    procs = [
        p for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == uid
    ]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=5)


def remove_account(username: str) -> None:
    """Delete a test account (only one with a random test name and a uid >= 1000)."""
    try:
        pw = pwd.getpwnam(username)
    except KeyError:
        return
    assert pw.pw_uid >= 1000 and username.startswith("t"), f"refusing to delete {username}"
    kill_user_processes(pw.pw_uid)
    for _ in range(3):
        r = subprocess.run(["userdel", "-r", "-f", username], capture_output=True, check=False)
        if r.returncode in (0, 6, 12):
            break
        time.sleep(0.5)


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def describe_group(name: str) -> str:
    """The group as /etc/group has it, and the accounts whose primary group it is (for a
    failure's message)."""
    try:
        g = grp.getgrnam(name)
    except KeyError:
        return f"no group {name}"
    primary = [p.pw_name for p in pwd.getpwall() if p.pw_gid == g.gr_gid]
    return f"{g.gr_name}:{g.gr_gid}:{','.join(g.gr_mem)} (primary group of {primary})"


def crypt_ok(password: str, hashed: str | None) -> bool:
    """True if ``hashed`` (from /etc/shadow) is a hash of ``password``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import crypt
    return bool(hashed) and crypt.crypt(password, hashed) == hashed


def run_as_nobody(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    """``notebooks.py ARGS`` as the unprivileged user nobody, from /tmp (or ``cwd``)."""
    env = {k: v for k, v in os.environ.items() if k not in ("NOTEBOOKS_CONFIG", "SUDO_USER")}
    env["HOME"] = "/tmp"
    r = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]
        + [PYTHON, str(NOTEBOOKS), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd or "/tmp",
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    return r


@pytest.fixture
def course(tmp_path):
    """A two-student course (accounts not yet created); cleaned up afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root: creates real accounts")
    c = TestCourse(tmp_path, n=2)
    try:
        yield c
    finally:
        c.cleanup()


class Courses:
    """``make_course``: ``courses(n)`` makes a course of n students; ``made`` lists them."""

    def __init__(self, base: Path):
        self.base = base
        self.made: list[TestCourse] = []

    def __call__(self, n: int = 2) -> TestCourse:
        sub = self.base / f"c{len(self.made)}"
        sub.mkdir()
        c = TestCourse(sub, n=n)
        self.made.append(c)
        return c


@pytest.fixture
def make_course(tmp_path):
    """Factory: ``make_course(n)`` for a course of n students; all cleaned up afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root: creates real accounts")
    courses = Courses(tmp_path)
    try:
        yield courses
    finally:
        for c in courses.made:
            c.cleanup()


@pytest.fixture
def public_folder():
    """A folder of root's (0755) in /tmp, outside any home and pytest's 0700 tmp_path: others
    can pass through it. Removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="classroom-public-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ready_course(course):
    """A course whose accounts exist (setup has run)."""
    r = course.run("setup", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    return course


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate and key for localhost and 127.0.0.1 (openssl) in ``folder``."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed: cannot make a test certificate")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture
def certificate(tmp_path):
    """A self-signed certificate and key for localhost and 127.0.0.1 (openssl)."""
    return make_certificate(tmp_path)


# --- servers: shared by test_launch, test_shutdown, test_forkserver, test_hooks ----------------

CLEAN_ENV = {"HOME", "USER", "LOGNAME", "SHELL", "PATH", "LANG"}


def status(course) -> dict[str, dict]:
    r = course.run("status", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    return {row["username"]: row for row in json.loads(r.stdout)}


def server_rows(course) -> dict[str, dict]:
    with sqlite3.connect(course.state_dir / "state.db") as db:
        db.row_factory = sqlite3.Row
        return {r["username"]: dict(r) for r in db.execute("SELECT * FROM servers")}


def answers(port: int, host: str = "127.0.0.1") -> bool:
    try:
        requests.get(f"http://{host}:{port}/api", timeout=3)
    except requests.RequestException:
        return False
    return True


def login(port: int, password: str, path: str = "/") -> requests.Session:
    """A session logged in to a student's server (base URL ``path``) with the handed-out
    password."""
    session = requests.Session()
    base = f"http://127.0.0.1:{port}{path.rstrip('/')}"
    session.get(f"{base}/login", timeout=10)
    xsrf = session.cookies.get("_xsrf", "")
    r = session.post(
        f"{base}/login?next={path}api/status",
        data={"password": password, "_xsrf": xsrf},
        timeout=10,
        allow_redirects=False,
    )
    assert r.status_code in (302, 303), (r.status_code, r.text[:300])
    session.headers["X-XSRFToken"] = xsrf
    return session


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def proc_env(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if item)


def proc_fds(pid: int) -> dict[int, str]:
    fds = {}
    for entry in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            fds[int(entry)] = os.readlink(f"/proc/{pid}/fd/{entry}")
    return fds


def log_writer_of(pid: int) -> int | None:
    """The root process that reads ``pid``'s stdout pipe (its log writer), or None."""
    import psutil

    out = proc_fds(pid).get(1, "")
    if not out.startswith("pipe:"):
        return None
    for proc in psutil.process_iter(["uids"]):
        if proc.pid != pid and proc.info["uids"] and proc.info["uids"].real == 0:
            with contextlib.suppress(OSError):
                if proc_fds(proc.pid).get(0) == out:
                    return proc.pid
    return None


def stop_session(proc: subprocess.Popen, timeout: float = 30) -> None:
    """End a process started in a session of its own, and what it started: SIGTERM to its
    group, SIGKILL if it still runs after ``timeout`` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def failed_line(text: str, username: str) -> bool:
    """True if a command's output has the line ``USERNAME: FAILED ...``."""
    return re.search(rf"^\s*{re.escape(username)}: FAILED", text, re.M) is not None


def control_chars(data: str | bytes, allowed: str = "\n\t") -> list[str]:
    """What a terminal would act on in ``data`` (bytes are read as UTF-8): C0 controls, DEL
    and C1 (Cc) and format characters such as bidi overrides (Cf), but those ``allowed``."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    return sorted(
        {
            f"U+{ord(ch):04X}"
            for ch in text
            if ch not in allowed and unicodedata.category(ch) in ("Cc", "Cf")
        }
    )


def snapshots(dest: Path, username: str) -> list[str]:
    """The names of a student's snapshots in retrieve's destination, oldest first."""
    return sorted(
        p.name
        for p in (dest / username).iterdir()
        if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")
    )


def server_pids_gone(pids, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(
            Path(f"/proc/{p}").exists() and "Z" not in proc_status(p).get("State", "Z")
            for p in pids
        ):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium under Playwright, one for each test module; ``browser.devices`` are
    Playwright's device descriptors (a phone's viewport and user agent)."""
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the playwright package is not installed"
    )
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        b.devices = p.devices  # type: ignore[attr-defined]
        try:
            yield b
        finally:
            b.close()


# --- the portal: shared by test_portal and test_portal_browser -----------------------------


class TinyServer:
    """A real HTTP server on a free port that answers 'hello from NAME'."""

    def __init__(self, name: str):
        body = f"hello from {name}".encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def make_settings(**changes) -> Settings:
    values = dict(
        config_file=Path("/tmp/portal-test.cfg"),
        name="intro-python",
        roster=Path("/tmp/students.csv"),
        group="intro-python",
        state_dir=Path("/tmp/portal-test-state"),
        ip="127.0.0.1",
        portal_port=0,
        title="Intro to Python",
    )
    values.update(changes)
    return Settings(**values)


class FakeCourse:
    def __init__(self, settings):
        self.settings = settings


class RunningPortal:
    """``portal.serve`` in a thread; ``url`` once it listens; ``close()`` stops it."""

    def __init__(self, settings: Settings, lookup):
        self.stop = threading.Event()
        self.urls: list[str] = []
        self.error: BaseException | None = None

        from classroom.host import portal

        def run():
            try:
                portal.serve(
                    FakeCourse(settings), lookup=lookup, ready=self.urls.append, stop=self.stop
                )
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.urls and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.urls, f"portal did not start: {self.error!r}"
        self.port = int(self.urls[0].rsplit(":", 1)[1].strip("/"))
        self.base = f"http://127.0.0.1:{self.port}"

    def get(self, path: str, **kw) -> requests.Response:
        kw.setdefault("allow_redirects", False)
        kw.setdefault("timeout", 10)
        return requests.get(self.base + path, **kw)

    def raw(self, request: bytes) -> tuple[int, dict[str, list[str]], bytes]:
        """Send bytes as they are; return status, headers (lower-case names, all values), body."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(request)
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
                if b"\r\n\r\n" in data:
                    head, _, body = data.partition(b"\r\n\r\n")
                    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                    if length and len(body) >= int(length.group(1)):
                        break
                    if not length and re.match(rb"HTTP/1\.\d (204|304)", head):
                        break
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        return status, headers, body

    def get_raw(self, path: str, host: str | bytes | None = "127.0.0.1", extra: bytes = b""):
        host_line = b""
        if host is not None:
            host_b = host if isinstance(host, bytes) else host.encode()
            host_line = b"Host: " + host_b + b"\r\n"
        req = (
            b"GET "
            + path.encode()
            + b" HTTP/1.1\r\n"
            + host_line
            + extra
            + b"Connection: close\r\n\r\n"
        )
        return self.raw(req)

    def close(self):
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive()


def roots_files(pid: int) -> list[str]:
    """The descriptors of ``pid`` open for writing on regular files owned by root (as root
    sees them). Reading root's files is what every process does (a module's .pyc while a
    kernel imports it); a descriptor it can write through is what must not reach it."""
    found = []
    for entry in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError, ValueError):
            st = os.stat(f"/proc/{pid}/fd/{entry}")
            with open(f"/proc/{pid}/fdinfo/{entry}") as info:
                flags = int(info.read().split("flags:")[1].split()[0], 8)
            if flags & os.O_ACCMODE == os.O_RDONLY:
                continue
            if st.st_uid == 0 and (st.st_mode & 0o170000) == 0o100000:
                found.append(f"fd {entry} -> {os.readlink(f'/proc/{pid}/fd/{entry}')}")
    return found
