"""Headless Chromium (Debian's, installed by scripts/install_chromium.sh) driven by Selenium
for the tests that look at a page as a person would: the Prefect and MLflow UIs and
fedround's HTML report. Screenshots are kept under ``build/screenshots/``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOTS = Path(__file__).resolve().parents[1] / "build" / "screenshots"
# Without these, Chromium reaches for Google's services at start, which a closed network
# refuses (many connections at a time) and which a test does not need.
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
)


@contextmanager
def chromium(user_data_dir: Path) -> Iterator[Any]:
    """A headless Chromium session; fails with the reason when Chromium cannot start."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        raise AssertionError(
            f"{', '.join(missing)} missing: run scripts/install_chromium.sh "
            "(apt-get install chromium chromium-driver)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={user_data_dir}"):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    except Exception as exc:
        raise AssertionError(f"headless Chromium did not start: {exc}") from exc
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: Any, condition: Callable[[Any], Any], timeout: float = 60) -> Any:
    """Poll ``condition(driver)`` until it is truthy; fails naming the page on timeout."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition(driver)
            if value:
                return value
        except Exception as exc:  # the page is still rendering
            last = exc
        time.sleep(0.5)
    raise AssertionError(
        f"{driver.current_url}: condition not met within {timeout:.0f}s ({last}); page text: "
        + driver.find_element("tag name", "body").text[:1500]
    )


def screenshot(driver: Any, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path
