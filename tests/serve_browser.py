"""Drive ``hierclass serve`` in a real headless browser: start the server, upload a photo on its page,
read the ranked categories back, take a screenshot.

Used by tests/test_serve_browser.py and by docs/screenshot.py (the README's picture of the page).
Needs selenium, Debian's ``chromium`` and ``chromium-driver`` (:func:`missing` says what is absent).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


def missing() -> str | None:
    """Why the browser cannot run here (None when it can)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    if not any(shutil.which(name) for name in CHROMIUM):
        return "no chromium found (apt-get install chromium chromium-driver)"
    if not shutil.which("chromedriver"):
        return "no chromedriver found (apt-get install chromium-driver)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Server:
    """A running ``hierclass serve``: its URL and process id."""

    url: str
    pid: int


@contextlib.contextmanager
def served(run_dir: Path, *args: str, timeout: float = 180.0) -> Iterator[Server]:
    """Run ``hierclass serve --run RUN_DIR`` (and ``args``) in a subprocess on a free port, until the block ends."""
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    command = [sys.executable, "-c", "from hierclass.cli import main; main()", "serve", "--run", str(run_dir)]
    proc = subprocess.Popen(
        [*command, "--port", str(port), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"hierclass serve stopped (exit {proc.returncode}): {proc.stdout.read()[-2000:]}")
            try:
                with urllib.request.urlopen(url + "health", timeout=2) as r:
                    if json.load(r)["status"] == "ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"hierclass serve did not answer on {url} within {timeout:.0f} s")
            time.sleep(0.25)
        yield Server(url, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def classify_in_browser(
    url: str, photos: list[Path], screenshot: Path, *, timeout: float = 60.0, size: tuple[int, int] = (1280, 860)
) -> list[dict[str, Any]]:
    """Open the page at ``url`` in headless chromium, pick ``photos`` in its file input, wait for the answer,
    save a screenshot, and return the ranked categories as the page shows them.

    Returns:
        One dict per ranked category: ``category_id``, ``probability`` (the page's data attributes),
        ``path`` (the names shown) and ``percent`` (the text shown).
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = next(shutil.which(name) for name in CHROMIUM if shutil.which(name))
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={size[0]},{size[1]}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        driver.set_page_load_timeout(timeout)
        driver.get(url)
        WebDriverWait(driver, timeout).until(lambda d: d.find_element(By.ID, "model").text.strip())
        driver.find_element(By.ID, "file").send_keys("\n".join(str(p.resolve()) for p in photos))
        WebDriverWait(driver, timeout).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error")
        )
        if driver.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "error":
            raise RuntimeError(f"the page shows an error: {driver.find_element(By.ID, 'error').text}")
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(screenshot))
        ranked = []
        for item in driver.find_elements(By.CSS_SELECTOR, "#ranked li.leaf"):
            names = [n.text for n in item.find_elements(By.CSS_SELECTOR, ".names > span:not(.sep)")]
            ranked.append(
                {
                    "category_id": int(item.get_attribute("data-category-id")),
                    "probability": float(item.get_attribute("data-probability")),
                    "path": names,
                    "percent": item.find_element(By.CSS_SELECTOR, ".prob").text,
                }
            )
        return ranked
    finally:
        driver.quit()
