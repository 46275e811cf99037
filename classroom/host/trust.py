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

import os
import stat
from pathlib import Path

from ..core.settings import Settings
from . import hooks


def named_paths(s: Settings) -> list[tuple[str, Path]]:
    """(config line and key, path) of everything the config names that root acts on."""
    found = [(f"{s.config_file}: the config file", s.config_file)]

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


def problems(s: Settings, trusted: set[int]) -> list[str]:
    """Each named path (or folder above it) that a user other than ``trusted`` uids could change."""
    found = []
    for label, path in named_paths(s):
        why = _changeable(path, trusted)
        if why:
            found.append(
                f"{label} {path}: {why}; root runs what it says, and whoever can change it "
                "could make root (or an assistant through sudo) do anything: chown root and "
                "chmod go-w it"
            )
    return found


def _changeable(path: Path, trusted: set[int]) -> str | None:
    """Why someone untrusted could change ``path`` (or swap it), or None."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None  # a missing file is its own problem, reported where it is used
    except OSError as exc:
        return exc.strerror or "cannot be looked at"
    if st.st_uid not in trusted:
        return f"it belongs to uid {st.st_uid}, not root"
    if st.st_mode & 0o022:
        return f"it is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    for parent in path.resolve().parents:
        pst = os.stat(parent)
        sticky = pst.st_mode & stat.S_ISVTX
        if pst.st_uid not in trusted or (pst.st_mode & 0o022 and not sticky):
            return f"the folder {parent} above it can be changed by others"
    return None
