#!/usr/bin/env bash
# Installs Debian's `chromium` for the browser test when it is missing.
# Playwright drives this system browser through `executable_path`; we never let
# Playwright download its own build (no internet assumption beyond the apt mirror).
set -euo pipefail

CHROMIUM=/usr/bin/chromium

if [[ -x "$CHROMIUM" ]]; then
  exit 0
fi

if [[ "$(id -u)" -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo -n)
  else
    echo "ensure_chromium: $CHROMIUM is missing and this is not root; install it with:" >&2
    echo "  apt-get update && apt-get install -y chromium" >&2
    exit 1
  fi
else
  SUDO=()
fi

echo "==> installing Debian chromium for the browser test (first run only)"
start=$(date +%s)
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" apt-get install -y -q chromium
echo "==> chromium installed in $(( $(date +%s) - start ))s: $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM")"
