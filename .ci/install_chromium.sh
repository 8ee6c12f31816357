#!/usr/bin/env bash
# Installs Debian's chromium for the browser tests of reports/ (tests/test_reports.py).
# Tolerates failure on purpose: without a browser those tests skip with a clear reason,
# and the rest of CI must still run.
set -u

if [ -x /usr/bin/chromium ]; then
    echo "install_chromium: /usr/bin/chromium already present"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_chromium: apt-get not found; browser tests will skip" >&2
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
        echo "install_chromium: not root and no sudo; browser tests will skip" >&2
        exit 0
    fi
fi

export DEBIAN_FRONTEND=noninteractive
if $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends chromium; then
    echo "install_chromium: installed $(/usr/bin/chromium --version 2>/dev/null || echo chromium)"
else
    echo "install_chromium: apt-get install chromium failed; browser tests will skip" >&2
fi
exit 0
