#!/usr/bin/env bash
# Install Debian/Ubuntu packages with apt-get (as root, or through sudo):
#   scripts/apt_install.sh "WHAT (for messages)" "WHAT TO INSTALL WITHOUT APT" PACKAGE...
set -euo pipefail
what="$1"; otherwise="$2"; shift 2
if ! command -v apt-get >/dev/null; then
  echo "$what is not installed and apt-get is not available: install $otherwise with your" \
       "package manager" >&2
  exit 1
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "fedround: installing $what (apt-get install $*)..." >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
