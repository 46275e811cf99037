"""The portal in a real browser: Playwright driving Debian's chromium.

The landing page is photographed (desktop and phone) into test-artifacts/; the form is
filled in and followed; and, end to end, a student of a real course goes from the portal
to their own JupyterLab, logs in with the handed-out password and runs print(6*7).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests
from chromium import (
    ARTIFACTS,
    needs_chromium,
    new_notebook,
    run_cell,
    screenshot_on_failure,
    wait_for_42,
    watch_console,
)
from conftest import NOTEBOOKS, PYTHON, RunningPortal, TinyServer, make_settings

pytestmark = [
    pytest.mark.browser,
    needs_chromium,
]


@pytest.fixture
def fake_class():
    """A portal whose lookup points alice at a tiny real HTTP server."""
    alice = TinyServer("alice")
    running = {"alice": {"port": alice.port, "url": f"http://127.0.0.1:{alice.port}/"}}
    p = RunningPortal(make_settings(title="Intro to Python"), lambda: running)
    try:
        yield p
    finally:
        p.close()
        alice.close()


def test_landing_page_looks_right_on_desktop_and_phone(browser, fake_class):
    ARTIFACTS.mkdir(exist_ok=True)
    desktop = browser.new_context(viewport={"width": 1280, "height": 800})
    phone = browser.new_context(**browser.devices["Pixel 7"])
    dark = browser.new_context(**browser.devices["iPhone SE"], color_scheme="dark")
    try:
        for name, context in (("desktop", desktop), ("phone", phone), ("phone-dark", dark)):
            page = context.new_page()
            problems = watch_console(page)
            response = page.goto(fake_class.base + "/")
            assert response.status == 200
            assert page.title() == "Intro to Python"
            assert page.get_by_role("heading", level=1).inner_text() == "Intro to Python"
            field = page.get_by_label("Your username")
            assert field.is_visible()
            assert field.get_attribute("autocapitalize") == "off"
            button = page.get_by_role("button", name="Open my notebooks")
            assert button.is_visible()
            # Fits the screen: no sideways scrolling; text big enough that phones do not zoom.
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
            assert (
                page.evaluate(
                    "parseFloat(getComputedStyle(document.getElementById('username')).fontSize)"
                )
                >= 16
            )
            box = button.bounding_box()
            assert box["height"] >= 44, "a thumb-sized button"
            # The inline style really applied (the CSP hash matches): the button is coloured.
            bg = page.evaluate("getComputedStyle(document.querySelector('button')).backgroundColor")
            assert bg not in ("rgba(0, 0, 0, 0)", "rgb(239, 239, 239)", "rgb(240, 240, 240)"), bg
            page.screenshot(path=str(ARTIFACTS / f"portal-landing-{name}.png"), full_page=True)
            assert not problems, problems
            # The friendly 404, photographed too.
            field.fill("nobody")
            with page.expect_navigation() as nav:
                field.press("Enter")
            assert nav.value.status == 404
            assert "no running server for" in page.inner_text("main")
            page.screenshot(path=str(ARTIFACTS / f"portal-not-found-{name}.png"), full_page=True)
            assert [p for p in problems if "status of 404" not in p] == [], problems
    finally:
        for context in (desktop, phone, dark):
            context.close()


def test_form_sends_the_student_to_their_server(browser, fake_class):
    context = browser.new_context(**browser.devices["Pixel 7"])
    try:
        page = context.new_page()
        problems = watch_console(page)
        page.goto(fake_class.base + "/")
        page.get_by_label("Your username").fill("  Alice ")
        page.get_by_role("button", name="Open my notebooks").click()
        page.wait_for_url("http://127.0.0.1:*/", timeout=10_000)
        assert page.inner_text("body") == "hello from alice"
        assert not problems, problems  # in particular: no form-action CSP violation on the redirect
        page.goto(fake_class.base + "/user/alice")
        assert page.inner_text("body") == "hello from alice"
        response = page.goto(fake_class.base + "/user/%2F%2Fevil.com")
        assert response.status == 404
        assert page.url.startswith(fake_class.base)
    finally:
        context.close()


# --- end to end: a real course, real servers, a real login ---------------------------------------


def wait_for(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"launch exited with {proc.returncode}:\n{log.read_text()}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    pytest.fail(f"the portal did not answer at {url} within {timeout} s:\n{log.read_text()}")


def server_states(course) -> dict[str, str]:
    r = course.run("status", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    return {row["username"]: row["server"] for row in json.loads(r.stdout)}


@pytest.mark.root
@pytest.mark.timeout(900)
def test_student_goes_from_portal_to_notebook_and_runs_a_cell(browser, ready_course, tmp_path):
    course = ready_course
    started = course.run("launch", "--no-portal", "--yes", timeout=600)
    output = started.stdout + started.stderr
    if "not built yet" in output:
        pytest.skip("servers.launch is not built yet (NotImplementedYet): nothing to log in to")
    portal_proc = None
    try:
        assert started.returncode == 0, output
        assert set(server_states(course).values()) == {"running"}

        # The portal as a teacher runs it: launch again (the servers already run, so they
        # are left alone) and it stays in the foreground with the portal.
        log = tmp_path / "launch.log"
        with open(log, "w") as out:
            portal_proc = subprocess.Popen(
                [PYTHON, str(NOTEBOOKS), "launch", str(course.config), "--yes"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={k: v for k, v in os.environ.items() if k != "NOTEBOOKS_CONFIG"},
            )
        portal = f"http://127.0.0.1:{course.sections['launch']['portal_port']}"
        wait_for(portal + "/healthz", 120, portal_proc, log)
        health = requests.get(portal + "/healthz", timeout=5).json()
        assert health == {"status": "ok", "course": course.name, "running": len(course.usernames)}

        username = course.usernames[0]
        creds = course.credentials()[username]
        password = creds.get("notebook_password") or creds["password"]

        context = browser.new_context(viewport={"width": 1280, "height": 900})
        try:
            page = context.new_page()
            page.set_default_timeout(60_000)
            page.goto(portal + "/")
            page.get_by_label("Your username").fill(f" {username.upper()} ")
            page.get_by_role("button", name="Open my notebooks").click()
            # The portal redirects to the student's own server, which asks for the password.
            page.wait_for_selector("input[type=password]")
            assert not page.url.startswith(portal), page.url
            page.fill("input[type=password]", password)
            page.locator("#login_submit, button[type=submit]").first.click()
            # JupyterLab: a new notebook from the launcher, then one cell.
            editor = new_notebook(page)
            run_cell(page, editor, "print(6*7)")
            wait_for_42(page, editor)
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "portal-e2e-notebook.png"))
        except Exception:
            screenshot_on_failure(page, "portal-e2e-failure.png")
            print("failed at", page.url, "; see test-artifacts/portal-e2e-failure.png")
            raise
        finally:
            context.close()

        # SIGTERM stops the portal, cleanly, and leaves the servers running.
        portal_proc.send_signal(signal.SIGTERM)
        assert portal_proc.wait(timeout=60) == 0, log.read_text()
        assert "Portal stopped." in log.read_text()
        with pytest.raises(requests.ConnectionError):
            requests.get(portal + "/", timeout=5)
        assert set(server_states(course).values()) == {"running"}
    finally:
        if portal_proc is not None and portal_proc.poll() is None:
            portal_proc.kill()
            portal_proc.wait()
        stopped = course.run("shutdown", "--yes", timeout=300)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert set(server_states(course).values()) == {"stopped"}
