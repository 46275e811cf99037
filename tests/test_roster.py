"""Pure tests of roster parsing: every problem at once, with the line or row the teacher sees.

Spreadsheet fixtures are made here at run time with openpyxl, odfpy and pandas
(no binary files in the repository).
"""

import datetime
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from classroom.core import roster, settings
from classroom.core.errors import EXIT_USAGE, InvalidInput

ROOT = Path(__file__).resolve().parent.parent


def parse(text, columns=()):
    return roster.parse(text, roster.Path("r.csv"), columns)


def problems(text, columns=()):
    with pytest.raises(InvalidInput) as e:
        parse(text, columns)
    assert e.value.exit_code == EXIT_USAGE
    return e.value.problems


def load_problems(path, columns=()):
    with pytest.raises(InvalidInput) as e:
        roster.load(path, columns)
    assert e.value.exit_code == EXIT_USAGE
    return e.value.problems


def xlsx(path, rows, title="Roster", start_row=1, more_sheets=()):
    """Write ``rows`` (lists of cell values) to the first sheet of a new workbook."""
    import openpyxl

    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = title
    for r, row in enumerate(rows, start_row):
        for c, value in enumerate(row, 1):
            if value is not None:
                sheet.cell(row=r, column=c, value=value)
    for name, extra in more_sheets:
        other = book.create_sheet(name)
        for row in extra:
            other.append(row)
    book.save(path)
    return path


# --------------------------------------------------------------------------------------------
# §3: the CSV roster
# --------------------------------------------------------------------------------------------


def test_original_tool_layout_loads_and_warns_about_passwords():
    r = parse(
        "username,surname,name,email,port,sys-pass,nb-pass\nada,Lovelace,Ada,a@x,8001,secret1,secret2\n"
    )
    (ada,) = r.students
    assert (ada.username, ada.full_name, ada.email, ada.role) == (
        "ada",
        "Ada Lovelace",
        "a@x",
        "student",
    )
    assert any("password" in w for w in r.warnings)
    assert "secret1" not in " ".join(r.warnings)


def test_bom_header_case_spaces_column_order_blank_rows():
    r = parse("\ufeff Email , USERNAME ,Name\n\nb@x, bob ,Bob\n\n,,\ncid@x,cid,\n")
    assert [s.username for s in r] == ["bob", "cid"]
    assert r.students[0].line == 3
    assert r.students[1].line == 6
    assert r.where(r.students[1]) == "r.csv, line 6"


def test_duplicates_in_any_case_and_invalid_names_all_reported():
    ps = problems("username\nada\nAda\nbad name\n-x\nada\n" + "a" * 40 + "\n")
    joined = "\n".join(ps)
    assert "line 3" in joined and "duplicate" in joined
    assert "line 4" in joined and "'bad name'" in joined
    assert "line 5" in joined
    assert "line 6" in joined
    assert "line 7" in joined
    assert len(ps) == 5


def test_a_row_spanning_lines_is_named_by_its_first_line():
    ps = problems('username,name\nada,"Ada\nLovelace"\nBad,x\n')
    assert ps == [
        "r.csv, line 4: 'Bad' in column username has capital letters; user names are "
        "lower case: write 'bad' in the roster, or map another column with "
        "[course] roster_columns = username:COLUMN"
    ]


def test_empty_file_and_header_only():
    assert "empty" in problems("")[0]
    assert "empty" in problems("\n\n")[0]
    assert "no students" in problems("username,name\n")[0]


def test_missing_username_column():
    (p,) = problems("user,name\nada,Ada\n")
    assert "line 1" in p and "no 'username' column" in p and "'user'" in p
    assert "roster_columns = username:COLUMN" in p


def test_gecos_is_sanitised():
    r = parse('username,name,surname\nada,"Ada:x,y","Love\nlace"\n')
    assert ":" not in r.students[0].gecos and "," not in r.students[0].gecos
    assert "\n" not in r.students[0].gecos


def test_select_only_unknown_is_error():
    r = parse("username\nada\nbob\n")
    assert [s.username for s in r.select(("bob",))] == ["bob"]
    with pytest.raises(InvalidInput, match="not in the roster"):
        r.select(("zed",))


def test_not_utf8(tmp_path):
    p = tmp_path / "r.csv"
    p.write_bytes(b"username,name\nada,Ren\xe9\n")
    with pytest.raises(InvalidInput, match="line 2.*UTF-8"):
        roster.load(p)


# --------------------------------------------------------------------------------------------
# §6.6: delimiters
# --------------------------------------------------------------------------------------------


def test_semicolon_csv_from_a_german_excel(tmp_path):
    # Excel's "CSV UTF-8" as saved with German settings: BOM, ';', CRLF, a comma in a name.
    p = tmp_path / "Teilnehmer.csv"
    p.write_bytes(
        "\ufeffUsername;Nachname;Vorname;E-Mail\r\n"
        "mueller;Müller;Jürgen;j@uni.de\r\n"
        'ada;"Lovelace, Countess";Ada;a@uni.de\r\n'
        ";;;\r\n".encode()
    )
    r = roster.load(p, [("name", "Vorname"), ("surname", "Nachname")])
    assert [(s.username, s.name, s.surname, s.email, s.line) for s in r] == [
        ("mueller", "Jürgen", "Müller", "j@uni.de", 2),
        ("ada", "Ada", "Lovelace, Countess", "a@uni.de", 3),
    ]


def test_excel_sep_line_and_tabs():
    r = parse("sep=;\nusername;name\nada;Ada, the first\n")
    assert [(s.username, s.name, s.line) for s in r] == [("ada", "Ada, the first", 3)]
    r = parse("username\tname\tsurname\nada\tAda\tLovelace, A.\n")
    assert r.students[0].surname == "Lovelace, A."


def test_line_numbers_after_a_sep_line():
    (p,) = problems("sep=;\nusername;name\nada;Ada\nBad;x\n")
    assert p.startswith("r.csv, line 4: 'Bad'")


def test_delimiter_inside_quotes_does_not_decide():
    r = parse('"Last name, First name";username;email\n"Lovelace, Ada";ada;a@x\n')
    assert r.students[0].username == "ada"


# --------------------------------------------------------------------------------------------
# §6.6: LMS exports, aliases, roster_columns
# --------------------------------------------------------------------------------------------


def test_moodle_export():
    r = parse(
        "First name,Surname,ID number,Email address,Username\n"
        "Ada,Lovelace,123,ada@uni.edu,ada\n"
        "Grace,Hopper,124,grace@uni.edu,grace\n"
    )
    assert [(s.username, s.name, s.surname, s.email) for s in r] == [
        ("ada", "Ada", "Lovelace", "ada@uni.edu"),
        ("grace", "Grace", "Hopper", "grace@uni.edu"),
    ]


def test_moodle_export_with_email_addresses_as_usernames_names_the_column():
    ps = problems(
        "First name,Surname,ID number,Email address,Username\n"
        "Ann,Lee,123,Ann.Lee@uni.edu,Ann.Lee@uni.edu\n"
        "Bo,Ng,124,bo@uni.edu,bo@uni.edu\n"
    )
    assert ps == [
        "r.csv, line 2: 'Ann.Lee@uni.edu' in column Username is an email address: use the "
        "login column, or map another column with [course] roster_columns = username:COLUMN",
        "r.csv, line 3: 'bo@uni.edu' in column Username is an email address: use the "
        "login column, or map another column with [course] roster_columns = username:COLUMN",
    ]


def test_canvas_gradebook_export():
    text = (
        "Student,ID,SIS User ID,SIS Login ID,Section,Quiz 1 (301)\n"
        "    Points Possible,,,,,10.00\n"
        '"Lovelace, Ada",5001,U01,ada,Intro 1,9.00\n'
        '"Hopper, Grace",5002,U02,grace,Intro 1,8.50\n'
    )
    r = parse(text)
    assert [(s.username, s.line) for s in r] == [("ada", 3), ("grace", 4)]
    assert r.students[0].full_name == ""
    r = parse(text, [("name", "Student")])
    assert r.students[0].full_name == "Lovelace, Ada"
    assert r.students[0].gecos == "Lovelace Ada"


def test_aliases_ignore_case_spaces_dashes_and_underscores():
    r = parse(" LOGIN ID ,given_name,Family-Name,E-Mail,Role\nada,Ada,Lovelace,a@x,Assistant\n")
    s = r.students[0]
    assert (s.username, s.name, s.surname, s.email, s.role) == (
        "ada",
        "Ada",
        "Lovelace",
        "a@x",
        "assistant",
    )


def test_roster_columns_maps_any_header_and_wins_over_an_alias():
    text = "Username,Matrikel,Vorname\nAnn.Lee@uni.edu,s123,Ann\n"
    assert "email address" in problems(text)[0]
    r = parse(text, [("username", "matrikel"), ("name", " Vorname ")])
    assert [(s.username, s.name) for s in r] == [("s123", "Ann")]


def test_roster_columns_naming_a_missing_column():
    (p,) = problems("Username,Vorname\nada,Ada\n", [("username", "Matrikel")])
    assert p.startswith("r.csv, line 1: [course] roster_columns maps username to 'Matrikel'")
    assert "'Username', 'Vorname'" in p


def test_two_columns_for_one_field_is_an_error_every_problem_at_once():
    ps = problems("Username,Email,Mail\nada,a@x,b@x\nBad,c@x,d@x\n")
    assert ps[0] == (
        "r.csv, line 1: columns 'Email' and 'Mail' both give the email: choose one with "
        "[course] roster_columns = email:COLUMN"
    )
    assert ps[1].startswith("r.csv, line 3: 'Bad'")
    assert len(ps) == 2
    r = parse("Username,Email,Mail\nada,a@x,b@x\n", [("email", "Mail")])
    assert r.students[0].email == "b@x"


def test_capitals_are_not_changed_silently():
    (p,) = problems("Login\nAnnLee\n")
    assert "'AnnLee' in column Login has capital letters" in p
    assert "'annlee'" in p and "roster_columns = username:COLUMN" in p


def test_parse_columns():
    assert roster.parse_columns("username:Matrikel, name : Vorname\nemail:E-Mail-Adresse") == (
        ("username", "Matrikel"),
        ("name", "Vorname"),
        ("email", "E-Mail-Adresse"),
    )
    assert roster.parse_columns("") == ()
    assert roster.parse_columns("username:Login: ID") == (("username", "Login: ID"),)
    for bad, needle in [
        ("username", "'username' is not FIELD:COLUMN"),
        ("username:", "not FIELD:COLUMN"),
        (":Matrikel", "not FIELD:COLUMN"),
        ("usrname:Matrikel", "'usrname' is not a roster field (did you mean 'username'?)"),
        ("username:A, username:B", "'username' is mapped twice"),
        ("username:A, name:a", "column 'a' is mapped twice"),
    ]:
        with pytest.raises(ValueError) as e:
            roster.parse_columns(bad)
        assert needle in str(e.value)


def test_roster_columns_in_the_config_file(tmp_path):
    cfg = tmp_path / "c.cfg"
    cfg.write_text("[course]\nname = c1\nroster = r.csv\nroster_columns = username:Matrikel\n")
    assert settings.load(cfg).roster_columns == (("username", "Matrikel"),)
    assert settings.load(ROOT / "config" / "notebooks.cfg").roster_columns == ()
    cfg.write_text(
        "[course]\nname = c1\nroster = r.csv\n\n"
        "roster_columns = username:Matrikel, vorname, login:Login\n"
    )
    with pytest.raises(InvalidInput) as e:
        settings.load(cfg)
    (p,) = e.value.problems
    assert p.startswith(f"{cfg}, line 5: [course] roster_columns: ")
    assert "'vorname' is not FIELD:COLUMN" in p and "'login' is not a roster field" in p


# --------------------------------------------------------------------------------------------
# §6.4: the role column
# --------------------------------------------------------------------------------------------


def test_roles_default_to_student_and_assistants_are_listed():
    r = parse("username,role\nada,\nbob,assistant\ncid, Student \ndan,ASSISTANT\n")
    assert [(s.username, s.role) for s in r] == [
        ("ada", "student"),
        ("bob", "assistant"),
        ("cid", "student"),
        ("dan", "assistant"),
    ]
    assert [s.username for s in r.assistants()] == ["bob", "dan"]
    assert parse("username\nada\n").assistants() == []


def test_unknown_role_and_duplicate_assistants_are_errors_with_their_lines():
    ps = problems(
        "username,role\nada,assistant\nbob,tutor\nada,assistant\ncid,student\nCid,assistant\n"
    )
    assert ps == [
        "r.csv, line 3: role 'tutor' is not known: write student or assistant "
        "(empty means student)",
        "r.csv, line 4: duplicate username 'ada' (also on line 2, as assistant; "
        "names are compared ignoring case)",
        "r.csv, line 6: duplicate username 'Cid' (also on line 5, as student; "
        "names are compared ignoring case)",
    ]


# --------------------------------------------------------------------------------------------
# §6.6: spreadsheets
# --------------------------------------------------------------------------------------------


def test_xlsx_first_sheet_with_numbers_and_rows_as_the_spreadsheet_shows_them(tmp_path):
    p = xlsx(
        tmp_path / "roster.xlsx",
        [
            ["Username", "Matrikel", "First name", "Last name", "Role"],
            ["ada", 12345, "Ada", "Lovelace", None],
            [None, None, None, None, None],
            ["bob", 12346.0, 2024, datetime.date(2024, 3, 1), "assistant"],
            ["nan", "N/A", "NA", "Nan", None],
        ],
        start_row=3,
        more_sheets=[("Other", [["username"], ["zed"]])],
    )
    r = roster.load(p)
    assert [(s.username, s.name, s.surname, s.role, s.line) for s in r] == [
        ("ada", "Ada", "Lovelace", "student", 4),
        ("bob", "2024", "2024-03-01", "assistant", 6),
        ("nan", "NA", "Nan", "student", 7),
    ]
    assert r.where(r.students[1]) == f"{p}, sheet 'Roster', row 6"
    assert [s.username for s in r.assistants()] == ["bob"]


def test_xlsx_numeric_matrikel_is_the_text_the_teacher_sees(tmp_path):
    p = xlsx(
        tmp_path / "roster.xlsx",
        [["Matrikel", "Vorname"], [12345, "Ada"], [None, "Bo"], [12346.0, "Cy"]],
    )
    ps = load_problems(p, {"username": "Matrikel"})
    assert ps[0] == (
        f"{p}, sheet 'Roster', row 2: invalid username '12345' in column A (Matrikel): "
        "must match ^[a-z_][a-z0-9_-]{0,31}$"
    )
    assert ps[1].startswith(f"{p}, sheet 'Roster', row 3: empty username (column A (Matrikel)")
    assert "'12346'" in ps[2]


def test_xlsx_moodle_export_with_email_usernames(tmp_path):
    p = xlsx(
        tmp_path / "moodle.xlsx",
        [
            ["First name", "Surname", "ID number", "Email address", "Username"],
            ["Ann", "Lee", "123", "Ann.Lee@uni.edu", "Ann.Lee@uni.edu"],
        ],
    )
    assert load_problems(p) == [
        f"{p}, sheet 'Roster', row 2: 'Ann.Lee@uni.edu' in column E (Username) is an "
        "email address: use the login column, or map another column with "
        "[course] roster_columns = username:COLUMN"
    ]


def test_xlsx_formula_in_a_used_column_is_refused_elsewhere_ignored(tmp_path):
    p = xlsx(
        tmp_path / "roster.xlsx",
        [
            ["Username", "Name", "Points", "Login"],
            ["ada", "Ada", "=1+1", "x"],
            ["=LOWER(D3)", "Bob", 3, "bob"],
            ["cid", '=PROPER("cid")', 4, "cid"],
        ],
    )
    assert load_problems(p, {"username": "Username"}) == [
        f"{p}, sheet 'Roster', row 3: column A (Username) holds a formula (=LOWER(D3)); "
        "the roster needs plain values: copy the column and paste values only",
        f"{p}, sheet 'Roster', row 4: column B (Name) holds a formula (=PROPER(\"cid\")); "
        "the roster needs plain values: copy the column and paste values only",
    ]
    p = xlsx(tmp_path / "ok.xlsx", [["Username", "Total"], ["ada", "=SUM(1,2)"]])
    assert roster.load(p).names() == ["ada"]


def test_xlsx_formula_with_a_cached_value_is_refused_too(tmp_path):
    # Excel saves the value next to the formula; the roster still refuses it (README).
    p = xlsx(tmp_path / "roster.xlsx", [["Username"], ['=LOWER("ADA")']])
    with zipfile.ZipFile(p) as z:
        parts = {n: z.read(n) for n in z.namelist()}
    sheet = "xl/worksheets/sheet1.xml"
    assert b"<f>" in parts[sheet]
    parts[sheet] = (
        parts[sheet]
        .replace(b"</f><v></v>", b"</f><v>ada</v>")
        .replace(b'LOWER("ADA")</f>', b'LOWER("ADA")</f><v>ada</v>')
    )
    parts[sheet] = parts[sheet].replace(b'<c r="A2"', b'<c t="str" r="A2"', 1)
    with zipfile.ZipFile(p, "w") as z:
        for name, data in parts.items():
            z.writestr(name, data)
    import pandas as pd

    assert pd.read_excel(p, header=None).iat[1, 0] == "ada"  # the cached value is there
    (problem,) = load_problems(p)
    assert "row 2: column A (Username) holds a formula" in problem


def test_xlsx_error_value_is_named(tmp_path):
    import openpyxl

    p = tmp_path / "roster.xlsx"
    book = openpyxl.Workbook()
    book.active.append(["Username", "Name"])
    book.active.append(["ada", "Ada"])
    book.active.append(["bob", "Bob"])
    book.active["B3"].value = "#N/A"  # openpyxl stores this as an error cell
    assert book.active["B3"].data_type == "e"
    book.save(p)
    assert load_problems(p) == [
        f"{p}, sheet 'Sheet', row 3: column B (Name) shows an error value; fix the cell"
    ]


def test_xlsx_empty_first_sheet(tmp_path):
    p = xlsx(tmp_path / "roster.xlsx", [], title="Notes", more_sheets=[("Students", [["x"]])])
    assert load_problems(p) == [
        f"{p}, sheet 'Notes': the first sheet is empty; the roster must be on the first "
        "sheet, with a header row that has a 'username' column (the file's sheets: "
        "Notes, Students)"
    ]
    p = xlsx(tmp_path / "blank.xlsx", [[" ", None]])
    assert "the first sheet is empty" in load_problems(p)[0]


def test_xlsx_header_only_and_no_username(tmp_path):
    p = xlsx(tmp_path / "a.xlsx", [["Username"]])
    assert load_problems(p) == [
        f"{p}, sheet 'Roster', row 1: the roster has a header but no students"
    ]
    p = xlsx(tmp_path / "b.xlsx", [["Vorname"], ["Ada"]], start_row=2)
    (problem,) = load_problems(p)
    assert problem.startswith(f"{p}, sheet 'Roster', row 2: no 'username' column")


def test_ods_from_pandas(tmp_path):
    import pandas as pd

    p = tmp_path / "roster.ods"
    frame = pd.DataFrame(
        {
            "Login": ["ada", "", "bob"],
            "Given name": ["Ada", "", "Bob"],
            "Matrikel": [12345, None, 12346],  # a float column in pandas: 12345.0
            "Role": ["", "", "assistant"],
        }
    )
    frame.to_excel(p, engine="odf", index=False)
    r = roster.load(p)
    assert [(s.username, s.name, s.role, s.line) for s in r] == [
        ("ada", "Ada", "student", 2),
        ("bob", "Bob", "assistant", 4),
    ]
    frame.loc[2, "Login"] = "Bob"
    frame.to_excel(p, engine="odf", index=False)
    (problem,) = load_problems(p, {"name": "Matrikel"})
    assert problem.startswith(f"{p}, sheet 'Sheet1', row 4: 'Bob' in column A (Login)")
    frame.loc[2, "Login"] = "bob"
    frame.to_excel(p, engine="odf", index=False)
    assert [s.name for s in roster.load(p, {"name": "Matrikel"})] == ["12345", "12346"]


def test_ods_formula_is_refused(tmp_path):
    from odf.opendocument import OpenDocumentSpreadsheet
    from odf.table import Table, TableCell, TableRow
    from odf.text import P

    doc = OpenDocumentSpreadsheet()
    table = Table(name="Kurs")
    for row in (["Username", "Name"], ["ada", "Ada"], ["bob", ("of:=LOWER([.A3])", "bob")]):
        tr = TableRow()
        for value in row:
            if isinstance(value, tuple):
                cell = TableCell(valuetype="string", formula=value[0])
                cell.addElement(P(text=value[1]))
            else:
                cell = TableCell(valuetype="string", numbercolumnsrepeated=1)
                cell.addElement(P(text=value))
            tr.addElement(cell)
        table.addElement(tr)
    doc.spreadsheet.addElement(table)
    p = tmp_path / "roster.ods"
    doc.save(str(p))
    assert load_problems(p) == [
        f"{p}, sheet 'Kurs', row 3: column B (Name) holds a formula (of:=LOWER([.A3])); "
        "the roster needs plain values: copy the column and paste values only"
    ]


def test_format_is_told_by_content_not_name(tmp_path):
    p = xlsx(tmp_path / "students.csv", [["Username"], ["ada"]])
    assert roster.load(p).names() == ["ada"]
    old = tmp_path / "old.xls"
    old.write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 600)
    assert "old Excel .xls" in load_problems(old)[0]
    other = tmp_path / "notes.zip"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("a.txt", "hello")
    assert "neither .xlsx nor .ods" in load_problems(other)[0]
    broken = tmp_path / "broken.xlsx"
    broken.write_bytes(p.read_bytes()[:400])
    assert "a damaged workbook" in load_problems(broken)[0]
    garbage = tmp_path / "garbage.xlsx"
    with zipfile.ZipFile(garbage, "w") as z:
        z.writestr("xl/workbook.xml", "not xml")
    assert load_problems(garbage) == [
        f"{garbage}: cannot read this .xlsx file; open it in a spreadsheet "
        "program and save it again as .xlsx or CSV UTF-8"
    ]


def test_cell_text_is_what_the_teacher_sees():
    import pandas as pd

    text = roster._text
    assert text(12345) == "12345"
    assert text(12345.0) == "12345"
    assert text(0.1 + 0.2) == "0.3"
    assert text(1.5) == "1.5"
    assert text(True) == "TRUE"
    assert text(datetime.datetime(2024, 3, 1)) == "2024-03-01"
    assert text(pd.Timestamp("2024-03-01 10:30")) == "2024-03-01 10:30"
    assert text(datetime.datetime(2024, 3, 1, 10, 30, 5)) == "2024-03-01 10:30:05"
    assert text(datetime.time(9, 15)) == "09:15:00"
    assert text(None) == "" and text(pd.NaT) == ""


# --------------------------------------------------------------------------------------------
# pandas only when a spreadsheet is read
# --------------------------------------------------------------------------------------------


def _modules_after(tmp_path, roster_file):
    cfg = tmp_path / "c.cfg"
    cfg.write_text(f"[course]\nname = c1\nroster = {roster_file}\n")
    code = textwrap.dedent(
        f"""
        import sys
        import classroom.cli
        from classroom.commands import course
        from classroom.core import roster
        settings, r = course.load({str(cfg)!r})
        r = roster.load(settings.roster, settings.roster_columns)
        print(r.names(), sorted(m for m in ("pandas", "numpy", "openpyxl", "odf")
                                if m in sys.modules))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return out.stdout.strip()


def test_a_csv_roster_does_not_import_pandas(tmp_path):
    (tmp_path / "r.csv").write_text("username;name\nada;Ada\n")
    assert _modules_after(tmp_path, "r.csv") == "['ada'] []"


def test_a_spreadsheet_roster_imports_pandas_then(tmp_path):
    xlsx(tmp_path / "r.xlsx", [["Username"], ["ada"]])
    assert _modules_after(tmp_path, "r.xlsx") == "['ada'] ['numpy', 'openpyxl', 'pandas']"
