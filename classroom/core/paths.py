"""Paths found in a student's folder, as the tool prints and records them.

A student may name a file anything: a newline, a terminal escape, bytes that
are not UTF-8. Such a name must neither break a report line nor be lost.
"""

from __future__ import annotations


def as_text(rel: str) -> str:
    """The path exactly, except undecodable bytes shown as ``\\xNN`` (what the manifest holds)."""
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def shown(rel: str) -> str:
    """The path as it can be printed on one line: newlines and other controls made visible."""
    text = as_text(rel)
    return text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
