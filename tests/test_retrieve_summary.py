"""retrieve's summary (SPEC §6.8): summary.csv and summary.html in DESTINATION, on real retrieves."""

from __future__ import annotations

import csv
import datetime
import os
import pwd
import stat
import subprocess
import sys
from pathlib import Path

from conftest import needs_root

from classroom.core import summary
from classroom.core.retrieverules import MANIFEST_HEADER


def read_summary(dest: Path) -> dict[str, dict]:
    with open(dest / "summary.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == summary.COLUMNS
        return {r["username"]: r for r in reader}


def manifest(dest: Path) -> list[dict]:
    with open(dest / "manifest.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def html_rows(page: str) -> dict[str, str]:
    """username -> its <tr ...> line."""
    rows = {}
    for line in page.splitlines():
        if line.startswith("<tr") and '<td class="mark">' in line:
            username = line.split('<td class="mark">', 1)[1].split("<", 1)[0]
            rows[username] = line
    return rows


def write(course, username: str, rel: str, text: str) -> Path:
    pw = course.pw(username)
    path = course.home(username) / "tutorial" / rel
    path.write_text(text)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    return path


@needs_root
def test_summary_on_real_retrieves(ready_course):
    c = ready_course
    a, b = c.usernames
    ghost = "tghost" + os.urandom(3).hex()  # in the roster, never set up: no snapshot at all
    c.write_roster(
        [
            f"{a},Smith,<script>alert('x')</script> & Co,{a}@example.org",
            f"{b},Jones,Bea,{b}@example.org",
            f"{ghost},Ghost,Gus,g@example.org",
        ]
    )
    assert c.run("send", "--yes", "--only", a, "--only", b).returncode == 0
    dest = c.base / "submissions"
    write(c, a, "lesson.ipynb", "my answers")  # changed: differs from what send handed out
    write(c, a, "answer.py", "print(42)\n")  # new: send never handed it out
    os.mkfifo(c.home(a) / "tutorial" / "pipe")  # skipped
    os.chown(c.home(a) / "tutorial" / "pipe", c.pw(a).pw_uid, -1)

    dry = c.run("retrieve", "--dry-run", "--only", a, "--only", b)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert not (dest / "summary.csv").exists() and not (dest / "summary.html").exists()

    r = c.run("retrieve", "--yes", "--only", a, "--only", b, "--deadline", "2000-01-01 00:00")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = read_summary(dest)
    assert list(rows) == [a, b, ghost]  # roster order, every student
    ra, rb, rg = rows[a], rows[b], rows[ghost]
    (snap,) = [p.name for p in (dest / a).iterdir() if p.name != "latest"]
    assert ra["name"] == "<script>alert('x')</script> & Co Smith"
    assert (ra["snapshots"], ra["latest"]) == ("1", snap)
    assert (ra["files"], ra["changed"], ra["new"], ra["skipped"]) == ("3", "1", "1", "1")
    late = [m for m in manifest(dest) if m["username"] == a and m["late"] == "late"]
    assert ra["late"] == str(len(late)) != "0"
    assert ra["last_modified"].startswith(str(datetime.date.today().year))
    assert (rb["files"], rb["changed"], rb["new"]) == ("2", "0", "0")
    assert (rg["snapshots"], rg["latest"], rg["files"], rg["last_modified"]) == ("0", "", "0", "")

    page = (dest / "summary.html").read_text()
    assert (
        "<script>" not in page
        and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; Co" in page
    )
    marked = html_rows(page)
    assert 'class="idle"' not in marked[a]
    assert 'class="idle"' in marked[b] and 'class="idle"' in marked[ghost]
    for name in ("summary.csv", "summary.html"):
        st = (dest / name).lstat()
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
        assert st.st_uid == (dest / "manifest.csv").stat().st_uid == 0
    assert not [p for p in os.listdir(dest) if p.endswith(".tmp")]

    # b hands something in: a second snapshot, b no longer stands out.
    write(c, b, "answer.py", "print(1)\n")
    r = c.run("retrieve", "--yes", "--only", a, "--only", b)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = read_summary(dest)
    assert (rows[b]["snapshots"], rows[b]["new"], rows[b]["changed"]) == ("2", "1", "0")
    assert rows[a]["snapshots"] == "1"
    assert 'class="idle"' not in html_rows((dest / "summary.html").read_text())[b]


@needs_root
def test_summary_owned_like_the_destination(ready_course, tmp_path):
    c = ready_course
    nobody = pwd.getpwnam("nobody")
    c.write_config(retrieve={"owner": "nobody", "destination": str(tmp_path / "grading")})
    assert c.run("send", "--yes").returncode == 0
    r = c.run("retrieve", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("summary.csv", "summary.html"):
        st = (tmp_path / "grading" / name).lstat()
        assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid)
    rows = read_summary(tmp_path / "grading")
    assert all(r["changed"] == "0" and r["new"] == "0" for r in rows.values())


def test_summarize_pure():
    """Counts from the manifest and what send handed out, without root or files."""
    import pandas as pd

    rows = [
        ["al", "s1", "a.py", "1", "2024-05-01T10:00:00+00:00", "x1", "new", ""],
        ["al", "s2", "a.py", "1", "2024-05-02T10:00:00+00:00", "x2", "changed", "late"],
        ["al", "s2", "lesson.ipynb", "1", "2024-04-01T10:00:00+00:00", "L", "unchanged", ""],
        ["al", "s2", "big", "9", "2024-05-02T11:00:00+00:00", "", "skipped: too big", ""],
        ["bo", "s1", "lesson.ipynb", "1", "2024-04-01T10:00:00+00:00", "L", "new", ""],
        ["gone", "s1", "x", "1", "2024-04-01T10:00:00+00:00", "y", "new", ""],
    ]
    m = pd.DataFrame(rows, columns=MANIFEST_HEADER)
    handed = {"al": {"lesson.ipynb": "L", "a.py": "x0"}, "bo": {"lesson.ipynb": "L"}}
    t = summary.summarize(m, handed, [("al", "Al"), ("bo", "Bo"), ("cy", "Cy")])
    got = {r["username"]: r for r in t.to_dict("records")}
    assert list(got) == ["al", "bo", "cy", "gone"]
    assert {k: got["al"][k] for k in summary.COUNTS} == {
        "snapshots": 2,
        "files": 2,
        "changed": 1,
        "new": 0,
        "late": 1,
        "skipped": 1,
    }
    assert got["al"]["latest"] == "s2" and not got["al"]["idle"]
    assert got["bo"]["idle"] and got["cy"]["idle"] and not got["gone"]["idle"]
    empty = summary.summarize(pd.DataFrame(columns=MANIFEST_HEADER, dtype=str), {}, [("cy", "")])
    assert empty.to_dict("records")[0]["snapshots"] == 0


def test_status_does_not_import_pandas():
    code = (
        "import sys, classroom.cli, classroom.commands.status, classroom.commands.check, "
        "classroom.commands.retrieve; print('pandas' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
