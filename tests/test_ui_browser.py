"""The recordings browser driven in a real headless Chromium (Debian's chromium + chromium-driver).

The tier skips, saying why, where no browser is installed. Screenshots are saved as test
artifacts under test-artifacts/ (and under docs/ with LLMPROXY_DOCS_SCREENSHOTS=1).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmproxy.config import load_settings
from llmproxy.tools.ui import UIServer
from tests.support import REPO, SEED, LoopThread
from tests.ui_support import chat_recording, seeded_directory, write_recording

CHROMIUM = Path(os.environ.get("LLMPROXY_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("LLMPROXY_CHROMEDRIVER", "/usr/bin/chromedriver"))
ARTIFACTS = REPO / "test-artifacts"
DOCS = REPO / "docs"
SEED_ID = SEED.name
WAIT = 60  # seconds: only a guard against a hang; a busy 2-core CI machine can be slow to render

webdriver = pytest.importorskip("selenium.webdriver", reason="the browser tier needs selenium (test extra)")
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def _driver(profile: Path) -> Any:
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip(f"no browser: {CHROMIUM} or {CHROMEDRIVER} is missing (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1500,950",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    try:
        # The driver path is given: selenium never looks for (or downloads) a browser itself.
        return webdriver.Chrome(service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)), options=options)
    except WebDriverException as exc:
        pytest.skip(f"headless chromium did not start: {exc.msg}")


@pytest.fixture
def page(tmp_path: Path, loop_thread: LoopThread) -> Iterator[tuple[Any, str]]:
    root = seeded_directory(tmp_path / "recordings")
    extra = [
        ("gpt-4o-mini", "Name a prime number.", "Seven.", 40, 3),
        (
            "gpt-4o",
            "Summarise the plot of Hamlet in one line.",
            "A prince avenges his father and everyone dies.",
            90,
            12,
        ),
        ("gpt-4.1", "Translate 'bonjour' to English.", "Hello.", 25, 2),
    ]
    for number, (model, question, answer, tokens_in, tokens_out) in enumerate(extra):
        write_recording(
            root,
            f"openai/chat-extra-{number}.json",
            chat_recording(question, answer, model=model, prompt_tokens=tokens_in, completion_tokens=tokens_out),
        )
    server = UIServer(root, load_settings(None, {}).router(), port=0)
    loop_thread.run(server.start())
    assert server.catalog.loaded.wait(120)
    driver = _driver(tmp_path / "chromium-profile")
    try:
        yield driver, f"http://127.0.0.1:{server.port}/"
    finally:
        driver.quit()
        loop_thread.run(server.stop())


def _screenshot(driver: Any, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    assert driver.save_screenshot(str(path)), f"no screenshot saved to {path}"
    if os.environ.get("LLMPROXY_DOCS_SCREENSHOTS") == "1":
        DOCS.mkdir(exist_ok=True)
        shutil.copy(path, DOCS / name)
    return path


def _row_ids(driver: Any) -> list[str]:
    # Read in one script: the list may be re-rendered between finding rows and reading them
    # (a stale element under load).
    return driver.execute_script("return Array.from(document.querySelectorAll('#rows tr'), r => r.dataset.id)")


def test_list_view_search_and_diff_in_a_real_browser(page: tuple[Any, str]) -> None:
    driver, url = page
    # A condition that met an element the page re-rendered meanwhile is asked again.
    wait = WebDriverWait(driver, WAIT, ignored_exceptions=(StaleElementReferenceException,))
    driver.get(url)

    # The seed recording appears in the list, with the others.
    wait.until(lambda d: SEED_ID in _row_ids(d) and len(_row_ids(d)) == 6)
    seed_row = driver.find_element(By.CSS_SELECTOR, f'#rows tr[data-id="{SEED_ID}"]')
    assert "gpt-4o" in seed_row.text and "/v1/chat/completions" in seed_row.text
    assert "6 recording(s)" in driver.find_element(By.ID, "totals").text
    shot = _screenshot(driver, "ui-list.png")
    assert shot.stat().st_size > 10_000

    # Search narrows the list (the seed's answer is assembled from its stream).
    driver.find_element(By.ID, "q").send_keys("humans live")
    wait.until(lambda d: _row_ids(d) == [SEED_ID])
    assert "1 recording(s)" in driver.find_element(By.ID, "totals").text

    # Its view shows the three messages and the streamed answer.
    seed_row = driver.find_element(By.CSS_SELECTOR, f'#rows tr[data-id="{SEED_ID}"] a')
    seed_row.click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#conversation .bubble")) == 3)
    bubbles = driver.find_elements(By.CSS_SELECTOR, "#conversation .bubble .text")
    assert [b.text for b in bubbles] == [
        "Which planet do humans live on?",
        "Humans live on Earth.",
        "Repeat your previous response in all caps.",
    ]
    answer = driver.find_element(By.ID, "answer")
    assert "HUMANS LIVE ON EARTH." in answer.text
    assert "response_format" in driver.find_element(By.CSS_SELECTOR, ".grid").text

    # A recording with timing shows its chunk-arrival chart (the view used for the docs).
    driver.get(url + "#/r/" + "openai%2Fchat-extra-1.json")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#timeline circle.chunk")) > 5)
    assert "A prince avenges" in driver.find_element(By.ID, "answer").text
    _screenshot(driver, "ui-recording.png")

    # A diff of two recordings shows the differing field.
    driver.get(url + "#/")
    search = wait.until(lambda d: d.find_element(By.ID, "q"))
    search.clear()
    search.send_keys("capital")
    wait.until(lambda d: _row_ids(d) == ["openai/chat-capital-a.json", "openai/chat-capital-b.json"])
    for box in driver.find_elements(By.CSS_SELECTOR, "#rows input[type=checkbox]"):
        box.click()
    compare = driver.find_element(By.ID, "compare")
    wait.until(lambda d: compare.is_enabled())
    compare.click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#diff-fields li"))
    fields = [li.text for li in driver.find_elements(By.CSS_SELECTOR, "#diff-fields li")]
    assert fields == ["temperature: 0.9 != 0.2 recorded"]
    assert "It is Paris." in driver.find_element(By.ID, "answer-diff").text
    _screenshot(driver, "ui-diff.png")

    # Tokens and cost, summed per model.
    driver.get(url + "#/costs")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "table.costs tbody tr"))
    by_model = driver.find_elements(By.CSS_SELECTOR, "table.costs")[0].text
    assert "gpt-4o-mini" in by_model and "gpt-4.1" in by_model and "unknown" in by_model
