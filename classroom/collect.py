"""retrieve: collect students' work for grading. (Being built: issue 3.)"""

from __future__ import annotations

import datetime as dt

from .course import Course
from .errors import InvalidInput, NotImplementedYet


def parse_deadline(text: str) -> dt.datetime:
    try:
        return dt.datetime.strptime(text.strip(), "%Y-%m-%d %H:%M").astimezone()
    except ValueError:
        raise InvalidInput(f'--deadline {text!r}: use "YYYY-MM-DD HH:MM"') from None


def retrieve(course: Course, *, only=(), deadline=None) -> int:
    raise NotImplementedYet("retrieve is not built yet")
