"""``export``: the class as a JupyterHub or Zero to JupyterHub configuration. Pure text generation.

``plan_for(settings, roster)`` collects what the class's set-up says (who logs in, who
helps, where the material lands, the limits, the culling); ``files_for(plan, target)``
turns it into the files an admin would write by hand: ``jupyterhub_config.py``, or
``values.yaml`` and ``README.txt`` for the Helm chart. No password ever enters a plan.
"""

from __future__ import annotations

import configparser
import json
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from .errors import InvalidInput
from .roster import Roster
from .settings import Settings, parse_size

TARGETS = ("jupyterhub", "z2jh")
FILES = {"jupyterhub": ("jupyterhub_config.py",), "z2jh": ("values.yaml", "README.txt")}

# [material] source written as a git URL (what nbgitpuller pulls); "#branch" picks a branch.
GIT_URL = re.compile(r"^(?:(?:https?|git|ssh)://\S+|[\w.-]+@[\w.-]+:\S+)$")
DEFAULT_BRANCH = "main"

# Zero to JupyterHub: the home folder in the user pod and the chart's user id.
Z2JH_HOME = "/home/jovyan"
Z2JH_UID, Z2JH_GID = 1000, 100
MATERIAL_MOUNT = "/srv/material"


@dataclass(frozen=True)
class Plan:
    """What an exported hub must reproduce of one class. Sizes in bytes, CPUs as a float."""

    course: str
    config_file: Path
    group: str
    staff_group: str
    students: tuple[str, ...]
    assistants: tuple[str, ...]
    app: str = "lab"
    root: str = "folder"
    material_folder: str = "tutorial"
    material_git: str = ""
    material_branch: str = DEFAULT_BRANCH
    memory: int = 0
    cpu: float = 0.0
    tasks: int = 0
    idle_timeout: int = 0
    ip: str = "0.0.0.0"
    port: int = 8000
    certfile: str = ""
    keyfile: str = ""
    start_timeout: int = 60
    password_length: int = 12

    @property
    def users(self) -> tuple[str, ...]:
        return self.students + self.assistants

    @property
    def limited(self) -> bool:
        return bool(self.memory or self.cpu or self.tasks)

    @property
    def default_url(self) -> str:
        return "/tree" if self.app == "notebook" else "/lab"


def plan_for(settings: Settings, roster: Roster) -> Plan:
    """The plan of a loaded course. Raise ``InvalidInput`` for a roster that names nobody.

    Fields other branches add (``role`` on a student, ``staff_group`` and the
    ``[limits]`` keys on the settings) are read with their documented defaults.
    """
    people = list(roster)
    if not people:
        # An empty allowed_users meant "every Unix user of the host" in older JupyterHubs.
        raise InvalidInput(
            f"{roster.path}: the roster lists nobody: there is no one to let into a hub; "
            "add the students and export again"
        )
    students = tuple(p.username for p in people if getattr(p, "role", "student") != "assistant")
    assistants = tuple(p.username for p in people if getattr(p, "role", "student") == "assistant")
    git_url, branch = git_source(settings.config_file)
    return Plan(
        course=settings.name,
        config_file=Path(settings.config_file),
        group=settings.group,
        staff_group=getattr(settings, "staff_group", "") or f"{settings.name}-staff",
        students=students,
        assistants=assistants,
        app=settings.app,
        root=settings.root,
        material_folder=settings.material_folder,
        material_git=git_url,
        material_branch=branch,
        memory=_size(getattr(settings, "memory_limit", 0)),
        cpu=float(getattr(settings, "cpu_limit", 0) or 0),
        tasks=int(getattr(settings, "tasks_limit", 0) or 0),
        idle_timeout=int(settings.idle_timeout),
        ip=settings.ip,
        port=int(settings.portal_port),
        certfile=str(settings.certfile or ""),
        keyfile=str(settings.keyfile or ""),
        start_timeout=int(settings.start_timeout),
        password_length=int(settings.password_length),
    )


def _size(value: Any) -> int:
    if isinstance(value, str):
        return parse_size(value) if value.strip() else 0
    return int(value or 0)


def git_source(config_file: Path) -> tuple[str, str]:
    """``(url, branch)`` when ``[material] source`` is a git URL, else ``("", "main")``.

    Read from the config text: the settings turn ``source`` into a path. A URL that
    carries a password is refused (export never writes one).
    """
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";",))
    try:
        parser.read(config_file, encoding="utf-8-sig")
    except configparser.Error:
        return "", DEFAULT_BRANCH  # settings.load reported it already
    text = parser.get("material", "source", fallback="").strip()
    if not GIT_URL.match(text):
        return "", DEFAULT_BRANCH
    url, _, branch = text.partition("#")
    if "://" in url and urllib.parse.urlsplit(url).password:
        raise InvalidInput(
            f"{config_file}: [material] source has a password in its URL; export never "
            "writes a password: use a public URL or a deploy key"
        )
    return url, branch or DEFAULT_BRANCH


def files_for(plan: Plan, target: str) -> dict[str, str]:
    """The files of ``target`` ('jupyterhub' or 'z2jh'): name -> text."""
    if target == "jupyterhub":
        return {"jupyterhub_config.py": jupyterhub_config(plan)}
    if target == "z2jh":
        return {"values.yaml": z2jh_values(plan), "README.txt": z2jh_readme(plan)}
    raise InvalidInput(f"--to {target}: must be one of {', '.join(TARGETS)}")


def byte_spec(size: int) -> str:
    """``2147483648`` -> ``'2G'``: the K/M/G/T (powers of 1024) that JupyterHub and KubeSpawner read."""
    for suffix, scale in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{suffix}"
    return str(size)


def _cpus(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _header(plan: Plan, comment: str, what: str) -> list[str]:
    return [
        f"{comment} {what} for the course {plan.course!r}, written by `notebooks export`",
        f"{comment} (classroom {__version__}) from {plan.config_file} and its roster.",
        f"{comment} Exporting again overwrites this file: change the course config and export",
        f"{comment} again, or copy this file elsewhere before you edit it by hand. No password",
        f"{comment} is written here.",
    ]


def _py_list(names: tuple[str, ...], indent: str = "    ") -> str:
    if not names:
        return "[]"
    return "[\n" + "".join(f"{indent}{name!r},\n" for name in names) + indent[:-4] + "]"


def _py_set(names: tuple[str, ...]) -> str:
    if not names:
        return "set()"
    return "{\n" + "".join(f"    {name!r},\n" for name in names) + "}"


def _culler_every(timeout: int) -> int:
    """How often the culler looks: half the timeout, between one and ten minutes."""
    return max(60, min(600, timeout // 2))


# ---------------------------------------------------------------------------------------------
# JupyterHub on a host where setup made the accounts


def jupyterhub_config(plan: Plan) -> str:
    """``jupyterhub_config.py``: PAM, the roster's users, the staff role, the material hook."""
    out = _header(plan, "#", "JupyterHub configuration")
    for part in (_hub_listen, _hub_users, _hub_spawner, _hub_limits, _hub_culler):
        out += part(plan)
    return "\n".join(out) + "\n"


def _hub_listen(plan: Plan) -> list[str]:
    """How to start the hub, and where it listens ([launch] ip, portal_port, TLS)."""
    scheme = "https" if plan.certfile else "http"
    host = "" if plan.ip in ("", "*", "0.0.0.0", "::", "[::]") else plan.ip
    out: list[str] = []
    out += [
        "#",
        "# Start it as root (PAM and the spawner need root) on the host where",
        "# `notebooks setup` made the accounts, from the Python environment that has",
        "# classroom and jupyterhub (pip install jupyterhub jupyterhub-idle-culler"
        + (" jupyterhub-systemdspawner" if plan.limited else "")
        + "),",
        "# with configurable-http-proxy installed (npm install -g configurable-http-proxy):",
        "#",
        "#     cd THIS_FOLDER && sudo /opt/classroom/venv/bin/jupyterhub -f jupyterhub_config.py",
        "#",
        "# JupyterHub keeps its database and cookie secret in the folder it starts in.",
        "# Stop `notebooks launch` first if it uses the same port.",
        "",
        "import sys",
        "",
        "from classroom.host.hubhook import material_hook",
        "",
        "c = get_config()  # noqa: F821 (JupyterHub provides get_config)",
        "",
        "# Where the hub listens: [launch] ip, portal_port"
        + (", certfile and keyfile." if plan.certfile else "."),
        f"c.JupyterHub.bind_url = {f'{scheme}://{host}:{plan.port}'!r}",
    ]
    if plan.certfile:
        out += [
            f"c.JupyterHub.ssl_cert = {plan.certfile!r}",
            f"c.JupyterHub.ssl_key = {plan.keyfile!r}",
        ]
    return out


def _hub_users(plan: Plan) -> list[str]:
    """Who logs in (PAM, the roster), the course group and the staff role."""
    g, staff = plan.group, plan.staff_group
    out: list[str] = []
    out += [
        "",
        "# Who may log in: the roster's students and assistants, with their Unix passwords",
        "# (PAM: the password from the handout, or the one they set with passwd).",
        "c.JupyterHub.authenticator_class = 'pam'",
        f"c.Authenticator.allowed_users = {_py_set(plan.users)}",
        "# Only those: a student dropped from the roster cannot log in any more, even though",
        "# JupyterHub's database still remembers them.",
        "c.Authenticator.allow_existing_users = False",
        "# No hub admins: on a host with local accounts a JupyterHub admin can start a server",
        "# as any account it adds, root included. Add your own username if you need the admin page.",
        "c.Authenticator.admin_users = set()",
        "",
        "# The course group (everyone in the roster) and its teaching staff.",
        "c.JupyterHub.load_groups = {",
        f"    {g!r}: {{'users': {_py_list(plan.users, ' ' * 8)}}},",
        f"    {staff!r}: {{'users': {_py_list(plan.assistants, ' ' * 8)}}},",
        "}",
        "",
        "# Assistants open, start and stop the servers of the course group, and see its members",
        "# on the admin page; they are not hub admins.",
        "c.JupyterHub.load_roles = [",
        "    {",
        f"        'name': {staff!r},",
        "        'description': "
        + repr(f"Teaching staff of {plan.course}: reach the students' servers")
        + ",",
        "        'scopes': [",
        f"            {f'access:servers!group={g}'!r},",
        f"            {f'servers!group={g}'!r},",
        f"            {f'read:users!group={g}'!r},",
        f"            {f'list:users!group={g}'!r},",
        "            'admin-ui',",
        "        ],",
        f"        'groups': [{staff!r}],",
        "    },",
        "]",
    ]
    return out


def _hub_spawner(plan: Plan) -> list[str]:
    """Each server: JupyterLab, its folder, its timeout, the material before it starts."""
    out = [
        "",
        "# Each student's server: JupyterLab, from the hub's own Python environment.",
        f"c.Spawner.default_url = {plan.default_url!r}",
        "c.Spawner.cmd = [sys.executable, '-m', 'jupyterhub.singleuser']",
    ]
    if plan.root == "folder":
        out.append(
            f"c.Spawner.notebook_dir = {f'~/{plan.material_folder}'!r}  # [launch] root = folder"
        )
    else:
        out.append("c.Spawner.notebook_dir = '~'  # [launch] root = home")
    out += [
        f"c.Spawner.start_timeout = {plan.start_timeout}",
        "",
        f"# Before each start: the material into ~/{plan.material_folder} with `notebooks send`'s",
        "# rules (an edited file is kept, the new version goes beside it). It runs",
        f"# `notebooks send {plan.config_file} --only USERNAME --yes` as root, under the course lock.",
        f"c.Spawner.pre_spawn_hook = material_hook({str(plan.config_file)!r})",
        "",
    ]
    return out


def _hub_limits(plan: Plan) -> list[str]:
    """[limits] as SystemdSpawner limits, or plain processes."""
    out: list[str] = []
    if plan.limited:
        out += [
            "# [limits]: each server in its own systemd unit, which the kernel holds to the limits",
            "# (server, kernels and terminals together). Needs systemd as PID 1 and",
            "# pip install jupyterhub-systemdspawner.",
            "c.JupyterHub.spawner_class = 'systemdspawner.SystemdSpawner'",
            "c.SystemdSpawner.dynamic_users = False  # the students' own accounts",
        ]
        if plan.memory:
            out.append(
                f"c.SystemdSpawner.mem_limit = {byte_spec(plan.memory)!r}  # [limits] memory"
            )
        if plan.cpu:
            out.append(f"c.SystemdSpawner.cpu_limit = {_cpus(plan.cpu)!r}  # [limits] cpu")
        if plan.tasks:
            out.append(
                f"c.SystemdSpawner.unit_extra_properties = {{'TasksMax': '{plan.tasks}'}}"
                "  # [limits] tasks"
            )
    else:
        out += [
            "# No [limits] in the course config: each server is a plain process of its student.",
            "# Set [limits] and export again to get SystemdSpawner with memory and CPU limits.",
            "c.JupyterHub.spawner_class = 'localprocess'",
        ]
    out.append("")
    return out


def _hub_culler(plan: Plan) -> list[str]:
    """[launch] idle_timeout as the jupyterhub-idle-culler service."""
    out: list[str] = []
    if plan.idle_timeout:
        every = _culler_every(plan.idle_timeout)
        out += [
            f"# [launch] idle_timeout: servers idle for {plan.idle_timeout} s are stopped",
            f"# (checked every {every} s) by the jupyterhub-idle-culler service.",
            "c.JupyterHub.services = [",
            "    {",
            "        'name': 'jupyterhub-idle-culler',",
            "        'command': [",
            "            sys.executable,",
            "            '-m',",
            "            'jupyterhub_idle_culler',",
            f"            '--timeout={plan.idle_timeout}',",
            f"            '--cull-every={every}',",
            "        ],",
            "    },",
            "]",
            "c.JupyterHub.load_roles.append(",
            "    {",
            "        'name': 'jupyterhub-idle-culler',",
            "        'scopes': ['list:users', 'read:users:activity', 'read:servers', 'delete:servers'],",
            "        'services': ['jupyterhub-idle-culler'],",
            "    }",
            ")",
        ]
    else:
        out.append("# [launch] idle_timeout = 0: idle servers are never stopped (no culler).")
    return out


# ---------------------------------------------------------------------------------------------
# Zero to JupyterHub (the Helm chart on Kubernetes)


def _yaml(value: Any) -> str:
    """A YAML scalar or flow sequence; JSON's quoting is valid YAML and never ambiguous."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    return json.dumps(value)


def z2jh_values(plan: Plan) -> str:
    """``values.yaml`` for the chart: users, admins, limits, culler, JupyterLab, material."""
    out = _header(plan, "#", "Zero to JupyterHub values")
    out += [
        "#",
        "# Deploy with the commands in README.txt beside this file. Checked against the",
        "# chart's values.schema.yaml (chart commit 48ea50e, JupyterHub 5.5).",
        "",
        "hub:",
        "  config:",
        "    JupyterHub:",
        "      # Kubernetes has no Unix accounts, so the students' passwords do not move:",
        "      # each roster user signs up once at /hub/signup and chooses a password.",
        "      # See README.txt before the first class; use your institution's login",
        "      # (OAuthenticator) instead where you have one.",
        "      authenticator_class: native",
        "      # The course group (everyone in the roster) and its teaching staff.",
        "      load_groups:",
        f"        {_yaml(plan.group)}:",
        f"          users: {_yaml(plan.users)}",
        f"        {_yaml(plan.staff_group)}:",
        f"          users: {_yaml(plan.assistants)}",
        "    Authenticator:",
        "      # The roster's students and assistants; nobody else.",
        f"      allowed_users: {_yaml(plan.users)}",
        "      # Dropped from the roster means no longer let in.",
        "      allow_existing_users: false",
        "      # The assistants: they reach students' servers and manage users. In a hub of",
        "      # its own on Kubernetes, an admin cannot become anyone on a shared host.",
        f"      admin_users: {_yaml(plan.assistants)}",
        "    NativeAuthenticator:",
        "      open_signup: false",
        f"      minimum_password_length: {plan.password_length}",
        "      check_common_password: true",
        "",
        "singleuser:",
        f"  defaultUrl: {_yaml(plan.default_url)}",
    ]
    if plan.memory:
        out += [
            "  # [limits] memory: the pod is killed above the limit; the guarantee (half the",
            "  # limit) is what the scheduler reserves on a node for each student.",
            "  memory:",
            f"    limit: {_yaml(byte_spec(plan.memory))}",
            f"    guarantee: {_yaml(byte_spec(plan.memory // 2))}",
        ]
    else:
        out.append("  # No [limits] memory: the chart's default guarantee (1G), no limit.")
    if plan.cpu:
        out += [
            "  # [limits] cpu: throttled above the limit; half of it is guaranteed.",
            "  cpu:",
            f"    limit: {_yaml(_cpus(plan.cpu))}",
            f"    guarantee: {_yaml(_cpus(plan.cpu / 2))}",
        ]
    else:
        out.append("  # No [limits] cpu: no CPU limit.")
    if plan.tasks:
        out += [
            f"  # [limits] tasks = {plan.tasks} has no per-pod setting in the chart: set",
            "  # podPidsLimit in the kubelet configuration of the user nodes.",
        ]
    out += _z2jh_material(plan)
    out += [""]
    if plan.idle_timeout:
        out += [
            f"# [launch] idle_timeout: servers idle for {plan.idle_timeout} s are stopped.",
            "cull:",
            "  enabled: true",
            f"  timeout: {plan.idle_timeout}",
            f"  every: {_culler_every(plan.idle_timeout)}",
        ]
    else:
        out += [
            "# [launch] idle_timeout = 0: idle servers are never stopped.",
            "cull:",
            "  enabled: false",
        ]
    return "\n".join(out) + "\n"


def _z2jh_material(plan: Plan) -> list[str]:
    target = f"{Z2JH_HOME}/{plan.material_folder}"
    if plan.material_git:
        return [
            f"  # The material: nbgitpuller (in the chart's default image) pulls {plan.material_git}",
            f"  # into ~/{plan.material_folder} at every start and merges it with the student's",
            "  # edits, keeping the student's version where both changed a line.",
            "  lifecycleHooks:",
            "    postStart:",
            "      exec:",
            "        command: "
            + _yaml(["gitpuller", plan.material_git, plan.material_branch, target]),
        ]
    claim = f"{plan.course}-material"
    return [
        f"  # The material: a volume (the PersistentVolumeClaim {claim!r}, filled as README.txt",
        f"  # says) copied into ~/{plan.material_folder} before each start. cp -n never",
        "  # overwrites a file the student has: edits are kept, new files arrive.",
        "  storage:",
        "    extraVolumes:",
        "      - name: course-material",
        "        persistentVolumeClaim:",
        f"          claimName: {_yaml(claim)}",
        "          readOnly: true",
        "  initContainers:",
        "    - name: course-material",
        "      image: busybox:1.36",
        "      command: "
        + _yaml(["sh", "-c", f"mkdir -p {target} && cp -Rn {MATERIAL_MOUNT}/. {target}/"]),
        "      securityContext:",
        f"        runAsUser: {Z2JH_UID}",
        f"        runAsGroup: {Z2JH_GID}",
        "      volumeMounts:",
        "        - name: course-material",
        f"          mountPath: {MATERIAL_MOUNT}",
        "          readOnly: true",
        "        # the student's home: the chart's default storage names it so",
        "        - name: " + _yaml("volume-{user_server}"),
        f"          mountPath: {Z2JH_HOME}",
    ]


def z2jh_readme(plan: Plan) -> str:
    """``README.txt``: the two commands to deploy, and what to know before the first class."""
    release = plan.course
    out = _header(plan, "", "Zero to JupyterHub")
    out = [line.lstrip() for line in out]
    out += [
        "",
        "Deploy (helm 3 and kubectl pointed at your cluster):",
        "",
        "    helm repo add jupyterhub https://hub.jupyter.org/helm-chart/ && helm repo update",
        f"    helm upgrade --cleanup-on-fail --install {release} jupyterhub/jupyterhub "
        f"--namespace {release} --create-namespace --values values.yaml",
        "",
        "Add --version X.Y.Z to pin the chart; values.yaml was checked against the chart's",
        "schema at commit 48ea50e (JupyterHub 5.5). Run the second command again after every",
        "export.",
        "",
        "Logging in",
        "----------",
        f"The roster's {len(plan.students)} student(s) and {len(plan.assistants)} assistant(s)"
        " are the only users let in",
        "(allowed_users). Kubernetes has no Unix accounts, so the passwords from the handout",
        "do not move: each user signs up once at /hub/signup with their roster username and",
        f"a password of their own (at least {plan.password_length} characters). A roster name is",
        "let in by its first sign-up: have the class sign up together in the first session,",
        "and check /hub/authorize (as an assistant) that every name was taken by its owner.",
        "With an institutional login, set hub.config.JupyterHub.authenticator_class to it",
        "(OAuthenticator) and keep allowed_users and admin_users.",
        "",
        "The material",
        "------------",
    ]
    if plan.material_git:
        out += [
            f"nbgitpuller pulls {plan.material_git} (branch {plan.material_branch})",
            f"into ~/{plan.material_folder} at every start. Push a change to the repository",
            "and the students get it at their next start, their own edits kept.",
        ]
    else:
        claim = f"{plan.course}-material"
        out += [
            f"Put the contents of [material] source into a PersistentVolumeClaim named {claim}",
            f"in the namespace {release} (readable by several pods: ReadOnlyMany or",
            "ReadWriteMany), for example with a helper pod and kubectl cp. Before each start",
            f"an init container copies it into ~/{plan.material_folder}; files a student already",
            "has are never overwritten. Or keep the material in a git repository, set",
            "[material] source to its URL and export again: nbgitpuller then brings updates too.",
        ]
    out += [
        "",
        "Limits and culling",
        "------------------",
        "singleuser.memory and singleuser.cpu come from [limits]; cull from [launch] idle_timeout.",
    ]
    return "\n".join(out) + "\n"
