"""The command line as a teacher meets it: help, version, config lookup, bad input, exit codes."""

from __future__ import annotations

import os
import pwd

import pytest
from conftest import ROOT, needs_root, run_cli

from classroom import __version__


def test_version_and_help():
    r = run_cli("--version")
    assert r.returncode == 0 and __version__ in r.stdout
    r = run_cli("--help")
    assert r.returncode == 0
    for command in ("setup", "send", "launch", "shutdown", "retrieve", "remove", "status", "check"):
        assert command in r.stdout
    for command in ("setup", "send", "launch", "shutdown", "retrieve", "remove"):
        h = run_cli(command, "--help")
        assert h.returncode == 0
        assert "--dry-run" in h.stdout and "--only" in h.stdout and "--yes" in h.stdout
    for command in ("status", "check"):
        assert "--json" in run_cli(command, "--help").stdout


def test_unknown_command_and_option_exit_2():
    r = run_cli("frobnicate")
    assert r.returncode == 2
    r = run_cli("setup", "--frob")
    assert r.returncode == 2


def test_missing_config_names_the_file(tmp_path):
    r = run_cli("check", str(tmp_path / "none.cfg"))
    assert r.returncode == 2 and "none.cfg" in (r.stdout + r.stderr)


def test_config_from_environment_and_cwd(tmp_path):
    cfg = ROOT / "config" / "notebooks.cfg"
    r = run_cli("check", "--json", env={"NOTEBOOKS_CONFIG": str(cfg)})
    assert r.returncode == 0, r.stdout + r.stderr
    (tmp_path / "notebooks.cfg").write_text(
        cfg.read_text().replace("../samples", str(ROOT / "samples"))
    )
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, str(ROOT / "notebooks.py"), "check"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr


BAD_ROSTERS = {
    "duplicates in case": ("username\nalice\nALICE\n", "duplicate"),
    "invalid name": ("username\nal ice\n", "invalid username"),
    "email usernames": ("Username;Email address\nann@uni.edu;ann@uni.edu\n", "roster_columns"),
    "empty": ("", "empty"),
    "no username column": ("user,name\nalice,A\n", "no 'username' column"),
}


@needs_root
@pytest.mark.parametrize("case", sorted(BAD_ROSTERS))
def test_bad_roster_exit_2_nothing_changed(course, case):
    text, needle = BAD_ROSTERS[case]
    course.roster.write_text(text)
    for command in ("setup", "send", "launch", "retrieve", "remove", "shutdown"):
        r = course.run(command, "--yes")
        assert r.returncode == 2, (command, r.stdout, r.stderr)
        assert needle in r.stderr and "students.csv" in r.stderr
    assert not course.state_dir.exists()


@needs_root
def test_roster_with_bom_and_original_columns_works(course):
    u = course.usernames[0]
    course.roster.write_bytes(
        (
            "\ufeffusername,surname,name,email,port,sys-pass,nb-pass\n"
            f"{u},Lovelace,Ada,ada@example.org,8001,oldsecret,oldnb\n"
        ).encode()
    )
    r = course.run("setup")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "password" in r.stderr  # the warning about password columns
    assert pwd.getpwnam(u).pw_gecos == "Ada Lovelace"
    creds = course.credentials()[u]
    assert creds["password"] != "oldsecret" and creds["notebook_password"] != "oldnb"
    assert "oldsecret" not in (course.state_dir / "credentials.csv").read_text()
    assert course.roster.read_bytes().startswith("\ufeff".encode())  # never rewritten


@needs_root
def test_handout_copy_and_profile_and_skeleton(course, tmp_path):
    profile = tmp_path / "profile"
    (profile / "startup").mkdir(parents=True)
    (profile / "ipython_config.py").write_text("c.InteractiveShell.colors = 'nocolor'\n")
    (profile / "startup" / "00-course.py").write_text("COURSE = 'yes'\n")
    skel = tmp_path / "skel"
    skel.mkdir()
    (skel / "WELCOME.txt").write_text("hello\n")
    course.write_config(accounts={"profile": str(profile), "skeleton": str(skel)})
    out = tmp_path / "slips.html"
    r = course.run("setup", "--handout", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert out.exists() and os.stat(out).st_mode & 0o077 == 0
    for u in course.usernames:
        home = course.home(u)
        assert (home / "WELCOME.txt").read_text() == "hello\n"
        pd = home / ".ipython" / "profile_default"
        assert (pd / "ipython_config.py").read_text().startswith("c.InteractiveShell")
        assert (pd / "startup" / "00-course.py").read_text() == "COURSE = 'yes'\n"
        st = os.stat(pd / "startup" / "00-course.py")
        assert st.st_uid == pwd.getpwnam(u).pw_uid
        assert u in out.read_text()


@needs_root
def test_dry_run_prints_exact_commands_for_only(course):
    u = course.usernames[1]
    r = course.run("setup", "--dry-run", "--only", u)
    assert r.returncode == 0
    assert u in r.stdout and course.usernames[0] not in r.stdout
    assert "useradd" in r.stdout and f"-- {u}" in r.stdout


@needs_root
def test_a_ctrl_c_after_the_work_is_not_nothing_was_changed(ready_course, monkeypatch, capsys):
    """A Ctrl-C that lands once the command has done its work and printed its summary (while
    it closes) must not end with "nothing was changed" (SPEC 6.10): exit 130 instead."""
    from classroom import cli
    from classroom.commands.course import Course

    real_close = Course.close

    def close_then_ctrl_c(self):
        real_close(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_finished_with", None, raising=False)
    monkeypatch.setattr(Course, "close", close_then_ctrl_c)
    with pytest.raises(SystemExit) as ended:
        cli.main(["setup", str(ready_course.config), "--yes"])
    err = capsys.readouterr().err
    assert ended.value.code == 130, err
    assert "nothing was changed" not in err.lower(), err
