"""``export``: write the class as a JupyterHub or Zero to JupyterHub configuration.

Needs no root and changes nothing on the host: it reads the config and the roster and
writes its own files into OUTDIR (``jupyterhub_config.py``; or ``values.yaml`` and
``README.txt``), each to a temporary name and renamed. Any other file in OUTDIR is left
alone. Every problem is found before the first file is written (exit 2).
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import tempfile
from pathlib import Path

import click

from ..core import export as gen
from ..core.errors import EXIT_OK, InvalidInput
from .course import load


def export(config_path: Path, target: str, outdir: Path) -> int:
    """Write ``target``'s files for the course of ``config_path`` into ``outdir``; return 0."""
    settings, roster = load(config_path)
    plan = gen.plan_for(settings, roster)
    files = gen.files_for(plan, target)
    outdir = prepare_outdir(outdir, list(files))
    for name, text in files.items():
        write_file(outdir / name, text)
        click.echo(f"  wrote {outdir / name}")
    who = f"{len(plan.students)} student(s), {len(plan.assistants)} assistant(s)"
    click.echo(f"export: {target} configuration for {plan.course} ({who}) in {outdir}")
    if target == "jupyterhub":
        if plan.material_git:
            click.echo(
                "warning: [material] source is a git URL; the hub's pre_spawn_hook runs "
                "`notebooks send`, which needs a folder",
                err=True,
            )
        jupyterhub = Path(sys.prefix) / "bin" / "jupyterhub"
        click.echo(
            f"Start it as root on this host: cd {outdir} && sudo {jupyterhub} -f jupyterhub_config.py"
        )
    else:
        click.echo(f"Deploy it with the two commands in {outdir / 'README.txt'}")
    return EXIT_OK


def prepare_outdir(outdir: Path, names: list[str]) -> Path:
    """``outdir`` made if missing and checked writable, and none of ``names`` in it anything
    but a regular file. Raise ``InvalidInput`` (exit 2) before anything is written."""
    outdir = Path(outdir).expanduser().absolute()
    if outdir.exists() and not outdir.is_dir():
        raise InvalidInput(f"OUTDIR {outdir} is a file, not a folder: give a folder to export into")
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInput(f"OUTDIR {outdir} cannot be made: {exc.strerror}") from None
    if not os.access(outdir, os.W_OK | os.X_OK):
        raise InvalidInput(f"OUTDIR {outdir} is not writable by you: pick another folder")
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            mode = (outdir / name).lstat().st_mode
            if not stat.S_ISREG(mode):
                raise InvalidInput(
                    f"{outdir / name} exists and is not a regular file: move it away and export again"
                )
    return outdir


def write_file(path: Path, text: str) -> None:
    """``text`` into ``path`` (0644) through a temporary file renamed over it: never half written."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise InvalidInput(
            f"{path}: cannot be written: {exc.strerror}", heading="export stopped"
        ) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise InvalidInput(
            f"{path}: cannot be written: {exc.strerror}", heading="export stopped"
        ) from None
