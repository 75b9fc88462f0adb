#!/usr/bin/env bash
# Chromium for the web demo's browser tests (tests/test_demo.py), from Debian's `chromium` package.
# Idempotent. Playwright drives this system browser; it never downloads one. When the browser cannot be
# installed (not root, no apt-get, no network) this says so and exits 0: the browser tests then skip, saying why.
set -u

found=""
for name in "${ESC_DEMO_CHROMIUM:-}" chromium chromium-browser google-chrome; do
    if [ -n "$name" ] && command -v "$name" >/dev/null 2>&1; then
        found=$(command -v "$name")
        break
    fi
done
if [ -n "$found" ]; then
    echo "install_browser: using $found ($("$found" --version 2>/dev/null | tail -n 1))"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser: no Chromium and no apt-get here; install chromium yourself (or set ESC_DEMO_CHROMIUM)," \
        "or the web demo's browser tests will skip"
    exit 0
fi
if [ "$(id -u)" = 0 ]; then
    sudo=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
    sudo="sudo -n"
else
    echo "install_browser: no Chromium, and installing it needs root: run 'apt-get install chromium' as root," \
        "or the web demo's browser tests will skip"
    exit 0
fi

echo "install_browser: installing Debian's chromium package (apt-get)"
export DEBIAN_FRONTEND=noninteractive
if $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q chromium >/dev/null; then
    echo "install_browser: installed $(command -v chromium) ($(chromium --version 2>/dev/null | tail -n 1))"
else
    echo "install_browser: apt-get could not install chromium; the web demo's browser tests will skip"
fi
exit 0
