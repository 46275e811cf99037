"""return (SPEC §6.7): feedback into each home with send's rules, recorded apart from send."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from conftest import needs_root


def own(path: Path, pw) -> None:
    os.lchown(path, pw.pw_uid, pw.pw_gid)


def line_of(out: str, username: str) -> str:
    return next(ln for ln in out.splitlines() if ln.strip().startswith(f"{username}:"))


def feedback(course, username: str, files: dict[str, str]) -> Path:
    """The teacher's feedback for one student: DIR/USERNAME/..."""
    root = course.base / "feedback" / username
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@needs_root
def test_return_dry_run_then_real_then_unchanged(ready_course):
    c = ready_course
    a, b = c.usernames
    feedback(c, a, {"grade.txt": "A-\n", "notes/lesson.md": "well done\n"})
    (c.base / "feedback").mkdir(exist_ok=True)  # b has no folder there

    dry = c.run("return", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "grade.txt" in line_of(dry.stdout, a) and "would be copied" in line_of(dry.stdout, a)
    assert "return (dry run, nothing changed): 1 would be copied, 1 unchanged" in dry.stdout
    assert not (c.home(a) / "feedback").exists()

    r = c.run("return", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "return: 1 copied, 1 unchanged, 0 failed" in r.stdout, r.stdout
    assert "no folder" in line_of(r.stdout, b)
    got = c.home(a) / "feedback"
    assert (got / "grade.txt").read_text() == "A-\n"
    assert (got / "notes" / "lesson.md").read_text() == "well done\n"
    pa = c.pw(a)
    for p in [got, *got.rglob("*")]:
        st = p.lstat()
        assert (st.st_uid, st.st_gid) == (pa.pw_uid, pa.pw_gid), p
        assert not st.st_mode & 0o022, p
    assert not (c.home(b) / "feedback").exists()

    again = c.run("return", "--yes")
    assert again.returncode == 0
    assert "return: 2 unchanged, 0 failed (nothing to do)" in again.stdout, again.stdout


@needs_root
def test_return_keeps_edits_restores_updates(ready_course):
    c = ready_course
    a, b = c.usernames
    feedback(c, a, {"grade.txt": "B\n", "comments.md": "see cell 3\n"})
    feedback(c, b, {"grade.txt": "A\n"})
    assert c.run("return", "--yes").returncode == 0
    pa = c.pw(a)
    got = c.home(a) / "feedback"
    (got / "comments.md").write_text("my reply to the teacher\n")
    own(got / "comments.md", pa)
    (got / "grade.txt").unlink()
    # The teacher revises both students' feedback.
    feedback(c, a, {"comments.md": "see cells 3 and 4\n"})
    feedback(c, b, {"grade.txt": "A+\n"})

    r = c.run("return", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    la = line_of(r.stdout, a)
    assert "conflict" in la and "comments.md" in la and "restored" in la, la
    assert (got / "comments.md").read_text() == "my reply to the teacher\n"
    assert (got / "comments.new.md").read_text() == "see cells 3 and 4\n"
    assert (got / "grade.txt").read_text() == "B\n"
    assert (c.home(b) / "feedback" / "grade.txt").read_text() == "A+\n"
    assert "updated" in line_of(r.stdout, b)
    assert "return: 1 conflict, 1 updated, 0 unchanged, 0 failed" in r.stdout, r.stdout


@needs_root
def test_return_and_send_records_do_not_mix(ready_course):
    """Feedback returned into the material's own folder: send's lesson (untouched by the
    student) is a file return never wrote, so it is kept; send still sees its own file."""
    c = ready_course
    a = c.usernames[0]
    assert c.run("send", "--yes").returncode == 0
    lesson = c.home(a) / "tutorial" / "lesson.ipynb"
    sent = lesson.read_text()
    feedback(c, a, {"lesson.ipynb": "the lesson, with the teacher's comments\n"})

    r = c.run("return", "--yes", "--folder", "tutorial", "--only", a)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "conflict" in line_of(r.stdout, a)
    assert lesson.read_text() == sent
    assert (lesson.parent / "lesson.new.ipynb").read_text().startswith("the lesson, with")

    again = c.run("send", "--yes")
    assert again.returncode == 0
    assert "send: 2 unchanged, 0 failed" in again.stdout, again.stdout
    assert lesson.read_text() == sent
    again = c.run("return", "--yes", "--folder", "tutorial", "--only", a)
    assert "return: 1 unchanged" in again.stdout, again.stdout


@needs_root
def test_return_links_and_fifos(ready_course):
    """A link or FIFO in the feedback is not sent; one in the student's folder is kept and the
    feedback goes beside it; a link in DIR's place for a student is not followed."""
    c = ready_course
    a, b = c.usernames
    root = feedback(c, a, {"grade.txt": "A\n", "notes.md": "notes\n"})
    (root / "passwd").symlink_to("/etc/passwd")
    os.mkfifo(root / "pipe")
    pa = c.pw(a)
    folder = c.home(a) / "feedback"
    folder.mkdir()
    own(folder, pa)
    (folder / "grade.txt").symlink_to("/etc/hostname")
    own(folder / "grade.txt", pa)
    os.mkfifo(folder / "notes.md")
    own(folder / "notes.md", pa)
    elsewhere = c.base / "elsewhere"
    (elsewhere / "x.txt").parent.mkdir()
    (elsewhere / "x.txt").write_text("not for b")
    (c.base / "feedback" / b).symlink_to(elsewhere)

    r = c.run("return", "--yes", timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "passwd: a symlink" in r.stdout and "pipe: a FIFO" in r.stdout
    assert "conflict" in line_of(r.stdout, a)
    assert (folder / "grade.txt").is_symlink()
    assert stat.S_ISFIFO((folder / "notes.md").lstat().st_mode)
    assert (folder / "grade.new.txt").read_text() == "A\n"
    assert (folder / "notes.new.md").read_text() == "notes\n"
    assert not (folder / "passwd").exists() and not (folder / "pipe").exists()
    assert "symlink" in line_of(r.stdout, b) and "FAILED" in line_of(r.stdout, b)
    assert not (c.home(b) / "feedback").exists()
    assert "return: 1 conflict, 0 unchanged, 1 failed" in r.stdout, r.stdout


@needs_root
def test_return_bad_source_exit_2(ready_course, tmp_path):
    c = ready_course
    a = c.usernames[0]
    feedback(c, a, {"grade.txt": "A\n"})
    bad = c.run("return", "--yes", "--source", str(tmp_path / "nope"))
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert "--source" in bad.stderr and "not a folder" in bad.stderr
    bad = c.run("return", "--yes", "--folder", "../out")
    assert bad.returncode == 2 and "--folder" in bad.stderr
    c.write_config(**{"return": {"source": "graded"}})
    bad = c.run("return", "--yes")
    assert bad.returncode == 2 and "graded" in bad.stderr and "[return] source" in bad.stderr
    assert not (c.home(a) / "feedback").exists()

    other = tmp_path / "week1"
    (other / a).mkdir(parents=True)
    (other / a / "marks.csv").write_text("q1,2\n")
    r = c.run("return", "--yes", "--source", str(other), "--folder", "marks", "--only", a)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (c.home(a) / "marks" / "marks.csv").read_text() == "q1,2\n"
    assert "return: 1 copied, 0 unchanged, 0 failed" in r.stdout, r.stdout
