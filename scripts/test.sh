#!/bin/sh
# Install everything the tests need (the tool, pytest, Playwright, Debian's
# chromium) on a fresh Debian host, then run the whole test suite as root.
#   sudo sh scripts/test.sh [PYTEST ARGS]
set -eu
HERE=$(cd "$(dirname "$0")/.." && pwd)
sh "$HERE/scripts/install.sh" --test
cd "$HERE"
VENV=${CLASSROOM_VENV:-/opt/classroom/venv}
"$VENV/bin/ruff" check classroom tests benchmarks scripts notebooks.py
"$VENV/bin/python" scripts/check_imports.py
exec "$VENV/bin/python" -m pytest "$@"
