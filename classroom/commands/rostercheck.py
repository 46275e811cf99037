"""check's view of the roster when the config itself has problems: every problem at once.

``settings.load`` refuses a config with any problem, which would hide the roster's own
problems until the config is fixed. Here only ``[course] roster`` (and
``roster_columns``) are read from the file, as settings would read them.
"""

from __future__ import annotations

import configparser
from pathlib import Path

from ..core import roster as roster_mod
from ..core.errors import InvalidInput
from ..core.roster import Roster


def roster_despite_config(config_path: Path) -> tuple[Roster | None, list[str]]:
    """The roster the config names, loaded despite the config's other problems, and the
    roster's problems. ``(None, [])`` when the config does not even say where it is."""
    parser = configparser.ConfigParser(
        interpolation=None, inline_comment_prefixes=(";",), strict=False
    )
    try:
        parser.read_string(Path(config_path).read_text(encoding="utf-8-sig"))
        value = parser.get("course", "roster", fallback="").strip()
    except (OSError, UnicodeDecodeError, configparser.Error):
        return None, []
    if not value:
        return None, []
    base = Path(config_path).resolve().parent
    path = (base / Path(value).expanduser()).resolve()
    try:
        columns = roster_mod.parse_columns(parser.get("course", "roster_columns", fallback=""))
    except ValueError:
        columns = ()  # settings reports it; the roster is read with the known headers
    try:
        return roster_mod.load(path, columns), []
    except InvalidInput as exc:
        return None, list(exc.problems)
