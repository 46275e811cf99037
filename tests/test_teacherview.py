"""What the teacher sees: progress under a terminal, status --watch, the slips, check."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import random_name, run_cli
from ptyrun import run_pty

from classroom.core.settings import Settings
from classroom.host import credentials

SHOW_CURSOR = "\x1b[?25h"


def settings(tmp_path, **launch) -> Settings:
    cfg = tmp_path / "c.cfg"
    (tmp_path / "students.csv").write_text("username,surname,name,email\nann,A,Ann,a@x.org\n")
    lines = "".join(f"{k} = {v}\n" for k, v in launch.items())
    cfg.write_text(f"[course]\nname = demo\nroster = students.csv\n[launch]\n{lines}")
    from classroom.core import settings as settings_mod

    return settings_mod.load(cfg)


# --- progress ------------------------------------------------------------------------------


def test_every_long_command_shows_progress_on_a_terminal_and_ends_cleanly(course):
    """Under a pty: a bar with n/N for each command, the cursor shown again at the end,
    then the plain per-student lines and the summary; -q draws no bar."""
    c = course
    c.usernames.append(random_name())
    c.write_roster()
    steps = [
        (["setup", "--yes"], "accounts", "setup: 3 created"),
        (["send"], "send", "send: 3 copied"),
        (["launch", "--no-portal"], "servers answering", "launch: 3 started"),
        (["retrieve"], "retrieve", "retrieve: 3 collected"),
        (["shutdown"], "stopping 3 student(s)' servers", "shutdown: 3 stopped"),
    ]
    for args, label, summary in steps:
        r = run_pty(args[0], str(c.config), *args[1:])
        assert r.returncode == 0, r.text
        assert label in r.text, r.text
        if args[0] != "shutdown":  # shutdown: one step, a spinner
            assert "3/3" in r.text, r.text
        if args[0] == "launch":
            assert "waiting for" in r.text, r.text  # who it still waits for
        tail = r.raw[r.raw.rindex(SHOW_CURSOR) :]
        assert summary in tail, r.raw  # the summary comes after the bar has ended
        assert "\x1b[" not in tail.replace(SHOW_CURSOR, ""), tail  # plain lines after it
    quiet = run_pty("-q", "send", str(c.config))
    assert quiet.returncode == 0
    assert "\x1b[" not in quiet.raw and "send:" in quiet.text
    r = run_pty("remove", str(c.config), "--yes")
    assert r.returncode == 0 and "removing" in r.text and "3/3" in r.text, r.text
    for user in c.usernames:  # printed above the bar: on the line it cleared, not after it
        assert f"\r\x1b[2K  {user}: removed" in r.raw, r.raw


def test_no_bar_when_stderr_is_not_a_terminal(ready_course):
    r = ready_course.run("send")
    assert r.returncode == 0
    assert "\x1b[" not in r.stderr + r.stdout and "━" not in r.stderr


# --- status --watch --------------------------------------------------------------------------


def test_watch_shows_the_table_and_exits_0_on_ctrl_c(ready_course):
    c = ready_course
    assert c.run("launch", "--no-portal").returncode == 0
    try:
        r = run_pty("status", str(c.config), "--watch", interrupt_when="Ctrl-C to stop", timeout=60)
        assert r.returncode == 0, r.text
        for user in c.usernames:
            assert re.search(
                rf"{user}\s+ok\s+running :\d+\s+[\d.]+M\s+\d+%\s+0\s+\d+ s ago", r.text
            ), r.text
        once = c.run("status", "--watch")
        assert once.returncode == 0
        assert once.stdout.count("running :") == 2 and "\x1b[" not in once.stdout
        assert "Ctrl-C" not in once.stdout  # printed once, no live view
    finally:
        c.run("shutdown")


def test_watch_lists_a_died_server_first(ready_course):
    c = ready_course
    assert c.run("launch", "--no-portal").returncode == 0
    try:
        import json

        rows = json.loads(c.run("status", "--json").stdout)
        last = rows[-1]
        subprocess.run(["kill", "-9", str(last["pid"])], check=True)
        import time

        time.sleep(0.5)
        out = c.run("status", "--watch").stdout.splitlines()
        assert out[1].startswith(last["username"]) and "died" in out[1], out
    finally:
        c.run("shutdown")


def test_status_and_check_of_a_csv_roster_do_not_import_rich(tmp_path):
    settings(tmp_path)
    probe = (
        "import sys\n"
        "from classroom.cli import main\n"
        "try:\n    main(sys.argv[1:])\n"
        "except SystemExit:\n    pass\n"
        "print('RICH' if 'rich' in sys.modules else 'NO-RICH', 'SEGNO' if 'segno' in sys.modules else '')\n"
    )
    for command in ("status", "check"):
        r = subprocess.run(
            [sys.executable, "-c", probe, command, str(tmp_path / "c.cfg")],
            capture_output=True,
            text=True,
            check=False,
        )
        assert "NO-RICH" in r.stdout and "SEGNO" not in r.stdout, r.stdout + r.stderr


# --- slips -----------------------------------------------------------------------------------


def test_qr_code_decodes_to_the_portal_address(tmp_path):
    zbarimg = pytest.importorskip("shutil").which("zbarimg")
    assert zbarimg, "zbar-tools is in install.sh's test packages"
    s = settings(tmp_path, server_address="class.example.org", portal_port="8200")
    page = credentials.handout_html(s, {"ann": {"name": "Ann A", "password": "pw"}})
    assert "http://class.example.org:8200/" in page and "<svg" in page
    assert "src=" not in page and "url(http" not in page  # nothing external
    png = tmp_path / "qr.png"
    credentials.qr_code("http://class.example.org:8200/").save(str(png), scale=6)
    r = subprocess.run([zbarimg, "--raw", "-q", str(png)], capture_output=True, text=True)
    assert r.stdout.strip() == "http://class.example.org:8200/"
    # and the SVG on the slip is that same code
    assert credentials.qr_svg("http://class.example.org:8200/") in page


def test_slips_follow_the_roster_order(ready_course):
    c = ready_course
    first, second = c.usernames
    c.write_roster([f"{second},Z,Zed,z@x.org", f"{first},A,Ann,a@x.org"])
    assert c.run("setup", "--yes").returncode == 0
    page = (c.state_dir / "handout.html").read_text()
    assert page.index(second) < page.index(first)
    c.write_roster()
    assert c.run("setup", "--yes").returncode == 0
    page = (c.state_dir / "handout.html").read_text()
    assert page.index(first) < page.index(second)


def test_a_dotless_host_name_is_warned_about_and_server_address_silences_it(tmp_path, monkeypatch):
    from classroom.core import addresses

    monkeypatch.setattr(addresses, "this_host", lambda: "vm")
    s = settings(tmp_path)
    warning = credentials.address_warning(s)
    assert warning and "server_address" in warning and "'vm' has no dot" in warning
    assert credentials.address_warning(settings(tmp_path, server_address="vm.example.org")) is None
    assert credentials.address_warning(settings(tmp_path, server_address="10.0.0.5")) is None
    assert credentials.address_warning(settings(tmp_path, ip="10.0.0.5")) is None


def test_check_warns_about_a_short_host_name_when_the_host_has_one(tmp_path):
    import socket

    settings(tmp_path)
    r = run_cli("check", str(tmp_path / "c.cfg"))
    host = socket.getfqdn()
    if "." not in host and "." not in socket.gethostname():
        assert "has no dot" in r.stdout and "server_address" in r.stdout
    (tmp_path / "c.cfg").write_text(
        (tmp_path / "c.cfg").read_text() + "server_address = 10.1.2.3\n"
    )
    assert "has no dot" not in run_cli("check", str(tmp_path / "c.cfg")).stdout


# --- check -----------------------------------------------------------------------------------


def test_check_reports_the_roster_problems_and_system_accounts_despite_config_problems(tmp_path):
    (tmp_path / "students.csv").write_text(
        "username,surname,name,email\nroot,A,Root,r@x.org\nBad Name,B,B,b@x.org\n"
    )
    cfg = tmp_path / "c.cfg"
    cfg.write_text("[course]\nname = demo\nroster = students.csv\nbogus = 1\n")
    r = run_cli("check", str(cfg))
    assert r.returncode == 2
    assert "unknown key 'bogus'" in r.stdout
    assert "invalid username 'Bad Name'" in r.stdout
    (tmp_path / "students.csv").write_text("username,surname,name,email\nroot,A,Root,r@x.org\n")
    r = run_cli("check", str(cfg))
    assert "unknown key 'bogus'" in r.stdout
    assert "root is a system account" in r.stdout, r.stdout
