"""access = proxy in a real browser (Playwright driving Debian's chromium), over HTTPS with a
self-signed certificate made here; and redirect mode's fix for a teacher with several
students' servers in one browser.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import subprocess
import time
from pathlib import Path

import pytest
import requests
from chromium import (
    ARTIFACTS,
    CHROMIUM,
    CHROMIUM_ARGS,
    needs_chromium,
    new_notebook,
    run_cell,
    screenshot_on_failure,
    wait_for_42,
    watch_console,
)
from conftest import PYTHON, RunningPortal, free_port
from proxyclass import running_class

from classroom.core.settings import load

pytestmark = [
    pytest.mark.browser,
    pytest.mark.root,
    needs_chromium,
]


@pytest.fixture(scope="module")
def klass(tmp_path_factory):
    yield from running_class(tmp_path_factory.mktemp("proxy-browser"))


def log_in(context, klass, username: str, password: str | None = None):
    page = context.new_page()
    page.set_default_timeout(90_000)
    page.goto(klass.url + "/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password or klass.creds[username]["password"])
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(f"{klass.url}/user/{username}/**")
    return page


@pytest.mark.timeout(900)
def test_student_logs_in_runs_a_cell_a_terminal_and_moves_50_mb_both_ways(browser, klass, tmp_path):
    c = klass.course
    u = c.usernames[0]
    context = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 900})
    page = None
    try:
        page = log_in(context, klass, u)
        problems = watch_console(page)
        page.wait_for_url(f"{klass.url}/user/{u}/lab**")
        cookies = {x["name"]: x for x in context.cookies()}
        session = cookies["__Host-classroom-session"]
        assert session["httpOnly"] and session["secure"] and session["sameSite"] == "Lax"
        # JupyterLab, without news or update pop-ups
        editor = new_notebook(page)
        run_cell(page, editor, "print(6*7)")
        wait_for_42(page, editor)
        assert page.locator(".jp-Notification-Toast").count() == 0, "a pop-up was shown"
        page.screenshot(path=str(ARTIFACTS / "proxy-notebook.png"))

        # a terminal: what it runs, it runs as the student
        page.locator('.lm-MenuBar-itemLabel:text-is("File")').click()
        page.locator('.lm-Menu-itemLabel:text-is("New")').hover()
        page.locator('.lm-Menu-itemLabel:text-is("Terminal")').click()
        page.locator(".jp-Terminal").last.wait_for()
        time.sleep(2)  # the shell prompt
        page.locator(".jp-Terminal").last.click()
        page.keyboard.type("whoami > ~/whoami.txt\n")
        whoami = c.home(u) / "whoami.txt"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (whoami.exists() and whoami.read_text()):
            time.sleep(0.3)
        assert whoami.read_text().strip() == u

        # upload 50 MB through the file browser, then download it back
        big = tmp_path / "big.bin"
        data = os.urandom(50 << 20)
        big.write_bytes(data)
        upload = page.locator('.jp-FileBrowser-toolbar [title*="Upload"]').first
        if not upload.is_visible():
            page.locator('.lm-TabBar-tab[data-id="filebrowser"]').click()
        with page.expect_file_chooser() as chooser:
            upload.click()
        chooser.value.set_files(str(big))
        page.locator('.jp-Dialog button:has-text("Upload")').click()  # "large file": yes
        folder = c.home(u) / "tutorial"
        uploaded = folder / "big.bin"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if uploaded.exists() and uploaded.stat().st_size == len(data):
                break
            time.sleep(0.5)
        assert uploaded.exists(), "the upload did not arrive"
        assert hashlib.sha256(uploaded.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
        with page.expect_download(timeout=300_000) as download:
            page.evaluate(
                "url => { const a = document.createElement('a'); a.href = url; "
                "a.download = 'big.bin'; document.body.appendChild(a); a.click(); }",
                f"/user/{u}/files/big.bin",
            )
        got = Path(download.value.path()).read_bytes()
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
        assert [p for p in problems if "XSRF" in p or "403" in p] == [], problems
    except Exception:
        if page is not None:
            screenshot_on_failure(page, "proxy-e2e-failure.png")
        raise
    finally:
        context.close()


LISTENER = r"""
import http.server, json, sys
host, port, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]

class Grab(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        with open(log, "a") as f:
            f.write(json.dumps({"path": self.path, "headers": dict(self.headers.items())}) + "\n")
        body = b"<html><body>a classmate's page</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

http.server.HTTPServer((host, port), Grab).serve_forever()
"""


# The class host as a name that resolves to loopback only inside the test's browser:
# browsers treat http://127.0.0.1 and http://localhost as secure origins and send them
# Secure cookies, which a real class host name never gets; this name is not one of those,
# and no traffic leaves 127.0.0.0/8.
CLASS_HOST = "classroom.test"


@pytest.mark.timeout(600)
def test_a_classmates_listener_collects_nothing_that_opens_a_server(browser, klass):
    host = CLASS_HOST
    c = klass.course
    a, b = c.usernames
    portal = RunningPortal(load(c.config).replace(ip="127.0.0.1", portal_port=0), lambda: {})
    url = f"https://{host}:{portal.port}"
    direct = f"https://127.0.0.1:{portal.port}"  # the same portal, for the replays below
    port = free_port()
    log = Path(f"/tmp/listener-{secrets.token_hex(4)}.log")
    log.touch()
    os.chown(log, c.pw(a).pw_uid, c.pw(a).pw_gid)
    listener = subprocess.Popen(
        ["runuser", "-u", a, "--", PYTHON, "-c", LISTENER, "127.0.0.1", str(port), str(log)]
    )
    own = browser.browser_type.launch(
        executable_path=CHROMIUM,
        args=[*CHROMIUM_ARGS, f"--host-resolver-rules=MAP {host} 127.0.0.1"],
    )
    context = own.new_context(ignore_https_errors=True)
    try:
        page = context.new_page()
        page.set_default_timeout(90_000)
        page.goto(url + "/")
        page.get_by_label("Username").fill(b)
        page.get_by_label("Password").fill(klass.creds[b]["password"])
        page.get_by_role("button", name="Log in").click()
        page.wait_for_url(f"{url}/user/{b}/lab**")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                requests.get(f"http://127.0.0.1:{port}/", timeout=2)
                break
            time.sleep(0.2)
        # B follows a classmate's links: the page, and paths like B's own server's
        for path in ("/x.png", f"/user/{b}/", f"/user/{b}/api/contents", "/"):
            page.goto(f"http://{host}:{port}{path}")
        grabbed = [json.loads(line) for line in log.read_text().splitlines()]
        assert len(grabbed) >= 4
        # Replay everything the listener got against the portal: no way into B's server.
        for request in grabbed:
            headers = {
                k: v
                for k, v in request["headers"].items()
                if k.lower() not in ("host", "connection")
            }
            for path in (f"/user/{b}/api/contents", f"/user/{b}/lab"):
                s = klass.session()
                s.verify = False  # the certificate names 127.0.0.1, not the class's name
                r = s.get(direct + path, headers=headers, timeout=30, allow_redirects=False)
                assert r.status_code == 403, (path, headers)
        cookies = " ".join(r["headers"].get("Cookie", "") for r in grabbed)
        assert "classroom-session" not in cookies and "_xsrf" not in cookies
        # and B's own browser is still in
        assert page.goto(f"{url}/user/{b}/api/contents").status == 200
    finally:
        context.close()
        own.close()
        listener.kill()
        listener.wait()
        log.unlink(missing_ok=True)
        portal.close()


@pytest.mark.timeout(900)
def test_redirect_mode_one_browser_saves_in_two_students_servers(browser, make_course):
    """Every server under /user/NAME/: their _xsrf and login cookies no longer clash."""
    c = make_course(2)
    a, b = c.usernames
    c.write_config(launch={"ip": "127.0.0.1", "start_mode": "exec"})
    assert c.run("setup", "--yes").returncode == 0
    creds = c.credentials()
    try:
        r = c.run("launch", "--no-portal")
        assert r.returncode == 0, r.stdout + r.stderr
        rows = {row["username"]: row for row in json.loads(c.run("status", "--json").stdout)}
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        pages = {}
        try:
            for u in (a, b):  # log in to both first: the second login used to clobber the first
                page = context.new_page()
                page.set_default_timeout(90_000)
                problems = watch_console(page)
                page.goto(rows[u]["url"] + "lab")
                page.fill("input[type=password]", creds[u]["notebook_password"])
                page.locator("#login_submit, button[type=submit]").first.click()
                page.wait_for_url(f"**/user/{u}/lab**")
                pages[u] = (page, problems)
            for u in (a, b):
                page, problems = pages[u]
                page.bring_to_front()
                editor = new_notebook(page)
                run_cell(page, editor, f"saved_by = {u!r}")
                save = page.locator(
                    '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Toolbar [title^="Save"]'
                ).first
                with page.expect_response(
                    lambda r: r.request.method == "PUT" and f"/user/{u}/api/contents/" in r.url
                ) as saved:
                    save.click()
                    page.locator('.jp-Dialog button:has-text("Save")').click()  # first save
                assert saved.value.status == 200, saved.value.text()[:300]  # no XSRF 403
                notebook = c.home(u) / "tutorial" / "Untitled.ipynb"
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    if notebook.exists() and f"saved_by = '{u}'" in notebook.read_text():
                        break
                    time.sleep(0.3)
                assert f"saved_by = '{u}'" in notebook.read_text()
                dialogs = page.locator(".jp-Dialog").all_inner_texts()
                assert not [d for d in dialogs if "XSRF" in d or "403" in d], dialogs
                assert not [p for p in problems if "XSRF" in p], problems
        except Exception:
            for u, (page, _) in pages.items():
                screenshot_on_failure(page, f"redirect-two-servers-failure-{u}.png")
            raise
        finally:
            context.close()
    finally:
        c.run("shutdown")
