"""access = proxy (SPEC 6.1, 6.11 rule 8), and what both modes share: every server under
/user/NAME/, the one-line cookie warning of redirect mode."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli


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
