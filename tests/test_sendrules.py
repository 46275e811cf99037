"""send's decision table (SPEC §4), row by row, without root and without a file."""

from __future__ import annotations

import pytest

from classroom.core import sendrules as r
from classroom.core.sendrules import Sent

SOURCE = "a" * 64  # sha256 of the source now
OLD = "b" * 64  # what the course sent last time
EDITED = "c" * 64  # the student's edit


# --- the table of SPEC §4 -------------------------------------------------------------------------


@pytest.mark.parametrize("force", [False, True])
def test_missing_never_sent_is_copied(force):
    assert r.decide(None, None, SOURCE, force=force) == r.COPY


@pytest.mark.parametrize("force", [False, True])
def test_missing_sent_before_is_restored(force):
    assert r.decide(OLD, None, SOURCE, force=force) == r.RESTORE
    assert r.decide(SOURCE, None, SOURCE, force=force) == r.RESTORE


@pytest.mark.parametrize("sent", [None, OLD, SOURCE])
@pytest.mark.parametrize("force", [False, True])
def test_same_as_source_is_left_alone(sent, force):
    assert r.decide(sent, SOURCE, SOURCE, force=force) == r.NOTHING


@pytest.mark.parametrize("force", [False, True])
def test_not_edited_and_source_changed_is_updated(force):
    assert r.decide(OLD, OLD, SOURCE, force=force) == r.UPDATE


def test_edited_is_kept_and_a_conflict():
    assert r.decide(OLD, EDITED, SOURCE, force=False) == r.CONFLICT


def test_students_own_file_of_that_name_is_kept_and_a_conflict():
    assert r.decide(None, EDITED, SOURCE, force=False) == r.CONFLICT
    assert r.decide(None, r.OTHER, SOURCE, force=False) == r.CONFLICT  # a link, a FIFO, ...
    assert r.decide(OLD, r.OTHER, SOURCE, force=False) == r.CONFLICT


def test_force_backs_up_and_overwrites_only_what_would_be_a_conflict():
    assert r.decide(OLD, EDITED, SOURCE, force=True) == r.OVERWRITE
    assert r.decide(None, EDITED, SOURCE, force=True) == r.OVERWRITE
    assert r.decide(None, r.OTHER, SOURCE, force=True) == r.OVERWRITE


def test_folders_of_the_source():
    assert r.decide(None, None, r.FOLDER, force=False) == r.COPY  # made
    assert r.decide(None, r.FOLDER, r.FOLDER, force=False) == r.NOTHING
    assert r.decide(None, r.OTHER, r.FOLDER, force=False) == r.CONFLICT  # a file of that name
    assert r.decide(None, r.OTHER, r.FOLDER, force=True) == r.OVERWRITE


# --- the new version beside an edited file ---------------------------------------------------------


def test_beside_a_free_name_gets_the_new_version():
    assert r.decide_beside(None, None, SOURCE) == r.WRITE


def test_beside_already_the_new_version_is_kept():
    assert r.decide_beside(SOURCE, SOURCE, SOURCE) == r.KEPT
    assert r.decide_beside(None, SOURCE, SOURCE) == r.KEPT


def test_beside_an_earlier_new_version_not_edited_follows_the_source():
    assert r.decide_beside(OLD, OLD, SOURCE) == r.WRITE


def test_beside_a_name_taken_otherwise_is_passed_over():
    assert r.decide_beside(OLD, EDITED, SOURCE) == r.NEXT
    assert r.decide_beside(None, EDITED, SOURCE) == r.NEXT
    assert r.decide_beside(None, r.OTHER, SOURCE) == r.NEXT


# --- bookkeeping and the report -------------------------------------------------------------------


def test_stale_record():
    assert r.stale(None, SOURCE, "1:2:3:4:5")
    assert r.stale(Sent(OLD, 3, "1:2:3:4:5"), SOURCE, "1:2:3:4:5")
    assert r.stale(Sent(SOURCE, 3, "1:2:3:4:0"), SOURCE, "1:2:3:4:5")
    assert not r.stale(Sent(SOURCE, 3, "1:2:3:4:5"), SOURCE, "1:2:3:4:5")


def test_outcome_is_the_weightiest_action():
    assert r.outcome({}) is None
    assert r.outcome({r.KEPT: ["x"]}) is None  # a conflict from before: nothing was done
    assert r.outcome({r.COPY: ["a"], r.RESTORE: ["b"]}) == r.RESTORE
    assert r.outcome({r.COPY: ["a"], r.UPDATE: ["b"], r.CONFLICT: ["c"]}) == r.CONFLICT
    assert r.outcome({r.UPDATE: ["a"], r.OVERWRITE: ["b"]}) == r.OVERWRITE


def test_detail():
    actions = {r.COPY: ["a", "b", "c"], r.CONFLICT: ["x (new version in x.new)"], r.KEPT: ["y"]}
    assert r.detail(actions, []) == (
        "3 copied; 1 conflict: x (new version in x.new); 1 conflict kept: y"
    )
    assert r.detail(actions, [], names=True).startswith("3 copied: a, b, c; ")
    many = [f"f{i}" for i in range(7)]
    assert r.detail({r.UPDATE: many}, [], limit=5, names=True) == (
        "7 updated: f0, f1, f2, f3, f4, ... 2 more"
    )
    assert r.detail({}, ["a: a FIFO", "b: a symlink"]) == "2 skipped: a: a FIFO; b: a symlink"
