"""Pure tests of config parsing and validation."""

from pathlib import Path

import pytest

from classroom.core import settings
from classroom.core.errors import InvalidInput

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path, text):
    p = tmp_path / "c.cfg"
    p.write_text(text)
    return p


def test_sample_config_loads_with_every_key():
    s = settings.load(ROOT / "config" / "notebooks.cfg")
    assert s.name == "intro-python"
    assert s.roster == (ROOT / "samples" / "students.csv").resolve()
    assert s.material_source == (ROOT / "samples" / "tutorial").resolve()
    text = (ROOT / "config" / "notebooks.cfg").read_text()
    for section, keys in settings.DEFAULTS.items():
        assert f"[{section}]" in text
        for key in keys:
            assert f"\n{key} =" in text, f"sample config lacks [{section}] {key}"


def test_defaults_and_relative_paths(tmp_path):
    s = settings.load(write(tmp_path, "[course]\nname = c1\nroster = r.csv\n"))
    assert s.group == "c1"
    assert s.state_dir == Path("/var/lib/classroom/c1")
    assert s.roster == tmp_path / "r.csv"
    assert s.retrieve_destination == tmp_path / "submissions"
    assert s.archive_dir == Path("/var/lib/classroom/c1/archive")
    assert s.max_file_size == 20 << 20
    assert s.home_mode == 0o700
    assert s.start_mode == "fork"


def test_typo_in_key_gets_did_you_mean_with_line(tmp_path):
    p = write(tmp_path, "[course]\nname = c1\nroster = r.csv\n\n[accounts]\npasword_length = 10\n")
    with pytest.raises(InvalidInput) as e:
        settings.load(p)
    msg = str(e.value)
    assert "line 6" in msg and "pasword_length" in msg and "did you mean 'password_length'" in msg


def test_unknown_section_and_every_problem_at_once(tmp_path):
    p = write(
        tmp_path,
        "[course]\nname = Bad Name\nroster = r.csv\n[acounts]\nshell = x\n"
        "[launch]\napp = jupyterlab\nportal_port = 99999\n",
    )
    with pytest.raises(InvalidInput) as e:
        settings.load(p)
    problems = e.value.problems
    assert any("did you mean [accounts]" in x for x in problems)
    assert any("name" in x and "line 2" in x for x in problems)
    assert any("app" in x and "line 7" in x for x in problems)
    assert any("portal_port" in x and "line 8" in x for x in problems)
    assert len(problems) >= 4


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("home_mode", "0755", "world-readable"),
        ("password_length", "6", "between 8"),
        ("notebook_password", "maybe", "same, separate"),
    ],
)
def test_bad_account_values(tmp_path, key, value, needle):
    p = write(tmp_path, f"[course]\nname = c1\nroster = r.csv\n[accounts]\n{key} = {value}\n")
    with pytest.raises(InvalidInput) as e:
        settings.load(p)
    assert needle in str(e.value)


def test_missing_required_and_missing_file(tmp_path):
    with pytest.raises(InvalidInput) as e:
        settings.load(write(tmp_path, "[accounts]\nshell = /bin/sh\n"))
    assert "[course] name is required" in str(e.value)
    with pytest.raises(InvalidInput) as e:
        settings.load(tmp_path / "nope.cfg")
    assert "not found" in str(e.value)


def test_certfile_needs_keyfile(tmp_path):
    p = write(tmp_path, "[course]\nname = c1\nroster = r.csv\n[launch]\ncertfile = c.pem\n")
    with pytest.raises(InvalidInput, match="certfile and keyfile go together"):
        settings.load(p)


def test_folder_must_stay_inside_home(tmp_path):
    p = write(tmp_path, "[course]\nname = c1\nroster = r.csv\n[material]\nfolder = ../etc\n")
    with pytest.raises(InvalidInput, match="folder"):
        settings.load(p)


def test_sizes():
    assert settings.parse_size("20M") == 20 * 1024 * 1024
    assert settings.parse_size("512") == 512
    assert settings.parse_size("1.5G") == int(1.5 * (1 << 30))
    with pytest.raises(ValueError):
        settings.parse_size("lots")


@pytest.mark.parametrize("value", ["http://class.example.org", "x:8000", "a/b", "bad host"])
def test_server_address_must_be_a_bare_host(tmp_path, value):
    p = write(
        tmp_path, f"[course]\nname = c1\nroster = r.csv\n[launch]\nserver_address = {value}\n"
    )
    with pytest.raises(InvalidInput, match="server_address"):
        settings.load(p)


def test_server_address_host_is_accepted(tmp_path):
    p = write(
        tmp_path,
        "[course]\nname = c1\nroster = r.csv\n[launch]\nserver_address = class.example.org\n",
    )
    assert settings.load(p).server_address == "class.example.org"


@pytest.mark.parametrize(
    "section, key, value, says",
    [
        ("launch", "start_timeout", "60s", "'60s' is not a number of seconds; write 60"),
        ("launch", "start_timeout", "2 min", "write 120"),
        ("hooks", "timeout", "soon", "write e.g. 60"),
        ("launch", "idle_timeout", "1h", "write 3600"),
        ("launch", "portal_port", "eighty", "'eighty' is not a whole number"),
        ("accounts", "home_mode", "rwx", "'rwx' is not a mode in octal"),
        ("retrieve", "max_file_size", "0", "would let no file through"),
        ("retrieve", "max_total_size", "lots", "'lots' is not a size"),
    ],
)
def test_values_are_explained_in_the_teachers_terms(tmp_path, section, key, value, says):
    p = write(tmp_path, f"[course]\nname = c1\nroster = r.csv\n[{section}]\n{key} = {value}\n")
    with pytest.raises(InvalidInput) as e:
        settings.load(p)
    text = str(e.value)
    assert f"[{section}] {key}" in text and says in text, text
    for internal in ("could not convert", "float", "invalid literal", "int()"):
        assert internal not in text, text


def test_human_sizes_read_as_written():
    from classroom.core.sizes import human_size, parse_size

    assert human_size(parse_size("20M")) == "20 MB"
    assert human_size(200 << 20) == "200 MB"
    assert human_size(1536) == "1.5 KB"
    assert human_size(12) == "12 bytes"
