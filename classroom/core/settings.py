"""The course config file (INI).

``KEYS`` is the one table of every key: its section and name, how its text is read
and checked, its default, what it is for. Reading the file, the did-you-mean for
unknown keys, the defaults and the ``Settings`` class are all derived from it.
"""

from __future__ import annotations

import configparser
import dataclasses
import difflib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .addresses import USERNAME, host_from_setting
from .errors import InvalidInput
from .roster import parse_columns
from .sizes import parse_size

COURSE_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
GROUP_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
DURATION = re.compile(
    r"^\s*(\d+(?:\.\d+)?)\s*(s|secs?|seconds?|m|mins?|minutes?|h|hours?)?\s*$", re.I
)
MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
STATE_BASE = Path("/var/lib/classroom")

# A parser reads a key's text (``base`` is the config file's folder, for relative
# paths) and returns its value, or raises ValueError saying what is wrong.
Parser = Callable[[str, Path], Any]


# --- parsers ------------------------------------------------------------------------------------


def parse_list(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in re.split(r"[,\n]", text) if p.strip())


def parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("yes", "true", "on", "1"):
        return True
    if low in ("no", "false", "off", "0"):
        return False
    raise ValueError(f"not yes or no: {text!r}")


def safe_folder(folder: str) -> bool:
    if not folder or folder.startswith("/") or "\0" in folder:
        return False
    parts = [p for p in folder.split("/") if p]
    return bool(parts) and all(p not in (".", "..") for p in parts)


def text(fallback: str = "") -> Parser:
    """The text as it is (``fallback`` when empty)."""
    return lambda value, base: value or fallback


def path(fallback: str | None = None) -> Parser:
    """An absolute path (relative ones are from the config's folder); else ``fallback``, else None."""

    def parse(value: str, base: Path) -> Path | None:
        value = value or fallback or ""
        return (base / Path(value).expanduser()).resolve() if value else None

    return parse


def matching(pattern: re.Pattern[str], message: str) -> Parser:
    """Empty, or text matching ``pattern``; ``message`` (``{!r}``: the text) says what is wrong."""

    def parse(value: str, base: Path) -> str:
        if value and not pattern.match(value):
            raise ValueError(message.format(value))
        return value

    return parse


def integer(lo: int, hi: int) -> Parser:
    def parse(value: str, base: Path) -> int:
        try:
            number = int(value)
        except ValueError:
            raise ValueError(
                f"{value!r} is not a whole number; write one from {lo} to {hi}"
            ) from None
        if not lo <= number <= hi:
            raise ValueError(f"{number} is not between {lo} and {hi}")
        return number

    return parse


def _in_seconds(value: str) -> float | None:
    """``'60s'``, ``'2 min'``, ``'1h'`` as seconds (for the hint); None if it is none of these."""
    m = DURATION.match(value)
    if not m:
        return None
    unit = (m.group(2) or "s")[0].lower()
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[unit]


def seconds(low: float, whole: bool = False) -> Parser:
    """A number of seconds, at least ``low`` (more than 0 when ``low`` is 0 and not ``whole``)."""

    def parse(value: str, base: Path) -> float | int:
        try:
            number: float | int = int(value) if whole else float(value)
        except ValueError:
            hint = _in_seconds(value)
            if hint is not None and whole:
                hint = round(hint)
            write = f"write {hint:g}" if hint is not None else "write e.g. 60"
            raise ValueError(f"{value!r} is not a number of seconds; {write}") from None
        if number < low or (not whole and number <= 0):
            least = f"{low:g} or more" if whole else "more than 0"
            raise ValueError(f"{value} seconds: must be {least}")
        return number

    return parse


def limit() -> Parser:
    """A size limit (``20M``); 0 is refused: it would let nothing through."""

    def parse(value: str, base: Path) -> int:
        number = parse_size(value)
        if number == 0:
            raise ValueError(f"{value!r} would let no file through; write a size such as 20M")
        return number

    return parse


def cpus(value: str, base: Path) -> float:
    """A number of CPUs, fractions allowed; 0 = no limit."""
    number = float(value)
    if not 0 <= number <= 4096:
        raise ValueError(f"{value} is not a number of CPUs (e.g. 0.5, 2; 0 = no limit)")
    return number


def choice(*options: str) -> Parser:
    def parse(value: str, base: Path) -> str:
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}, not {value!r}")
        return value

    return parse


def home_mode(value: str, base: Path) -> int:
    try:
        mode = int(value, 8)
    except ValueError:
        raise ValueError(f"{value!r} is not a mode in octal; write e.g. 0700") from None
    if mode & 0o007:
        raise ValueError(
            f"{value} lets other users in; homes are never world-readable (use 0700 or 0750)"
        )
    if mode & ~0o7777 or not mode & 0o700 == 0o700:
        raise ValueError(f"{value} is not a sensible home mode (use 0700)")
    return mode


def shell(value: str, base: Path) -> str:
    if not value.startswith("/"):
        raise ValueError(f"{value!r} must be an absolute path")
    return value


def profile(value: str, base: Path) -> str:
    """A profile name as it is, or a folder (anything with a '/') made absolute."""
    return str(path()(value, base)) if "/" in value else value


def folder(value: str, base: Path) -> Path | None:
    found = path()(value, base)
    if found is not None and not found.is_dir():
        raise ValueError(f"{found} is not a folder")
    return found


def home_folder(value: str, base: Path) -> str:
    if not safe_folder(value):
        raise ValueError(f"{value!r} must be a relative path inside the home, without '..'")
    return value.strip("/")


def link_name(value: str, base: Path) -> str:
    """One name in the home (``shared``): no folder, no '..'."""
    name = value.strip()
    if not safe_folder(name) or "/" in name:
        raise ValueError(f"{value!r} must be one name (HOME/NAME), without '/' or '..'")
    return name


def words(fallback: tuple[str, ...] = ()) -> Parser:
    """A comma (or line) separated list; ``fallback`` when it is empty."""
    return lambda value, base: parse_list(value) or fallback


def modules(value: str, base: Path) -> tuple[str, ...]:
    """A list of Python module names (``a.b``), checked for shape only."""
    names = parse_list(value)
    for name in names:
        if not MODULE.match(name):
            raise ValueError(f"{name!r} is not a Python module name")
    return names


def server_address(value: str, base: Path) -> str:
    if value:
        host_from_setting(value)
    return value


# --- the table ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """One config key: where it is, how it is read, its default (as written in the file)."""

    section: str
    name: str
    parse: Parser
    default: str
    help: str
    field: str = ""  # the ``Settings`` attribute, when it is not the key's name
    required: bool = False

    @property
    def attribute(self) -> str:
        return self.field or self.name


KEYS: tuple[Key, ...] = (
    Key(
        "course",
        "name",
        matching(
            COURSE_NAME, "{!r} must match [a-z][a-z0-9-]{{0,30}} (lower case, digits, dashes)"
        ),
        "",
        "names the group and the state folder",
        required=True,
    ),
    Key("course", "roster", path(), "", "the roster CSV", required=True),
    Key(
        "course",
        "group",
        matching(GROUP_NAME, "{!r} is not a valid group name"),
        "",
        "default: the course name; every student is a member",
    ),
    Key("course", "state_dir", path(), "", "default STATE_BASE/NAME; root-only (0700)"),
    Key(
        "course",
        "roster_columns",
        lambda value, base: parse_columns(value),
        "",
        "FIELD:HEADER pairs for headers the roster does not know",
    ),
    Key(
        "course",
        "staff_group",
        matching(GROUP_NAME, "{!r} is not a valid group name"),
        "",
        "default: COURSE-staff; the assistants, who write the shared folder",
    ),
    Key("accounts", "home_base", path("/home"), "/home", "homes are HOME_BASE/USERNAME"),
    Key("accounts", "shell", shell, "/bin/bash", "the students' login shell"),
    Key("accounts", "home_mode", home_mode, "0700", "never world-readable"),
    Key("accounts", "password_length", integer(8, 128), "12", "at least 8"),
    Key("accounts", "notebook_password", choice("same", "separate"), "same", "or separate"),
    Key("accounts", "profile", profile, "", "the teacher's IPython profile copied to students"),
    Key("accounts", "skeleton", folder, "", "a folder copied once into each new home"),
    Key("material", "source", path(), "", "what send copies", field="material_source"),
    Key(
        "material",
        "folder",
        home_folder,
        "tutorial",
        "HOME/FOLDER: where send puts it, what retrieve collects",
        field="material_folder",
    ),
    Key(
        "material",
        "exclude",
        words(),
        ".ipynb_checkpoints, __pycache__, *.pyc, .git",
        "names or glob patterns never sent",
        field="material_exclude",
    ),
    Key(
        "retrieve",
        "destination",
        path("submissions"),
        "submissions",
        "the teacher's grading area",
        field="retrieve_destination",
    ),
    Key(
        "retrieve",
        "owner",
        matching(USERNAME, "{!r} is not a user name"),
        "",
        "who owns what is retrieved; default: the sudo caller",
        field="retrieve_owner",
    ),
    Key("retrieve", "include", words(("*",)), "*", "files collected", field="retrieve_include"),
    Key(
        "retrieve",
        "exclude",
        words(),
        ".ipynb_checkpoints, __pycache__, *.pyc",
        "files never collected",
        field="retrieve_exclude",
    ),
    Key("retrieve", "max_file_size", limit(), "20M", "larger files skipped"),
    Key("retrieve", "max_total_size", limit(), "200M", "per student per run"),
    Key("launch", "app", choice("lab", "notebook", "server"), "lab", "what each server runs"),
    Key(
        "launch",
        "access",
        choice("redirect", "proxy"),
        "redirect",
        "redirect (a port per student) | proxy (one port, a login, the portal forwards)",
    ),
    Key("launch", "ip", text("0.0.0.0"), "0.0.0.0", "where the students' servers listen"),
    Key("launch", "portal_port", integer(1, 65535), "8000", "the portal's port"),
    Key("launch", "first_port", integer(1, 65535), "8001", "students' ports from here upward"),
    Key("launch", "server_address", server_address, "", "host name in the links"),
    Key("launch", "title", text(), "", "shown on the portal; default: the course name"),
    Key("launch", "certfile", path(), "", "HTTPS when both are set"),
    Key("launch", "keyfile", path(), "", "HTTPS when both are set"),
    Key("launch", "root", choice("folder", "home"), "folder", "where each server opens"),
    Key("launch", "start_timeout", seconds(0), "60", "seconds each server gets to answer"),
    Key("launch", "start_mode", choice("fork", "exec"), "fork", "fork or exec"),
    Key(
        "launch", "idle_timeout", seconds(0, whole=True), "0", "seconds; 0: never stop idle servers"
    ),
    Key(
        "launch",
        "kernel_mode",
        choice("fork", "exec"),
        "fork",
        "fork: kernels forked from one pre-imported process; exec: as Jupyter does",
    ),
    Key(
        "launch",
        "preload",
        modules,
        "numpy, pandas, matplotlib.pyplot",
        "modules imported once for every kernel (kernel_mode = fork)",
    ),
    Key("hooks", "pre_spawn", text(), "", "an executable, or module:function"),
    Key("hooks", "post_stop", text(), "", "an executable, or module:function"),
    Key("hooks", "timeout", seconds(0), "60", "seconds a hook gets", field="hook_timeout"),
    Key(
        "limits",
        "memory",
        lambda v, b: parse_size(v),
        "0",
        "per student (server, kernels, terminals together); K, M, G; 0 = no limit",
        field="memory_limit",
    ),
    Key(
        "limits",
        "cpu",
        cpus,
        "0",
        "per student, in CPUs (e.g. 1.5); 0 = no limit",
        field="cpu_limit",
    ),
    Key(
        "limits",
        "tasks",
        integer(0, 10**7),
        "0",
        "processes and threads per student; 0 = no limit",
        field="tasks_limit",
    ),
    Key(
        "shared",
        "folder",
        path(),
        "",
        "the class's shared folder; empty: none",
        field="shared_folder",
    ),
    Key(
        "shared", "link", link_name, "shared", "each home gets HOME/LINK to it", field="shared_link"
    ),
    Key("return", "source", path("feedback"), "feedback", "DIR/USERNAME/", field="return_source"),
    Key("return", "folder", home_folder, "feedback", "HOME/FOLDER", field="return_folder"),
    Key("remove", "archive", lambda v, b: parse_bool(v), "yes", "tar.gz of each home first"),
    Key("remove", "archive_dir", path(), "", "default: STATE_DIR/archive"),
)

# Every key of every section with its default ("" means "not set" or derived).
DEFAULTS: dict[str, dict[str, str]] = {}
for _key in KEYS:
    DEFAULTS.setdefault(_key.section, {})[_key.name] = _key.default
REQUIRED = {(k.section, k.name) for k in KEYS if k.required}

# Defaults that depend on other values: applied when a key is empty.
DERIVED: dict[str, Callable[[Any], Any]] = {
    "roster": lambda s: s.config_file.parent / "students.csv",
    "group": lambda s: s.name,
    "state_dir": lambda s: STATE_BASE / (s.name or "course"),
    "staff_group": lambda s: f"{s.name}-staff",
    "title": lambda s: s.name,
    "archive_dir": lambda s: s.state_dir / "archive",
}


# --- Settings -----------------------------------------------------------------------------------


class _Unset:
    def __repr__(self) -> str:
        return "<default>"


UNSET: Any = _Unset()


class _SettingsMethods:
    config_file: Path
    lines: dict[tuple[str, str], int]

    def __post_init__(self) -> None:
        """Keys not given take their default; empty derived ones their derived value."""
        base = self.config_file.parent
        for key in KEYS:
            if getattr(self, key.attribute) is UNSET:
                object.__setattr__(self, key.attribute, key.parse(key.default, base))
        for name, derive in DERIVED.items():
            if not getattr(self, name):
                object.__setattr__(self, name, derive(self))

    def where(self, section: str, key: str) -> str:
        """``file line N`` of a key, for error messages."""
        line = self.lines.get((section, key))
        return f"{self.config_file}, line {line}" if line else f"{self.config_file}"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


Settings = dataclasses.make_dataclass(
    "Settings",
    [
        ("config_file", Path),
        ("name", str),
        *[(k.attribute, Any, dataclasses.field(default=UNSET)) for k in KEYS if k.name != "name"],
        ("lines", dict, dataclasses.field(default_factory=dict, compare=False, repr=False)),
    ],
    bases=(_SettingsMethods,),
    frozen=True,
)
Settings.__module__ = __name__
Settings.__doc__ = """The validated config, one attribute per key of ``KEYS``.

Paths are absolute; sizes are bytes; lists are tuples. Keys not given take their
default, as if the file did not set them.
"""


# --- reading the file ---------------------------------------------------------------------------


def default_config_path() -> Path:
    return Path(os.environ.get("NOTEBOOKS_CONFIG") or "notebooks.cfg")


def _key_lines(text: str) -> dict[tuple[str, str], int]:
    """Map (section, key) to its line number, and (section, '') to the section header's."""
    lines: dict[tuple[str, str], int] = {}
    section = ""
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and "]" in line:
            section = line[1 : line.index("]")].strip()
            lines.setdefault((section, ""), number)
        elif raw[:1].isspace():
            continue  # continuation of a multi-line value
        else:
            key = re.split(r"[=:]", line, maxsplit=1)[0].strip().lower()
            lines.setdefault((section, key), number)
    return lines


def load(path: Path | str) -> Settings:
    """Read and validate the config file; raise ``InvalidInput`` listing every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InvalidInput(
            f"{path}: config file not found (give its path: notebooks COMMAND my.cfg)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{path}: cannot read the config file: {exc}") from None
    path = path.resolve()
    parser = configparser.ConfigParser(
        interpolation=None, inline_comment_prefixes=(";",), strict=True, empty_lines_in_values=False
    )
    try:
        parser.read_string(text, source=str(path))
    except configparser.Error as exc:
        raise InvalidInput(f"{path}: {' '.join(str(exc).split())}") from None
    return _validate(path, parser, _key_lines(text))


def _shared_problems(values: dict[str, Any]) -> list[str]:
    """The shared folder is never where the students' homes are (they could change it), and
    its link does not take the place of the folders send and return fill."""
    shared = values.get("shared_folder")
    if shared is None:
        return []
    problems = []
    home_base = values.get("home_base") or Path(DEFAULTS["accounts"]["home_base"])
    if shared == home_base or home_base in shared.parents or shared in home_base.parents:
        problems.append(
            f"[shared] folder {shared} is in or around home_base {home_base}, where the "
            "students' homes are; choose a folder outside it (e.g. /srv/classroom/COURSE)"
        )
    link = values.get("shared_link") or DEFAULTS["shared"]["link"]
    for section, key in (("material", "material_folder"), ("return", "return_folder")):
        folder = values.get(key) or DEFAULTS[section]["folder"]
        if folder.split("/")[0] == link:
            problems.append(f"[shared] link {link!r} is where [{section}] folder goes; rename one")
    return problems


def _validate(
    path: Path, parser: configparser.ConfigParser, lines: dict[tuple[str, str], int]
) -> Settings:
    problems: list[str] = []

    def at(section: str, key: str = "") -> str:
        line = lines.get((section, key)) or lines.get((section, ""))
        return f"{path}, line {line}" if line else str(path)

    for section in parser.sections():
        if section not in DEFAULTS:
            hint = difflib.get_close_matches(section, DEFAULTS, n=1)
            mean = f" (did you mean [{hint[0]}]?)" if hint else ""
            problems.append(f"{at(section)}: unknown section [{section}]{mean}")
            continue
        for key in parser[section]:
            if key not in DEFAULTS[section]:
                hint = difflib.get_close_matches(key, DEFAULTS[section], n=1)
                mean = f" (did you mean '{hint[0]}'?)" if hint else ""
                problems.append(f"{at(section, key)}: unknown key '{key}' in [{section}]{mean}")

    values: dict[str, Any] = {}
    for key in KEYS:
        if parser.has_option(key.section, key.name):
            raw = parser.get(key.section, key.name).strip()
        elif key.required:
            problems.append(f"{at(key.section)}: [{key.section}] {key.name} is required")
            raw = ""
        else:
            continue  # the default
        try:
            values[key.attribute] = key.parse(raw, path.parent)
        except (ValueError, TypeError) as exc:
            problems.append(f"{at(key.section, key.name)}: [{key.section}] {key.name}: {exc}")
    if bool(values.get("certfile")) != bool(values.get("keyfile")):
        problems.append(
            f"{at('launch', 'certfile')}: [launch] certfile and keyfile go together: set both or neither"
        )
    problems += [f"{at('shared', 'folder')}: {p}" for p in _shared_problems(values)]
    if problems:
        raise InvalidInput(
            problems,
            heading=f"{path}: the config has {len(problems)} problem(s); nothing was changed",
        )
    return Settings(config_file=path, lines=lines, **values)
