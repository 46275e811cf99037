"""access = proxy (SPEC 6.1, 6.11 rule 8), and what both modes share: every server under
/user/NAME/, the one-line cookie warning of redirect mode.

The real thing: a course in proxy mode over HTTPS (a self-signed certificate made here),
real accounts, real servers on their sockets, the portal as ``launch`` runs it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import os
import pwd
import secrets
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests
from conftest import (
    PYTHON,
    RunningPortal,
    make_certificate,
    run_cli,
    status,
)
from proxyclass import running_class
from students import as_student

from classroom.core.settings import load
from classroom.host import portal_login, proxy, sessions
from classroom.host.serverhome import prepare_socket_dir
from classroom.host.sessions import FAIL_DELAY, LIMIT, RateLimit

# --- both modes: the warning, the key --------------------------------------------------------


@pytest.mark.parametrize(
    "launch,expect",
    [
        ({}, "any student can collect a classmate's login cookie"),
        ({"access": "redirect"}, "access = proxy with HTTPS prevents it"),
        ({"access": "proxy"}, "access = proxy without HTTPS"),
        ({"access": "proxy", "certfile": "cert.pem", "keyfile": "key.pem"}, None),
    ],
)
def test_check_says_in_one_line_what_the_access_mode_lets_students_do(tmp_path, launch, expect):
    (tmp_path / "students.csv").write_text("username\nada\n")
    for name in ("cert.pem", "key.pem"):
        (tmp_path / name).write_text("x")
    lines = [
        "[course]",
        "name = demo",
        "roster = students.csv",
        f"state_dir = {tmp_path / 'state'}",
        "[launch]",
    ]
    lines += [f"{k} = {v}" for k, v in launch.items()]
    (tmp_path / "c.cfg").write_text("\n".join(lines) + "\n")
    r = run_cli("check", str(tmp_path / "c.cfg"), "--json")
    warnings = json.loads(r.stdout)["warnings"]
    cookie = [w for w in warnings if "cookie" in w]
    if expect is None:
        assert cookie == []
    else:
        assert len(cookie) == 1 and expect in cookie[0] and "\n" not in cookie[0]


def test_access_is_a_checked_key(tmp_path):
    (tmp_path / "students.csv").write_text("username\nada\n")
    (tmp_path / "c.cfg").write_text(
        "[course]\nname = demo\nroster = students.csv\n[launch]\naccess = proxi\n"
    )
    r = run_cli("check", str(tmp_path / "c.cfg"))
    assert r.returncode == 2 and "must be one of redirect, proxy" in r.stdout


# --- pure parts: headers, cookies, the rate limit ---------------------------------------------


def test_upstream_gets_no_portal_cookie_no_authorization_no_forged_forwarding():
    from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine

    headers = HTTPHeaders()
    headers.add("Host", "class.example.org")
    headers.add("Cookie", "__Host-classroom-session=abc; _xsrf=2|x; evil=1")
    headers.add("Cookie", "classroom-session=def; username-127-0-0-1-8000=u")
    headers.add("Authorization", "token stolen")
    headers.add("X-Forwarded-For", "10.0.0.1")
    headers.add("Connection", "keep-alive, X-Secret")
    headers.add("X-Secret", "hop")
    headers.add("X-XSRFToken", "2|x")
    start = RequestStartLine("GET", "/user/a/", "HTTP/1.1")
    out = proxy.upstream_headers(HTTPServerRequest(start_line=start, headers=headers))
    assert out["Cookie"] == "_xsrf=2|x; username-127-0-0-1-8000=u"
    assert "Authorization" not in out and "X-Forwarded-For" not in out
    assert "X-Secret" not in out and "Connection" not in out
    assert out["Host"] == "class.example.org" and out["X-XSRFToken"] == "2|x"


@pytest.mark.parametrize(
    "set_cookie,expect",
    [
        ("_xsrf=2|abc; Path=/user/ada/", "_xsrf=2|abc; Path=/user/ada/"),
        ("_xsrf=2|abc; Path=/; Domain=example.org", "_xsrf=2|abc; Path=/user/ada/"),
        ("username-h-1=x; Path=/user/bob/", "username-h-1=x; Path=/user/ada/"),
        ("__Host-classroom-session=forged; Path=/; Secure", None),
        ("classroom-session=forged; Path=/", None),
        ("tracking=1; Path=/user/ada/", None),
    ],
)
def test_a_server_sets_only_its_own_cookies_on_its_own_path(set_cookie, expect):
    assert proxy.scoped_cookie(set_cookie, "/user/ada/") == expect
    secure = proxy.scoped_cookie(set_cookie, "/user/ada/", secure=True)
    assert secure == (None if expect is None else expect + "; Secure")


@pytest.mark.parametrize(
    "value,expect",
    [
        ("/user/ada/lab", "/user/ada/lab"),
        ("/user/ada/lab?x=1", "/user/ada/lab?x=1"),
        ("//evil.example/user/", ""),
        ("https://evil.example/user/ada/", ""),
        ("/user//evil.example", ""),
        ("/user/ada/\\evil", ""),
        ("/login", ""),
    ],
)
def test_after_login_only_a_path_under_user(value, expect):
    assert portal_login.safe_next(value) == expect


def test_more_than_ten_failures_in_five_minutes_wait_until_the_window_passed():
    now = [1000.0]
    limit = RateLimit(clock=lambda: now[0])
    for _ in range(LIMIT):
        assert limit.retry_after("user:ada", "addr:1") == 0
        limit.failed("user:ada", "addr:1")
        now[0] += 1
    assert limit.retry_after("user:ada") == 0  # ten: not more than ten
    limit.failed("user:ada", "addr:1")
    wait = limit.retry_after("user:ada")
    assert 0 < wait <= sessions.WINDOW
    assert limit.retry_after("addr:1") and limit.retry_after("user:bob", "addr:1")
    assert limit.retry_after("user:bob", "addr:2") == 0
    now[0] += wait
    assert limit.retry_after("user:ada", "addr:1") == 0


# --- a real class in proxy mode, over HTTPS ----------------------------------------------------

RECORDER = r"""
import os, socket, sys
path, log = sys.argv[1], sys.argv[2]
if os.path.exists(path):
    os.unlink(path)
srv = socket.socket(socket.AF_UNIX)
srv.bind(path)
os.chmod(path, 0o600)
srv.listen(16)
open(log + ".ready", "w").close()
while True:
    conn, _ = srv.accept()
    data = b""
    conn.settimeout(5)
    try:
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    with open(log, "ab") as f:
        f.write(data.split(b"\r\n\r\n")[0] + b"\n\n")
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\nrecorded")
    conn.close()
"""


@pytest.fixture(scope="module")
def klass(tmp_path_factory):
    yield from running_class(tmp_path_factory.mktemp("proxy-class"))


@pytest.mark.root
def test_servers_listen_on_sockets_only_their_student_can_reach(klass):
    c = klass.course
    a, b = c.usernames
    st = status(c)
    for u in (a, b):
        assert st[u]["server"] == "running" and st[u]["port"] is None
        assert st[u]["url"] == f"{klass.url}/user/{u}/"
        proc = psutil.Process(st[u]["pid"])
        listening = [x for x in proc.net_connections(kind="inet") if x.status == "LISTEN"]
        assert listening == [], f"{u}'s server listens on TCP: {listening}"
        folder = Path(f"/run/classroom/{c.name}/servers/{u}")
        info = folder.stat()
        assert info.st_uid == c.pw(u).pw_uid and info.st_mode & 0o777 == 0o700
        assert not (c.home(u) / ".jupyter" / "classroom-tls").exists()
    # as A, from this host: B's socket and its folder are closed, and so is the key
    sock = Path(f"/run/classroom/{c.name}/servers/{b}/server.sock")
    probe = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n    s.connect(sys.argv[1]); print('CONNECTED')\n"
        "except OSError as e:\n    print('REFUSED', e.errno)\n"
        "try:\n    open(sys.argv[2], 'rb').read(); print('READ KEY')\n"
        "except OSError as e:\n    print('NO KEY', e.errno)\n"
    )
    r = subprocess.run(
        ["runuser", "-u", a, "--", PYTHON, "-c", probe, str(sock), str(klass.key)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "REFUSED 13" in r.stdout and "NO KEY 13" in r.stdout, r.stdout + r.stderr
    r = subprocess.run(["runuser", "-u", a, "--", "ls", str(sock.parent)], capture_output=True)
    assert r.returncode != 0


@pytest.mark.root
def test_login_wrong_password_and_unknown_user_get_the_same_answer(klass):
    a = klass.course.usernames[0]
    page = klass.get("/")
    assert page.status_code == 200 and 'type="password"' in page.text
    answers = {}
    for who, password in ((a, "not-the-password"), ("tnobody", "whatever"), ("daemon", "x")):
        s = klass.session()
        started = time.monotonic()
        r = s.post(
            klass.url + "/login",
            data={"username": who, "password": password},
            timeout=30,
            allow_redirects=False,
        )
        assert time.monotonic() - started >= FAIL_DELAY - 0.1
        assert r.status_code == 403 and not s.cookies
        answers[who] = r.text.replace(who, "NAME")
    assert len(set(answers.values())) == 1, "the answer tells a student from a stranger"
    assert "Wrong username or password" in answers[a]


@pytest.mark.root
def test_login_sets_one_strict_session_cookie_and_logout_ends_it(klass):
    a = klass.course.usernames[0]
    s = klass.session()
    r = s.post(
        klass.url + "/login",
        data={"username": f" {a.upper()} ", "password": klass.creds[a]["password"]},
        timeout=30,
        allow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["Location"] == f"/user/{a}/"
    cookie = r.headers["Set-Cookie"]
    assert cookie.startswith("__Host-classroom-session=")
    for attribute in ("HttpOnly", "Secure", "SameSite=Lax", "Path=/"):
        assert attribute in cookie
    assert "Domain" not in cookie and "expires" not in cookie.lower()
    # no server password: the portal's login is the only one
    api = s.get(f"{klass.url}/user/{a}/api/contents", timeout=30)
    assert api.status_code == 200 and api.json()["type"] == "directory"
    assert s.get(klass.url + "/", timeout=30).text.count(a) >= 1  # "logged in as"
    stolen = dict(s.cookies)
    assert s.get(klass.url + "/logout", timeout=30).status_code == 200
    again = klass.session()
    again.cookies.update(stolen)
    r = again.get(f"{klass.url}/user/{a}/api/contents", timeout=30, allow_redirects=False)
    assert r.status_code == 403, "a copied cookie outlived the logout"
    # a login form posted from another origin is refused
    r = klass.session().post(
        klass.url + "/login",
        data={"username": a, "password": klass.creds[a]["password"]},
        headers={"Origin": "http://127.0.0.1:9"},
        timeout=30,
        allow_redirects=False,
    )
    assert r.status_code == 403 and "Set-Cookie" not in r.headers


@pytest.mark.root
def test_logging_out_closes_the_open_kernel_connections_of_that_session(klass):
    """Logged out on a lab computer, a JupyterLab tab left open elsewhere on it must not
    still run code as the student over its open kernel WebSocket."""
    a = klass.course.usernames[0]
    s = klass.login(a)
    ws = kernel_websocket(klass, s, a)
    ws.send(json.dumps(execute("print(6*7)", a)))
    assert read_stream(ws) == "42\n"
    other = klass.login(a)  # the same student in another browser: stays logged in
    ws_other = kernel_websocket(klass, other, a)
    assert s.get(klass.url + "/logout", timeout=30).status_code == 200
    assert closed_within(ws, 2 * sessions.CACHE_SECONDS + 30), (
        "the kernel connection outlived logout"
    )
    ws_other.send(json.dumps(execute("print(7*6)", a)))
    assert read_stream(ws_other) == "42\n"
    ws_other.close()


@pytest.mark.root
def test_kernel_websocket_and_a_50_mb_upload_and_download_stream_through(klass):
    import websocket

    a = klass.course.usernames[0]
    s = klass.login(a)
    base = f"{klass.url}/user/{a}"
    k = s.post(f"{base}/api/kernels", json={}, timeout=60)
    assert k.status_code == 201, k.text
    cookie = "; ".join(f"{n}={v}" for n, v in s.cookies.items())
    ws = websocket.create_connection(
        f"wss://127.0.0.1:{klass.port}/user/{a}/api/kernels/{k.json()['id']}/channels",
        header=[f"Cookie: {cookie}"],
        origin=klass.url,
        sslopt={"ca_certs": str(klass.cert)},
        timeout=60,
    )
    try:
        ws.send(json.dumps(execute("import getpass; print(6*7, getpass.getuser())", a)))
        assert read_stream(ws) == f"42 {a}\n"
    finally:
        ws.close()
    # a WebSocket from another origin, or with no Origin at all, is refused
    for origin in ("https://evil.example", None):
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            websocket.create_connection(
                f"wss://127.0.0.1:{klass.port}/user/{a}/api/kernels/{k.json()['id']}/channels",
                header=[f"Cookie: {cookie}"],
                suppress_origin=origin is None,
                origin=origin,
                sslopt={"ca_certs": str(klass.cert)},
                timeout=30,
            )
        assert refused.value.status_code == 403

    portal = psutil.Process(klass.portal.pid)
    before = portal.memory_info().rss
    peak = [before]
    done = threading.Event()

    def watch():
        while not done.is_set():
            with contextlib.suppress(psutil.Error):
                peak[0] = max(peak[0], portal.memory_info().rss)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    data = os.urandom(50 << 20)
    try:
        up = s.put(
            f"{base}/api/contents/big.bin",
            json={"type": "file", "format": "base64", "content": base64.b64encode(data).decode()},
            timeout=300,
        )
        assert up.status_code in (200, 201), up.text[:300]
        down = s.get(f"{base}/files/big.bin", headers={"Referer": f"{base}/lab"}, stream=True)
        digest = hashlib.sha256()
        for chunk in down.iter_content(1 << 20):
            digest.update(chunk)
        assert down.status_code == 200
        assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    finally:
        done.set()
        watcher.join()
    assert peak[0] - before < 25 << 20, f"the portal grew by {(peak[0] - before) >> 20} MB"


def answer_once_ended(s: requests.Session, url: str) -> int:
    """The status ``url`` gets once the portal has looked the session up again (it keeps a
    session for ``CACHE_SECONDS``): 200 while it still lets it through, for at most 30 s more."""
    deadline = time.monotonic() + sessions.CACHE_SECONDS + 30
    while True:
        code = s.get(url, timeout=30, allow_redirects=False).status_code
        if code != 200 or time.monotonic() > deadline:
            return code
        time.sleep(0.5)


def kernel_websocket(klass, s: requests.Session, username: str):
    """A new kernel of ``username``'s, and a WebSocket to it through the portal."""
    import websocket

    k = s.post(f"{klass.url}/user/{username}/api/kernels", json={}, timeout=60)
    assert k.status_code == 201, k.text
    cookie = "; ".join(f"{n}={v}" for n, v in s.cookies.items())
    return websocket.create_connection(
        f"wss://127.0.0.1:{klass.port}/user/{username}/api/kernels/{k.json()['id']}/channels",
        header=[f"Cookie: {cookie}"],
        origin=klass.url,
        sslopt={"ca_certs": str(klass.cert)},
        timeout=60,
    )


def closed_within(ws, seconds: float) -> bool:
    """Whether the other end closes ``ws`` within ``seconds`` (what arrives meanwhile is read)."""
    import websocket

    deadline = time.monotonic() + seconds
    ws.settimeout(1)
    try:
        while time.monotonic() < deadline:
            try:
                if not ws.recv():
                    return True
            except websocket.WebSocketTimeoutException:
                continue
            except (websocket.WebSocketConnectionClosedException, ConnectionError, OSError):
                return True
        return False
    finally:
        ws.close()


def execute(code: str, username: str) -> dict:
    return {
        "header": {
            "msg_id": uuid.uuid4().hex,
            "msg_type": "execute_request",
            "username": username,
            "session": uuid.uuid4().hex,
            "version": "5.3",
        },
        "parent_header": {},
        "metadata": {},
        "content": {"code": code, "silent": False},
        "channel": "shell",
    }


def read_stream(ws) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        message = json.loads(ws.recv())
        if message.get("msg_type") == "stream":
            return message["content"]["text"]
    raise AssertionError("no output")


def cross_user_requests(a: str, b: str) -> list[str]:
    """Request lines A's session sends, each aiming at B's server some way."""
    b_hex = "".join(f"%{ord(ch):02X}" for ch in b)
    b_upper = b.upper()
    return [
        f"GET /user/{b}/ HTTP/1.1",
        f"GET /user/{b}/api/contents HTTP/1.1",
        f"GET /user/{b}/lab HTTP/1.1",
        f"GET /user/{b} HTTP/1.1",
        f"GET /user/{b_hex}/api/contents HTTP/1.1",
        f"GET /user/%{ord(b[0]):02x}{b[1:]}/api/contents HTTP/1.1",
        f"GET /user/{b_upper}/api/contents HTTP/1.1",
        f"GET /USER/{b}/api/contents HTTP/1.1",
        f"GET /user//{b}/api/contents HTTP/1.1",
        f"GET //user/{b}/api/contents HTTP/1.1",
        f"GET /user/./{b}/api/contents HTTP/1.1",
        f"GET /user/{a}/../{b}/api/contents HTTP/1.1",
        f"GET /user/{a}/..%2F{b}/api/contents HTTP/1.1",
        f"GET /user/{a}%2F..%2F{b}/api/contents HTTP/1.1",
        f"GET /user/{a}%2f..%2f{b}/api/contents HTTP/1.1",
        f"GET /user/%2e%2e/{b}/api/contents HTTP/1.1",
        f"GET /user/{b}%00/api/contents HTTP/1.1",
        f"GET /user/{b}/../{b}/api/contents HTTP/1.1",
        f"GET https://127.0.0.1/user/{b}/api/contents HTTP/1.1",
        f"POST /user/{b}/api/kernels HTTP/1.1",
        f"PUT /user/{b}/api/contents/x.txt HTTP/1.1",
        f"DELETE /user/{b}/api/contents/x.txt HTTP/1.1",
    ]


@pytest.mark.root
def test_a_students_session_never_reaches_another_students_server(klass):
    c = klass.course
    a, b = c.usernames
    s_a = klass.login(a)
    s_b = klass.login(b)
    # B's server is stopped: B gets the friendly 503, nothing else
    r = c.run("shutdown", "--only", b)
    assert r.returncode == 0, r.stdout + r.stderr
    stopped = s_b.get(f"{klass.url}/user/{b}/lab", timeout=30)
    assert stopped.status_code == 503 and "not running" in stopped.text
    # In its place, a recorder as B on B's socket: every connection that reaches it is noted.
    log = Path(f"/tmp/recorder-{secrets.token_hex(4)}.log")
    log.touch()
    os.chown(log, c.pw(b).pw_uid, c.pw(b).pw_gid)
    sock = f"/run/classroom/{c.name}/servers/{b}/server.sock"
    assert not Path(sock).parent.exists(), "shutdown left the stopped server's socket folder"
    prepare_socket_dir(load(c.config), c.pw(b))
    # the recorder is B's process itself (no runuser above it): kill() below ends it
    recorder = as_student(c, b, RECORDER, sock, str(log))
    try:
        deadline = time.monotonic() + 60
        while not Path(f"{log}.ready").exists() and time.monotonic() < deadline:
            assert recorder.poll() is None, "the recorder did not start"
            time.sleep(0.1)
        assert Path(f"{log}.ready").exists()
        ws = "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        origin = f"Origin: {klass.url}\r\n"
        for line in cross_user_requests(a, b):
            for extra in ("", origin, origin + "Connection: Upgrade\r\n" + ws):
                if extra and not line.startswith("GET") and "Upgrade" in extra:
                    continue
                code = klass.raw(line, s_a, extra + "Content-Length: 0\r\n")
                assert code in (400, 403, 404), (line, extra, code)
                assert log.read_bytes() == b"", f"{line!r} reached {b}'s server"
        # the recorder works: B's own session reaches it (with nothing of the portal's)
        s_b.cookies.set("evil", "1")
        got = s_b.get(
            f"{klass.url}/user/{b}/api/contents", headers={"Authorization": "token abc"}, timeout=30
        )
        assert got.text == "recorded", (got.status_code, got.text[-600:])
        seen = log.read_text()
        assert f"GET /user/{b}/api/contents" in seen
        assert "classroom-session" not in seen and "authorization" not in seen.lower()
        assert "evil" not in seen
        # a student's own odd paths go to their own server, never to B's
        assert klass.raw(f"GET /user/{a}/../{b}/api/contents HTTP/1.1", s_a) == 404
        assert log.read_text().count("GET ") == 1
    finally:
        recorder.kill()
        recorder.wait()
        for path in (log, Path(f"{log}.ready")):
            path.unlink(missing_ok=True)
        r = c.run("launch", "--no-portal", "--only", b)
        assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.root
def test_a_socket_swapped_for_a_link_to_another_students_is_refused(klass):
    """Root follows links; the student owns their socket's folder: the peer's uid decides."""
    c = klass.course
    a, b = c.usernames
    s_a = klass.login(a)
    folder = Path(f"/run/classroom/{c.name}/servers/{a}")
    real = folder / "real.sock"
    pw = c.pw(a)
    swap = subprocess.run(
        [
            "runuser",
            "-u",
            a,
            "--",
            "sh",
            "-c",
            f"mv {folder}/server.sock {real} && ln -s ../{b}/server.sock {folder}/server.sock",
        ],
        capture_output=True,
        text=True,
    )
    assert swap.returncode == 0, swap.stderr
    try:
        r = s_a.get(f"{klass.url}/user/{a}/api/contents", timeout=30)
        assert r.status_code == 503
    finally:
        (folder / "server.sock").unlink()
        os.rename(real, folder / "server.sock")
        assert (folder / "server.sock").stat().st_uid == pw.pw_uid
    assert s_a.get(f"{klass.url}/user/{a}/api/contents", timeout=30).status_code == 200


@pytest.mark.root
def test_an_answer_the_portal_gives_itself_under_user_closes_the_connection(klass):
    """The portal refuses under /user/ before reading the (streamed) body, and then closes
    the connection: the answer says so, or a client that reuses it loses its next request."""
    a, b = klass.course.usernames
    s_a = klass.login(a)
    for session, path, code in (
        (klass.session(), f"/user/{a}/lab", 403),
        (s_a, f"/user/{b}/lab", 403),
    ):
        r = session.get(klass.url + path, timeout=30, allow_redirects=False)
        assert r.status_code == code and r.headers.get("Connection") == "close", r.headers
    assert s_a.get(f"{klass.url}/user/{a}/api/contents", timeout=30).status_code == 200


@pytest.mark.root
def test_not_logged_in_gets_the_login_form_and_nothing_is_forwarded(klass):
    a = klass.course.usernames[0]
    r = klass.get(f"/user/{a}/lab")
    assert r.status_code == 403 and 'type="password"' in r.text
    assert f'value="/user/{a}/lab"' in r.text  # back there after logging in


@pytest.mark.root
def test_too_many_wrong_passwords_get_429_until_the_window_passed(klass):
    """A portal of its own (the rate limit is in memory), on the same course."""
    c = klass.course
    a, b = c.usernames
    settings = load(c.config).replace(portal_port=0)
    portal = RunningPortal(settings, lambda: {})
    try:
        url = f"https://127.0.0.1:{portal.port}/login"

        def attempt(username: str, password: str, source: str = "127.0.0.1"):
            context = ssl.create_default_context(cafile=str(klass.cert))
            conn = http.client.HTTPSConnection(
                "127.0.0.1", portal.port, context=context, timeout=60, source_address=(source, 0)
            )
            body = f"username={username}&password={password}"
            conn.request(
                "POST", "/login", body, {"Content-Type": "application/x-www-form-urlencoded"}
            )
            response = conn.getresponse()
            response.read()
            conn.close()
            return response.status, response.getheader("Retry-After")

        assert url
        with ThreadPoolExecutor(LIMIT) as pool:
            codes = list(pool.map(lambda _: attempt(a, "wrong")[0], range(LIMIT)))
        assert codes == [403] * LIMIT
        code, retry = attempt(a, "wrong")  # the eleventh failure
        assert code == 429 and 0 < int(retry) <= sessions.WINDOW
        assert attempt(a, klass.creds[a]["password"])[0] == 429  # the right one waits too
        assert attempt(a, klass.creds[a]["password"], "127.0.0.2")[0] == 429  # per username
        assert attempt(b, klass.creds[b]["password"], "127.0.0.2")[0] == 303
        # per address: failures for many names from one address
        with ThreadPoolExecutor(LIMIT + 1) as pool:
            list(pool.map(lambda i: attempt(f"tnobody{i}", "x", "127.0.0.3"), range(LIMIT + 1)))
        assert attempt(b, klass.creds[b]["password"], "127.0.0.3")[0] == 429
    finally:
        portal.close()


@pytest.mark.root
def test_healthz_counts_the_servers_on_sockets(klass):
    r = klass.get("/healthz")
    assert r.json() == {"status": "ok", "course": klass.course.name, "running": 2}


@pytest.mark.root
def test_a_new_password_logs_out_whoever_used_the_old_one(klass):
    """A slip was lost: the teacher gives that student a new password; a browser that
    logged in with the old one is out (within the portal's short cache), the new one works."""
    c = klass.course
    b = c.usernames[1]
    thief = klass.login(b)
    contents = f"{klass.url}/user/{b}/api/contents"
    assert thief.get(contents, timeout=30).status_code == 200
    r = c.run("setup", "--yes", "--reset-passwords", "--only", b)
    assert r.returncode == 0, r.stdout + r.stderr
    old, klass.creds = klass.creds, c.credentials()
    assert klass.creds[b]["password"] != old[b]["password"]
    code = answer_once_ended(thief, contents)
    assert code == 403, "a session made with the old password still reaches the server"
    r = klass.session().post(
        klass.url + "/login",
        data={"username": b, "password": old[b]["password"]},
        timeout=30,
        allow_redirects=False,
    )
    assert r.status_code == 403
    s = klass.login(b)  # the new password; the server runs
    deadline = time.monotonic() + 60
    while s.get(contents, timeout=30).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert s.get(contents, timeout=30).status_code == 200


@pytest.mark.root
def test_a_password_changed_outside_the_course_ends_the_sessions_made_with_the_old_one(klass):
    """The student suspects a classmate saw their password and changes it (``passwd``;
    here ``chpasswd``, the same change to /etc/shadow): whoever logged in with the old one
    is out, an open kernel connection too; the new one logs in."""
    c = klass.course
    a = c.usernames[0]
    old_session = klass.login(a)
    contents = f"{klass.url}/user/{a}/api/contents"
    assert old_session.get(contents, timeout=30).status_code == 200
    ws = kernel_websocket(klass, old_session, a)
    new = "Nw-" + secrets.token_urlsafe(12)
    subprocess.run(["chpasswd"], input=f"{a}:{new}\n", text=True, check=True)
    klass.creds[a] = {**klass.creds[a], "password": new}
    code = answer_once_ended(old_session, contents)
    assert code == 403, "a session made with the old password still reaches the server"
    assert closed_within(ws, 2 * sessions.CACHE_SECONDS + 30), "its kernel connection stays open"
    fresh = klass.login(a)
    assert fresh.get(contents, timeout=30).status_code == 200


def test_sessions_made_with_another_password_have_ended(tmp_path):
    """Unit: a session keeps the stamp it was made with; another stamp now ends it."""
    now = {"ada": "one"}
    store = sessions.Sessions(tmp_path, stamp=lambda u: now.get(u))
    ada = store.create("ada")
    assert store.user(ada) == "ada"
    now["ada"] = "two"
    store.cache.clear()  # as CACHE_SECONDS later
    assert store.user(ada) is None
    assert store.user(ada) is None  # ended for good, also if the stamp came back
    now["ada"] = "one"
    store.cache.clear()
    assert store.user(ada) is None
    del now["ada"]  # the account is gone
    bob = store.create("bob")
    store.cache.clear()
    assert store.user(bob) is None
    store.close()


def test_end_users_ends_only_their_sessions(tmp_path):
    store = sessions.Sessions(tmp_path)
    try:
        mine = [store.create("alice"), store.create("alice")]
        theirs = store.create("bob")
    finally:
        store.close()
    assert sessions.end_users(tmp_path, {"alice", "carol"}) == 2
    store = sessions.Sessions(tmp_path)
    try:
        assert [store.user(x) for x in mine] == [None, None]
        assert store.user(theirs) == "bob"
    finally:
        store.close()
    assert sessions.end_users(tmp_path / "nothing-here", {"bob"}) == 0


def test_the_uid_behind_a_socket_decides(tmp_path):
    """peer_uid is what connect() trusts: it is the listener's uid (here: ours)."""
    from classroom.host.server import peer_uid

    path = tmp_path / "s.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(path))
    try:
        assert peer_uid(client) == os.getuid() == pwd.getpwuid(os.getuid()).pw_uid
    finally:
        client.close()
        listener.close()


@pytest.mark.root
def test_switching_from_redirect_to_proxy_takes_the_key_copies_away(make_course, tmp_path):
    c = make_course(1)
    (u,) = c.usernames
    cert, key = make_certificate(tmp_path)
    c.write_config(launch={"certfile": str(cert), "keyfile": str(key), "app": "server"})
    assert c.run("setup", "--yes").returncode == 0
    try:
        r = c.run("launch", "--no-portal")
        assert r.returncode == 0, r.stdout + r.stderr
        copies = c.home(u) / ".jupyter" / "classroom-tls"
        assert (copies / "key.pem").exists()
        c.write_config(launch={"access": "proxy"})
        r = c.run("launch", "--no-portal")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "access = proxy" in r.stdout  # the running server was restarted
        assert not copies.exists()
        st = status(c)[u]
        assert st["server"] == "running" and st["port"] is None
        assert st["url"].endswith(f"/user/{u}/")
    finally:
        c.run("shutdown")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


@pytest.mark.root
def test_detached_portal_outlives_launch_comes_back_keeps_sessions_and_stops_with_shutdown(
    make_course,
):
    c = make_course(1)
    (u,) = c.usernames
    c.write_config(launch={"access": "proxy", "ip": "127.0.0.1", "app": "server"})
    assert c.run("setup", "--yes").returncode == 0
    url = f"http://127.0.0.1:{c.sections['launch']['portal_port']}"
    try:
        r = c.run("launch", "--detach")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "in the background" in r.stdout
        entry = status(c)[u]["portal"]
        assert entry is not None and entry["url"] == url + "/"
        supervisor = psutil.Process(entry["pid"])
        assert os.getsid(supervisor.pid) == supervisor.pid  # its own session: no terminal
        assert supervisor.ppid() != os.getpid()  # launch has exited; it was re-parented
        assert "portal: running in the background" in c.run("status").stdout
        s = requests.Session()
        r = s.post(
            url + "/login",
            data={"username": u, "password": c.credentials()[u]["password"]},
            allow_redirects=False,
            timeout=30,
        )
        assert r.status_code == 303
        assert s.get(f"{url}/user/{u}/api/contents", timeout=30).status_code == 200

        again = c.run("launch", "--detach")
        assert again.returncode == 0 and "already running in the background" in again.stdout
        assert "0 failed" in again.stdout and "started (" not in again.stdout
        assert status(c)[u]["portal"] == entry

        (child,) = supervisor.children()
        child.kill()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException, psutil.Error):
                if supervisor.children() and requests.get(url + "/healthz", timeout=2).ok:
                    break
            time.sleep(0.2)
        assert [p.pid for p in supervisor.children()] != [child.pid]
        # logged in before the restart, still logged in
        assert s.get(f"{url}/user/{u}/api/contents", timeout=30).status_code == 200
    finally:
        done = c.run("shutdown")
    assert done.returncode == 0 and "portal: stopped" in done.stdout, done.stdout + done.stderr
    with contextlib.suppress(psutil.NoSuchProcess):  # gone, or a zombie waiting for init
        assert supervisor.status() == psutil.STATUS_ZOMBIE
    assert status(c)[u]["portal"] is None
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/healthz", timeout=5)


def test_detach_takes_neither_no_portal_nor_stop_on_exit(tmp_path):
    (tmp_path / "students.csv").write_text("username\nada\n")
    state = tmp_path / "state"
    (tmp_path / "c.cfg").write_text(
        f"[course]\nname = demo\nroster = students.csv\nstate_dir = {state}\n"
    )
    for other in ("--no-portal", "--stop-on-exit"):
        r = run_cli("launch", str(tmp_path / "c.cfg"), "--detach", other)
        assert r.returncode == 2 and "--detach" in r.stderr, r.stdout + r.stderr
    assert not state.exists()


@pytest.mark.root
def test_separate_notebook_password_logs_in_and_a_planted_link_is_not_followed(make_course):
    c = make_course(2)
    a, b = c.usernames
    c.write_config(
        accounts={"notebook_password": "separate"}, launch={"access": "proxy", "ip": "127.0.0.1"}
    )
    assert c.run("setup", "--yes").returncode == 0
    creds = c.credentials()
    assert creds[a]["notebook_password"] != creds[a]["password"]
    portal = RunningPortal(load(c.config).replace(portal_port=0), lambda: {})
    try:

        def login(username: str, password: str) -> int:
            r = requests.post(
                f"{portal.base}/login",
                data={"username": username, "password": password},
                allow_redirects=False,
                timeout=30,
            )
            return r.status_code

        assert login(a, creds[a]["notebook_password"]) == 303
        assert login(a, creds[a]["password"]) == 403  # the Unix password is not this one
        # A points their ~/.jupyter at B's: B's hash is never read for A
        jupyter = c.home(a) / ".jupyter"
        subprocess.run(
            ["runuser", "-u", a, "--", "sh", "-c", f"mv {jupyter} {jupyter}.old"], check=True
        )
        os.symlink(c.home(b) / ".jupyter", jupyter)
        os.lchown(jupyter, c.pw(a).pw_uid, c.pw(a).pw_gid)
        assert login(a, creds[b]["notebook_password"]) == 403
        assert login(a, creds[a]["notebook_password"]) == 403
    finally:
        portal.close()


@pytest.mark.root
def test_remove_takes_the_courses_run_folder_away(make_course):
    c = make_course(1)
    c.write_config(launch={"access": "proxy", "ip": "127.0.0.1", "app": "server"})
    assert c.run("setup", "--yes").returncode == 0
    assert c.run("launch", "--no-portal").returncode == 0
    run = Path(f"/run/classroom/{c.name}")
    assert (run / "servers" / c.usernames[0]).is_dir()
    r = c.run("remove", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not run.exists()
