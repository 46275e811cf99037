"""The roster: who is in the class, and who teaches it. Pure parsing and validation.

A roster is CSV (``,`` ``;`` or tab, detected), ``.xlsx`` or ``.ods`` (the first
sheet). The format is told by the file's content, not its name. CSV is read with
the stdlib ``csv`` module: exact line numbers, and no 30 MB import for fifty
lines (``status`` and ``check`` stay quick). Spreadsheets are read with pandas,
imported only then.

Every problem names the file and the place the teacher sees it: ``line N`` in a
CSV, ``sheet 'S', row N`` in a spreadsheet (the header is the row it is on).
"""

from __future__ import annotations

import csv
import difflib
import io
import re
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import date, datetime, time
from pathlib import Path
from typing import Any, NoReturn

from .addresses import USERNAME
from .errors import InvalidInput

FIELDS = ("username", "name", "surname", "email", "role")
# Header names of the common LMS exports (Moodle, Canvas), compared by ``_key``.
ALIASES: dict[str, tuple[str, ...]] = {
    "username": ("username", "login", "login id", "sis login id", "user id"),
    "name": ("name", "first name", "given name"),
    "surname": ("surname", "last name", "family name"),
    "email": ("email", "email address", "e-mail", "mail"),
    "role": ("role",),
}
ROLES = ("student", "assistant")
PASSWORD_COLUMNS = {"sys-pass", "nb-pass", "password", "passwd", "notebook_password"}
# Canvas gradebook exports put these rows under the header; they are not people.
CANVAS_NOTE_ROWS = {"points possible", "manual posting"}
GECOS_UNSAFE = re.compile(r"[:,=\\\x00-\x1f\x7f]")
DELIMITERS = (",", ";", "\t")
MAP_HINT = "map another column with [course] roster_columns = username:COLUMN"


def _key(header: str) -> str:
    """Header names compare ignoring case, spaces, dashes and underscores."""
    return re.sub(r"[\s_-]+", "", header).lower()


_ALIAS_FIELD = {_key(a): f for f, names in ALIASES.items() for a in names}
_PASSWORD_KEYS = {_key(c) for c in PASSWORD_COLUMNS}
_CANVAS_NOTE_KEYS = {_key(n) for n in CANVAS_NOTE_ROWS}


@dataclass(frozen=True)
class Student:
    """One person with an account: a student, or an assistant (``role``)."""

    username: str
    name: str = ""
    surname: str = ""
    email: str = ""
    line: int = 0  # the line (CSV) or row (spreadsheet) the teacher sees
    role: str = "student"

    @property
    def full_name(self) -> str:
        return " ".join(p for p in (self.name, self.surname) if p)

    @property
    def gecos(self) -> str:
        """The full name made safe for the GECOS field of /etc/passwd."""
        return " ".join(GECOS_UNSAFE.sub(" ", self.full_name).split())

    @property
    def is_assistant(self) -> bool:
        return self.role == "assistant"


@dataclass(frozen=True)
class Roster:
    """Everyone who gets an account (students and assistants), in roster order."""

    path: Path
    students: tuple[Student, ...]
    warnings: tuple[str, ...] = ()
    place: str = ""  # "" for CSV; "sheet 'NAME'" for a spreadsheet

    def __iter__(self) -> Iterator[Student]:
        return iter(self.students)

    def __len__(self) -> int:
        return len(self.students)

    def names(self) -> list[str]:
        return [s.username for s in self.students]

    def assistants(self) -> list[Student]:
        """The people whose ``role`` is ``assistant``."""
        return [s for s in self.students if s.is_assistant]

    def where(self, student: Student) -> str:
        """``FILE, line N`` (CSV) or ``FILE, sheet 'S', row N``: for messages about a row."""
        if self.place:
            return f"{self.path}, {self.place}, row {student.line}"
        return f"{self.path}, line {student.line}"

    def select(self, only: tuple[str, ...] | list[str]) -> list[Student]:
        """The students named by ``--only`` (all when empty); unknown names are an error."""
        if not only:
            return list(self.students)
        by_name = {s.username: s for s in self.students}
        unknown = [u for u in only if u not in by_name]
        if unknown:
            raise InvalidInput(
                [f"--only {u}: not in the roster {self.path}" for u in unknown],
                heading="nothing was changed",
            )
        seen: set[str] = set()
        return [by_name[u] for u in only if not (u in seen or seen.add(u))]


def parse_columns(text: str) -> tuple[tuple[str, str], ...]:
    """``'username:Matrikel, name:Vorname'`` -> ``(('username', 'Matrikel'), ...)``.

    The value of ``[course] roster_columns``; raises ``ValueError`` naming every bad pair.
    """
    pairs: list[tuple[str, str]] = []
    bad: list[str] = []
    for item in (p.strip() for p in re.split(r"[,\n]", text)):
        if not item:
            continue
        field, sep, column = (s.strip() for s in item.partition(":"))
        field = field.lower()
        if not sep or not field or not column:
            bad.append(f"{item!r} is not FIELD:COLUMN (e.g. username:Matrikel)")
        elif field not in FIELDS:
            hint = difflib.get_close_matches(field, FIELDS, n=1)
            mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            bad.append(f"{field!r} is not a roster field{mean}; fields: {', '.join(FIELDS)}")
        elif any(f == field for f, _ in pairs):
            bad.append(f"{field!r} is mapped twice")
        elif any(_key(c) == _key(column) for _, c in pairs):
            bad.append(f"column {column!r} is mapped twice")
        else:
            pairs.append((field, column))
    if bad:
        raise ValueError("; ".join(bad))
    return tuple(pairs)


def load(
    path: Path | str,
    columns: Mapping[str, str] | Iterable[tuple[str, str]] = (),
) -> Roster:
    """Read and validate a roster file; raise ``InvalidInput`` listing every problem.

    ``columns`` is ``[course] roster_columns``: roster field -> header in the file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InvalidInput(
            f"{path}: roster file not found (check [course] roster in the config)"
        ) from None
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read the roster: {exc.strerror}") from None
    kind = _kind(path, data)
    if kind in ("xlsx", "ods"):
        return _load_sheet(path, data, kind, dict(columns))
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InvalidInput(
            f"{path}, line {line}: not UTF-8 text (save the roster as CSV UTF-8; "
            "in Excel: Save As, 'CSV UTF-8')"
        ) from None
    return parse(text, path, columns)


def parse(
    text: str,
    path: Path = Path("roster.csv"),
    columns: Mapping[str, str] | Iterable[tuple[str, str]] = (),
) -> Roster:
    """Parse CSV text (delimiter ``,`` ``;`` or tab, detected from the header line)."""
    lines = text.splitlines(keepends=True)
    skip = 0
    delimiter = None
    # Excel writes and honours a first line "sep=;".
    if lines and re.fullmatch(r"sep=[,;\t]\r?\n?", lines[0]):
        delimiter, skip = lines[0][4], 1
    body = "".join(lines[skip:])
    if delimiter is None:
        delimiter = _delimiter(body)
    reader = csv.reader(io.StringIO(body, newline=""), delimiter=delimiter)
    rows: list[tuple[int, list[Any]]] = []
    problems: list[str] = []
    last = 0
    try:
        for row in reader:
            rows.append((skip + last + 1, row))  # the line the row starts on
            last = reader.line_num
    except csv.Error as exc:
        problems.append(f"{path}, line {skip + reader.line_num}: {exc}")
    return _build(path, "", rows, dict(columns), problems)


def _delimiter(text: str) -> str:
    """The most frequent of ``,`` ``;`` tab in the first non-blank line, outside quotes."""
    for line in text.splitlines():
        if line.strip():
            bare = re.sub(r'"[^"]*"', "", line)
            counts = [(bare.count(d), -i, d) for i, d in enumerate(DELIMITERS)]
            best = max(counts)
            return best[2] if best[0] else ","
    return ","


def _kind(path: Path, data: bytes) -> str:
    """``csv``, ``xlsx`` or ``ods`` from the content; anything else is an error."""
    if data.startswith(b"\xd0\xcf\x11\xe0"):
        raise InvalidInput(
            f"{path}: an old Excel .xls file or a password-protected workbook: "
            "save it as .xlsx or CSV UTF-8, without a password"
        )
    if not data.startswith(b"PK\x03\x04"):
        return "csv"
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            names = set(z.namelist())
            mimetype = z.read("mimetype") if "mimetype" in names else b""
    except (zipfile.BadZipFile, OSError, KeyError):
        raise InvalidInput(
            f"{path}: a damaged workbook (not a readable zip file): open it in a spreadsheet "
            "program and save it again as .xlsx, .ods or CSV UTF-8"
        ) from None
    if mimetype.startswith(b"application/vnd.oasis.opendocument.spreadsheet"):
        return "ods"
    if "xl/workbook.xml" in names:
        return "xlsx"
    raise InvalidInput(
        f"{path}: not a roster: a zip file that is neither .xlsx nor .ods "
        "(save the roster as CSV UTF-8, .xlsx or .ods)"
    )


def _load_sheet(path: Path, data: bytes, kind: str, columns: dict[str, str]) -> Roster:
    """Read the first sheet with pandas; refuse formulas in the columns the roster uses."""
    try:
        import pandas as pd  # only here: CSV rosters never pay for it
    except ImportError:  # pragma: no cover - pandas is a dependency
        raise InvalidInput(
            f"{path}: reading a spreadsheet needs pandas (pip install pandas openpyxl odfpy)"
        ) from None
    engine = "openpyxl" if kind == "xlsx" else "odf"
    try:  # from the bytes already read: openpyxl would refuse a file not named .xlsx
        with pd.ExcelFile(io.BytesIO(data), engine=engine) as book:
            sheets = list(book.sheet_names)
            frame = pd.read_excel(book, sheet_name=0, header=None, dtype=object, na_filter=False)
        formulas = _xlsx_formulas(data) if kind == "xlsx" else _ods_formulas(data)
    except Exception:  # a damaged file fails deep inside openpyxl or odfpy, in many ways
        raise InvalidInput(
            f"{path}: cannot read this .{kind} file; open it in a "
            f"spreadsheet program and save it again as .{kind} or CSV UTF-8"
        ) from None
    place = f"sheet {sheets[0]!r}"
    # Row i of the frame is row i + 1 of the sheet: pandas keeps leading blank rows.
    rows = [(i + 1, list(values)) for i, values in enumerate(frame.itertuples(index=False))]
    if not any(_text(v).strip() for _, row in rows for v in row):
        others = f" (the file's sheets: {', '.join(sheets)})" if len(sheets) > 1 else ""
        raise InvalidInput(
            f"{path}, {place}: the first sheet is empty; the roster must be on the first "
            f"sheet, with a header row that has a 'username' column{others}"
        )
    return _build(path, place, rows, columns, [], formulas)


@dataclass(frozen=True)
class _Layout:
    """Where a table came from and which column holds which field: for messages."""

    path: Path
    place: str  # "" for CSV, "sheet 'S'" for a spreadsheet
    header: tuple[str, ...] = ()
    used: Mapping[str, int] | None = None

    @property
    def unit(self) -> str:
        return "row" if self.place else "line"

    @property
    def where(self) -> str:
        return f"{self.path}, {self.place}" if self.place else f"{self.path}"

    def at(self, number: int) -> str:
        return f"{self.where}, {self.unit} {number}"

    def column(self, field: str) -> str:
        """``column Username`` (CSV) or ``column B (Username)`` (spreadsheet)."""
        index = (self.used or {})[field]
        title = self.header[index] if index < len(self.header) else ""
        if not self.place:
            return f"column {title}"
        letter, n = "", index + 1
        while n:
            n, r = divmod(n - 1, 26)
            letter = chr(ord("A") + r) + letter
        return f"column {letter} ({title})" if title else f"column {letter}"

    def cell(self, cells: list[str], field: str) -> str:
        i = (self.used or {}).get(field)
        return cells[i] if i is not None and i < len(cells) else ""


def _build(
    path: Path,
    place: str,
    rows: list[tuple[int, list[Any]]],
    columns: dict[str, str],
    problems: list[str],
    formulas: Mapping[tuple[int, int], str] | None = None,
) -> Roster:
    """Validate a table of (row number, cells): the one place roster rules live."""
    layout = _Layout(path, place)
    texts = [(n, raw, [_text(v).strip() for v in raw]) for n, raw in rows]
    texts = [t for t in texts if any(t[2])]  # blank rows are skipped
    if not texts:
        if not problems:
            problems.append(
                f"{layout.where}: the roster is empty; "
                "it needs a header row with a 'username' column"
            )
        _fail(path, problems)
    header_at, _, header = texts[0]
    used = _map_header(header, columns, layout.at(header_at), problems)
    if "username" not in used:
        _fail(path, problems)
    layout = _Layout(path, place, tuple(header), used)
    password_cols = [i for i, h in enumerate(header) if _key(h) in _PASSWORD_KEYS]
    passwords_found = False
    students: list[Student] = []
    seen: dict[str, tuple[int, str]] = {}
    for number, raw, cells in texts[1:]:
        passwords_found |= any(i < len(cells) and cells[i] for i in password_cols)
        found = _row_problems(layout, number, raw, cells, formulas or {})
        username = layout.cell(cells, "username")
        if found or not username:
            if not found and _key(cells[0]) in _CANVAS_NOTE_KEYS:
                continue  # Canvas's "Points Possible" row is not a person
            problems += found or [
                f"{layout.at(number)}: empty username ({layout.column('username')} is "
                "empty): fill it in or delete the row"
            ]
            continue
        role, found = _person_problems(layout, number, username, cells, seen)
        if found:
            problems += found
            continue
        students.append(
            Student(
                username=username,
                name=layout.cell(cells, "name"),
                surname=layout.cell(cells, "surname"),
                email=layout.cell(cells, "email"),
                line=number,
                role=role,
            )
        )
    if not seen and not problems:
        problems.append(f"{layout.at(header_at)}: the roster has a header but no students")
    if problems:
        _fail(path, problems)
    warnings = []
    if passwords_found:
        warnings.append(
            f"{path}: the roster has password columns; passwords in a roster are never used "
            "and never written back (delete them from the file)"
        )
    return Roster(path=path, students=tuple(students), warnings=tuple(warnings), place=place)


def _person_problems(
    layout: _Layout, number: int, username: str, cells: list[str], seen: dict[str, tuple[int, str]]
) -> tuple[str, list[str]]:
    """The row's role, and what is wrong with its person: an unknown role, a username seen
    before (``seen``, updated: lower-cased name -> (row, role)), a username not allowed."""
    found = []
    role_text = layout.cell(cells, "role")
    role = role_text.lower() or "student"
    if role not in ROLES:
        found.append(
            f"{layout.at(number)}: role {role_text!r} is not known: write student or "
            "assistant (empty means student)"
        )
    key = username.lower()
    if key in seen:
        line, was = seen[key]
        found.append(
            f"{layout.at(number)}: duplicate username {username!r} (also on "
            f"{layout.unit} {line}, as {was}; names are compared ignoring case)"
        )
    else:
        seen[key] = (number, role if role in ROLES else repr(role_text))
        if not USERNAME.fullmatch(username):
            found.append(
                f"{layout.at(number)}: {_username_problem(username, layout.column('username'))}"
            )
    return role, found


def _row_problems(
    layout: _Layout,
    number: int,
    raw: list[Any],
    cells: list[str],
    formulas: Mapping[tuple[int, int], str],
) -> list[str]:
    """Formulas and error values in the columns the roster uses (spreadsheets only)."""
    found = []
    for field, i in (layout.used or {}).items():
        if (number, i) in formulas:
            found.append(
                f"{layout.at(number)}: {layout.column(field)} holds a formula "
                f"({formulas[number, i]}); the roster needs plain values: copy the column "
                "and paste values only"
            )
        elif i < len(raw) and _is_error(raw[i]):
            found.append(
                f"{layout.at(number)}: {layout.column(field)} shows an error value; fix the cell"
            )
    return found


def _fail(path: Path, problems: list[str]) -> NoReturn:
    raise InvalidInput(
        problems,
        heading=f"{path}: the roster has {len(problems)} problem(s); nothing was changed",
    )


def _map_header(
    header: list[str], columns: dict[str, str], where: str, problems: list[str]
) -> dict[str, int]:
    """Roster field -> column index: ``roster_columns`` first, then the aliases."""
    used: dict[str, int] = {}
    keys = [_key(h) for h in header]
    found = ", ".join(repr(h) for h in header if h)
    for field, name in columns.items():
        matches = [i for i, k in enumerate(keys) if k == _key(name)]
        if not matches:
            problems.append(
                f"{where}: [course] roster_columns maps {field} to {name!r}, but the header "
                f"has no such column (found {found})"
            )
        elif len(matches) > 1:
            problems.append(f"{where}: column {name!r} appears twice in the header")
        else:
            used[field] = matches[0]
    claimed = set(used.values())
    candidates: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        field = _ALIAS_FIELD.get(k)
        if field and field not in columns and i not in claimed:
            candidates.setdefault(field, []).append(i)
    for field, found_at in candidates.items():
        if len(found_at) == 1:
            used[field] = found_at[0]
        else:
            names = " and ".join(repr(header[i]) for i in found_at)
            problems.append(
                f"{where}: columns {names} both give the {field}: choose one with "
                f"[course] roster_columns = {field}:COLUMN"
            )
            used[field] = found_at[0]  # keep reading rows, to report every problem
    if "username" not in used and "username" not in columns:
        problems.append(
            f"{where}: no 'username' column in the header (found {found}); name one "
            f"Username or Login, or map it with [course] roster_columns = username:COLUMN"
        )
    return used


def _username_problem(username: str, column: str) -> str:
    """Why a username is refused, and what to do; it is never changed silently."""
    if "@" in username:
        return f"{username!r} in {column} is an email address: use the login column, or {MAP_HINT}"
    if USERNAME.fullmatch(username.lower()):
        return (
            f"{username!r} in {column} has capital letters; user names are lower case: "
            f"write {username.lower()!r} in the roster, or {MAP_HINT}"
        )
    return f"invalid username {username!r} in {column}: must match ^[a-z_][a-z0-9_-]{{0,31}}$"


def _is_error(value: Any) -> bool:
    """A spreadsheet error cell (#N/A, #REF!...): pandas gives NaN (or NaT)."""
    return isinstance(value, float | datetime) and value != value


def _text(value: Any) -> str:
    """A cell as the teacher sees it: 12345, not 12345.0; 2024-03-01, not a timestamp."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return ""
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return format(value, ".15g")
    if isinstance(value, datetime):
        if value != value:  # NaT
            return ""
        if value.time() == time(0):
            return value.date().isoformat()
        return value.isoformat(sep=" ", timespec="seconds" if value.second else "minutes")
    if isinstance(value, date | time):
        return value.isoformat()
    return "" if value is None else str(value)


def _xlsx_formulas(data: bytes) -> dict[tuple[int, int], str]:
    """(row, column index) -> formula, for every formula cell of the first sheet."""
    import openpyxl

    book = openpyxl.load_workbook(
        io.BytesIO(data), read_only=True, data_only=False, keep_links=False
    )
    try:
        sheet = book.worksheets[0]
        sheet.reset_dimensions()  # declared dimensions can be wrong; pandas does the same
        return {
            (cell.row, cell.column - 1): str(getattr(cell.value, "text", cell.value))
            for row in sheet.iter_rows()
            for cell in row
            if getattr(cell, "data_type", None) == "f"
        }
    finally:
        book.close()


_ODS_TABLE = "{urn:oasis:names:tc:opendocument:xmlns:table:1.0}"


def _ods_formulas(data: bytes) -> dict[tuple[int, int], str]:
    """(row, column index) -> formula, for every formula cell of the first sheet."""
    import xml.etree.ElementTree as ET

    with zipfile.ZipFile(io.BytesIO(data)) as z:
        content = z.read("content.xml")
    if b"formula=" not in content:
        return {}
    found: dict[tuple[int, int], str] = {}
    depth = row = col = tables = 0
    for event, el in ET.iterparse(io.BytesIO(content), events=("start", "end")):  # noqa: S314
        if el.tag == _ODS_TABLE + "table":
            if event == "start":
                depth += 1
                tables += depth == 1
                if tables > 1:  # the second sheet: the first is done
                    break
            else:
                depth -= 1
            continue
        if depth != 1:
            continue
        if el.tag == _ODS_TABLE + "table-row":
            if event == "start":
                col = 0
            else:
                row += int(el.get(_ODS_TABLE + "number-rows-repeated", "1"))
                el.clear()
        elif event == "start" and el.tag in (
            _ODS_TABLE + "table-cell",
            _ODS_TABLE + "covered-table-cell",
        ):
            formula = el.get(_ODS_TABLE + "formula")
            if formula:
                found[(row + 1, col)] = formula
            col += int(el.get(_ODS_TABLE + "number-columns-repeated", "1"))
    return found
