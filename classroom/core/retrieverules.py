"""retrieve's rules (SPEC §4): the caps, what is late, the manifest's rows and statuses.

A retrieval of one student's folder is told, file by file, what is there; a
``Tally`` keeps what it learns (the manifest entries, the counts, what the state
must remember) and decides by these rules. A ``StillSame`` does the same for
the repeat-run fast path, which only looks at metadata. No file is read here.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
from dataclasses import dataclass, field

from .errors import InvalidInput
from .paths import as_text, shown
from .sizes import human_size

MANIFEST_HEADER = ["username", "snapshot", "path", "size", "mtime", "sha256", "status", "late"]
SKIPPED = "skipped: "  # how a skipped file's reason is kept in the state, in place of a sha256
STATUSES = ("new", "changed", "unchanged")

# What one student's home can make one retrieval write (SPEC §6.11 rule 14), whatever it holds:
MAX_ROWS = 10_000  # manifest rows (files first), then one summary row for the rest
MAX_FOLDERS = 10_000  # folders in the snapshot (those of collected files first)
REMEMBERED_SKIPS = 1_000  # skipped entries the state keeps one by one; the rest as a SkipSet
REPORTED = 100  # "path: why" kept for the report line (which shows a few)
SUMMARY = "\0skipped"  # the state's row for every skipped entry at once (no path has a NUL)


DEADLINE_FORMATS = ("%Y-%m-%d %H:%M", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S")


def parse_deadline(text: str) -> dt.datetime:
    """``--deadline "YYYY-MM-DD HH:MM"`` as a local time; a date alone is the end of that day."""
    text = " ".join(text.split())
    for fmt in DEADLINE_FORMATS:
        with contextlib.suppress(ValueError):
            return dt.datetime.strptime(text, fmt).astimezone()
    try:
        day = dt.datetime.strptime(text, "%Y-%m-%d")
    except ValueError:
        raise InvalidInput(
            f'--deadline {text!r}: use "YYYY-MM-DD HH:MM", or "YYYY-MM-DD" (the end of that day)'
        ) from None
    return dt.datetime.combine(day.date(), dt.time.max).astimezone()


def is_late(mtime_ns: int, deadline: float | None) -> bool:
    """Modified after the deadline (epoch seconds; None: nothing is late)."""
    return deadline is not None and mtime_ns / 1e9 > deadline


def late_work(
    rel: str, sha: str, mtime_ns: int, deadline: float | None, handed_out: dict[str, str]
) -> bool:
    """Is ``rel`` (content ``sha``) the student's work after the deadline? Modified after it,
    and not what send handed out there (``handed_out``: rel -> sha256), whatever its mtime."""
    return is_late(mtime_ns, deadline) and handed_out.get(rel) != sha


def too_large(size: int, max_file: int) -> str | None:
    """Why a file of ``size`` bytes is not collected, or None."""
    if size <= max_file:
        return None
    return f"larger than max_file_size ({human_size(size)} > {human_size(max_file)})"


def grew(max_file: int) -> str:
    return f"grew past max_file_size ({human_size(max_file)}) while read"


def over_total(max_total: int) -> str:
    return f"over max_total_size ({human_size(max_total)}) for this retrieval"


def iso(mtime_ns: int) -> str:
    return dt.datetime.fromtimestamp(mtime_ns / 1e9).astimezone().isoformat(timespec="seconds")


def split_rows(rows) -> tuple[dict[str, list], dict[str, list]]:
    """The last snapshot's rows ``(path, snapshot, sha256, size, stat key)``, as
    (rel -> [sha256, size, stat key] of its files, rel -> [reason, stat key] of what was skipped)."""
    files: dict[str, list] = {}
    skipped: dict[str, list] = {}
    for path, _snap, sha, size, key in rows:
        rel = os.fsdecode(bytes(path))
        if sha.startswith(SKIPPED):
            skipped[rel] = [sha[len(SKIPPED) :], key]
        else:
            files[rel] = [sha, size, key]
    return files, skipped


@dataclass
class SkipSet:
    """Every skipped entry of a retrieval in constant space: how many, and a digest of their
    paths that does not depend on their order. The same paths give the same ``key``."""

    count: int = 0
    digest: int = 0

    def add(self, rel: str) -> None:
        self.count += 1
        h = hashlib.sha256(os.fsencode(rel)).digest()
        self.digest = (self.digest + int.from_bytes(h[:16], "big")) % (1 << 128)

    def key(self) -> str:
        return f"{self.count}:{self.digest:032x}"

    @classmethod
    def of(cls, prev_skipped: dict[str, list]) -> str:
        """The key of what the last snapshot skipped: its summary row's, else its paths'."""
        if SUMMARY in prev_skipped:
            return prev_skipped[SUMMARY][1]
        skips = cls()
        for rel in prev_skipped:
            skips.add(rel)
        return skips.key()


def one_by_one(prev_skipped: dict[str, list]) -> set[str]:
    """The skipped paths the state kept one by one (not the summary row)."""
    return set(prev_skipped) - {SUMMARY}


@dataclass(frozen=True)
class Caps:
    """The limits of one retrieval: ``max_file_size``, ``max_total_size``, ``--deadline``."""

    max_file: int
    max_total: int
    deadline: float | None = None  # epoch seconds


def unchanged_result(
    files: int, size: int, skipped: list[str], late: list[str], n_skipped: int | None = None
) -> dict:
    """The result for a student whose folder is exactly as the last snapshot has it
    (``skipped``: some of the ``n_skipped`` skipped entries, for the report)."""
    n = len(skipped) if n_skipped is None else n_skipped
    return {
        "state": "unchanged",
        "counts": {"new": 0, "changed": 0, "unchanged": files, "skipped": n},
        "deleted": [],
        "skipped": skipped,
        "late": late,
        "files": files,
        "bytes": size,
        "cache": [],
    }


@dataclass
class StillSame:
    """The repeat-run fast path: is every entry of the folder what the last snapshot recorded?

    Fed each entry's metadata (``see``); the same files with the same dev:ino:size:
    mtime:ctime mean the same content. What is skipped now must be exactly what was
    skipped last time: the same paths (their ``SkipSet`` key), a regular file among those
    kept one by one with the same stat.
    """

    prev_files: dict[str, list]
    prev_skipped: dict[str, list]
    caps: Caps
    handed_out: dict[str, str] = field(default_factory=dict)  # rel -> sha256 send last wrote
    files: int = 0
    size: int = 0
    skipped: list[str] = field(default_factory=list)  # "path: why", the first REPORTED
    skips: SkipSet = field(default_factory=SkipSet)
    late: list[str] = field(default_factory=list)
    overflow: bool = field(init=False)  # some skipped paths of the last snapshot are only a key

    def __post_init__(self) -> None:
        self.overflow = SUMMARY in self.prev_skipped

    def see(self, rel: str, problem: bool, size: int, key: str, mtime_ns: int) -> bool:
        """One entry (``problem``: it cannot be collected as it is); False when it differs."""
        was = self.prev_skipped.get(rel)
        if problem or too_large(size, self.caps.max_file):
            if was is None and not self.overflow:
                return False  # newly skipped: recorded by a new snapshot
            return self._skipped(rel, was)
        if was is not None:  # skipped last time (unreadable, say): the same file?
            return was[1] == key and self._skipped(rel, was)
        prev = self.prev_files.get(rel)
        if prev is None or prev[2] != key:
            return False
        self.files += 1
        self.size += size
        if late_work(rel, prev[0], mtime_ns, self.caps.deadline, self.handed_out):
            self.late.append(shown(rel))
        return True

    def _skipped(self, rel: str, was: list | None) -> bool:
        self.skips.add(rel)
        if was is not None and len(self.skipped) < REPORTED:
            self.skipped.append(f"{shown(rel)}: {was[0]}")
        return True

    def result(self) -> dict | None:
        """The fast path's result once every entry was seen, or None: something went away."""
        if self.files != len(self.prev_files) or self.skips.key() != SkipSet.of(self.prev_skipped):
            return None
        return unchanged_result(self.files, self.size, self.skipped, self.late, self.skips.count)


@dataclass
class Tally:
    """What one retrieval learned of one student's folder, entry by entry, and what it decided.

    Whatever the folder holds, what it keeps is bounded: ``MAX_ROWS`` files, as many
    skipped entries (the first ones: only they can get a manifest row), ``MAX_FOLDERS``
    folders, ``REMEMBERED_SKIPS`` skipped entries for the state, and a ``SkipSet`` of all.
    """

    prev_files: dict[str, list]  # the last snapshot's: rel -> [sha256, size, stat key]
    prev_skipped: dict[str, list]  # rel -> [reason, stat key]; SUMMARY -> [what, SkipSet key]
    caps: Caps
    handed_out: dict[str, str] = field(default_factory=dict)  # rel -> sha256 send last wrote
    entries: list[dict] = field(default_factory=list)  # the manifest rows, in order
    cache: dict[str, list] = field(default_factory=dict)  # rel -> [sha, size, key], collected
    skip_cache: dict[str, list] = field(default_factory=dict)  # rel -> ["skipped: why", size, key]
    skips: SkipSet = field(default_factory=SkipSet)  # every skipped entry
    seen: set[str] = field(default_factory=set)  # the last snapshot's files found again
    folders: list[str] = field(default_factory=list)  # folders found, in order (empty ones too)
    dirs: set[str] = field(default_factory=set)  # the folders the snapshot has (see ``place``)
    counts: dict[str, int] = field(
        default_factory=lambda: {"new": 0, "changed": 0, "unchanged": 0, "skipped": 0}
    )
    skipped: list[str] = field(default_factory=list)  # "path: why", the first REPORTED
    late: list[str] = field(default_factory=list)
    total: int = 0
    changed: bool = False
    file_rows: int = 0
    skip_rows: int = 0

    def refuse(self, size: int, rel: str | None = None) -> str | None:
        """Why a file of ``size`` bytes is not collected (the caps), or None; given ``rel``, the
        folders it needs are then kept for it in the snapshot (``place``)."""
        reason = too_large(size, self.caps.max_file)
        if reason is None and self.total + size > self.caps.max_total:
            reason = over_total(self.caps.max_total)
        if reason is None and self.file_rows >= MAX_ROWS:
            reason = f"over the {MAX_ROWS:,} files of one retrieval"
        if reason is None and rel is not None:
            reason = self.place(rel)
        return reason

    def place(self, rel: str) -> str | None:
        """Keep the folders of file ``rel`` in the snapshot; why not, if over ``MAX_FOLDERS``."""
        parts = rel.split("/")[:-1]
        needed = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        new = [d for d in needed if d not in self.dirs]
        if len(self.dirs) + len(new) > MAX_FOLDERS:
            return f"in a folder over the {MAX_FOLDERS:,} folders of one retrieval"
        self.dirs.update(new)
        return None

    def folder(self, rel: str) -> None:
        """A folder of the student's (kept in the snapshot, even empty, while there is room)."""
        if len(self.folders) < MAX_FOLDERS:
            self.folders.append(rel)

    def snapshot_folders(self) -> list[str]:
        """Every folder of the snapshot: those of its files, then the others found, in order,
        up to ``MAX_FOLDERS`` in all (a folder only with the one it is in)."""
        for rel in self.folders:
            if len(self.dirs) >= MAX_FOLDERS:
                break
            parent = rel.rpartition("/")[0]
            if not parent or parent in self.dirs:
                self.dirs.add(rel)
        return sorted(self.dirs, key=lambda d: d.split("/"))

    def saw(self, rel: str) -> None:
        """``rel`` is in the folder (so not deleted)."""
        if rel in self.prev_files:
            self.seen.add(rel)

    def skip(self, rel: str, why: str, size: int = 0, mtime: int = 0, key: str = "") -> None:
        """``rel`` is not collected: a manifest row "skipped: why" (while there is room)."""
        self.counts["skipped"] += 1
        self.skips.add(rel)
        if len(self.skip_cache) < REMEMBERED_SKIPS:
            self.skip_cache[rel] = [SKIPPED + why, size, key]
        if len(self.skipped) < REPORTED:
            self.skipped.append(f"{shown(rel)}: {why}")
        if self.skip_rows < MAX_ROWS:
            self.skip_rows += 1
            status = f"skipped: {why}"
            self.entries.append(
                {
                    "rel": rel,
                    "size": size,
                    "mtime": mtime,
                    "sha": "",
                    "status": status,
                    "skip": True,
                }
            )

    def add(self, rel: str, status: str, sha: str, size: int, key: str, mtime: int) -> None:
        """``rel`` is in the snapshot: new, changed or unchanged."""
        self.counts[status] += 1
        self.total += size
        self.file_rows += 1
        if status != "unchanged":
            self.changed = True
        late = late_work(rel, sha, mtime, self.caps.deadline, self.handed_out)
        if late:
            self.late.append(shown(rel))
        self.entries.append(
            {"rel": rel, "size": size, "mtime": mtime, "sha": sha, "status": status, "late": late}
        )
        self.cache[rel] = [sha, size, key]

    def reported_same(self, rel: str, key: str, size: int, mtime: int) -> str | None:
        """The reader says ``rel`` has the stat it had when last collected: its sha256, to
        keep it as unchanged, or None (skipped: it is not so, or over a cap)."""
        self.saw(rel)
        prev = self.prev_files.get(rel)
        if prev is None or prev[2] != key:
            self.skip(rel, "reported unchanged, but is not", size, mtime)
            return None
        why = self.refuse(size, rel)
        if why:
            self.skip(rel, why, size, mtime)
            return None
        return prev[0]

    def status(self, rel: str) -> str:
        return "changed" if rel in self.prev_files else "new"

    def lost(self, rel: str) -> None:
        """The previous snapshot's copy of unchanged ``rel`` is gone: it is not in this one."""
        self.cache.pop(rel, None)
        for e in self.entries:
            if e["rel"] == rel:
                e.update(sha="", status="skipped: the previous copy is missing; retrieve again")
        self.skipped.append(f"{shown(rel)}: the previous copy is missing from the destination")

    def result(self) -> dict:
        """What was found. ``state``: "nothing" to collect, "unchanged", or "collected" (then
        the snapshot is to be made; ``rows`` and ``cache`` come with its name)."""
        deleted = sorted(set(self.prev_files) - self.seen)
        if (
            deleted
            or self.skips.key() != SkipSet.of(self.prev_skipped)
            or set(self.skip_cache) != one_by_one(self.prev_skipped)
        ):
            # What cannot be collected is part of the record too: a file that became (or
            # stopped being) unreadable, too large, a link... makes a new snapshot.
            self.changed = True
        result = {
            "counts": self.counts,
            "deleted": [shown(r) for r in deleted],
            "skipped": self.skipped,
            "late": self.late,
            "files": len(self.cache),
            "bytes": self.total,
        }
        if not self.cache and not self.prev_files:
            n = self.counts["skipped"]
            why = "no files in the folder" + (f" ({n} skipped)" if n else "")
            return {**result, "state": "nothing", "why": why}
        if not self.changed:  # only the files whose stat changed need their cache entry refreshed
            no = [None, None, None]
            fresh = [
                [r, *v] for r, v in self.cache.items() if self.prev_files.get(r, no)[2] != v[2]
            ]
            fresh += [
                [r, *v] for r, v in self.skip_cache.items() if self.prev_skipped[r][1] != v[2]
            ]
            return {**result, "state": "unchanged", "cache": fresh}
        return {**result, "state": "collected"}

    def rows(self, username: str, snapshot: str) -> list[list]:
        """The manifest rows of a new snapshot (columns of ``MANIFEST_HEADER``): every file, the
        first skipped entries up to ``MAX_ROWS`` rows in all, and a summary row for the rest."""
        room = MAX_ROWS - self.file_rows
        rows, listed = [], 0
        for e in self.entries:
            if e.get("skip"):
                if listed >= room:
                    continue
                listed += 1
            late = "late" if e.get("late") else ""
            mtime = iso(e["mtime"]) if e["mtime"] else ""
            rel = as_text(e["rel"])
            rows.append([username, snapshot, rel, e["size"], mtime, e["sha"], e["status"], late])
        hidden = self.counts["skipped"] - listed
        if hidden > 0:
            why = f"{hidden:,} more entries, not listed (at most {MAX_ROWS:,} rows per student)"
            rows.append([username, snapshot, "", 0, "", "", SKIPPED + why, ""])
        return rows

    def remembered(self) -> list[list]:
        """What the state keeps of a new snapshot: [rel, sha or "skipped: why", size, key], and
        for skipped entries not kept one by one, a summary row with their ``SkipSet`` key."""
        kept = [[rel, *v] for rel, v in (*self.cache.items(), *self.skip_cache.items())]
        if self.skips.count > len(self.skip_cache):
            kept.append([SUMMARY, f"{SKIPPED}{self.skips.count} entries", 0, self.skips.key()])
        return kept


def detail(result: dict, limit: int = 5) -> str:
    """One student's retrieval, in a report line."""
    parts = []
    counts = result.get("counts", {})
    if result.get("snapshot"):
        parts.append(f"snapshot {result['snapshot']}")
    nums = [f"{counts[k]} {k}" for k in STATUSES if counts.get(k)]
    if result.get("deleted"):
        nums.append(f"{len(result['deleted'])} deleted")
    if nums and result.get("state") == "collected":
        parts.append(", ".join(nums))
    late = result.get("late") or []
    if late:
        more = " ..." if len(late) > limit else ""
        parts.append(f"{len(late)} late: " + ", ".join(late[:limit]) + more)
    skipped = result.get("skipped") or []
    n = max(counts.get("skipped", 0), len(skipped))  # the list holds the first ones only
    shown_here = skipped[:limit]
    if n:
        more = f"; ... {n - len(shown_here)} more" if shown_here and n > len(shown_here) else ""
        listed = (": " + "; ".join(shown_here)) if shown_here else ""
        parts.append(f"{n} skipped{listed}{more}")
    return "; ".join(parts)
