"""A real headless Chromium (Debian's `chromium` + `chromium-driver`) driven by Selenium, for the
control panel's end-to-end tests. Screenshots go to test-artifacts/panel/<prefix>-NN-<step>.png
(or under $EDGE_TEST_ARTIFACTS/panel/).

Selenium's calls block: the tests run each browser step in a thread (asyncio.to_thread), so
the edge, in the test's event loop, keeps serving the pages the browser asks for.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("EDGE_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "panel"
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-dev-shm-usage", "--window-size=1366,900")


class Browser:
    def __init__(self, prefix: str) -> None:
        for binary, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
            if not os.access(binary, os.X_OK):
                pytest.fail(f"{binary} is missing: install Debian's {package} (scripts/test "
                            "does)", pytrace=False)
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.profile = tempfile.mkdtemp(prefix="edge-chromium-")
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for flag in (*FLAGS, f"--user-data-dir={self.profile}"):
            opts.add_argument(flag)
        self.driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER),
                                       options=opts)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        for old in ARTIFACTS.glob(f"{prefix}-*.png"):  # a previous run's
            old.unlink()
        self.shots: list[Path] = []

    def css(self, selector: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, selector)

    def all(self, selector: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.driver.find_elements(By.CSS_SELECTOR, selector))

    def wait(self, what: str, cond: Callable[[], Any], timeout: float = 30.0) -> Any:
        """Poll `cond` (inside the browser's thread) until it is truthy; fail naming `what`."""
        from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.2,
                                 ignored_exceptions=(StaleElementReferenceException,)
                                 ).until(lambda _d: cond())
        except TimeoutException:
            self.screenshot(f"timeout-{what.replace(' ', '-')[:40]}")
            raise AssertionError(f"browser: {what} did not happen within {timeout:g} s "
                                 f"(page {self.driver.current_url})") from None

    def screenshot(self, name: str) -> Path:
        path = ARTIFACTS / f"{self.prefix}-{len(self.shots) + 1:02d}-{name}.png"
        self.driver.save_screenshot(str(path))
        self.shots.append(path)
        return path

    def quit(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)
