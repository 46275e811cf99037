"""Pure tests of roster parsing: every problem at once, with its line number."""

import pytest

from classroom.core import roster
from classroom.core.errors import InvalidInput


def parse(text):
    return roster.parse(text, roster.Path("r.csv"))


def problems(text):
    with pytest.raises(InvalidInput) as e:
        parse(text)
    return e.value.problems


def test_original_tool_layout_loads_and_warns_about_passwords():
    r = parse(
        "username,surname,name,email,port,sys-pass,nb-pass\nada,Lovelace,Ada,a@x,8001,secret1,secret2\n"
    )
    (ada,) = r.students
    assert (ada.username, ada.full_name, ada.email) == ("ada", "Ada Lovelace", "a@x")
    assert any("password" in w for w in r.warnings)
    assert "secret1" not in " ".join(r.warnings)


def test_bom_header_case_spaces_column_order_blank_rows():
    r = parse("\ufeff Email , USERNAME ,Name\n\nb@x, bob ,Bob\n\n,,\ncid@x,cid,\n")
    assert [s.username for s in r] == ["bob", "cid"]
    assert r.students[0].line == 3
    assert r.students[1].line == 6


def test_duplicates_in_any_case_and_invalid_names_all_reported():
    ps = problems("username\nada\nAda\nbad name\n-x\nada\n" + "a" * 40 + "\n")
    joined = "\n".join(ps)
    assert "line 3" in joined and "duplicate" in joined
    assert "line 4" in joined and "'bad name'" in joined
    assert "line 5" in joined
    assert "line 6" in joined
    assert "line 7" in joined
    assert len(ps) == 5


def test_semicolons_are_explained():
    (p,) = problems("username;name\nada;Ada\n")
    assert "';'" in p and "line 1" in p


def test_empty_file_and_header_only():
    assert "empty" in problems("")[0]
    assert "empty" in problems("\n\n")[0]
    assert "no students" in problems("username,name\n")[0]


def test_missing_username_column():
    (p,) = problems("user,name\nada,Ada\n")
    assert "no 'username' column" in p


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
