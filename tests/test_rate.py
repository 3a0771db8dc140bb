"""Human evaluation: anonymised shuffling, the ballot store, the report, and a ballot cast in Chromium."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shutil
import socket
import sqlite3
import time

import imageio.v3 as iio
import numpy as np
import pytest

from fleximmt.rate import CRITERIA, DuplicateBallot, cast_ballots, format_report, load_cases, report

METHODS = ["anyv2v", "cogvideox", "fleximmt"]


@pytest.fixture()
def cases_dir(tmp_path):
    rng = np.random.RandomState(0)
    for case in ("case_a", "case_b"):
        (tmp_path / "cases" / case / "candidates").mkdir(parents=True)
        (tmp_path / "cases" / case / "references").mkdir()
        for name in METHODS:
            iio.imwrite(tmp_path / "cases" / case / "candidates" / f"{name}.mp4",
                        (rng.rand(8, 64, 64, 3) * 255).astype(np.uint8), fps=8, codec="libx264")  # fmt: skip
        iio.imwrite(tmp_path / "cases" / case / "references" / "walk.mp4", (rng.rand(8, 64, 64, 3) * 255).astype(np.uint8),
                    fps=8, codec="libx264")  # fmt: skip
        (tmp_path / "cases" / case / "case.json").write_text('{"prompt": "A tiger walks. A man is crouching."}')
    return tmp_path / "cases"


def test_order_is_shuffled_per_rater_and_case_and_stable(cases_dir):
    case = load_cases(cases_dir)[0]
    assert case.order("alice") == case.order("alice")
    orders = {tuple(case.order(f"rater{i}")) for i in range(20)}
    assert len(orders) > 1 and all(sorted(o) == METHODS for o in orders)


def test_ballots_are_unique_survive_reopening_and_report_sums_to_100(tmp_path):
    db = tmp_path / "votes.sqlite"
    cast_ballots(db, "alice", "case_a", {c: "fleximmt" for c in CRITERIA})
    cast_ballots(db, "bob", "case_a", {**{c: "fleximmt" for c in CRITERIA}, "AC": "cogvideox"})
    cast_ballots(db, "alice", "case_b", {**{c: "anyv2v" for c in CRITERIA}, "MF": "fleximmt"})
    with pytest.raises(DuplicateBallot, match="already rated"):
        cast_ballots(db, "alice", "case_a", {c: "anyv2v" for c in CRITERIA})
    with pytest.raises(ValueError, match="missing: TS"):
        cast_ballots(db, "carol", "case_a", {"MF": "fleximmt", "TC": "anyv2v", "AC": "anyv2v"})
    rows = sqlite3.connect(db).execute("SELECT COUNT(*) FROM ballots").fetchone()[0]
    assert rows == 12  # nothing of the refused ballots was written, nothing lost on reopening
    table = report(db)
    for criterion, column in table.items():
        assert sum(column.values()) == pytest.approx(100.0, abs=1e-9), criterion
    assert table["MF"]["fleximmt"] == pytest.approx(100.0)
    assert table["AC"] == pytest.approx({"anyv2v": 100 / 3, "cogvideox": 100 / 3, "fleximmt": 100 / 3})
    assert table["TC"]["fleximmt"] == pytest.approx(200 / 3) and table["TC"]["cogvideox"] == 0.0
    assert "| fleximmt | 100.000 |" in format_report(table)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")), reason="needs Debian's chromium and chromium-driver")
def test_a_ballot_cast_by_clicking_in_chromium_reaches_the_database(cases_dir, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from fleximmt.rate import serve

    db = tmp_path / "votes.sqlite"
    port = free_port()
    demo = serve(cases_dir, db, port=port, block=False)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                "--window-size=1280,2400"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(f"http://127.0.0.1:{port}/?rater=alice")
        wait = WebDriverWait(driver, 60)
        wait.until(ec.text_to_be_present_in_element((By.ID, "header"), "Case 1 of 2"))
        page_text = driver.page_source
        assert not any(m in page_text for m in METHODS)  # candidates are anonymous
        picks = {"MF": 2, "TC": 1, "TS": 2, "AC": 3}
        for criterion, number in picks.items():
            radio = wait.until(ec.presence_of_element_located(
                (By.CSS_SELECTOR, f"#crit_{criterion.lower()} input[value='Candidate {number}']")))  # fmt: skip
            driver.execute_script("arguments[0].click();", radio)
        driver.execute_script("arguments[0].click();", driver.find_element(By.ID, "submit"))
        wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "Saved your ballot"))
        wait.until(ec.text_to_be_present_in_element((By.ID, "header"), "Case 2 of 2"))
        driver.save_screenshot(str(tmp_path / "rate.png"))
    finally:
        driver.quit()
        demo.close()
    ballots = dict(sqlite3.connect(db).execute("SELECT criterion, pick FROM ballots WHERE rater='alice' AND case_id='case_a'"))
    order = load_cases(cases_dir)[0].order("alice")
    assert ballots == {c: order[n - 1] for c, n in picks.items()}
