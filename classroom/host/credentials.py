"""The credentials file (CSV) and the printable handout (HTML), both 0600 root."""

from __future__ import annotations

import csv
import html
import io
from pathlib import Path

from ..core.addresses import portal_url
from ..core.secret import Secret
from .files import write_atomic

HEADER = ["username", "name", "email", "password", "notebook_password"]


def read(path: Path) -> dict[str, dict[str, str]]:
    """The rows of credentials.csv by username (empty when there is none)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    return {
        row["username"]: row for row in csv.DictReader(io.StringIO(text)) if row.get("username")
    }


def update(
    path: Path, changes: dict[str, dict[str, str | Secret]], drop: set[str] = frozenset()
) -> None:
    """Update rows in place (one per student), drop others, keep the rest as they are."""
    rows = read(path)
    for username, values in changes.items():
        row = rows.setdefault(username, dict.fromkeys(HEADER, ""))
        row["username"] = username
        for key, value in values.items():
            row[key] = value.reveal() if isinstance(value, Secret) else value
    for username in drop:
        rows.pop(username, None)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HEADER, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for username in sorted(rows):
        writer.writerow(rows[username])
    write_atomic(path, buf.getvalue())


HANDOUT_CSS = """
@import url("data:text/css,");
body { font-family: "DejaVu Sans", Verdana, sans-serif; margin: 0; }
.slip { border-bottom: 2px dashed #888; padding: 1.2em 1.5em; page-break-inside: avoid; }
.slip:before { content: "\\2702  cut here"; color: #888; font-size: 70%; display: block; }
h2 { margin: .2em 0; font-size: 120%; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .3em 1em; margin: .5em 0; }
dt { color: #555; }
.secret, .user { font-family: "DejaVu Sans Mono", "Liberation Mono", "Courier New", monospace;
  font-size: 160%; letter-spacing: .12em; font-weight: bold; }
.note { font-size: 85%; color: #444; }
@media print { .slip { page-break-inside: avoid; } }
"""


def handout_html(settings, rows: dict[str, dict[str, str]]) -> str:
    """One slip per student with name, username, password(s) and the portal address."""
    address = portal_url(settings)
    slips = []
    for username in sorted(rows):
        row = rows[username]
        nb = row.get("notebook_password") or ""
        notebook = (
            f"<dt>Notebook password</dt><dd class='secret'>{html.escape(nb)}</dd>"
            if nb and nb != row.get("password")
            else ""
        )
        slips.append(
            f"""<section class="slip">
<h2>{html.escape(settings.title)}: {html.escape(row.get("name") or username)}</h2>
<dl>
<dt>Username</dt><dd class="user">{html.escape(username)}</dd>
<dt>Password</dt><dd class="secret">{html.escape(row.get("password") or "")}</dd>
{notebook}
<dt>Jupyter</dt><dd><a href="{html.escape(address)}">{html.escape(address)}</a></dd>
</dl>
<p class="note">Open the address, type your username, then log in with your password.
Keep this slip private.</p>
</section>"""
        )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>{html.escape(settings.title)}: accounts</title>
<style>{HANDOUT_CSS}</style></head>
<body>
{"".join(slips)}
</body></html>
"""
