#!/usr/bin/env bash
# Install Debian's Chromium and ChromeDriver when missing: the browser tests open the Prefect
# and MLflow UIs and fedround's HTML report in headless Chromium (tests/browser.py).
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "Chromium is not installed and apt-get is not available: install chromium and" \
       "chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver) with your package manager" >&2
  exit 1
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "fedround: installing Chromium for the browser tests (apt-get install chromium chromium-driver)..." >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
