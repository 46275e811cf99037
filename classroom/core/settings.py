"""The course config file (INI): defaults, parsing and validation, all in one place."""

from __future__ import annotations

import configparser
import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .addresses import USERNAME, host_from_setting
from .errors import InvalidInput
from .roster import parse_columns

COURSE_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
GROUP_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")

# Every key of every section with its default: the one place defaults live.
# ``None`` means "derived" (see ``Settings``); "" means "not set".
DEFAULTS: dict[str, dict[str, str | None]] = {
    "course": {
        "name": None,
        "roster": None,
        "group": None,
        "state_dir": None,
        "roster_columns": "",
    },
    "accounts": {
        "home_base": "/home",
        "shell": "/bin/bash",
        "home_mode": "0700",
        "password_length": "12",
        "notebook_password": "same",
        "profile": "",
        "skeleton": "",
    },
    "material": {
        "source": "",
        "folder": "tutorial",
        "exclude": ".ipynb_checkpoints, __pycache__, *.pyc, .git",
    },
    "retrieve": {
        "destination": "submissions",
        "owner": "",
        "include": "*",
        "exclude": ".ipynb_checkpoints, __pycache__, *.pyc",
        "max_file_size": "20M",
        "max_total_size": "200M",
    },
    "launch": {
        "app": "lab",
        "ip": "0.0.0.0",
        "portal_port": "8000",
        "first_port": "8001",
        "server_address": "",
        "title": "",
        "certfile": "",
        "keyfile": "",
        "root": "folder",
        "start_timeout": "60",
        "start_mode": "fork",
        "idle_timeout": "0",
    },
    "hooks": {"pre_spawn": "", "post_stop": "", "timeout": "60"},
    "remove": {"archive": "yes", "archive_dir": ""},
}
REQUIRED = {("course", "name"), ("course", "roster")}


@dataclass(frozen=True)
class Settings:
    """The validated config. Paths are absolute; sizes are bytes; lists are tuples."""

    config_file: Path
    name: str
    roster: Path
    group: str
    state_dir: Path
    roster_columns: tuple[tuple[str, str], ...] = ()  # roster field -> header in the file
    home_base: Path = Path("/home")
    shell: str = "/bin/bash"
    home_mode: int = 0o700
    password_length: int = 12
    notebook_password: str = "same"
    profile: str = ""
    skeleton: Path | None = None
    material_source: Path | None = None
    material_folder: str = "tutorial"
    material_exclude: tuple[str, ...] = ()
    retrieve_destination: Path = Path("submissions")
    retrieve_owner: str = ""
    retrieve_include: tuple[str, ...] = ("*",)
    retrieve_exclude: tuple[str, ...] = ()
    max_file_size: int = 20 << 20
    max_total_size: int = 200 << 20
    app: str = "lab"
    ip: str = "0.0.0.0"
    portal_port: int = 8000
    first_port: int = 8001
    server_address: str = ""
    title: str = ""
    certfile: Path | None = None
    keyfile: Path | None = None
    root: str = "folder"
    start_timeout: float = 60.0
    start_mode: str = "fork"
    idle_timeout: int = 0
    pre_spawn: str = ""
    post_stop: str = ""
    hook_timeout: float = 60.0
    archive: bool = True
    archive_dir: Path = Path("/var/lib/classroom/archive")
    lines: dict[tuple[str, str], int] = field(default_factory=dict, compare=False, repr=False)

    def where(self, section: str, key: str) -> str:
        """``file line N`` of a key, for error messages."""
        line = self.lines.get((section, key))
        return f"{self.config_file}, line {line}" if line else f"{self.config_file}"

    def replace(self, **changes: Any) -> Settings:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return Settings(**values)


SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``'20M'`` -> 20971520. Accepts plain bytes and K, M, G, T (powers of 1024)."""
    m = SIZE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 500K, 20M, 1G)")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def parse_list(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in re.split(r"[,\n]", text) if p.strip())


def parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("yes", "true", "on", "1"):
        return True
    if low in ("no", "false", "off", "0"):
        return False
    raise ValueError(f"not yes or no: {text!r}")


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


def default_config_path() -> Path:
    import os

    return Path(os.environ.get("NOTEBOOKS_CONFIG") or "notebooks.cfg")


def load(path: Path | str) -> Settings:
    """Read and validate the config file; raise ``InvalidInput`` listing every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InvalidInput(
            f"{path}: config file not found (give its path: notebooks.py COMMAND my.cfg)"
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


def _validate(
    path: Path, parser: configparser.ConfigParser, lines: dict[tuple[str, str], int]
) -> Settings:
    problems: list[str] = []
    base = path.parent

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

    def raw(section: str, key: str) -> str:
        if parser.has_option(section, key):
            return parser.get(section, key).strip()
        default = DEFAULTS[section][key]
        if default is None and (section, key) in REQUIRED:
            problems.append(f"{at(section)}: [{section}] {key} is required")
        return default or ""

    def conv(section: str, key: str, func: Callable[[str], Any], fallback: Any) -> Any:
        text = raw(section, key)
        try:
            return func(text)
        except (ValueError, TypeError) as exc:
            problems.append(f"{at(section, key)}: [{section}] {key}: {exc}")
            return fallback

    def path_or_none(text: str) -> Path | None:
        return (base / Path(text).expanduser()).resolve() if text else None

    def check(cond: bool, section: str, key: str, message: str) -> None:
        if not cond:
            problems.append(f"{at(section, key)}: [{section}] {key}: {message}")

    def integer(lo: int, hi: int) -> Callable[[str], int]:
        def parse(text: str) -> int:
            value = int(text)
            if not lo <= value <= hi:
                raise ValueError(f"{value} is not between {lo} and {hi}")
            return value

        return parse

    def positive(text: str) -> float:
        value = float(text)
        if value <= 0:
            raise ValueError(f"must be more than 0, not {text}")
        return value

    def choice(*options: str) -> Callable[[str], str]:
        def parse(text: str) -> str:
            if text not in options:
                raise ValueError(f"must be one of {', '.join(options)}, not {text!r}")
            return text

        return parse

    name = raw("course", "name")
    check(
        bool(COURSE_NAME.match(name)) or not name,
        "course",
        "name",
        f"{name!r} must match [a-z][a-z0-9-]{{0,30}} (lower case, digits, dashes)",
    )
    roster_text = raw("course", "roster")
    roster = path_or_none(roster_text) or base / "students.csv"
    group = raw("course", "group") or name
    check(
        bool(GROUP_NAME.match(group)) or not group,
        "course",
        "group",
        f"{group!r} is not a valid group name",
    )
    state_dir = path_or_none(raw("course", "state_dir")) or Path("/var/lib/classroom") / (
        name or "course"
    )
    roster_columns = conv("course", "roster_columns", parse_columns, ())

    home_base = path_or_none(raw("accounts", "home_base")) or Path("/home")
    shell = raw("accounts", "shell")
    check(shell.startswith("/"), "accounts", "shell", f"{shell!r} must be an absolute path")

    def mode(text: str) -> int:
        value = int(text, 8)
        if value & 0o007:
            raise ValueError(
                f"{text} lets other users in; homes are never world-readable (use 0700 or 0750)"
            )
        if value & ~0o7777 or not value & 0o700 == 0o700:
            raise ValueError(f"{text} is not a sensible home mode (use 0700)")
        return value

    home_mode = conv("accounts", "home_mode", mode, 0o700)
    password_length = conv("accounts", "password_length", integer(8, 128), 12)
    notebook_password = conv("accounts", "notebook_password", choice("same", "separate"), "same")
    profile = raw("accounts", "profile")
    if "/" in profile:
        profile = str(path_or_none(profile))
    skeleton = path_or_none(raw("accounts", "skeleton"))
    if skeleton is not None:
        check(skeleton.is_dir(), "accounts", "skeleton", f"{skeleton} is not a folder")

    source = path_or_none(raw("material", "source"))
    folder = raw("material", "folder")
    check(
        safe_folder(folder),
        "material",
        "folder",
        f"{folder!r} must be a relative path inside the home, without '..'",
    )

    destination = path_or_none(raw("retrieve", "destination")) or base / "submissions"
    owner = raw("retrieve", "owner")
    check(
        not owner or bool(USERNAME.match(owner)),
        "retrieve",
        "owner",
        f"{owner!r} is not a user name",
    )
    max_file = conv("retrieve", "max_file_size", parse_size, 20 << 20)
    max_total = conv("retrieve", "max_total_size", parse_size, 200 << 20)

    app = conv("launch", "app", choice("lab", "notebook", "server"), "lab")
    ip = raw("launch", "ip") or "0.0.0.0"
    portal_port = conv("launch", "portal_port", integer(1, 65535), 8000)
    first_port = conv("launch", "first_port", integer(1, 65535), 8001)
    certfile = path_or_none(raw("launch", "certfile"))
    keyfile = path_or_none(raw("launch", "keyfile"))
    if bool(certfile) != bool(keyfile):
        problems.append(
            f"{at('launch', 'certfile')}: [launch] certfile and keyfile go together: set both or neither"
        )
    server_address = raw("launch", "server_address")
    if server_address:
        try:
            host_from_setting(server_address)
        except ValueError as exc:
            problems.append(f"{at('launch', 'server_address')}: [launch] server_address: {exc}")
    root = conv("launch", "root", choice("folder", "home"), "folder")
    start_timeout = conv("launch", "start_timeout", positive, 60.0)
    start_mode = conv("launch", "start_mode", choice("fork", "exec"), "fork")
    idle_timeout = conv("launch", "idle_timeout", integer(0, 10**8), 0)

    hook_timeout = conv("hooks", "timeout", positive, 60.0)
    archive = conv("remove", "archive", parse_bool, True)
    archive_dir = path_or_none(raw("remove", "archive_dir")) or state_dir / "archive"

    if problems:
        raise InvalidInput(
            problems,
            heading=f"{path}: the config has {len(problems)} problem(s); nothing was changed",
        )
    return Settings(
        config_file=path,
        name=name,
        roster=roster,
        group=group,
        state_dir=state_dir,
        roster_columns=roster_columns,
        home_base=home_base,
        shell=shell,
        home_mode=home_mode,
        password_length=password_length,
        notebook_password=notebook_password,
        profile=profile,
        skeleton=skeleton,
        material_source=source,
        material_folder=folder.strip("/"),
        material_exclude=parse_list(raw("material", "exclude")),
        retrieve_destination=destination,
        retrieve_owner=owner,
        retrieve_include=parse_list(raw("retrieve", "include")) or ("*",),
        retrieve_exclude=parse_list(raw("retrieve", "exclude")),
        max_file_size=max_file,
        max_total_size=max_total,
        app=app,
        ip=ip,
        portal_port=portal_port,
        first_port=first_port,
        server_address=server_address,
        title=raw("launch", "title") or name,
        certfile=certfile,
        keyfile=keyfile,
        root=root,
        start_timeout=start_timeout,
        start_mode=start_mode,
        idle_timeout=idle_timeout,
        pre_spawn=raw("hooks", "pre_spawn"),
        post_stop=raw("hooks", "post_stop"),
        hook_timeout=hook_timeout,
        archive=archive,
        archive_dir=archive_dir,
        lines=lines,
    )


def safe_folder(folder: str) -> bool:
    if not folder or folder.startswith("/") or "\0" in folder:
        return False
    parts = [p for p in folder.split("/") if p]
    return bool(parts) and all(p not in (".", "..") for p in parts)
