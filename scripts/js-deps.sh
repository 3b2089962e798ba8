#!/usr/bin/env bash
# Makes sure what make test-js needs is here: Node 20 or later with npm,
# and Chromium for the browser test, installing them from Debian's
# packages when they are absent. A Node older than 20 (Debian bookworm's
# own is 18) is an error, not a skip: the SDK's tests use Node's built-in
# WebSocket and test runner.
set -euo pipefail

log() { printf 'js-deps: %s\n' "$*" >&2; }

install_pkgs() {
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  log "installing $*"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y "$@" >/dev/null ||
    { $SUDO apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y "$@" >/dev/null; }
}

command -v node >/dev/null 2>&1 || install_pkgs nodejs
command -v npm >/dev/null 2>&1 || install_pkgs npm
major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$major" -lt 20 ]; then
  log "node $(node --version) is too old: the SDK and its tests need Node 20 or later"
  exit 1
fi
if [ -z "${CHROMIUM:-}" ] && [ ! -x /usr/bin/chromium ]; then
  install_pkgs chromium
fi
log "node $(node --version), npm $(npm --version), $("${CHROMIUM:-/usr/bin/chromium}" --version 2>/dev/null || echo 'chromium: version unknown')"
