"""The roster (CSV): who is in the class. Pure parsing and validation.

The stdlib ``csv`` module is used rather than pandas: it gives exact line
numbers for every problem, and a root tool should not need a 30 MB import to
read fifty lines.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path

from .addresses import USERNAME
from .errors import InvalidInput

PASSWORD_COLUMNS = {
    "sys-pass",
    "nb-pass",
    "password",
    "passwd",
    "sys_pass",
    "nb_pass",
    "notebook_password",
}
GECOS_UNSAFE = re.compile(r"[:,=\\\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Student:
    username: str
    name: str = ""
    surname: str = ""
    email: str = ""
    line: int = 0

    @property
    def full_name(self) -> str:
        return " ".join(p for p in (self.name, self.surname) if p)

    @property
    def gecos(self) -> str:
        """The full name made safe for the GECOS field of /etc/passwd."""
        return " ".join(GECOS_UNSAFE.sub(" ", self.full_name).split())


@dataclass(frozen=True)
class Roster:
    path: Path
    students: tuple[Student, ...]
    warnings: tuple[str, ...] = ()

    def __iter__(self):
        return iter(self.students)

    def __len__(self) -> int:
        return len(self.students)

    def names(self) -> list[str]:
        return [s.username for s in self.students]

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


def load(path: Path | str) -> Roster:
    """Read and validate a roster file; raise ``InvalidInput`` listing every problem."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InvalidInput(
            f"{path}: roster file not found (check [course] roster in the config)"
        ) from None
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read the roster: {exc.strerror}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InvalidInput(
            f"{path}, line {line}: not UTF-8 text (save the roster as CSV UTF-8)"
        ) from None
    return parse(text, path)


def parse(text: str, path: Path = Path("roster.csv")) -> Roster:
    problems: list[str] = []
    warnings: list[str] = []
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    header_line = 0
    students: list[Student] = []
    seen: dict[str, int] = {}
    password_cols: list[int] = []
    passwords_found = False
    try:
        for row in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = [c.strip().lower() for c in row]
                header_line = line
                if "username" not in header:
                    if len(row) == 1 and ";" in row[0]:
                        problems.append(
                            f"{path}, line {line}: the columns are separated by ';'; "
                            "save the roster as comma-separated CSV"
                        )
                    elif len(row) == 1 and "\t" in row[0]:
                        problems.append(
                            f"{path}, line {line}: the columns are separated by tabs; "
                            "save the roster as comma-separated CSV"
                        )
                    else:
                        found = ", ".join(repr(c) for c in header)
                        problems.append(
                            f"{path}, line {line}: no 'username' column in the header (found {found})"
                        )
                    break
                dups = sorted({c for c in header if c and header.count(c) > 1})
                for col in dups:
                    problems.append(
                        f"{path}, line {line}: column '{col}' appears twice in the header"
                    )
                password_cols = [i for i, c in enumerate(header) if c in PASSWORD_COLUMNS]
                continue
            cells = {h: (row[i].strip() if i < len(row) else "") for i, h in enumerate(header) if h}
            if any(i < len(row) and row[i].strip() for i in password_cols):
                passwords_found = True
            username = cells.get("username", "")
            if not username:
                problems.append(f"{path}, line {line}: empty username")
                continue
            key = username.lower()
            if key in seen:
                problems.append(
                    f"{path}, line {line}: duplicate username {username!r} "
                    f"(also on line {seen[key]}; names are compared ignoring case)"
                )
                continue
            seen[key] = line
            if not USERNAME.match(username):
                hint = ""
                if USERNAME.match(username.lower()):
                    hint = f" (user names are lower case: {username.lower()!r})"
                problems.append(
                    f"{path}, line {line}: invalid username {username!r}: must match "
                    f"^[a-z_][a-z0-9_-]{{0,31}}${hint}"
                )
                continue
            students.append(
                Student(
                    username=username,
                    name=cells.get("name", ""),
                    surname=cells.get("surname", ""),
                    email=cells.get("email", ""),
                    line=line,
                )
            )
    except csv.Error as exc:
        problems.append(f"{path}, line {reader.line_num}: {exc}")
    if header is None and not problems:
        problems.append(
            f"{path}: the roster is empty; it needs a header row with a 'username' column"
        )
    elif not students and not problems:
        problems.append(f"{path}, line {header_line}: the roster has a header but no students")
    if problems:
        raise InvalidInput(
            problems,
            heading=f"{path}: the roster has {len(problems)} problem(s); nothing was changed",
        )
    if passwords_found:
        warnings.append(
            f"{path}: the roster has password columns; passwords in a roster are never used "
            "and never written back (delete them from the file)"
        )
    return Roster(path=path, students=tuple(students), warnings=tuple(warnings))
