"""retrieve's summary (SPEC §6.8): one row per student, from the manifest and what send handed out.

``summarize`` reads nothing: it gets the manifest (a pandas DataFrame of
``MANIFEST_HEADER`` columns, all text) and, per student, the sha256 send last
wrote at each path. Of each student's latest snapshot it counts the files, those
that differ from what send handed out (``changed``), those send never handed out
(``new``), the late and the skipped ones. A student who handed in nothing of
their own (no changed, no new file) is ``idle``: the HTML page marks them.
pandas is imported by the caller (retrieve only), never at import time here.
"""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas

COLUMNS = [
    "username",
    "name",
    "snapshots",
    "latest",
    "files",
    "changed",
    "new",
    "late",
    "skipped",
    "last_modified",
]
COUNTS = ["snapshots", "files", "changed", "new", "late", "skipped"]
FILE_STATUSES = ("new", "changed", "unchanged")


def summarize(
    manifest: pandas.DataFrame,
    handed_out: dict[str, dict[str, str]],
    students: Sequence[tuple[str, str]],
) -> pandas.DataFrame:
    """The summary table (``COLUMNS``, plus the boolean ``idle``), one row per student.

    ``handed_out``: username -> {path as in the manifest: sha256 send wrote there};
    ``students``: (username, name) in roster order. Students found only in the
    manifest (dropped from the roster) follow, by name.
    """
    import pandas as pd

    m = manifest
    per_user = m.groupby("username", sort=False)["snapshot"]
    snapshots = per_user.nunique()
    latest = per_user.last()  # the manifest is a log: the last snapshot written is the latest
    rows = m[m["snapshot"] == m["username"].map(latest.to_dict())]
    sent = pd.DataFrame(
        [(u, p, sha) for u, paths in handed_out.items() for p, sha in paths.items()],
        columns=["username", "path", "sent_sha256"],
    )
    rows = rows.merge(sent, on=["username", "path"], how="left")
    is_file = rows["status"].isin(FILE_STATUSES)
    handed = rows["sent_sha256"].notna()
    mtime = pd.to_datetime(
        rows["mtime"].where(is_file), utc=True, errors="coerce", format="ISO8601"
    )
    counted = pd.DataFrame(
        {
            "username": rows["username"],
            "files": is_file,
            "changed": is_file & handed & (rows["sha256"] != rows["sent_sha256"]),
            "new": is_file & ~handed,
            "late": rows["late"] == "late",
            "skipped": rows["status"].str.startswith("skipped"),
            "mtime": mtime,
        }
    ).groupby("username", sort=False)
    totals = counted[["files", "changed", "new", "late", "skipped"]].sum()
    last = counted["mtime"].max()

    names = dict(students)
    snaps, latest_of, last_mtime = snapshots.to_dict(), latest.to_dict(), last.to_dict()
    counts = totals.to_dict("index")
    table = []
    for username in [u for u, _ in students] + sorted(set(latest_of) - set(names)):
        n = {k: int(v) for k, v in counts.get(username, {}).items()}
        table.append(
            {
                "username": username,
                "name": names.get(username, ""),
                "snapshots": int(snaps.get(username, 0)),
                "latest": latest_of.get(username, ""),
                **{k: n.get(k, 0) for k in ("files", "changed", "new", "late", "skipped")},
                "last_modified": _local(last_mtime.get(username)),
                "idle": not n.get("changed") and not n.get("new"),
            }
        )
    return pd.DataFrame(table, columns=[*COLUMNS, "idle"])


def _local(when) -> str:
    """A UTC timestamp (or NaT) as local ISO time, to the second; '' for none."""
    if when is None or when != when:  # NaT and NaN are not equal to themselves
        return ""
    return dt.datetime.fromtimestamp(when.timestamp()).astimezone().isoformat(timespec="seconds")


def to_csv(table: pandas.DataFrame) -> str:
    """``summary.csv``: the ``COLUMNS`` of the table."""
    return table[COLUMNS].to_csv(index=False, lineterminator="\n")


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }}
td.n {{ text-align: right; }}
tr.idle {{ background: #fde2e1; font-weight: bold; }}
tr.idle td.mark::after {{ content: " (nothing handed in)"; font-weight: normal; }}
</style>
</head>
<body>
<h1>{title}</h1>
<p>{intro}</p>
<table>
<thead><tr>{head}</tr></thead>
<tbody>
{body}
</tbody>
</table>
</body>
</html>
"""


def to_html(table: pandas.DataFrame, title: str) -> str:
    """``summary.html``: the table as a page a teacher opens; every value escaped (names and
    file data are the students'); students who handed in nothing are ``class="idle"``."""
    idle = int(table["idle"].sum())
    intro = (
        f"{len(table)} student(s); {idle} handed in nothing changed or new (highlighted). "
        "changed: differs from what send handed out; new: send never handed it out; "
        "counted in each student's latest snapshot."
    )
    lines = []
    for row in table.to_dict("records"):
        cells = []
        for col in COLUMNS:
            cls = ' class="n"' if col in COUNTS else ' class="mark"' if col == "username" else ""
            cells.append(f"<td{cls}>{html.escape(str(row[col]))}</td>")
        cls = ' class="idle"' if row["idle"] else ""
        lines.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return PAGE.format(
        title=html.escape(title),
        intro=html.escape(intro),
        head="".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS),
        body="\n".join(lines),
    )
