"""The audit page in a real headless Chromium, served by a real `meshward audit`.

The store holds decisions made by the real servicer on the sample policies/ (28
allowed, 12 denied, 6 flipped by the staged reviews-require-trace). The page must show
those numbers in its chart and tables, narrow its list with a filter, open a
decision's explanation, and show a replay's flips. A screenshot of each view is saved
under test-artifacts/.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from audit.record import DecisionRecord
from tests.audit.decided import decide_into_store
from tests.e2e.browser import ARTIFACTS, chromium
from tests.e2e.processes import running_audit

POLICIES = Path(__file__).parents[2] / "policies"
DEADLINE = 30.0  # only keeps a broken run from hanging; nothing asserts durations


def wait(driver: WebDriver, condition: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + DEADLINE
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if result := condition():
                return result
        except Exception as exc:  # the element is not there yet
            last = exc
        time.sleep(0.05)
    errors = driver.find_element(By.ID, "error").text
    raise AssertionError(f"page: {what} never happened (error box: {errors!r}; last: {last!r})")


def text(driver: WebDriver, css: str) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, css).text)


def loaded_since(driver: WebDriver, before: str | None) -> Callable[[], bool]:
    return lambda: driver.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") != before


def shot(driver: WebDriver, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"audit-page-{name}.png"
    driver.save_screenshot(str(path))
    return path


@pytest.fixture
def records(tmp_path: Path) -> list[DecisionRecord]:
    return decide_into_store(POLICIES, tmp_path / "data")


def test_the_page_shows_filters_explains_and_replays(
    tmp_path: Path, records: list[DecisionRecord]
) -> None:
    allowed = sum(r.allowed for r in records)
    denied = len(records) - allowed
    # The candidate: reviews may no longer read ratings.
    candidate = tmp_path / "candidate"
    shutil.copytree(POLICIES, candidate)
    ratings = candidate / "istio" / "ratings.yaml"
    ratings.write_text(ratings.read_text().replace("sa/reviews", "sa/nobody"))
    flips = sum(r.allowed and r.source_principal.endswith("/reviews") for r in records)  # type: ignore[union-attr]
    with (
        running_audit(
            tmp_path / "data", tmp_path / "audit.log", extra=["--policies", tmp_path]
        ) as audit,
        chromium() as driver,
    ):
        driver.get(f"{audit.url}/?since=1h")
        # The chart comes first, the top tables from requests of their own: all rendered.
        wait(driver, loaded_since(driver, None), "the overview")
        assert text(driver, "#total-allowed") == f"{allowed} allowed"
        assert text(driver, "#total-denied") == f"{denied} denied"
        bars = driver.find_elements(By.CSS_SELECTOR, "#chart rect")
        assert bars, "the chart draws bars"
        by_principal = Counter(r.source_principal for r in records if not r.allowed)
        top = driver.find_elements(By.CSS_SELECTOR, "#top-principals tbody tr")
        first = top[0].find_elements(By.TAG_NAME, "td")
        (principal, count), *_ = by_principal.most_common()
        assert (first[0].text, first[1].text) == (principal, str(count))
        by_policy = Counter(r.policy for r in records if not r.allowed and r.policy)
        policies = {
            row.find_elements(By.TAG_NAME, "td")[0].text: row.find_elements(By.TAG_NAME, "td")[
                1
            ].text
            for row in driver.find_elements(By.CSS_SELECTOR, "#top-policies tbody tr")
        }
        assert policies == {name: str(n) for name, n in by_policy.items()}
        shot(driver, "overview")

        # The list, then a filter that narrows it (kept in the URL, to be shared).
        driver.find_element(By.CSS_SELECTOR, "a[data-tab=decisions]").click()
        rows = wait(
            driver,
            lambda: driver.find_elements(By.CSS_SELECTOR, "#decision-list tbody tr.row"),
            "the decision list",
        )
        assert len(rows) == len(records)
        field = driver.find_element(By.NAME, "principal_prefix")
        field.send_keys("example.org/ns/default/sa/reviews")
        before = driver.find_element(By.TAG_NAME, "body").get_attribute("data-loaded")
        driver.find_element(By.CSS_SELECTOR, "#filters button[type=submit]").click()
        wait(driver, loaded_since(driver, before), "the filtered list")
        rows = driver.find_elements(By.CSS_SELECTOR, "#decision-list tbody tr.row")
        from_reviews = [
            r for r in records if r.source_principal == "example.org/ns/default/sa/reviews"
        ]
        assert len(rows) == len(from_reviews)
        assert "principal_prefix=example.org" in driver.current_url

        # A decision opens its explanation.
        denial = next(r for r in from_reviews if not r.allowed)
        driver.find_element(By.CSS_SELECTOR, f"tr.row[data-id='{denial.decision_id}']").click()
        wait(
            driver,
            lambda: (
                driver.find_element(By.ID, "explanation").get_attribute("data-decision")
                == denial.decision_id
            ),
            "the explanation",
        )
        assert driver.find_element(By.ID, "explanation").is_displayed()
        assert text(driver, "#explain-id") == denial.decision_id
        assert text(driver, "#explain-decided-by") == denial.policy_id
        assert "the same as recorded" in text(driver, "#explain-reevaluated")
        matched = text(driver, "#explain-policies")
        assert "default.ratings-deny-writes" in matched
        assert f"#decisions/{denial.decision_id}" in driver.current_url
        shot(driver, "explanation")

        # Dry-run flips and edges.
        driver.get(f"{audit.url}/?since=1h#dry-run")
        wait(
            driver,
            lambda: "default.reviews-require-trace" in text(driver, "#dry-run-table"),
            "dry-run",
        )
        row = driver.find_element(By.CSS_SELECTOR, "#dry-run-table tbody tr")
        assert row.find_elements(By.TAG_NAME, "td")[3].text == str(
            sum(bool(r.dry_run_flips) for r in records)
        )
        driver.find_element(By.CSS_SELECTOR, "a[data-tab=edges]").click()
        wait(
            driver,
            lambda: driver.find_elements(By.CSS_SELECTOR, "#edge-table tbody tr td.num"),
            "edges",
        )
        edges = driver.find_elements(By.CSS_SELECTOR, "#edge-table tbody tr")
        assert len(edges) == len({(r.source_principal, r.destination_workload) for r in records})

        # A replay against the candidate shows its flips.
        driver.find_element(By.CSS_SELECTOR, "a[data-tab=replay]").click()
        driver.find_element(By.NAME, "policies").send_keys(str(candidate))
        driver.find_element(By.CSS_SELECTOR, "#replay-form button").click()
        wait(driver, lambda: text(driver, "#replay-allow-to-deny"), "the replay")
        assert text(driver, "#replay-allow-to-deny") == str(flips)
        assert text(driver, "#replay-deny-to-allow") == "0"
        groups = text(driver, "#replay-groups")
        assert "example.org/ns/default/sa/reviews" in groups
        assert "no_allow_policy_matched" in groups
        shot(driver, "replay")
        errors = [entry for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]
        assert errors == [], errors
