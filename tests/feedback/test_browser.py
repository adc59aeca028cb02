"""The labeling page in a real headless browser (Debian's chromium and chromedriver, driven by
Selenium): a labeler opens the page, gives a name, labels pairs by keyboard (and one by
button), and the store holds exactly those judgments, with the winners the labeler picked
mapped back through the randomised sides. On both stores."""

from __future__ import annotations

import shutil

import pytest

from feedback.client import FeedbackClient
from feedback.pairs import Pair
from feedback.store import open_store
from tests.feedback.servers import ProcessServer

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the [dev] extra)")
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

TOKEN = "browser-test-token"
# (what the labeler presses, the choice it means); one answer by button
PLAN = [("a", "left"), (Keys.ARROW_RIGHT, "right"), ("t", "tie"), ("1", "left"),
        ("s", "skip"), ("#btn-right", "right"), ("b", "right"), (Keys.ARROW_LEFT, "left")]


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("chromium and chromedriver not found: apt-get install chromium "
                    "chromium-driver (.ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--no-first-run", "--disable-extensions", "--window-size=1200,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(driver_path))
    yield driver
    driver.quit()


def state(driver) -> tuple[str, str]:
    return driver.execute_script("return [document.body.dataset.state || '', "
                                 "document.body.dataset.lease || '']")


def wait_for(driver, predicate, what):
    WebDriverWait(driver, 20, poll_frequency=0.02).until(lambda d: predicate(state(d)), what)


def test_a_labeler_labels_by_keyboard_and_the_store_holds_exactly_that(browser, store_url,
                                                                        tmp_path):
    (tmp_path / "token").write_text(TOKEN)
    server = ProcessServer(store_url, tmp_path, "--auth-token-file", str(tmp_path / "token"),
                           "--seed", "3")  # a side draw that shows both orders
    try:
        texts = [Pair(f"pair-{i}", f"Question {i}: which is kinder?", f"<b>alpha</b> {i}",
                      f"beta {i}\nsecond line", rm_version="v7", policy_step=i)
                 for i in range(len(PLAN))]
        FeedbackClient(server.url, token=TOKEN).enqueue(texts)

        browser.get(f"{server.url}/#token={TOKEN}")
        wait_for(browser, lambda s: s[0] == "login", "the name form")
        name = browser.find_element(By.ID, "name")
        name.send_keys("alice" + Keys.ENTER)
        wait_for(browser, lambda s: s[0] == "ready", "the first pair")
        assert "token=" not in browser.current_url  # the token left the address bar

        expected = {}
        for key, choice in PLAN:
            _, lease = state(browser)
            left = browser.find_element(By.ID, "left").text
            right = browser.find_element(By.ID, "right").text
            pair = next(p for p in texts if left in (p.response_a, p.response_b))
            assert right == (pair.response_b if left == pair.response_a else pair.response_a)
            pair_id = pair.id
            left_side = "a" if left == pair.response_a else "b"
            winner = {"left": left_side, "right": "b" if left_side == "a" else "a"}.get(
                choice, choice)
            expected[pair_id] = (choice, winner, left_side)
            if key.startswith("#"):
                browser.find_element(By.CSS_SELECTOR, key).click()
            else:
                ActionChains(browser).send_keys(key).perform()
            wait_for(browser, lambda s, lease=lease: s[1] != lease or s[0] == "empty",
                     f"the answer {choice!r} to go in")
        wait_for(browser, lambda s: s[0] == "empty", "the empty queue")
        assert browser.find_element(By.ID, "done").text == str(len(PLAN))
        assert browser.find_element(By.ID, "depth").text == "0"
        assert "Nothing to label" in browser.find_element(By.ID, "status").text

        resources = browser.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)")
        assert resources and all(r.startswith(server.url + "/v1/") for r in resources)
        severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, severe  # no CSP violation, no script error

        with open_store(store_url) as store:
            rows = list(store.labeled())
        got = {r.pair.id: (r.judgment.choice, r.judgment.winner, r.judgment.left)
               for r in rows}
        assert got == expected
        assert {r.judgment.labeler for r in rows} == {"alice"} and len(rows) == len(PLAN)
        assert {left for _, _, left in got.values()} == {"a", "b"}
    finally:
        browser.get("about:blank")
        assert server.stop() == 0, server.log()
