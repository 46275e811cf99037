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
# Most tests wait on real servers, accounts and a browser, not on the CPU: several
# workers, one test file each at a time (a file's course fixtures are made once).
# CLASSROOM_TEST_WORKERS=0 runs them in this one process.
WORKERS=${CLASSROOM_TEST_WORKERS:-3}
exec "$VENV/bin/python" -m pytest -n "$WORKERS" --dist loadfile "$@"
