"""retrieve's rules: caps, late, manifest rows and statuses, the fast path; without root."""

from __future__ import annotations

import datetime as dt

from classroom.core import retrieverules as r
from classroom.core.retrieverules import Caps, StillSame, Tally

K1, K2 = "1:10:5:100:100", "1:10:5:200:200"  # stat keys: the same file before and after a write
SHA_A, SHA_B = "a" * 64, "b" * 64
DEADLINE = dt.datetime(2024, 5, 1, 12, 0).timestamp()
BEFORE = int((DEADLINE - 60) * 1e9)
AFTER = int((DEADLINE + 60) * 1e9)


def tally(prev_files=None, prev_skipped=None, max_file=1000, max_total=3000, deadline=None):
    return Tally(prev_files or {}, prev_skipped or {}, Caps(max_file, max_total, deadline))


def test_late_is_after_the_deadline():
    assert not r.is_late(AFTER, None)
    assert not r.is_late(BEFORE, DEADLINE)
    assert r.is_late(AFTER, DEADLINE)


def test_caps():
    t = tally(max_file=1000, max_total=1500)
    assert t.refuse(1000) is None
    assert t.refuse(1001) == "larger than max_file_size (1001 bytes > 1000 bytes)"
    t.add("a", "new", SHA_A, 1000, K1, BEFORE)
    assert t.refuse(500) is None
    assert t.refuse(501) == "over max_total_size (1.5 KB) for this retrieval"
    assert r.grew(1000) == "grew past max_file_size (1000 bytes) while read"


def test_split_rows():
    rows = [
        (b"a.py", "S1", SHA_A, 5, K1),
        (b"locked.py", "S1", "skipped: cannot be read (permission denied)", 0, K2),
    ]
    files, skipped = r.split_rows(rows)
    assert files == {"a.py": [SHA_A, 5, K1]}
    assert skipped == {"locked.py": ["cannot be read (permission denied)", K2]}


def test_nothing_in_the_folder():
    t = tally()
    t.skip("fifo", "a FIFO")
    result = t.result()
    assert result["state"] == "nothing"
    assert result["why"] == "no files in the folder (1 skipped)"


def test_first_snapshot_rows_statuses_late():
    t = tally(deadline=DEADLINE)
    t.seen.update({"early.py", "late.py", "big.py"})
    t.add("early.py", t.status("early.py"), SHA_A, 5, K1, BEFORE)
    t.add("late.py", t.status("late.py"), SHA_B, 5, K2, AFTER)
    t.skip("big.py", t.refuse(5000) or "", 5000, BEFORE, K1)
    result = t.result()
    assert result["state"] == "collected"
    assert result["counts"] == {"new": 2, "changed": 0, "unchanged": 0, "skipped": 1}
    assert result["late"] == ["late.py"]
    assert (result["files"], result["bytes"]) == (2, 10)
    rows = {row[2]: row for row in t.rows("tstudent", "2024-05-01_120000")}
    header = r.MANIFEST_HEADER
    early = dict(zip(header, rows["early.py"], strict=True))
    assert early["status"] == "new" and early["late"] == "" and early["sha256"] == SHA_A
    assert early["mtime"].startswith("2024-05-01T11:59:00")
    assert dict(zip(header, rows["late.py"], strict=True))["late"] == "late"
    big = dict(zip(header, rows["big.py"], strict=True))
    assert big["status"] == "skipped: larger than max_file_size (4.9 KB > 1000 bytes)"
    assert big["sha256"] == ""
    assert sorted(x[0] for x in t.remembered()) == ["big.py", "early.py", "late.py"]


def test_nothing_changed_remembers_only_new_stats():
    t = tally(prev_files={"a.py": [SHA_A, 5, K1], "b.py": [SHA_B, 5, K1]})
    sha = t.reported_same("a.py", K1, 5, BEFORE)
    assert sha == SHA_A
    t.add("a.py", "unchanged", sha, 5, K1, BEFORE)
    t.seen.add("b.py")  # touched, same content: unchanged with its new stat
    t.add("b.py", "unchanged", SHA_B, 5, K2, BEFORE)
    result = t.result()
    assert result["state"] == "unchanged"
    assert result["cache"] == [["b.py", SHA_B, 5, K2]]


def test_changed_and_deleted_files_make_a_snapshot():
    prev = {"a.py": [SHA_A, 5, K1], "gone.py": [SHA_A, 5, K1]}
    t = tally(prev_files=prev)
    t.seen.add("a.py")
    assert t.status("a.py") == "changed" and t.status("other.py") == "new"
    t.add("a.py", "changed", SHA_B, 5, K2, BEFORE)
    result = t.result()
    assert result["state"] == "collected" and result["deleted"] == ["gone.py"]

    t = tally(prev_files={"gone.py": [SHA_A, 5, K1]})
    assert t.result()["state"] == "collected"  # only a deletion is a change too


def test_a_new_skipped_file_is_a_change():
    t = tally(prev_files={"a.py": [SHA_A, 5, K1]})
    t.add("a.py", "unchanged", t.reported_same("a.py", K1, 5, BEFORE) or "", 5, K1, BEFORE)
    t.skip("locked.py", "cannot be read (permission denied)", 0, 0, K2)
    assert t.result()["state"] == "collected"


def test_reported_same_is_checked():
    t = tally(prev_files={"a.py": [SHA_A, 5, K1]}, max_total=4)
    assert t.reported_same("a.py", K2, 5, BEFORE) is None  # not the stat it had
    assert t.reported_same("new.py", K1, 5, BEFORE) is None  # never collected
    t = tally(prev_files={"a.py": [SHA_A, 5, K1]}, max_total=4)
    assert t.reported_same("a.py", K1, 5, BEFORE) is None  # over the total
    assert [e["status"] for e in t.entries] == [
        "skipped: over max_total_size (4 bytes) for this retrieval"
    ]


def test_a_lost_previous_copy_is_skipped():
    t = tally(prev_files={"a.py": [SHA_A, 5, K1]})
    t.add("a.py", "unchanged", SHA_A, 5, K1, BEFORE)
    t.lost("a.py")
    assert "a.py" not in t.cache
    assert t.entries[0]["status"] == "skipped: the previous copy is missing; retrieve again"
    assert t.skipped == ["a.py: the previous copy is missing from the destination"]


def test_names_are_shown_on_one_line_and_kept_exactly():
    t = tally(deadline=DEADLINE)
    t.add("new\nline.py", "new", SHA_A, 5, K1, AFTER)
    assert t.late == ["new\\nline.py"]
    assert t.rows("u", "S")[0][2] == "new\nline.py"


def test_still_same():
    prev_files = {"a.py": [SHA_A, 5, K1]}
    prev_skipped = {"fifo": ["a FIFO", ""], "locked.py": ["permission denied", K2]}
    caps = Caps(1000, 3000, DEADLINE)
    s = StillSame(prev_files, prev_skipped, caps)
    assert s.see("a.py", False, 5, K1, AFTER)
    assert s.see("fifo", True, 0, "", 0)
    assert s.see("locked.py", False, 5, K2, BEFORE)
    result = s.result()
    assert result is not None and result["state"] == "unchanged"
    assert result["late"] == ["a.py"] and len(result["skipped"]) == 2
    assert (result["files"], result["bytes"]) == (1, 5)

    s = StillSame(prev_files, prev_skipped, caps)
    assert not s.see("a.py", False, 5, K2, BEFORE)  # written to
    s = StillSame(prev_files, {}, caps)
    assert not s.see("new-fifo", True, 0, "", 0)  # newly skipped
    s = StillSame(prev_files, prev_skipped, caps)
    assert not s.see("locked.py", False, 5, K1, BEFORE)  # another file than the skipped one
    s = StillSame(prev_files, {}, caps)
    assert not s.see("big.bin", False, 5000, K1, BEFORE)  # newly too large
    s = StillSame(prev_files, {}, caps)
    assert s.result() is None  # a.py is gone


def test_detail():
    result = {
        "state": "collected",
        "snapshot": "S",
        "counts": {"new": 1, "changed": 2, "unchanged": 3, "skipped": 0},
        "deleted": ["x"],
        "late": [f"f{i}" for i in range(6)],
        "skipped": ["a: a FIFO"],
    }
    assert r.detail(result) == (
        "snapshot S; 1 new, 2 changed, 3 unchanged, 1 deleted; "
        "6 late: f0, f1, f2, f3, f4 ...; 1 skipped: a: a FIFO"
    )
    assert r.detail({**result, "state": "unchanged", "snapshot": None}) == (
        "6 late: f0, f1, f2, f3, f4 ...; 1 skipped: a: a FIFO"
    )


def test_sizes_are_human():
    from classroom.core.sizes import human_size

    assert human_size(20 << 20) == "20 MB"
    assert human_size(200 << 20) == "200 MB"
    assert human_size(1536) == "1.5 KB"
    assert human_size(512) == "512 bytes"
    assert human_size((1 << 20) - 1) == "1 MB"  # never "1024 KB"
    assert r.too_large(25 << 20, 20 << 20) == "larger than max_file_size (25 MB > 20 MB)"


def test_deadline_date_alone_is_the_end_of_that_day():
    d = r.parse_deadline("2024-05-01")
    assert (d.year, d.month, d.day, d.hour, d.minute, d.second) == (2024, 5, 1, 23, 59, 59)
    assert r.parse_deadline(" 2024-05-01  12:30 ") == r.parse_deadline("2024-05-01 12:30")
    assert r.parse_deadline("2024-05-01T12:30").hour == 12


def test_what_send_handed_out_is_never_late():
    handed_out = {"lesson.ipynb": SHA_A, "data.csv": SHA_A}
    t = Tally({}, {}, Caps(1000, 3000, DEADLINE), handed_out)
    t.add("lesson.ipynb", "new", SHA_A, 5, K1, AFTER)  # touched, as sent: not late
    t.add("data.csv", "new", SHA_B, 5, K1, AFTER)  # edited after the deadline: late
    t.add("answer.py", "new", SHA_A, 5, K1, AFTER)  # the student's own: late
    assert t.late == ["data.csv", "answer.py"]
    prev = {"lesson.ipynb": [SHA_A, 5, K1], "data.csv": [SHA_B, 5, K1]}
    s = StillSame(prev, {}, Caps(1000, 3000, DEADLINE), handed_out)
    assert s.see("lesson.ipynb", False, 5, K1, AFTER) and s.see("data.csv", False, 5, K1, AFTER)
    assert s.late == ["data.csv"]


def test_escaped_leaves_nothing_a_terminal_acts_on():
    import unicodedata

    from classroom.core.text import escaped as printable

    hostile = "\x1b]0;pwned\x07\x1b[2K\x1b[1A started\u009b31m\x7f\u202e\u2028\udcff\n\t"
    shown = printable(hostile.replace(" ", "") + " ok é")
    assert not [ch for ch in shown if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Cs")]
    assert shown.startswith("\\x1b]0;pwned\\x07\\x1b[2K") and shown.endswith("\\n\\t ok é")
    assert printable("lesson.ipynb") == "lesson.ipynb"
    assert printable(printable(hostile)) == printable(hostile)  # what it prints is printable


def flood(t: Tally, links: int, folders: int) -> None:
    """What the reader reports of a flooded folder, in walk order: folders, links, two files."""
    for i in range(folders):
        t.folder(f"f{i:06d}")
    for i in range(links):
        t.saw(f"deep/l{i:06d}")
        t.skip(f"deep/l{i:06d}", "a symlink", 11, BEFORE, f"1:{i}:11:0:0")
    for rel, sha in (("lesson.ipynb", SHA_A), ("zz/answer.py", SHA_B)):
        t.saw(rel)
        assert t.refuse(5, rel) is None
        t.add(rel, "unchanged" if rel in t.prev_files else "new", sha, 5, K1, BEFORE)


def as_state(t: Tally) -> list[tuple]:
    """What the state keeps of a snapshot, as ``split_rows`` reads it back."""
    return [(rel.encode(), "S1", sha, size, key) for rel, sha, size, key in t.remembered()]


def test_a_flood_is_bounded_and_the_same_flood_is_no_change():
    t = tally(max_total=10**9)
    flood(t, links=25_000, folders=12_000)
    result = t.result()
    assert result["state"] == "collected" and result["counts"]["skipped"] == 25_000
    rows = t.rows("u", "S1")
    assert len(rows) == r.MAX_ROWS + 1
    assert {"lesson.ipynb", "zz/answer.py"} <= {row[2] for row in rows}  # files first
    assert rows[-1][2] == "" and "15,002 more entries, not listed" in rows[-1][6]
    assert len(t.remembered()) == r.REMEMBERED_SKIPS + 2 + 1  # + the files + the summary
    assert len(result["skipped"]) <= r.REPORTED
    assert "25000 skipped: deep/l000000: a symlink" in r.detail(result)
    folders = t.snapshot_folders()
    assert len(folders) == r.MAX_FOLDERS and "zz" in folders and "deep" not in folders

    prev_files, prev_skipped = r.split_rows(as_state(t))
    again = Tally(prev_files, prev_skipped, Caps(1000, 10**9))
    flood(again, links=25_000, folders=12_000)
    assert again.result()["state"] == "unchanged"

    still = StillSame(prev_files, prev_skipped, Caps(1000, 10**9))
    for i in range(25_000):
        assert still.see(f"deep/l{i:06d}", True, 11, f"1:{i}:11:0:0", BEFORE)
    for rel in ("lesson.ipynb", "zz/answer.py"):
        assert still.see(rel, False, 5, K1, BEFORE)
    fast = still.result()
    assert fast is not None and fast["counts"]["skipped"] == 25_000

    one_more = Tally(prev_files, prev_skipped, Caps(1000, 10**9))
    flood(one_more, links=25_001, folders=0)
    assert one_more.result()["state"] == "collected"  # a new skipped entry is a change
    still = StillSame(prev_files, prev_skipped, Caps(1000, 10**9))
    for i in range(25_001):
        still.see(f"deep/l{i:06d}", True, 11, "", BEFORE)
    assert still.result() is None


def test_files_past_the_caps_of_rows_and_folders_are_skipped():
    t = tally(max_total=10**9)
    for i in range(r.MAX_ROWS):
        assert t.refuse(1, f"f{i}.txt") is None
        t.add(f"f{i}.txt", "new", SHA_A, 1, K1, BEFORE)
    assert t.refuse(1, "one-more.txt") == "over the 10,000 files of one retrieval"
    t = tally(max_total=10**9)
    deep = "/".join(f"d{i}" for i in range(r.MAX_FOLDERS))
    assert t.refuse(1, f"{deep}/file") is None
    assert t.refuse(1, "other/file") == "in a folder over the 10,000 folders of one retrieval"
    assert t.refuse(1, "top-level-file") is None
