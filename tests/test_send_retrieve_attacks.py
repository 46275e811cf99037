"""A student's tricks against send and retrieve (SPEC §5 rules 4, 5, 7).

Symlinks to /etc/shadow, to another home and to /, FIFOs, sockets, a device,
a 50 GB sparse file, a hard link to a file the student cannot read, a name
with a newline, folders nested absurdly deep, the folder itself a symlink,
and a thread that keeps swapping a folder for a symlink to a root-owned
victim folder while send and retrieve run. None of it may make the tool read,
write or chown anything outside the student's own files, hang, or fill the disk.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import control_chars, failed_line, needs_root, snapshots
from students import FLOOD, HOSTILE_NAMES, run_as_student, stopper

MARKER = b"VICTIM-MARKER-7f3a"
SECRET = b"ROOT-SECRET-91c2"


def own(path: Path, pw) -> None:
    os.lchown(path, pw.pw_uid, pw.pw_gid)


def fingerprint(root: Path) -> dict:
    """Everything about a tree that a write, chown, chmod or touch would change."""
    out = {}
    for p in [root, *sorted(root.rglob("*"))]:
        st = p.lstat()
        data = p.read_bytes() if stat.S_ISREG(st.st_mode) else b""
        out[str(p)] = (
            st.st_mode,
            st.st_uid,
            st.st_gid,
            st.st_mtime_ns,
            st.st_ctime_ns,
            hashlib.sha256(data).hexdigest(),
        )
    return out


def file_state(path: Path) -> tuple:
    st = path.stat()
    return (
        st.st_mode,
        st.st_uid,
        st.st_mtime_ns,
        st.st_ctime_ns,
        hashlib.sha256(path.read_bytes()).hexdigest(),
    )


def all_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def make_victim(course) -> Path:
    """A root-owned folder any user could read, next to the homes: only no-follow protects it."""
    victim = course.home_base / f"victim-{os.urandom(3).hex()}"
    (victim / "data").mkdir(parents=True)
    os.chmod(victim, 0o755)
    os.chmod(victim / "data", 0o755)
    for rel in ("numbers.csv", "lesson.ipynb", "data/numbers.csv"):
        (victim / rel).write_bytes(MARKER + b" " + rel.encode())
        os.chmod(victim / rel, 0o644)
    return victim


def manifest_rows(dest: Path) -> list[dict]:
    with open(dest / "manifest.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def sent_course(ready_course):
    c = ready_course
    r = c.run("send", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    return c


@needs_root
def test_retrieve_never_reads_what_it_should_not(sent_course):
    c = sent_course
    a, b = c.usernames
    pa = c.pw(a)
    folder = c.home(a) / "tutorial"
    (c.home(b) / "private.txt").write_bytes(SECRET)
    secret = c.home_base / f"secret-{os.urandom(3).hex()}"
    secret.write_bytes(SECRET)
    os.chmod(secret, 0o600)
    (folder / "shadow").symlink_to("/etc/shadow")
    (folder / "other-home").symlink_to(c.home(b))
    (folder / "root").symlink_to("/")
    os.mkfifo(folder / "fifo")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(folder / "sock"))
    os.mknod(folder / "zero", 0o666 | stat.S_IFCHR, os.makedev(1, 5))
    with open(folder / "sparse.bin", "wb") as f:
        f.truncate(50 << 30)
    os.link(
        secret, folder / "hardlink-secret"
    )  # root can; a student could with protected_hardlinks=0
    (folder / "new\nline.txt").write_bytes(b"name with a newline")
    deep = folder.joinpath(*["d"] * 80)
    deep.mkdir(parents=True)
    (deep / "bottom.txt").write_text("deep")
    for p in [*folder.rglob("*")]:
        if p.name != "hardlink-secret":
            own(p, pa)
    secret_before = file_state(secret)  # after the link (which changes its ctime)

    t = time.monotonic()
    r = c.run("retrieve", "--yes", timeout=120)
    assert time.monotonic() - t < 60
    assert r.returncode == 0, r.stdout + r.stderr
    dest = c.base / "submissions"
    rows = {x["path"]: x for x in manifest_rows(dest) if x["username"] == a}
    expect = {
        "shadow": "a symlink",
        "other-home": "a symlink",
        "root": "a symlink",
        "fifo": "a FIFO",
        "sock": "a socket",
        "zero": "a device",
        "sparse.bin": "larger than max_file_size",
        "hardlink-secret": "permission denied",
    }
    for rel, why in expect.items():
        assert rows[rel]["status"].startswith("skipped") and why in rows[rel]["status"], (
            rel,
            rows[rel],
        )
    assert rows["new\nline.txt"]["status"] == "new"
    assert any("nested deeper" in x["status"] for x in rows.values())
    snap = dest / a / "latest"
    assert (snap / "new\nline.txt").read_bytes() == b"name with a newline"
    got = all_bytes(dest)
    assert SECRET not in got
    assert b"root:" not in got  # nothing of /etc/shadow or /etc/passwd
    for p in snap.rglob("*"):
        assert stat.S_ISREG(p.lstat().st_mode) or stat.S_ISDIR(p.lstat().st_mode), p
    assert sum(p.lstat().st_blocks for p in dest.rglob("*")) * 512 < 10 << 20
    assert file_state(secret) == secret_before

    again = c.run("retrieve", "--yes", timeout=120)
    assert again.returncode == 0
    assert "retrieve: 2 unchanged, 0 failed" in again.stdout, again.stdout


@needs_root
def test_send_never_writes_through_links(sent_course):
    c = sent_course
    a = c.usernames[0]
    pa = c.pw(a)
    folder = c.home(a) / "tutorial"
    victim = make_victim(c)
    before = fingerprint(victim)
    # A root-only stand-in for /etc/shadow (the real one changes whenever any account does).
    shadow_path = c.home_base / f"shadow-{os.urandom(3).hex()}"
    shadow_path.write_bytes(SECRET)
    os.chmod(shadow_path, 0o600)
    shadow = file_state(shadow_path)
    tutorial = c.base / "tutorial"
    (tutorial / "pipe.txt").write_text("a pipe in the way")
    (tutorial / "big.csv").write_text("small")
    (tutorial / "lesson.ipynb").write_text("lesson v2")
    (tutorial / "data" / "numbers.csv").write_text("v2")

    (folder / "lesson.ipynb").unlink()
    (folder / "lesson.ipynb").symlink_to(shadow_path)
    os.rename(folder / "data", folder / "data.mine")
    (folder / "data").symlink_to(victim)
    os.mkfifo(folder / "pipe.txt")
    with open(folder / "big.csv", "wb") as f:
        f.truncate(50 << 30)
    for p in folder.rglob("*"):
        own(p, pa)

    r = c.run("send", "--yes", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.strip().startswith(a))
    assert "conflict" in line, line
    assert fingerprint(victim) == before
    assert file_state(shadow_path) == shadow
    assert (folder / "lesson.ipynb").is_symlink() and (folder / "data").is_symlink()
    assert stat.S_ISFIFO((folder / "pipe.txt").lstat().st_mode)
    assert (folder / "lesson.new.ipynb").read_text() == "lesson v2"
    assert (folder / "pipe.new.txt").read_text() == "a pipe in the way"
    assert (folder / "big.new.csv").read_text() == "small"
    assert (folder / "lesson.new.ipynb").stat().st_uid == pa.pw_uid

    r = c.run("send", "--yes", "--force", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert fingerprint(victim) == before
    assert file_state(shadow_path) == shadow
    assert (folder / "lesson.ipynb").read_text() == "lesson v2"
    assert (folder / "data").is_dir() and not (folder / "data").is_symlink()
    assert (folder / "data" / "numbers.csv").read_text() == "v2"
    (backup,) = (folder / ".backup").iterdir()
    assert (backup / "lesson.ipynb").is_symlink() and (backup / "data").is_symlink()
    assert stat.S_ISFIFO((backup / "pipe.txt").lstat().st_mode)
    for p in [folder, *folder.rglob("*")]:
        assert p.lstat().st_uid == pa.pw_uid, p


@needs_root
def test_folder_itself_a_symlink(ready_course):
    """HOME/FOLDER -> a root-owned folder: that student fails, nothing of it is read or written."""
    c = ready_course
    a, b = c.usernames
    victim = make_victim(c)
    before = fingerprint(victim)
    (c.home(a) / "tutorial").symlink_to(victim)
    own(c.home(a) / "tutorial", c.pw(a))
    r = c.run("send", "--yes", timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "symlink" in r.stdout and "send: 1 copied, 0 unchanged, 1 failed" in r.stdout
    assert (c.home(b) / "tutorial" / "lesson.ipynb").exists()
    r = c.run("retrieve", "--yes", timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "retrieve: 1 collected, 0 unchanged, 1 failed" in r.stdout
    assert MARKER not in all_bytes(c.base / "submissions")
    assert fingerprint(victim) == before


@needs_root
def test_race_swapping_folder_for_symlink(sent_course):
    """A thread swaps folders for symlinks to a root-owned victim while send and retrieve run."""
    c = sent_course
    a = c.usernames[0]
    pa = c.pw(a)
    folder = c.home(a) / "tutorial"
    victim = make_victim(c)
    before = fingerprint(victim)
    for i in range(40):  # enough files that the swaps land mid-walk
        (folder / "data" / f"f{i}.csv").write_text(f"student file {i}\n")
        own(folder / "data" / f"f{i}.csv", pa)
    (c.base / "tutorial" / "data" / "more.csv").write_text("more")
    stop = threading.Event()
    swaps = 0

    def swapper() -> None:
        nonlocal swaps
        data, real, link = folder / "data", folder / "data.real", folder / "data.link"
        while not stop.is_set():
            try:
                if not link.exists() and not link.is_symlink():
                    link.symlink_to(victim)
                    os.lchown(link, pa.pw_uid, pa.pw_gid)
                os.rename(data, real)
                os.rename(link, data)  # data -> victim
                time.sleep(0.0005)
                os.rename(data, link)
                os.rename(real, data)  # data is the real folder again
                time.sleep(0.0005)
                swaps += 1
            except OSError:
                pass

    thread = threading.Thread(target=swapper, daemon=True)
    thread.start()
    try:
        for i in range(4):
            (c.base / "tutorial" / "lesson.ipynb").write_text(f"lesson v{i + 2}")
            r = c.run("send", "--yes", timeout=120)
            assert r.returncode in (0, 1), r.stdout + r.stderr
            for u in c.usernames:
                (c.home(u) / "tutorial" / "answer.txt").write_text(f"answer {i}")
                own(c.home(u) / "tutorial" / "answer.txt", c.pw(u))
            r = c.run("retrieve", "--yes", timeout=120)
            assert r.returncode in (0, 1), r.stdout + r.stderr
    finally:
        stop.set()
        thread.join(5)
    assert swaps > 10
    assert fingerprint(victim) == before
    dest = c.base / "submissions"
    assert MARKER not in all_bytes(dest)
    for p in dest.rglob("*"):
        assert not p.is_symlink() or p.name == "latest", p
    for p in [folder, *folder.rglob("*")]:
        if p.name != "data.link":
            assert p.lstat().st_uid == pa.pw_uid, p
    # Once the swapping stops, everything is sent and collected normally.
    if (folder / "data").is_symlink():
        os.rename(folder / "data", folder / "data.link")
        os.rename(folder / "data.real", folder / "data")
    r = c.run("send", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (folder / "data" / "more.csv").read_text() == "more"
    r = c.run("retrieve", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (dest / a / "latest" / "data" / "f39.csv").read_text() == "student file 39\n"


# --- SPEC §6.11 rule 15: a student's file names reach the teacher's terminal without controls ---


@needs_root
def test_retrieve_shows_file_names_without_control_characters(sent_course):
    c = sent_course
    a = c.usernames[0]
    pa = c.pw(a)
    folder = c.home(a) / "tutorial"
    for name in HOSTILE_NAMES:
        (folder / name).write_text("x\n")
        own(folder / name, pa)
        (folder / f"link-{name}").symlink_to("/etc/passwd")  # skipped, and named
        own(folder / f"link-{name}", pa)
    # every new file late
    r = c.run("retrieve", "--yes", "--deadline", "2000-01-01 00:00", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(rf"^\s*{a}: collected", r.stdout, re.M), r.stdout
    assert "late" in r.stdout and "skipped" in r.stdout, r.stdout
    assert "\\x1b]0;pwned\\x07title.txt" in r.stdout, r.stdout
    assert not control_chars(r.stdout + r.stderr), repr(r.stdout + r.stderr)


@needs_root
def test_send_shows_file_names_without_control_characters(ready_course):
    c = ready_course
    a = c.usernames[0]
    pa = c.pw(a)
    for name in HOSTILE_NAMES:
        (c.base / "tutorial" / name).write_text("v1\n")
    first = c.run("send", "--yes", timeout=120)
    assert first.returncode == 0, first.stdout + first.stderr
    for name in HOSTILE_NAMES:  # the student edits them, the teacher changes them: conflicts
        (c.home(a) / "tutorial" / name).write_text("mine\n")
        own(c.home(a) / "tutorial" / name, pa)
        (c.base / "tutorial" / name).write_text("v2\n")
    second = c.run("send", "--yes", timeout=120)
    assert second.returncode in (0, 1), second.stdout + second.stderr
    assert "conflict" in second.stdout, second.stdout
    for r in (first, second):
        assert not control_chars(r.stdout + r.stderr), repr(r.stdout + r.stderr)


# --- SPEC §6.11 rule 14: a student who stops their own worker or reader stalls no one else -------
#
# Each student's part has an overall deadline, ``workers.STUDENT_DEADLINE`` (300 s and more):
# these tests make it 5 s, either by lowering that constant in the command's own process
# (``DEADLINE_5S``) or as the teacher would, with $CLASSROOM_STUDENT_DEADLINE, and fail if the
# command still runs well after it. The student SIGSTOPs every process of theirs as soon as it
# appears, and lets them run for a moment every 2 s (which once reset the reader's timeout).

DEADLINE_5S = (
    "import sys; from classroom.host import workers; workers.STUDENT_DEADLINE = 5.0; "
    "from classroom.cli import main; main(sys.argv[1:])"
)
DEADLINE_BY = pytest.mark.parametrize("deadline_by", ["constant", "env"])


def run_with_short_deadline(
    c, *args: str, deadline_by: str, bound: float = 45
) -> subprocess.CompletedProcess:
    """``notebooks.py ARGS CONFIG --yes`` with each student's deadline at 5 s (``deadline_by``
    the constant or the environment variable); fails the test if it still runs after ``bound``
    seconds: one student held up the class."""
    from conftest import NOTEBOOKS, PYTHON, ROOT

    env = {k: v for k, v in os.environ.items() if k != "NOTEBOOKS_CONFIG"}
    env.pop("CLASSROOM_STUDENT_DEADLINE", None)
    if deadline_by == "env":
        env["CLASSROOM_STUDENT_DEADLINE"] = "5"
        command = [PYTHON, str(NOTEBOOKS), args[0], str(c.config), *args[1:], "--yes"]
    else:
        command = [PYTHON, "-c", DEADLINE_5S, args[0], str(c.config), *args[1:], "--yes"]
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=bound)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the command and its workers
        out, err = proc.communicate()
        pytest.fail(f"`{' '.join(args)}` still ran after {bound} s: {out}{err}")
    assert "Traceback" not in err, err
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


@needs_root
@DEADLINE_BY
def test_send_is_not_stalled_by_a_student_who_stops_the_worker(ready_course, deadline_by):
    c = ready_course
    staller, other = c.usernames
    many = c.base / "tutorial" / "many"
    many.mkdir()
    for i in range(3000):  # a worker that takes a while
        (many / f"n{i:05d}.txt").write_text(f"{i}\n")
    with stopper(c, staller):
        r = run_with_short_deadline(c, "send", deadline_by=deadline_by)
    assert r.returncode == 1, r.stdout + r.stderr
    assert failed_line(r.stdout, staller), r.stdout
    assert "not done within 5 s" in r.stdout, r.stdout
    assert (c.home(other) / "tutorial" / "many" / "n02999.txt").exists()


@needs_root
@DEADLINE_BY
def test_retrieve_is_not_stalled_by_a_student_who_stops_the_reader(sent_course, deadline_by):
    c = sent_course
    staller, other = c.usernames
    c.write_config(retrieve={"max_total_size": "1M"})  # the deadline grows with it
    pw = c.pw(staller)
    many = c.home(staller) / "tutorial" / "many"
    many.mkdir()
    own(many, pw)
    for i in range(5000):  # a reader that takes a while
        (many / f"n{i:05d}.txt").write_text(f"{i}\n")
        own(many / f"n{i:05d}.txt", pw)
    answer = c.home(other) / "tutorial" / "answer.py"
    answer.write_text("print(42)\n")
    own(answer, c.pw(other))
    with stopper(c, staller, pulse=2.0):
        r = run_with_short_deadline(c, "retrieve", deadline_by=deadline_by)
    assert r.returncode == 1, r.stdout + r.stderr
    assert failed_line(r.stdout, staller), r.stdout
    assert re.search(rf"^\s*{other}: collected", r.stdout, re.M), r.stdout
    dest = c.base / "submissions"
    assert (dest / other / "latest" / "answer.py").read_text() == "print(42)\n"
    assert not (dest / staller).exists() or not [
        p for p in (dest / staller).iterdir() if p.name.startswith(".partial-")
    ], "the failed student's half-built snapshot was left"


# --- SPEC §6.11 rule 14: what a home can make retrieve write is bounded ---------------------------


def user_rows(dest: Path, username: str) -> list[dict]:
    csv.field_size_limit(1 << 24)
    return [row for row in manifest_rows(dest) if row["username"] == username]


MEASURED = """
import json, resource, subprocess, sys
r = subprocess.run(sys.argv[1:], capture_output=True, text=True)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"code": r.returncode, "out": r.stdout, "err": r.stderr, "peak": peak}))
"""


def retrieve_measured(c) -> tuple[subprocess.CompletedProcess, int]:
    """``retrieve --yes``, and the largest resident size any of its processes reached (bytes)."""
    import json

    from conftest import NOTEBOOKS, PYTHON

    command = [PYTHON, str(NOTEBOOKS), "retrieve", str(c.config), "--yes"]
    wrapper = subprocess.run(
        [PYTHON, "-c", MEASURED, *command], capture_output=True, text=True, timeout=300, check=True
    )
    got = json.loads(wrapper.stdout)
    return subprocess.CompletedProcess(command, got["code"], got["out"], got["err"]), got["peak"]


@needs_root
def test_retrieve_flood_is_bounded_and_not_repeated(sent_course):
    """15 nested 255-character folders, 20,000 symlinks, 10,500 empty folders, one edit: at
    most 10,000 manifest rows (and a summary row) and 10,000 folders, a small state, bounded
    memory, and the same home again makes no new snapshot and no new row."""
    c = sent_course
    flooder, other = c.usernames
    dest = c.base / "submissions"
    run_as_student(c, flooder, FLOOD, "20000", "10500", timeout=300)
    answer = c.home(other) / "tutorial" / "answer.py"
    answer.write_text("print(42)\n")
    own(answer, c.pw(other))
    try:
        r, peak = retrieve_measured(c)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "Traceback" not in r.stderr, r.stderr
        assert peak < 400 << 20, f"a process of retrieve used {peak >> 20} MB"
        rows = user_rows(dest, flooder)
        assert 0 < len(rows) <= 10_001, f"{len(rows)} manifest rows for one student"
        summary = [row for row in rows if row["path"] == ""]
        assert len(summary) == 1 and "not listed" in summary[0]["status"], summary
        assert {"lesson.ipynb", "data/numbers.csv"} <= {row["path"] for row in rows}
        (snap,) = snapshots(dest, flooder)
        folders = sum(len(d) for _, d, _ in os.walk(dest / flooder / snap))
        assert folders <= 10_000, f"{folders} folders in one snapshot"
        assert (dest / flooder / "latest" / "lesson.ipynb").read_text().endswith("# my answer\n")
        assert (dest / other / "latest" / "answer.py").read_text() == "print(42)\n"
        state_db = c.state_dir / "state.db"
        assert state_db.stat().st_size < 16 << 20, f"state.db: {state_db.stat().st_size} bytes"
        size = (dest / "manifest.csv").stat().st_size

        again = c.run("retrieve", "--yes", timeout=300)
        assert again.returncode == 0, again.stdout + again.stderr
        assert snapshots(dest, flooder) == [snap], "the same skipped entries: a new snapshot"
        assert (dest / "manifest.csv").stat().st_size == size, "nothing changed, yet new rows"
        assert "retrieve: 2 unchanged" in again.stdout, again.stdout
    finally:
        shutil.rmtree(dest, ignore_errors=True)
