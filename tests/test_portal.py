"""The portal over real HTTP: a real portal on a free port, students' "servers" that are
tiny real HTTP servers, and a fake lookup of the running servers. No root needed."""

from __future__ import annotations

import base64
import hashlib
import http.client
import http.server
import json
import re
import signal
import socket
import ssl
import subprocess
import sys
import textwrap

import pytest
import requests
from conftest import ROOT, FakeCourse, RunningPortal, TinyServer, make_settings

from classroom.core.errors import EXIT_PARTIAL, InvalidInput
from classroom.host import portal

# --- helpers -------------------------------------------------------------------------------


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def students():
    """alice and bob run a server; carol's server stopped (not in the lookup); dave's record is
    stale (his port answers nothing)."""
    alice, bob = TinyServer("alice"), TinyServer("bob")
    running = {
        "alice": {"port": alice.port, "url": f"http://0.0.0.0:{alice.port}/"},
        "bob": {"port": bob.port, "url": f"http://0.0.0.0:{bob.port}/lab"},
        "dave": {"port": dead_port(), "url": "http://0.0.0.0:1/"},
    }
    yield {"alice": alice, "bob": bob, "running": running}
    alice.close()
    bob.close()


@pytest.fixture
def calls():
    return []


@pytest.fixture
def make_portal(students, calls):
    made = []

    def make(lookup=None, **changes):
        def default_lookup():
            calls.append(1)
            return students["running"]

        p = RunningPortal(make_settings(**changes), lookup or default_lookup)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


@pytest.fixture
def web(make_portal):
    return make_portal()


# --- pure functions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header, host",
    [
        ("localhost", "localhost"),
        ("localhost:8000", "localhost"),
        ("Class.Example.ORG:8000", "class.example.org"),
        ("class.example.org.", "class.example.org"),
        ("127.0.0.1:8000", "127.0.0.1"),
        ("10.1.2.3", "10.1.2.3"),
        ("[::1]:8000", "[::1]"),
        ("[2001:DB8:0:0::1]", "[2001:db8::1]"),
        ("my-host", "my-host"),
    ],
)
def test_host_header_accepted(header, host):
    assert portal.host_from_header(header) == host


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "evil.com@x",
        "user:pass@evil.com",
        "x:1/..",
        "evil.com/x",
        "evil.com\\x",
        "evil.com?x",
        "evil.com#x",
        "evil.com\r\nSet-Cookie: a=b",
        "evil.com\nx",
        "a b",
        "evil.com:",
        "evil.com:abc",
        "evil.com:99999",
        "evil.com:80:80",
        "evil.com,good.com",
        "évil.com",
        "_x.example",
        "-evil.com",
        "evil-.com",
        "evil..com",
        "999.1.1.1",
        "1.2.3",
        "[::1",
        "[fe80::1%eth0]",
        "[::1]x",
        "[::1]:99999",
        "[evil.com]",
        "http://evil.com",
        "a" * 64 + ".com",
        ("a." * 130) + "com",
    ],
)
def test_host_header_refused(header):
    assert portal.host_from_header(header) is None


@pytest.mark.parametrize(
    "typed, username",
    [
        ("alice", "alice"),
        ("  Alice ", "alice"),
        ("ALICE", "alice"),
        ("\talice\n", "alice"),
        ("_a-1", "_a-1"),
        ("", None),
        ("   ", None),
        ("al ice", None),
        ("1alice", None),
        ("-alice", None),
        ("alice/..", None),
        ("../alice", None),
        ("//evil.com", None),
        ("alice@evil.com", None),
        ("\u212aelly", None),  # KELVIN SIGN lower-cases to ASCII 'k'
        ("ålice", None),
        ("a" * 33, None),
        ("alice\x00", None),
        ("alice\r\nx", None),
    ],
)
def test_clean_username(typed, username):
    assert portal.clean_username(typed) == username


@pytest.mark.parametrize(
    "value, host",
    [
        ("class.example.org", "class.example.org"),
        ("10.0.0.5", "10.0.0.5"),
        ("::1", "[::1]"),
        ("[::1]", "[::1]"),
    ],
)
def test_server_address_accepted(value, host):
    assert portal.host_from_setting(value) == host


@pytest.mark.parametrize(
    "value",
    ["http://class.example.org", "class.example.org:8000", "class.example.org/x", "a b", "x@y"],
)
def test_server_address_refused_at_start(value):
    with pytest.raises(InvalidInput, match="server_address"):
        portal.make_app(make_settings(server_address=value), lambda: {})


# --- the landing page ------------------------------------------------------------------------


def test_landing_page_has_title_and_form_but_no_students(web):
    r = web.get("/")
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/html")
    page = r.text
    assert "<h1>Intro to Python</h1>" in page
    assert "<title>Intro to Python</title>" in page
    assert '<form method="get" action="/go">' in page
    for name in ("alice", "bob", "dave"):
        assert name not in page
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    assert '<html lang="en">' in page


def test_landing_form_is_accessible_and_phone_friendly(web):
    page = web.get("/").text
    assert '<label for="username">' in page
    tag = re.search(r"<input[^>]*>", page, re.S).group(0)
    for attr in (
        'id="username"',
        'name="username"',
        'autocapitalize="off"',
        'autocorrect="off"',
        'spellcheck="false"',
        'autocomplete="username"',
        "required",
    ):
        assert attr in tag
    assert '<button type="submit">' in page


def test_landing_page_needs_nothing_from_outside(web):
    page = web.get("/").text
    assert "<script" not in page.lower()
    assert not re.search(r"(src|href)\s*=\s*[\"'](?!data:|/)", page), "no external resource"
    assert "http://" not in page and "https://" not in page
    assert " style=" not in page, "no style attributes: CSP allows the one <style> only"


def test_title_is_escaped(make_portal):
    p = make_portal(title='<script>alert("x")</script> & Co')
    page = p.get("/").text
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; Co" in page


def test_head_of_landing_page(web):
    r = requests.head(web.base + "/", timeout=10)
    assert r.status_code == 200
    assert r.headers["X-Frame-Options"] == "DENY"


# --- security headers --------------------------------------------------------------------------


def check_security_headers(headers):
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "no-referrer"
    assert headers["Cache-Control"] == "no-store"
    policy = headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy
    assert "frame-ancestors 'none'" in policy
    assert "base-uri 'none'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert "script-src" not in policy  # falls back to default-src 'none': no script at all
    assert "Server" not in headers
    assert "Set-Cookie" not in headers


@pytest.mark.parametrize(
    "path", ["/", "/user/alice", "/user/carol", "/go?username=", "/healthz", "/nope"]
)
def test_security_headers_everywhere(web, path):
    check_security_headers(web.get(path).headers)


def test_csp_allows_exactly_the_inline_style(web):
    r = web.get("/")
    styles = re.findall(r"<style>(.*?)</style>", r.text, re.S)
    assert len(styles) == 1
    digest = base64.b64encode(hashlib.sha256(styles[0].encode()).digest()).decode()
    assert f"style-src 'sha256-{digest}'" in r.headers["Content-Security-Policy"]


def test_csp_lets_the_form_go_to_the_servers_host_only(web):
    policy = web.get("/", headers={"Host": "class.example.org:8000"}).headers[
        "Content-Security-Policy"
    ]
    assert "form-action 'self' http://class.example.org:*;" in policy


# --- redirects -------------------------------------------------------------------------------


def test_user_link_redirects_to_the_students_server(web, students):
    r = web.get("/user/alice")
    assert r.status_code == 302
    assert r.headers["Location"] == f"http://127.0.0.1:{students['alice'].port}/"
    followed = web.get("/user/alice", allow_redirects=True)
    assert followed.status_code == 200
    assert followed.text == "hello from alice"


def test_redirect_keeps_the_recorded_path_only(web, students):
    r = web.get("/user/bob/")
    assert r.headers["Location"] == f"http://127.0.0.1:{students['bob'].port}/lab"


def test_form_trims_and_lower_cases(web, students):
    for typed in ("alice", "  Alice  ", "ALICE", "%09alice%0A"):
        r = web.get(f"/go?username={typed}")
        assert r.status_code == 302, typed
        assert r.headers["Location"] == f"http://127.0.0.1:{students['alice'].port}/"
    r = web.get("/go?username=+Bob+", allow_redirects=True)
    assert r.text == "hello from bob"


def test_form_by_post_too(web, students):
    r = requests.post(
        web.base + "/go", data={"username": " Alice"}, allow_redirects=False, timeout=10
    )
    assert r.status_code == 302
    assert r.headers["Location"] == f"http://127.0.0.1:{students['alice'].port}/"


def test_lookup_is_read_on_every_request(web, students, calls):
    before = len(calls)
    web.get("/user/alice")
    web.get("/user/alice")
    web.get("/healthz")
    assert len(calls) - before == 3
    eve = TinyServer("eve")
    try:
        assert web.get("/user/eve").status_code == 404
        students["running"]["eve"] = {"port": eve.port, "url": ""}
        assert web.get("/user/eve", allow_redirects=True).text == "hello from eve"
    finally:
        eve.close()


def test_host_the_browser_used_is_the_redirect_host(web, students):
    port = students["alice"].port
    for host, expect in [
        ("class.example.org:8000", "class.example.org"),
        ("CLASS.example.org", "class.example.org"),
        ("10.0.0.7:8000", "10.0.0.7"),
        ("[::1]:8000", "[::1]"),
    ]:
        r = web.get("/user/alice", headers={"Host": host})
        assert r.headers["Location"] == f"http://{expect}:{port}/", host


def test_server_address_wins_over_host_header(make_portal, students):
    p = make_portal(server_address="class.example.org")
    r = p.get("/user/alice", headers={"Host": "other.example.org"})
    assert r.headers["Location"] == f"http://class.example.org:{students['alice'].port}/"
    assert (
        "form-action 'self' http://class.example.org:*"
        in p.get("/").headers["Content-Security-Policy"]
    )


# --- not running: one friendly 404 -------------------------------------------------------------


def test_unknown_and_stopped_get_the_same_friendly_404(web):
    unknown = web.get("/user/zed")  # not in the course at all
    stopped = web.get("/user/carol")  # in the course, server stopped
    stale = web.get("/user/dave")  # recorded, but nothing answers on the port
    for r in (unknown, stopped, stale):
        assert r.status_code == 404
        assert "Location" not in r.headers
        assert "no running server for" in r.text
        assert "ask your teacher" in r.text
        assert '<form method="get" action="/go">' in r.text
    assert (
        unknown.text.replace("zed", "X")
        == stopped.text.replace("carol", "X")
        == stale.text.replace("dave", "X")
    )
    assert web.get("/go?username=Carol").text == stopped.text


def test_404_page_offers_the_name_again(web):
    page = web.get("/go?username=Zed").text
    assert 'value="zed"' in page


def test_empty_username(web):
    r = web.get("/go?username=+++")
    assert r.status_code == 400
    assert "Location" not in r.headers
    assert "Type your username" in r.text
    assert web.get("/go").status_code == 400


def test_404_for_any_other_page(web):
    for path in ("/nope", "/favicon.ico", "/user", "/user/alice/x", "/static/../../etc/passwd"):
        r = web.get(path)
        assert r.status_code == 404, path
        assert "Page not found" in r.text
        assert "Traceback" not in r.text


def test_other_methods_get_a_friendly_page(web):
    r = requests.post(web.base + "/", timeout=10)
    assert r.status_code == 405
    assert "<h1>Intro to Python</h1>" in r.text
    assert "Traceback" not in r.text
    r = requests.request("DELETE", web.base + "/user/alice", timeout=10, allow_redirects=False)
    assert r.status_code == 405
    assert "Location" not in r.headers


@pytest.mark.parametrize(
    "entry",
    [
        {"port": "8001", "url": "http://x:8001/"},
        {"port": 0, "url": ""},
        {"port": True, "url": ""},
        {"port": 70000, "url": ""},
        {"port": None, "url": None},
        "8001",
        None,
    ],
)
def test_a_bad_record_is_not_running(make_portal, entry):
    p = make_portal(lookup=lambda: {"alice": entry})
    r = p.get("/user/alice")
    assert r.status_code == 404
    assert "Location" not in r.headers
    assert p.get("/healthz").json()["running"] == 0


@pytest.mark.parametrize(
    "url, path",
    [
        ("//evil.com/x", "/x"),  # only the path of a recorded URL is used, never its host
        ("http://evil.com//evil.com", "/"),
        ("http://evil.com/lab", "/lab"),
        ("/../../x", "/"),
        ("/a/../b", "/"),
        ("/%2e%2e/", "/"),
        ("/a b", "/"),
        ("/lab?token=x", "/lab"),
        (42, "/"),
    ],
)
def test_a_hostile_recorded_path_falls_back_to_root(make_portal, students, url, path):
    port = students["alice"].port
    p = make_portal(lookup=lambda: {"alice": {"port": port, "url": url}})
    assert p.get("/user/alice").headers["Location"] == f"http://127.0.0.1:{port}{path}"


def test_lookup_failure_is_503_not_a_redirect(make_portal):
    def broken():
        raise RuntimeError("state is locked")

    p = make_portal(lookup=broken)
    assert p.get("/").status_code == 200
    r = p.get("/user/alice")
    assert r.status_code == 503
    assert "Location" not in r.headers
    assert "state is locked" not in r.text and "Traceback" not in r.text
    h = p.get("/healthz")
    assert h.status_code == 503
    assert h.json()["status"] == "error"


# --- no open redirect ---------------------------------------------------------------------------

HOSTILE_PATHS = [
    "//evil.com",
    "//evil.com/",
    "///evil.com",
    "/\\evil.com",
    "/%2F%2Fevil.com",
    "/%5Cevil.com",
    "/http://evil.com",
    "/user/../..",
    "/user/../../evil.com",
    "/user/..%2F..",
    "/user/%2e%2e",
    "/user/%2e%2e%2f%2e%2e",
    "/user/%2F%2Fevil.com",
    "/user/%2f%2fevil.com",
    "/user//evil.com",
    "/user///evil.com",
    "/user/alice%2F..%2F..%2Fevil.com",
    "/user/alice%2Fevil.com",
    "/user/alice%0D%0ALocation:%20http://evil.com",
    "/user/alice%0d%0aSet-Cookie:%20x=1",
    "/user/alice%0A",
    "/user/alice%00",
    "/user/alice%20",
    "/user/@evil.com",
    "/user/alice@evil.com",
    "/user/evil.com",
    "/user/http:%2F%2Fevil.com",
    "/user/%E2%84%AAelly",
    "/user/%ff%fe",
    "/user/" + "a" * 40,
    "/user/-alice",
    "/user/1alice",
    "/go?username=//evil.com",
    "/go?username=%2F%2Fevil.com",
    "/go?username=http://evil.com",
    "/go?username=alice@evil.com",
    "/go?username=alice%2F..%2Fevil.com",
    "/go?username=alice%0D%0ALocation:%20http://evil.com",
    "/go?username=evil.com",
    "/go?next=http://evil.com",
    "/go?username=alice/../../evil.com",
    "/?next=//evil.com",
    "/healthz/..%2F..%2Fevil.com",
]


@pytest.mark.parametrize("path", HOSTILE_PATHS)
def test_hostile_paths_never_redirect_elsewhere(web, path):
    status, headers, body = web.get_raw(path)
    locations = headers.get("location", [])
    if status == 302:  # only a valid student name may redirect, and only to their port
        assert locations and re.fullmatch(r"http://127\.0\.0\.1:\d+/", locations[0]), locations
    else:
        assert status in (200, 400, 404), (status, path)
        assert not locations
    assert "set-cookie" not in headers
    assert b"evil.com<" not in body and b"Traceback" not in body


@pytest.mark.parametrize(
    "request_line",
    [
        b"GET http://evil.com/user/alice HTTP/1.1",
        b"GET //evil.com/user/alice HTTP/1.1",
        b"GET @evil.com HTTP/1.1",
        b"GET * HTTP/1.1",
    ],
)
def test_odd_request_targets(web, request_line):
    status, headers, _ = web.raw(request_line + b"\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert status in (400, 404)
    assert "location" not in headers


HOSTILE_HOSTS = [
    b"evil.com@x",
    b"evil.com@127.0.0.1",
    b"x:1/..",
    b"evil.com/",
    b"evil.com/x?",
    b"evil.com\\x",
    b"evil.com:80@good",
    b"evil.com:abc",
    b"evil.com:99999",
    b"a b",
    b"evil.com\r\n x",  # folded onto a second line
    b"evil.com\r\nHost: good.example",  # two Host headers
    b"",
    b"[::1",
    b"[fe80::1%eth0]",
    b"\xc3\xa9vil.com",
    b"_evil.com",
    b"-evil.com",
    b"999.1.1.1",
    b"http://evil.com",
    b"evil.com%2F",
    b"evil.com#",
]


@pytest.mark.parametrize("host", HOSTILE_HOSTS)
def test_hostile_host_headers_fall_back_to_our_address(web, students, host):
    status, headers, body = web.get_raw("/user/alice", host=host)
    if status == 400:  # tornado may refuse the request outright: fine, no redirect
        assert "location" not in headers
        return
    assert status == 302
    assert headers["location"] == [f"http://127.0.0.1:{students['alice'].port}/"]
    # and the landing page's form-action names no such host either
    status, headers, _ = web.get_raw("/", host=host)
    if status == 200:
        assert "evil" not in headers["content-security-policy"][0]


def test_no_host_header_at_all(web, students):
    status, headers, _ = web.raw(b"GET /user/alice HTTP/1.0\r\n\r\n")
    assert status == 302
    assert headers["location"] == [f"http://127.0.0.1:{students['alice'].port}/"]


def test_a_valid_name_in_a_crlf_path_does_not_inject_headers(web):
    status, headers, _ = web.get_raw("/go?username=alice%0D%0ASet-Cookie:%20x=1")
    assert status == 404
    assert "set-cookie" not in headers


def test_404_page_echoes_no_markup(web):
    for path in (
        "/user/%3Cb%3Ehi%3C%2Fb%3E",
        "/go?username=%3Cb%3Ehi%3C/b%3E",
        "/go?username=%22%3E%3Cx",
    ):
        r = web.get(path)
        assert r.status_code == 404
        assert "<b>hi" not in r.text and '"><x' not in r.text


# --- health ---------------------------------------------------------------------------------------


def test_healthz_counts_without_names(web):
    r = web.get("/healthz")
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("application/json")
    data = r.json()
    assert data == {"status": "ok", "course": "intro-python", "running": 3}
    for name in ("alice", "bob", "dave"):
        assert name not in r.text


# --- serve: TLS, signals, errors ---------------------------------------------------------------


def test_https_when_certfile_and_keyfile_are_set(make_portal, students, certificate):
    cert, key = certificate
    p = make_portal(certfile=cert, keyfile=key)
    assert p.urls[0].startswith("https://")
    base = f"https://127.0.0.1:{p.port}"
    r = requests.get(base + "/", verify=str(cert), timeout=10)
    assert r.status_code == 200 and "Intro to Python" in r.text
    r = requests.get(base + "/user/alice", verify=str(cert), allow_redirects=False, timeout=10)
    assert r.headers["Location"] == f"https://127.0.0.1:{students['alice'].port}/"
    assert (
        "form-action 'self' https://127.0.0.1:*"
        in requests.get(base + "/", verify=str(cert), timeout=10).headers["Content-Security-Policy"]
    )
    with pytest.raises(requests.ConnectionError):  # plain HTTP to the HTTPS port: no answer
        requests.get(f"http://127.0.0.1:{p.port}/", timeout=5)
    context = portal.tls_context(make_settings(certfile=cert, keyfile=key))
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_bad_certificate_is_a_clear_error(tmp_path):
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate")
    with pytest.raises(portal.PortalError, match="certfile"):
        portal.serve(FakeCourse(make_settings(certfile=bogus, keyfile=bogus)), lookup=dict)


def test_port_in_use_is_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(portal.PortalError, match="portal_port") as info:
            portal.serve(FakeCourse(make_settings(portal_port=port)), lookup=dict)
    assert info.value.exit_code == EXIT_PARTIAL
    assert "keep running" in info.value.message


SERVE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    from pathlib import Path
    from classroom.host import portal
    from classroom.core.settings import Settings

    class Course:
        settings = Settings(config_file=Path("/tmp/x.cfg"), name="c", roster=Path("/tmp/r"),
                            group="c", state_dir=Path("/tmp/s"), ip="127.0.0.1", portal_port=0)

    portal.serve(Course, lookup=dict, ready=lambda url: print("READY", url, flush=True))
    print("RETURNED", flush=True)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_cleanly_on_signal(sig):
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE_SCRIPT.format(root=str(ROOT))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = proc.stdout.readline()
        assert first.startswith("Portal: http://"), first + proc.stderr.read()
        ready = proc.stdout.readline()
        assert ready.startswith("READY http://")
        url = ready.split()[1]
        assert requests.get(url, timeout=10).status_code == 200
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Portal stopped." in out and "RETURNED" in out
    assert "Traceback" not in err
    with pytest.raises(requests.ConnectionError):
        requests.get(url, timeout=5)


def test_serve_prints_server_address(make_portal):
    p = make_portal(server_address="class.example.org")
    assert p.urls[0] == f"http://class.example.org:{p.port}/"


def test_printed_address_is_the_host_name_students_use(monkeypatch):
    from classroom.core import addresses

    monkeypatch.setattr(portal.socket, "getfqdn", lambda *a: "localhost")
    monkeypatch.setattr(portal.socket, "gethostname", lambda: "classhost")
    s = make_settings(ip="0.0.0.0")
    assert portal.portal_url(s, 8000) == "http://classhost:8000/"
    # the same host as the servers
    assert addresses.server_url(s, 8001, "ada") == "http://classhost:8001/user/ada/"
    monkeypatch.setattr(portal.socket, "getfqdn", lambda *a: "class.example.org")
    assert portal.portal_url(s, 8000) == "http://class.example.org:8000/"


def test_page_source_parses_as_html(web):
    from html.parser import HTMLParser

    class Check(HTMLParser):
        def __init__(self):
            super().__init__()
            self.stack = []

        def handle_starttag(self, tag, attrs):
            if tag not in ("meta", "link", "input", "rect", "path", "br"):
                self.stack.append(tag)

        def handle_startendtag(self, tag, attrs):
            pass

        def handle_endtag(self, tag):
            assert self.stack and self.stack[-1] == tag, (self.stack, tag)
            self.stack.pop()

    for path in ("/", "/user/zed", "/nope", "/go?username="):
        checker = Check()
        checker.feed(web.get(path).text)
        assert checker.stack == [], path


def test_healthz_is_json_even_for_head_less_clients(web):
    conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=10)
    conn.request("GET", "/healthz")
    resp = conn.getresponse()
    assert json.loads(resp.read())["status"] == "ok"
    conn.close()
