"""Who may change what root does (SPEC §6.4): the config file and what it names.

Root (and the assistants, through sudo) runs what the config says: a user who could
change the config, the roster, the material, a hook, the skeleton, the profile folder,
the certificate or the folders above the state folder could make root do their
bidding. Each of these, and every folder above it, must belong to root (or to the
teacher running setup, who has root anyway) and must not be writable by group or
others; a folder above may be writable by others when it is sticky (/tmp), since then
only its owner can rename what is in it. POSIX ACLs show in the group bits (the mask),
so an ACL that lets someone write is caught too.

What is not checked, on purpose: ``[return] source`` (the assistants may write the
feedback there: it is read as root through send's engine, which never follows a link),
the retrieve destination (``host.snapshot`` checks it), and a profile named by name (the
teacher's own ``~/.ipython``, read only by setup, which only root runs).
"""

from __future__ import annotations

from pathlib import Path

from ..core import roster
from ..core.errors import InvalidInput
from ..core.settings import Settings
from . import hooks
from .files import changeable_by_others
from .system import sudo_caller


def named_paths(s: Settings) -> list[tuple[str, Path]]:
    """(config line and key, path) of everything the config names that root acts on."""
    found = [("the config file", s.config_file)]

    def add(section: str, key: str, path: Path | str | None) -> None:
        if path:
            found.append((f"{s.where(section, key)}: [{section}] {key}", Path(path)))

    add("course", "roster", s.roster)
    add("material", "source", s.material_source)
    add("accounts", "skeleton", s.skeleton)
    if s.profile and "/" in s.profile:
        add("accounts", "profile", s.profile)
    add("launch", "certfile", s.certfile)
    add("launch", "keyfile", s.keyfile)
    for key in ("pre_spawn", "post_stop"):
        try:
            hook = hooks.parse(getattr(s, key), s.config_file.parent)
        except hooks.HookFailed:
            continue  # check and setup report it by itself
        if hook is None:
            continue
        if hook.kind == "executable":
            add("hooks", key, hook.target)
        else:  # module:function, imported with the config's folder first on sys.path
            top = hook.target.split(":")[0].split(".")[0]
            for candidate in (s.config_file.parent / f"{top}.py", s.config_file.parent / top):
                if candidate.exists():
                    add("hooks", key, candidate)
    state_parent = s.state_dir.parent
    found.append((f"{s.where('course', 'state_dir')}: the folder above the state", state_parent))
    return found


def trusted_uids(s: Settings) -> set[int]:
    """Root, and the teacher running the command (who has root anyway), unless in the roster."""
    uids = {0}
    caller = sudo_caller()
    if caller is not None and caller.pw_uid != 0:
        try:
            names = set(roster.load(s.roster, s.roster_columns).names())
        except (InvalidInput, OSError):
            names = set()
        if caller.pw_name not in names:
            uids.add(caller.pw_uid)
    return uids


def problems(s: Settings, trusted: set[int] | None = None) -> list[str]:
    """Each named path (or folder above it) that a user other than root and ``trusted``
    (by default ``trusted_uids``) could change."""
    trusted = trusted_uids(s) if trusted is None else trusted
    found = []
    for label, path in named_paths(s):
        why = changeable_by_others(path, trusted)
        if why:
            found.append(
                f"{label}: {why}; root runs what it says, and whoever can change it "
                "could make root (or an assistant through sudo) do anything: chown root and "
                "chmod go-w it"
            )
    return found
