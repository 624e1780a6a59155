#!/usr/bin/env bash
# Installs Debian's chromium and chromedriver for the browser test in tests/test_serve.py, where this
# machine can (Debian/Ubuntu as root). Elsewhere that test is skipped with a message (under CI=true it fails).
command -v chromium >/dev/null && command -v chromedriver >/dev/null && exit 0
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 ||
        { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; }
fi
command -v chromium >/dev/null && command -v chromedriver >/dev/null ||
    echo "note: chromium/chromedriver not installed; the browser test will be skipped" >&2
exit 0
