#!/usr/bin/env bash
# Install Debian's Chromium and ChromeDriver when missing: the browser tests open the Prefect
# and MLflow UIs and fedround's HTML report in headless Chromium (tests/browser.py).
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
exec "$(dirname "$0")/apt_install.sh" "Chromium for the browser tests" \
  "chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver)" chromium chromium-driver
