#!/usr/bin/env bash
# Install Debian's Chromium and its WebDriver for tests/test_browser.py (idempotent).
# Needs root (or passwordless sudo) and access to the Debian package mirrors.
# Exit status: 0 = chromium is installed (already or now); 1 = it could not be installed
# (the reason is printed on stderr and the browser test skips with it).
set -u
have() { command -v "$1" >/dev/null 2>&1; }
if have chromium && { have chromedriver || have chromium-driver; }; then
    echo "chromium already installed: $(chromium --version 2>/dev/null)"
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif have sudo && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "cannot install chromium: not root and no passwordless sudo (run: apt-get install chromium chromium-driver)" >&2
    exit 1
fi
if ! have apt-get; then
    echo "cannot install chromium: apt-get not found (not a Debian/Ubuntu system)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get update -qq >/tmp/fer_browser_setup.log 2>&1; then
    echo "cannot install chromium: apt-get update failed (no network?): $(tail -n 3 /tmp/fer_browser_setup.log | tr '\n' ' ')" >&2
    exit 1
fi
if ! $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core \
        >>/tmp/fer_browser_setup.log 2>&1; then
    echo "cannot install chromium: apt-get install failed: $(tail -n 3 /tmp/fer_browser_setup.log | tr '\n' ' ')" >&2
    exit 1
fi
echo "installed $(chromium --version 2>/dev/null)"
