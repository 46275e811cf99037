"""The portal's page: one HTML page (no script, nothing loaded from elsewhere), its
style, and the security headers and content security policy every answer carries."""

from __future__ import annotations

import base64
import hashlib
import html
from typing import Any

from ..core.addresses import MAX_INPUT

CSS = """
:root{color-scheme:light dark;--bg:#eef2f8;--card:#fff;--text:#1b2232;--muted:#586175;
--accent:#1f6feb;--accent-hover:#1a5fcc;--on-accent:#fff;--border:#d3d9e4;--field:#fbfcfe;
--note-bg:#fff6e8;--note-edge:#e59a2f;--shadow:0 12px 32px rgba(24,39,75,.10)}
@media (prefers-color-scheme:dark){:root{--bg:#0f131a;--card:#181e28;--text:#e6eaf1;
--muted:#a2acbd;--accent:#5b9dff;--accent-hover:#7db1ff;--on-accent:#0b1220;--border:#2e3746;
--field:#121822;--note-bg:#33280f;--note-edge:#d08b22;--shadow:none}}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%;text-size-adjust:100%}
body{margin:0;min-height:100vh;min-height:100dvh;display:flex;align-items:center;
justify-content:center;padding:1rem;background:var(--bg);color:var(--text);
font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans","Helvetica Neue",
Arial,sans-serif}
main{width:100%;max-width:26rem;background:var(--card);border:1px solid var(--border);
border-radius:16px;padding:2rem 1.5rem 1.5rem;box-shadow:var(--shadow)}
.mark{display:block;width:48px;height:48px;margin:0 0 1rem}
h1{font-size:1.6rem;line-height:1.25;margin:0 0 .4rem;overflow-wrap:anywhere}
.lead{color:var(--muted);margin:0 0 1.5rem}
label{display:block;font-weight:600;margin:0 0 .4rem}
input{display:block;width:100%;font:inherit;font-size:1.15rem;padding:.75rem .9rem;
border:1px solid var(--border);border-radius:10px;background:var(--field);color:inherit;
font-family:ui-monospace,"SFMono-Regular","DejaVu Sans Mono",Menlo,Consolas,monospace}
input:focus{outline:3px solid var(--accent);outline-offset:1px;border-color:var(--accent)}
.help{color:var(--muted);font-size:.875rem;margin:.4rem 0 0}
button{display:block;width:100%;min-height:48px;margin:1.25rem 0 0;padding:.75rem 1rem;
font:inherit;font-weight:600;font-size:1.05rem;color:var(--on-accent);background:var(--accent);
border:0;border-radius:10px;cursor:pointer}
button:hover{background:var(--accent-hover)}
button:focus-visible{outline:3px solid var(--text);outline-offset:2px}
.gap{margin-top:1rem}
a.button{display:block;text-align:center;min-height:48px;padding:.75rem 1rem;font-weight:600;
font-size:1.05rem;color:var(--on-accent);background:var(--accent);border-radius:10px;
text-decoration:none}
a.button:hover{background:var(--accent-hover)}
button.quiet{background:transparent;color:var(--accent);border:1px solid var(--border)}
.note{margin:0 0 1.25rem;padding:.8rem 1rem;border-left:4px solid var(--note-edge);
background:var(--note-bg);border-radius:8px;overflow-wrap:anywhere}
.note strong{display:block;margin-bottom:.15rem}
.note p{margin:0}
code{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:.95em}
.foot{color:var(--muted);font-size:.8rem;margin:1.5rem 0 0;padding-top:1rem;
border-top:1px solid var(--border)}
@media (max-width:600px){body{align-items:flex-start;padding-top:max(1rem,6vh)}}
@media (max-width:380px){main{padding:1.5rem 1rem 1rem;border-radius:12px}h1{font-size:1.4rem}}
"""
CSS_HASH = "sha256-" + base64.b64encode(hashlib.sha256(CSS.encode()).digest()).decode()

# A notebook with a play mark: an inline SVG, so no request leaves the page.
MARK = (
    '<svg class="mark" viewBox="0 0 48 48" aria-hidden="true" focusable="false">'
    '<rect x="4" y="4" width="40" height="40" rx="10" fill="#f37726"/>'
    '<rect x="13" y="12" width="22" height="25" rx="3" fill="#fff"/>'
    '<path d="M21 19.5v10l8-5z" fill="#f37726"/></svg>'
)

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="{referrer}">
<meta name="robots" content="noindex, nofollow">
<link rel="icon" href="data:,">
<title>{head_title}</title>
<style>{css}</style>
</head>
<body>
<main>
{mark}
<h1>{title}</h1>
{body}
</main>
</body>
</html>
"""

FORM = """<form method="get" action="/go">
<label for="username">Your username</label>
<input id="username" name="username" type="text" value="{value}" required maxlength="{maxlength}"
 autocomplete="username" autocapitalize="off" autocorrect="off" spellcheck="false"
 inputmode="text" enterkeyhint="go" aria-describedby="username-help">
<p id="username-help" class="help">The username on the slip from your teacher.</p>
<button type="submit">Open my notebooks</button>
</form>
<p class="foot">You will be asked for your password on the next page.</p>"""


def render(title: str, body: str, head_title: str = "", referrer: str = "no-referrer") -> str:
    """A complete page: the course title as heading, ``body`` (already HTML) below it.

    ``referrer``: the page's referrer policy (proxy mode's forms need ``same-origin``, so
    that browsers send the Origin the portal checks, not ``null``).
    """
    return PAGE.format(
        referrer=referrer,
        head_title=html.escape(head_title or title),
        css=CSS,
        mark=MARK,
        title=html.escape(title),
        body=body,
    )


def form(value: str = "") -> str:
    return FORM.format(value=html.escape(value), maxlength=MAX_INPUT)


def note(heading: str, text: str) -> str:
    """A notice above the form; both parts are HTML."""
    return f'<div class="note" role="alert"><strong>{heading}</strong><p>{text}</p></div>'


LEAD = '<p class="lead">Type your username to open your own Jupyter notebooks.</p>'


SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), interest-cohort=()",
    "Cache-Control": "no-store",
}


def security_headers(handler: Any, referrer: str = "no-referrer") -> None:
    """Every answer of the portal's own: the headers above, the CSP, no ``Server``."""
    handler.clear_header("Server")
    for name, value in SECURITY_HEADERS.items():
        handler.set_header(name, value)
    handler.set_header("Referrer-Policy", referrer)
    handler.set_header("Content-Security-Policy", csp())


def csp(form_target: str = "") -> str:
    """No script at all; only the page's own style (by hash); forms to the portal (and servers)."""
    targets = f"'self' {form_target}".strip()
    return (
        f"default-src 'none'; style-src '{CSS_HASH}'; img-src data:; "
        f"form-action {targets}; frame-ancestors 'none'; base-uri 'none'"
    )


# --- proxy mode: the login form and what a logged-in student sees ------------------------

LOGIN_FORM = """<form method="post" action="/login">
<input type="hidden" name="next" value="{next}">
<label for="username">Username</label>
<input id="username" name="username" type="text" value="{value}" required maxlength="{maxlength}"
 autocomplete="username" autocapitalize="off" autocorrect="off" spellcheck="false"
 inputmode="text" enterkeyhint="next"{focus_user}>
<label for="password" class="gap">Password</label>
<input id="password" name="password" type="password" required maxlength="{maxpassword}"
 autocomplete="current-password" enterkeyhint="go"{focus_password}>
<p class="help">The username and password on the slip from your teacher.</p>
<button type="submit">Log in</button>
</form>"""

LOGIN_LEAD = '<p class="lead">Log in to open your own Jupyter notebooks.</p>'
MAX_PASSWORD = 256


def login_form(value: str = "", next_url: str = "") -> str:
    """Username and password; after a failure the username is kept and the password focused."""
    return LOGIN_FORM.format(
        value=html.escape(value),
        next=html.escape(next_url),
        maxlength=MAX_INPUT,
        maxpassword=MAX_PASSWORD,
        focus_user="" if value else " autofocus",
        focus_password=" autofocus" if value else "",
    )


def signed_in(username: str) -> str:
    """What ``/`` shows a student who is logged in: their notebooks, or log out."""
    name = html.escape(username)
    return (
        f'<p class="lead">You are logged in as <code>{name}</code>.</p>'
        f'<p><a class="button" href="/user/{name}/">Open my notebooks</a></p>'
        '<form method="post" action="/logout"><button type="submit" class="quiet">'
        "Log out</button></form>"
    )
