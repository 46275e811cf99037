"""Sizes as a teacher reads and writes them: ``20M`` in the config, ``20 MB`` in messages."""

from __future__ import annotations

import re

SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
UNITS = ("bytes", "KB", "MB", "GB", "TB")


def parse_size(text: str) -> int:
    """``'20M'`` -> 20971520. Accepts plain bytes and K, M, G, T (powers of 1024)."""
    m = SIZE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a size (write e.g. 500K, 20M, 1G)")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def human_size(n: int | float) -> str:
    """``20971520`` -> ``'20 MB'``; ``1536`` -> ``'1.5 KB'``; ``12`` -> ``'12 bytes'``.

    Units are powers of 1024, as ``parse_size`` reads them, so a limit prints as written.
    """
    value = float(n)
    for unit in UNITS:
        if round(abs(value), 1) < 1024 or unit == UNITS[-1]:  # 1023.99 KB is 1 MB
            if unit == "bytes":
                return f"{int(value)} bytes" if int(value) != 1 else "1 byte"
            text = f"{value:.1f}".removesuffix(".0")
            return f"{text} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
