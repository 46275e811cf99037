"""``export --to jupyterhub|z2jh``: the files, checked against the chart's schema and a real JupyterHub.

The Zero to JupyterHub schema and defaults are the chart's own files
(``../shared/z2jh``, chart commit 48ea50e); the hub test starts the real
``jupyterhub`` (with Node's configurable-http-proxy) on a class that ``setup`` made.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import requests
import yaml
from conftest import PYTHON, ROOT, free_port, random_name, run_cli

from classroom.core import export as gen
from classroom.core.roster import Roster, Student

CHART = ROOT.parent / "shared" / "z2jh"
if not CHART.is_dir():  # a worktree beside the main checkout
    CHART = Path("/work/shared/z2jh")


# --------------------------------------------------------------------------------------------
# helpers


def write_course(base: Path, rows: list[str], *, header: str = "username,name", **extra) -> Path:
    """A course config (no accounts) in ``base``: roster rows, a tutorial folder, ``extra`` keys."""
    (base / "tutorial").mkdir(parents=True, exist_ok=True)
    (base / "tutorial" / "lesson.py").write_text("print('hello')\n")
    (base / "students.csv").write_text(header + "\n" + "".join(r + "\n" for r in rows))
    sections = {
        "course": {"name": "intro-py", "roster": "students.csv", "state_dir": str(base / "state")},
        "material": {"source": "tutorial"},
    }
    for key, value in extra.items():
        section, _, name = key.partition("__")
        sections.setdefault(section, {})[name] = value
    text = "".join(
        f"[{s}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())
        for s, keys in sections.items()
    )
    config = base / "notebooks.cfg"
    config.write_text(text)
    return config


def export(config: Path, target: str, outdir: Path) -> subprocess.CompletedProcess:
    return run_cli("export", str(config), "--to", target, str(outdir))


def chart_schema() -> dict:
    return yaml.safe_load((CHART / "values.schema.yaml").read_text())


def chart_defaults() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def merged(defaults: dict, values: dict) -> dict:
    """Helm's merge of user values over the chart's defaults (maps merge, anything else replaces)."""
    out = copy.deepcopy(defaults)
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def validate(values: dict) -> None:
    """Validate like ``helm lint``: the merged values against the chart's JSON schema."""
    import jsonschema

    jsonschema.validate(merged(chart_defaults(), values), chart_schema())


def plan(**changes) -> gen.Plan:
    base = gen.Plan(
        course="intro-py",
        config_file=Path("/srv/course/notebooks.cfg"),
        group="intro-py",
        staff_group="intro-py-staff",
        students=("ada", "bob"),
        assistants=("tom",),
    )
    return dataclasses.replace(base, **changes)


def hub_config(text: str):
    """Load a generated jupyterhub_config.py the way JupyterHub does (traitlets' loader)."""
    from traitlets.config.loader import PyFileConfigLoader

    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"jhc-{random_name()}.py"
    path.write_text(text)
    try:
        return PyFileConfigLoader(path.name, str(path.parent)).load_config()
    finally:
        path.unlink()


# --------------------------------------------------------------------------------------------
# the generated files, without a hub


def test_values_validate_against_the_chart_schema_and_match_the_config():
    p = plan(memory=2 << 30, cpu=1.5, tasks=200, idle_timeout=1800)
    values = yaml.safe_load(gen.z2jh_values(p))
    validate(values)
    auth = values["hub"]["config"]["Authenticator"]
    assert auth["allowed_users"] == ["ada", "bob", "tom"]
    assert auth["admin_users"] == ["tom"]
    assert auth["allow_existing_users"] is False
    assert values["hub"]["config"]["JupyterHub"]["authenticator_class"] == "native"
    single = values["singleuser"]
    assert single["memory"] == {"limit": "2G", "guarantee": "1G"}
    assert single["cpu"] == {"limit": 1.5, "guarantee": 0.75}
    assert single["defaultUrl"] == "/lab"
    assert values["cull"] == {"enabled": True, "timeout": 1800, "every": 600}
    # the material from a folder: a volume copied in by an init container, never overwriting
    (init,) = single["initContainers"]
    assert "cp -Rn /srv/material/. /home/jovyan/tutorial/" in init["command"][-1]
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    assert mounts == {"course-material": "/srv/material", "volume-{user_server}": "/home/jovyan"}
    claim = single["storage"]["extraVolumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim == "intro-py-material"


def test_values_without_limits_or_culling_validate_and_leave_the_chart_defaults():
    values = yaml.safe_load(gen.z2jh_values(plan()))
    validate(values)
    assert "memory" not in values["singleuser"] and "cpu" not in values["singleuser"]
    assert values["cull"] == {"enabled": False}


def test_the_schema_catches_a_wrong_value():
    """The validation is real: a limit of the wrong type is refused by the chart's schema."""
    import jsonschema

    values = yaml.safe_load(gen.z2jh_values(plan(cpu=2)))
    validate(values)
    # Helm validates the values merged over the chart's defaults: on their own, the
    # chart's required sections are missing.
    with pytest.raises(jsonschema.ValidationError, match="required"):
        jsonschema.validate(values, chart_schema())
    values["singleuser"]["cpu"]["limit"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        validate(values)


def test_git_material_is_pulled_by_nbgitpuller(tmp_path):
    config = write_course(tmp_path, ["ada"], material__source="https://example.org/course.git#fall")
    # the settings take the URL for a path; export reads the text as written
    url, branch = gen.git_source(config)
    assert (url, branch) == ("https://example.org/course.git", "fall")
    values = yaml.safe_load(gen.z2jh_values(plan(material_git=url, material_branch=branch)))
    validate(values)
    command = values["singleuser"]["lifecycleHooks"]["postStart"]["exec"]["command"]
    assert command == ["gitpuller", url, "fall", "/home/jovyan/tutorial"]
    assert "initContainers" not in values["singleuser"]


def test_a_git_url_with_a_password_is_refused(tmp_path):
    config = write_course(tmp_path, ["ada"], material__source="https://u:secret@example.org/c.git")
    r = export(config, "z2jh", tmp_path / "out")
    assert r.returncode == 2
    assert "password" in r.stderr and "secret" not in r.stdout + r.stderr
    assert not (tmp_path / "out").exists()


def test_jupyterhub_config_loads_and_matches_the_course():
    p = plan(idle_timeout=600)
    c = hub_config(gen.jupyterhub_config(p))
    assert c.JupyterHub.authenticator_class == "pam"
    assert c.Authenticator.allowed_users == {"ada", "bob", "tom"}
    assert c.Authenticator.admin_users == set()
    assert c.Authenticator.allow_existing_users is False
    assert c.JupyterHub.load_groups == {
        "intro-py": {"users": ["ada", "bob", "tom"]},
        "intro-py-staff": {"users": ["tom"]},
    }
    staff, culler = c.JupyterHub.load_roles
    assert staff["groups"] == ["intro-py-staff"]
    assert "access:servers!group=intro-py" in staff["scopes"]
    assert culler["services"] == ["jupyterhub-idle-culler"]
    (service,) = c.JupyterHub.services
    assert "--timeout=600" in service["command"]
    assert c.Spawner.default_url == "/lab"
    assert c.JupyterHub.spawner_class == "localprocess"
    assert callable(c.Spawner.pre_spawn_hook)
    assert c.Spawner.notebook_dir == "~/tutorial"


def test_limits_give_systemdspawner_with_the_same_limits():
    c = hub_config(gen.jupyterhub_config(plan(memory=512 << 20, cpu=2, tasks=300)))
    assert c.JupyterHub.spawner_class == "systemdspawner.SystemdSpawner"
    assert c.SystemdSpawner.mem_limit == "512M"
    assert c.SystemdSpawner.cpu_limit == 2
    assert c.SystemdSpawner.unit_extra_properties == {"TasksMax": "300"}
    values = yaml.safe_load(gen.z2jh_values(plan(memory=512 << 20, cpu=2, tasks=300)))
    assert values["singleuser"]["memory"]["limit"] == "512M"
    assert values["singleuser"]["cpu"]["limit"] == 2


def test_no_culler_without_idle_timeout():
    c = hub_config(gen.jupyterhub_config(plan()))
    assert "services" not in c.JupyterHub
    assert [r["name"] for r in c.JupyterHub.load_roles] == ["intro-py-staff"]


def test_roles_from_the_roster_role_column():
    """Students and assistants are told apart by the roster's ``role`` (SPEC §6.4)."""

    @dataclasses.dataclass(frozen=True)
    class Member(Student):
        role: str = "student"

    roster = Roster(
        Path("students.csv"),
        (Member("ada"), Member("tom", role="assistant"), Member("bob", role="student")),
    )
    settings = _settings(Path("/nonexistent/notebooks.cfg"))
    p = gen.plan_for(settings, roster)
    assert p.students == ("ada", "bob") and p.assistants == ("tom",)
    # a roster without the column: everyone is a student
    p = gen.plan_for(settings, Roster(Path("s.csv"), (Student("ada"),)))
    assert p.students == ("ada",) and p.assistants == ()


def _settings(config: Path):
    from classroom.core.settings import Settings

    return Settings(config_file=config, name="intro-py", roster=Path("s.csv"), group="intro-py",
                    state_dir=Path("/tmp/none"))  # fmt: skip


def test_limits_from_the_config(tmp_path):
    """[limits] in the course config reach both files (once settings know the section)."""
    from classroom.core import settings as settings_mod

    if "limits" not in settings_mod.DEFAULTS:
        pytest.skip("[limits] is not in this branch's settings yet (SPEC §6.2, another branch)")
    config = write_course(tmp_path, ["ada"], limits__memory="1G", limits__cpu="1.5")
    assert export(config, "jupyterhub", tmp_path / "hub").returncode == 0
    c = hub_config((tmp_path / "hub" / "jupyterhub_config.py").read_text())
    assert c.SystemdSpawner.mem_limit == "1G" and c.SystemdSpawner.cpu_limit == 1.5
    assert export(config, "z2jh", tmp_path / "k8s").returncode == 0
    values = yaml.safe_load((tmp_path / "k8s" / "values.yaml").read_text())
    assert values["singleuser"]["memory"]["limit"] == "1G"


# --------------------------------------------------------------------------------------------
# the command: files, OUTDIR, bad input


def test_export_writes_its_files_and_leaves_others_alone(tmp_path):
    config = write_course(tmp_path, ["ada", "bob"], launch__idle_timeout="900")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    (out / "values.yaml").write_text("old: true\n")
    r = export(config, "z2jh", out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", "notes.txt", "values.yaml"]
    assert (out / "notes.txt").read_text() == "mine\n"
    values = yaml.safe_load((out / "values.yaml").read_text())
    validate(values)
    assert values["hub"]["config"]["Authenticator"]["allowed_users"] == ["ada", "bob"]
    assert values["cull"]["timeout"] == 900
    readme = (out / "README.txt").read_text()
    assert (
        "helm repo add jupyterhub" in readme
        and "helm upgrade --cleanup-on-fail --install" in readme
    )
    # again: the same files, nothing else
    r = export(config, "jupyterhub", out)
    assert r.returncode == 0, r.stdout + r.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.txt", "jupyterhub_config.py", "notes.txt", "values.yaml"]
    assert (out / "notes.txt").read_text() == "mine\n"
    assert oct((out / "jupyterhub_config.py").stat().st_mode & 0o777) == "0o644"


def test_export_makes_a_missing_outdir(tmp_path):
    config = write_course(tmp_path, ["ada"])
    r = export(config, "jupyterhub", tmp_path / "a" / "b")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "a" / "b" / "jupyterhub_config.py").is_file()


def test_outdir_that_is_a_file_is_exit_2(tmp_path):
    config = write_course(tmp_path, ["ada"])
    target = tmp_path / "out"
    target.write_text("a file\n")
    r = export(config, "jupyterhub", target)
    assert r.returncode == 2
    assert "is a file" in r.stderr
    assert target.read_text() == "a file\n"
    r = export(config, "z2jh", target / "sub")
    assert r.returncode == 2 and "cannot be made" in r.stderr


def test_a_folder_where_a_file_goes_is_exit_2_and_nothing_written(tmp_path):
    config = write_course(tmp_path, ["ada"])
    out = tmp_path / "out"
    (out / "README.txt").mkdir(parents=True)
    r = export(config, "z2jh", out)
    assert r.returncode == 2 and "not a regular file" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["README.txt"]


def test_a_symlink_in_outdir_is_refused_not_followed(tmp_path):
    config = write_course(tmp_path, ["ada"])
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    (out / "jupyterhub_config.py").symlink_to(victim)
    r = export(config, "jupyterhub", out)
    assert r.returncode == 2
    assert victim.read_text() == "keep\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_unwritable_outdir_is_exit_2(tmp_path):
    config = write_course(tmp_path, ["ada"])
    out = tmp_path / "out"
    out.mkdir()
    opened = [(p, p.stat().st_mode) for p in (tmp_path, tmp_path.parent, tmp_path.parent.parent)]
    try:
        for p, mode in opened:
            p.chmod(mode | 0o005)  # nobody may read the config, not write OUTDIR
        r = subprocess.run(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--",
             PYTHON, str(ROOT / "notebooks.py"), "export", str(config), "--to", "z2jh", str(out)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    finally:
        for p, mode in opened:
            p.chmod(mode)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "not writable" in r.stderr and "Traceback" not in r.stderr
    assert list(out.iterdir()) == []


def test_a_roster_with_nobody_is_exit_2_and_nothing_written(tmp_path):
    config = write_course(tmp_path, [])
    out = tmp_path / "out"
    r = export(config, "jupyterhub", out)
    assert r.returncode == 2
    assert "students.csv" in r.stderr
    assert not out.exists()
    # and the generator refuses on its own, whatever the roster loader allows
    from classroom.core.errors import InvalidInput

    with pytest.raises(InvalidInput, match="lists nobody"):
        gen.plan_for(_settings(config), Roster(Path("students.csv"), ()))


def test_one_argument_is_outdir_with_the_default_config(tmp_path):
    config = write_course(tmp_path, ["ada"])
    r = run_cli(
        "export", "--to", "z2jh", str(tmp_path / "out"), env={"NOTEBOOKS_CONFIG": str(config)}
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "values.yaml").is_file()
    r = run_cli("export", "--to", "z2jh")
    assert r.returncode == 2


# --------------------------------------------------------------------------------------------
# the real thing: JupyterHub with the exported configuration, on a class setup made


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


def xsrf_field(html: str) -> str:
    m = re.search(r'name="_xsrf"\s+value="([^"]+)"', html)
    assert m, html[:2000]
    return m.group(1)


def login(base: str, username: str, password: str) -> tuple[requests.Session, requests.Response]:
    s = requests.Session()
    page = s.get(f"{base}/hub/login", timeout=30)
    r = s.post(
        f"{base}/hub/login",
        data={"username": username, "password": password, "_xsrf": xsrf_field(page.text)},
        timeout=60,
    )
    return s, r


def hub_api(s: requests.Session, base: str, method: str, path: str) -> requests.Response:
    """A hub REST call with the login cookie (and its _xsrf token, as the browser sends it)."""
    token = s.cookies.get("_xsrf", path="/hub/")
    return s.request(method, f"{base}/hub/api{path}", headers={"X-XSRFToken": token}, timeout=60)


def open_server(s: requests.Session, base: str, user: str) -> requests.Response:
    """Open ``user``'s server in the session, as a browser does: through the hub's OAuth,
    confirming access when JupyterHub asks (it asks when the server is someone else's)."""
    r = s.get(f"{base}/user/{user}/", timeout=60)
    if "oauth2/authorize" in r.url and r.status_code == 200 and "<form" in r.text:
        fields = re.findall(r'<input[^>]*name="([^"]+)"[^>]*value="([^"]*)"', r.text)
        r = s.post(r.url, data=fields, timeout=60)
    return r


def server_api(s: requests.Session, base: str, user: str, path: str) -> requests.Response:
    return s.get(f"{base}/user/{user}/api{path}", timeout=60)


def start_server(s: requests.Session, base: str, user: str) -> None:
    r = hub_api(s, base, "POST", f"/users/{user}/server")
    assert r.status_code in (201, 202), (r.status_code, r.text)
    wait_for(
        lambda: hub_api(s, base, "GET", f"/users/{user}").json().get("servers", {}).get("", {}).get("ready"),
        90,
        f"{user}'s server",
    )  # fmt: skip


def stop_server(s: requests.Session, base: str, user: str) -> None:
    r = hub_api(s, base, "DELETE", f"/users/{user}/server")
    assert r.status_code in (202, 204), (r.status_code, r.text)
    wait_for(
        lambda: not hub_api(s, base, "GET", f"/users/{user}").json().get("servers"), 60, "stop"
    )


@contextlib.contextmanager
def running_hub(config_file: Path, workdir: Path):
    """JupyterHub with ``config_file`` on free ports, as root; stopped (and its children) after."""
    port, hub_port, api_port = free_port(), free_port(), free_port()
    log = (workdir / "hub.log").open("w")
    env = {
        "PATH": f"{Path(PYTHON).parent}:/usr/local/bin:/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),  # this checkout's classroom, for the hook import
        "LANG": "C.UTF-8",
        "HOME": "/root",
    }
    argv = [
        PYTHON, "-m", "jupyterhub", "-f", str(config_file),
        f"--JupyterHub.bind_url=http://127.0.0.1:{port}",
        f"--JupyterHub.hub_bind_url=http://127.0.0.1:{hub_port}",
        f"--ConfigurableHTTPProxy.api_url=http://127.0.0.1:{api_port}",
    ]  # fmt: skip
    hub = subprocess.Popen(
        argv, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert hub.poll() is None, (workdir / "hub.log").read_text()
        with contextlib.suppress(requests.RequestException):
            return requests.get(f"{base}/hub/health", timeout=2).status_code == 200
        return False

    try:
        wait_for(healthy, 60, "JupyterHub to answer")
        yield base, hub
    finally:
        tree = (
            [hub, *psutil.Process(hub.pid).children(recursive=True)] if hub.poll() is None else []
        )
        with contextlib.suppress(ProcessLookupError):
            os.killpg(hub.pid, signal.SIGTERM)
        try:
            hub.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(hub.pid, signal.SIGKILL)
            hub.wait(5)
        for p in tree[1:]:  # the proxy and servers the hub started, if it left any
            with contextlib.suppress(psutil.Error):
                p.kill()
        log.close()


@pytest.mark.root
def test_a_real_jupyterhub_with_the_exported_config(course):
    if not shutil.which("configurable-http-proxy"):
        pytest.fail("configurable-http-proxy is missing: run scripts/install.sh --test")
    ada, bob = course.usernames
    tom = random_name()  # the assistant
    course.usernames.append(tom)
    stranger = random_name()  # a real account with a password, not in the roster
    course.extra_users.append(stranger)
    course.roster.write_text(
        f"username,name,role\n{ada},Ada,student\n{bob},Bob,\n{tom},Tom,assistant\n"
    )
    course.write_config(launch={"idle_timeout": "3600"})
    r = course.run("setup", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    creds = course.credentials()
    subprocess.run(
        ["useradd", "-N", "--create-home", "--", stranger], check=True, capture_output=True
    )
    subprocess.run(["chpasswd"], input=f"{stranger}:Stranger-Pass-42\n", text=True, check=True)

    out = course.base / "hub"
    r = export(course.config, "jupyterhub", out)
    assert r.returncode == 0, r.stdout + r.stderr
    config_file = out / "jupyterhub_config.py"
    text = config_file.read_text()
    for row in creds.values():  # never a password
        assert row["password"] not in text
        assert not row["notebook_password"] or row["notebook_password"] not in text
    # the roster's `role` column makes tom an assistant, the others students
    from classroom.commands.course import load

    planned = gen.plan_for(*load(course.config))
    assert planned.assistants == (tom,) and set(planned.students) == {ada, bob}

    with running_hub(config_file, out) as (base, hub):
        # the culler service runs beside the hub
        assert any(
            "jupyterhub_idle_culler" in " ".join(p.cmdline())
            for p in psutil.Process(hub.pid).children(recursive=True)
        )
        # a student logs in with the password from credentials.csv; the server spawns
        s, r = login(base, ada, creds[ada]["password"])
        assert r.status_code == 200, r.text[:2000]
        start_server(s, base, ada)
        lab = open_server(s, base, ada)
        assert lab.status_code == 200 and lab.url.rstrip("/").endswith(f"/user/{ada}/lab")
        # [launch] root = folder: the server opens in ~/tutorial, with the material in it
        listing = server_api(s, base, ada, "/contents/")
        assert listing.status_code == 200, listing.text[:2000]
        assert {"lesson.ipynb", "data"} <= {f["name"] for f in listing.json()["content"]}
        home = course.home(ada)
        assert (home / "tutorial" / "lesson.ipynb").stat().st_uid == course.pw(ada).pw_uid

        # the student edits a file through Jupyter; the teacher updates the material
        token = s.cookies.get("_xsrf", path=f"/user/{ada}/")
        r = s.put(
            f"{base}/user/{ada}/api/contents/data/numbers.csv",
            json={"type": "file", "format": "text", "content": "a,b\n9,9\n"},
            headers={"X-XSRFToken": token},
            timeout=60,
        )
        assert r.status_code in (200, 201), r.text
        (course.base / "tutorial" / "data" / "numbers.csv").write_text("a,b\n3,4\n")
        (course.base / "tutorial" / "week2.py").write_text("print(2)\n")

        # the assistant reaches the student's server; another student does not
        t, r = login(base, tom, creds[tom]["password"])
        assert r.status_code == 200
        assert open_server(t, base, ada).status_code == 200
        seen = server_api(t, base, ada, "/contents/data/numbers.csv")
        assert seen.status_code == 200 and seen.json()["content"] == "a,b\n9,9\n"
        b, r = login(base, bob, creds[bob]["password"])
        assert r.status_code == 200
        assert open_server(b, base, ada).status_code in (403, 404)
        assert server_api(b, base, ada, "/contents/").status_code == 403

        # a second spawn: the edit is kept, the new version lands beside it, new files arrive
        stop_server(s, base, ada)
        start_server(s, base, ada)
        open_server(s, base, ada)
        kept = server_api(s, base, ada, "/contents/data/numbers.csv")
        assert kept.status_code == 200 and kept.json()["content"] == "a,b\n9,9\n"
        assert (home / "tutorial" / "week2.py").read_text() == "print(2)\n"
        beside = [p.name for p in (home / "tutorial" / "data").iterdir() if p.name != "numbers.csv"]
        assert any(name.startswith("numbers") for name in beside), beside

        # someone with a Unix account and the right password, not in the roster: refused
        x, r = login(base, stranger, "Stranger-Pass-42")
        assert r.status_code == 403
        assert not x.cookies.get("jupyterhub-session-id") or "/hub/login" in r.url
        assert hub_api(x, base, "GET", f"/users/{stranger}").status_code == 403
        # and a wrong password for a student
        _, r = login(base, bob, "not-the-password")
        assert r.status_code == 403


@pytest.mark.root
def test_the_hook_waits_while_the_course_is_locked(ready_course):
    """Students who log in together take turns: the hook's send waits for the course lock."""
    import threading

    from classroom.host import hubhook
    from classroom.host.state import Lock

    c = ready_course
    user = c.usernames[0]
    lock = Lock(c.state_dir, "retrieve")
    lock.acquire()
    try:
        with pytest.raises(hubhook.MaterialNotSent, match="locked"):
            hubhook.send_material(c.config, user, lock_wait=0)
        threading.Timer(2.0, lock.release).start()
        hubhook.send_material(c.config, user, lock_wait=60)
    finally:
        lock.release()
    assert (c.home(user) / "tutorial" / "lesson.ipynb").is_file()
    # the hook itself, called as JupyterHub calls it (a coroutine, with a spawner)
    import asyncio
    import types

    (c.home(user) / "tutorial" / "lesson.ipynb").unlink()
    spawner = types.SimpleNamespace(user=types.SimpleNamespace(name=user))
    asyncio.run(hubhook.material_hook(c.config)(spawner))
    assert (c.home(user) / "tutorial" / "lesson.ipynb").is_file()  # restored, as send does
    with pytest.raises(hubhook.MaterialNotSent, match="not a valid user name"):
        asyncio.run(
            hubhook.material_hook(c.config)(
                types.SimpleNamespace(user=types.SimpleNamespace(name="-x"))
            )
        )
