"""Text from a student (log lines, file names) made safe for the teacher's terminal.

A student controls what their server logs and what their files are called; printed
raw, an escape sequence there could retitle the teacher's terminal, erase lines or
fake a "started" line (SPEC §6.11 rule 15). ``printable`` is the one filter.
"""

from __future__ import annotations

import re
import unicodedata

# Escape sequences a terminal acts on, removed whole (not just their first character):
# string commands (OSC, DCS, SOS, PM, APC) up to their terminator or the end, CSI
# sequences, then any other ESC + intermediates + final byte; 7-bit and C1 forms.
_SEQUENCE = re.compile(
    r"(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f]).*?(?:\x07|\x1b\\|\x9c|$)"
    r"|(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?"
    r"|\x1b[ -/]*[0-~]?",
    re.DOTALL,
)
# Format characters that reorder or hide text (bidirectional overrides, "Trojan source").
_HIDING = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
REPLACEMENT = "?"


def printable(text: str | bytes) -> str:
    """``text`` as one plain line: escape sequences removed, every other control
    character (newlines and tabs too), line separator and bidirectional override
    replaced by ``?``. Bytes are decoded as UTF-8 (undecodable bytes become U+FFFD)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = _SEQUENCE.sub("", text)
    return "".join(REPLACEMENT if _unsafe(ch) else ch for ch in text)


def _unsafe(ch: str) -> bool:
    if ch.isprintable():
        return ch in _HIDING
    return unicodedata.category(ch) in ("Cc", "Zl", "Zp") or ch in _HIDING


NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escaped(text: str) -> str:
    """A student's file name on one line, every character a terminal could act on (C0
    and C1 controls, so every ESC or CSI, DEL, line separators, bidi overrides, other
    non-printable characters) written as ``\\xNN`` (``\\n``, ``\\uNNNN``): unlike
    ``printable``, nothing is dropped, so the teacher can still tell which file it is."""
    if text.isprintable() and not any(ch in _HIDING for ch in text):
        return text
    return "".join(ch if ch.isprintable() and ch not in _HIDING else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    code = ord(ch)
    if ch in NAMED:
        return NAMED[ch]
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
