"""The per-student lines and the summary a command prints (no root)."""

from classroom.commands.course import Report


def test_dry_run_lines_read_as_english(capsys):
    report = Report("send", dry_run=True)
    report.done("ann", "sent")  # an irregular participle: was "would sent"
    report.done("bob", "copied", "3 files")
    report.done("cy", "conflict")
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "  ann: would be sent",
        "  bob: would be copied (3 files)",
        "  cy: would conflict",
    ]


def test_summary_counts_each_outcome_and_failures():
    report = Report("setup")
    report.done("ann", "created")
    report.unchanged("bob")
    report.failed("cy", "no home")
    assert report.summary() == "setup: 1 created, 1 unchanged, 1 failed"
    assert report.finish() == 1
