#!/bin/sh
# Install Python packages for the students' Jupyter servers and kernels (run as root).
#
#   sh scripts/install-packages.sh config/student-packages.txt     # a requirements file
#   sh scripts/install-packages.sh numpy 'pandas>=2.1'              # or names
#   sh scripts/install-packages.sh --dry-run config/student-packages.txt
#
# The students' servers run from $CLASSROOM_VENV (default /opt/classroom/venv), the
# environment scripts/install.sh made. Every package already in it (the tool's own
# dependencies: jupyter_server, tornado, click, ipykernel, ...) is pinned at its installed
# version with a pip constraints file, so a package installed for the students can add
# what it needs but can never upgrade, downgrade or remove what the tool runs on: pip
# refuses such a package instead. To move one of those, reinstall the tool.
set -eu
VENV=${CLASSROOM_VENV:-/opt/classroom/venv}
DRY=""
if [ "${1:-}" = "--dry-run" ]; then DRY="--dry-run"; shift; fi
if [ $# -eq 0 ]; then
    echo "usage: $0 [--dry-run] REQUIREMENTS.txt | PACKAGE..." >&2
    exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "$VENV/bin/python not found: run scripts/install.sh first" >&2
    exit 2
fi
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
"$VENV/bin/python" -m pip list --format=freeze --exclude-editable >"$CONSTRAINTS"
umask 022
if [ $# -eq 1 ] && [ -f "$1" ]; then
    "$VENV/bin/python" -m pip install $DRY -c "$CONSTRAINTS" -r "$1"
else
    "$VENV/bin/python" -m pip install $DRY -c "$CONSTRAINTS" "$@"
fi
if [ -z "$DRY" ]; then
    chmod -R a+rX "$VENV"  # students read it: their servers and kernels run from it
    "$VENV/bin/python" -m pip check
fi
