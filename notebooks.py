#!/usr/bin/env python3
"""notebooks.py: run a class on Jupyter. See README.rst, or `notebooks.py --help`."""

import os
import sys

VENV_PYTHON = os.environ.get("CLASSROOM_VENV", "/opt/classroom/venv") + "/bin/python"

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    # Run from the environment scripts/install.sh made (the one the students'
    # servers use), whichever python3 started this script.
    venv = os.path.dirname(os.path.dirname(VENV_PYTHON))
    if os.path.exists(VENV_PYTHON) and os.path.realpath(sys.prefix) != os.path.realpath(venv):
        os.execv(VENV_PYTHON, [VENV_PYTHON, *sys.argv])
    try:
        from classroom.cli import main
    except KeyboardInterrupt:  # Ctrl-C while Python was still loading: nothing was done yet
        sys.stderr.write("notebooks: stopped before anything was done\n")
        sys.exit(130)
    main()
