#!/bin/sh
# Install everything classroom needs on a fresh Debian host (run as root).
#
#   sh scripts/install.sh          # the tool and the student servers' environment
#   sh scripts/install.sh --test   # the same, plus test tools and chromium
#
# The Python environment lives in $CLASSROOM_VENV (default /opt/classroom/venv),
# built from Debian's python3 so that students can read it: their Jupyter
# servers run from it.
set -eu
VENV=${CLASSROOM_VENV:-/opt/classroom/venv}
HERE=$(cd "$(dirname "$0")/.." && pwd)
TEST=no
[ "${1:-}" = "--test" ] && TEST=yes

PKGS="python3 python3-venv python3-dev passwd tar acl sudo"
[ "$TEST" = yes ] && PKGS="$PKGS chromium fonts-dejavu-core rsync procps openssl nodejs keyutils zbar-tools"
if ! dpkg -s $PKGS >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends $PKGS
fi

umask 022
if [ ! -x "$VENV/bin/python" ]; then
    mkdir -p "$(dirname "$VENV")"
    /usr/bin/python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
fi
if [ "$TEST" = yes ]; then
    "$VENV/bin/pip" install -q "$HERE[test]"
else
    "$VENV/bin/pip" install -q "$HERE"
fi
chmod -R a+rX "$VENV"
# JupyterHub's proxy, from npm (the export tests start a real hub). Debian's nodejs comes
# without npm (its own package); a nodejs from elsewhere may bring npm and refuse Debian's.
if [ "$TEST" = yes ] && ! command -v configurable-http-proxy >/dev/null 2>&1; then
    command -v npm >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends npm
    npm install -g -q configurable-http-proxy
fi
ln -sf "$VENV/bin/notebooks" /usr/local/bin/notebooks
echo "classroom installed in $VENV"
