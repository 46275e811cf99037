"""Quantities as the teacher reads them: sizes in the units of the config file."""

from __future__ import annotations

UNITS = (("KB", 1 << 10), ("MB", 1 << 20), ("GB", 1 << 30), ("TB", 1 << 40))


def human_size(n: int) -> str:
    """``20971520`` -> ``'20 MB'``; ``1536`` -> ``'1.5 KB'``; ``512`` -> ``'512 bytes'``.

    The units are powers of 1024, as ``20M`` in the config file means; one decimal
    at most, none when it is 0.
    """
    if abs(n) < 1024:
        return "1 byte" if n == 1 else f"{n} bytes"
    unit, scale = next(((u, s) for u, s in UNITS if round(abs(n) / s, 1) < 1024), UNITS[-1])
    return f"{n / scale:.1f}".removesuffix(".0") + f" {unit}"
