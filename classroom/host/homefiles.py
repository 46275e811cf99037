"""What setup writes into a student's home, as the student: the Jupyter password, the profile.

``write_student_files`` runs in a child that has become the student (``as_user``),
so a link or a FIFO the student planted can only lead to the student's own files.
"""

from __future__ import annotations

import json
from pathlib import Path

from .files import read_json_object, write_atomic

JUPYTER_CONFIG = Path(".jupyter") / "jupyter_server_config.json"
PROFILE = Path(".ipython") / "profile_default"
MAX_CONFIG = 1 << 20  # bytes of an existing Jupyter config read


def read_config(path: Path) -> dict:
    """The student's Jupyter config as a dict; {} when it is missing, not a file or not JSON."""
    return read_json_object(path, MAX_CONFIG)


def write_student_files(home: str, hashed: str | None, profile: dict[str, str]) -> list[str]:
    """Set the Jupyter password hash (other settings kept) and add missing profile files (0600).

    Returns the paths written.
    """
    written = []

    def write(path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(path, text)
        written.append(str(path))

    if hashed is not None:
        config_path = Path(home) / JUPYTER_CONFIG
        config = read_config(config_path)
        section = config.get("IdentityProvider")
        if not isinstance(section, dict):
            section = config["IdentityProvider"] = {}
        section["hashed_password"] = hashed
        write(config_path, json.dumps(config, indent=2) + "\n")
    for rel, text in profile.items():
        target = Path(home) / PROFILE / rel
        if not target.exists():
            write(target, text)
    return written
