"""Text from students (file names, log lines) made safe to print on the teacher's terminal."""

from __future__ import annotations

NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(ch: str) -> str:
    code = ord(ch)
    if ch in NAMED:
        return NAMED[ch]
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: str) -> str:
    """``text`` on one line with nothing a terminal acts on: C0 and C1 controls (so every
    escape sequence's ESC or CSI), DEL, line separators, bidi overrides and other
    non-printable characters become ``\\xNN`` (``\\n``, ``\\uNNNN``); the rest is kept."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escaped(ch) for ch in text)
