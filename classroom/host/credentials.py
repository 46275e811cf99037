"""The credentials file (CSV) and the printable handout (HTML), both 0600 root."""

from __future__ import annotations

import contextlib
import csv
import html
import io
import socket
from pathlib import Path

from ..core.addresses import host_name, portal_url, public_host
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
.slip { display: flex; gap: 1.5em; align-items: center; flex-wrap: wrap; }
.slip:before { flex-basis: 100%; }
.qr svg { width: 8em; height: 8em; display: block; }
@media print { .slip { page-break-inside: avoid; } }
"""


def handout_html(settings, rows: dict[str, dict[str, str]]) -> str:
    """One slip per student, in the order of ``rows`` (the roster's): name, username,
    password(s), the portal address and a QR code of it (inline SVG: no external file)."""
    address = portal_url(settings)
    qr = qr_svg(address)
    slips = []
    for username, row in rows.items():
        nb = row.get("notebook_password") or ""
        notebook = (
            f"<dt>Notebook password</dt><dd class='secret'>{html.escape(nb)}</dd>"
            if nb and nb != row.get("password")
            else ""
        )
        slips.append(
            f"""<section class="slip">
<div class="fields">
<h2>{html.escape(settings.title)}: {html.escape(row.get("name") or username)}</h2>
<dl>
<dt>Username</dt><dd class="user">{html.escape(username)}</dd>
<dt>Password</dt><dd class="secret">{html.escape(row.get("password") or "")}</dd>
{notebook}
<dt>Jupyter</dt><dd><a href="{html.escape(address)}">{html.escape(address)}</a></dd>
</dl>
<p class="note">Open the address (or scan the code), type your username, then log in
with your password. Keep this slip private.</p>
</div>
<div class="qr" role="img" aria-label="QR code of {html.escape(address)}">{qr}</div>
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


def qr_code(address: str):
    """The QR code (segno) of ``address``; medium error correction, for printed slips."""
    import segno

    return segno.make(address, error="m", micro=False)


def qr_svg(address: str) -> str:
    """The QR code of ``address`` as an inline ``<svg>`` (scales with its CSS box)."""
    return qr_code(address).svg_inline(scale=4, border=4, omitsize=True)


def address_warning(settings) -> str | None:
    """A warning when the slips' address is a short host name (no dot, no server_address):
    students' laptops and phones usually cannot resolve it. None when it is fine."""
    if settings.server_address:
        return None
    host = public_host(settings)
    if "." in host or host.startswith("[") or host_name(host) is None:
        return None
    ip = primary_ip()
    example = f" (this host's address looks like {ip})" if ip else ""
    return (
        f"{settings.where('launch', 'server_address')}: the handout and launch give students "
        f"{portal_url(settings)}, but '{host}' has no dot: students' devices may not resolve it. "
        f"Set [launch] server_address to a name their devices resolve (e.g. class.example.org) "
        f"or to this host's IP address{example}"
    )


def primary_ip() -> str | None:
    """The IPv4 address this host reaches other networks from (no packet is sent), or None."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("192.0.2.1", 9))  # TEST-NET-1: routing only; UDP connect sends nothing
        ip = sock.getsockname()[0]
        return None if ip.startswith(("0.", "127.")) else ip
    return None
