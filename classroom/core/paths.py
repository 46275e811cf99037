"""Paths found in a student's folder, as the tool prints and records them.

A student may name a file anything: a newline, a terminal escape, bytes that
are not UTF-8. Such a name must neither break a report line nor be lost.
"""

from __future__ import annotations

from .text import escaped


def as_text(rel: str) -> str:
    """The path exactly, except undecodable bytes shown as ``\\xNN`` (what the manifest holds)."""
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def shown(rel: str) -> str:
    """The path as it can be printed on one line: newlines, escapes and other controls made
    visible (``core.text.escaped``)."""
    return escaped(as_text(rel))
