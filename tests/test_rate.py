"""Human evaluation: anonymised shuffling, the ballot store, the report, and a ballot cast in Chromium."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import sqlite3
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from helpers import GradioSession, free_port, headless_chromium, needs_chromium, serving

from fleximmt.apps.rate import (
    CRITERIA,
    DuplicateBallot,
    StaleBallot,
    add_cli,
    cast_ballots,
    format_report,
    load_cases,
    page_view,
    report,
    submit,
)

METHODS = ["anyv2v", "cogvideox", "fleximmt"]


@pytest.fixture()
def cases_dir(tmp_path):
    """Two cases, each with one reference and three candidates: 8 frames of 64 x 64 coloured noise."""
    rng = np.random.RandomState(0)
    for case in ("case_a", "case_b"):
        folder = tmp_path / "cases" / case
        (folder / "candidates").mkdir(parents=True)
        (folder / "references").mkdir()
        for video in [folder / "references" / "walk.mp4", *[folder / "candidates" / f"{m}.mp4" for m in METHODS]]:
            iio.imwrite(video, (rng.rand(8, 64, 64, 3) * 255).astype(np.uint8), fps=8, codec="libx264")
        (folder / "case.json").write_text('{"prompt": "A tiger walks. A man is crouching."}')
    return tmp_path / "cases"


def all_picks(method: str, **others: str) -> dict[str, str]:
    return {c: others.get(c, method) for c in CRITERIA}


# -- anonymised, shuffled candidates ------------------------------------------------------------
def test_order_is_stable_for_a_rater_and_differs_between_raters(cases_dir):
    case = load_cases(cases_dir)[0]
    assert case.order("alice") == case.order("alice")
    orders = {tuple(case.order(f"rater{i}")) for i in range(20)}
    assert len(orders) > 1 and all(sorted(o) == METHODS for o in orders)


def test_the_page_data_names_no_method(cases_dir, tmp_path):
    case = load_cases(cases_dir)[0]
    (tmp_path / "cache").mkdir()
    view = page_view(case, "alice", tmp_path / "cache", salt="s")
    assert list(view["candidates"]) == ["Candidate 1", "Candidate 2", "Candidate 3"]
    # the files served are the candidates in alice's order, copied under names that do not reveal them
    served = [Path(p).read_bytes() for p in view["candidates"].values()]
    assert served == [case.candidates[m].read_bytes() for m in case.order("alice")]
    text = json.dumps(view)
    assert not any(m in text for m in METHODS) and str(cases_dir) not in text


# -- the ballot store ---------------------------------------------------------------------------
def test_a_second_ballot_for_the_same_case_is_refused_and_writes_nothing(tmp_path):
    db = tmp_path / "votes.sqlite"
    cast_ballots(db, "alice", "case_a", all_picks("fleximmt"))
    with pytest.raises(DuplicateBallot, match="'alice' has already rated case 'case_a'"):
        cast_ballots(db, "alice", "case_a", all_picks("anyv2v"))
    assert set(sqlite3.connect(db).execute("SELECT pick FROM ballots")) == {("fleximmt",)}


def test_the_page_shows_a_refused_ballot_as_a_message(cases_dir, tmp_path):
    db = tmp_path / "votes.sqlite"
    cases = load_cases(cases_dir)
    case_a = cases[0]
    second = case_a.order("alice")[1]  # what alice sees as Candidate 2
    assert submit(db, "alice", case_a, dict.fromkeys(CRITERIA, "Candidate 2"), cases) == (
        True,
        "Saved your ballot for case 1 of 2.",
    )
    saved, message = submit(db, "alice", case_a, dict.fromkeys(CRITERIA, "Candidate 1"), cases)
    assert not saved and "already rated case 1 of 2" in message
    saved, message = submit(
        db, "bob", case_a, {"MF": "Candidate 1", "TC": None, "TS": "Candidate 1", "AC": "Candidate 1"}, cases
    )
    assert not saved and "missing: TC" in message
    saved, message = submit(db, "bob", case_a, dict.fromkeys(CRITERIA, "Candidate 9"), cases)
    assert (
        not saved
        and "'Candidate 9' is not one of this case's videos (Candidate 1, Candidate 2, Candidate 3)" in message
    )
    assert list(sqlite3.connect(db).execute("SELECT DISTINCT rater, pick FROM ballots")) == [("alice", second)]


def test_a_ballot_for_a_case_that_is_not_the_raters_current_one_is_refused(tmp_path):
    db = tmp_path / "votes.sqlite"
    order = ["case_a", "case_b", "case_c"]
    with pytest.raises(StaleBallot, match="'case_b' is not 'alice''s current case \\('case_a'\\)"):
        cast_ballots(db, "alice", "case_b", all_picks("fleximmt"), order)
    cast_ballots(db, "alice", "case_a", all_picks("fleximmt"), order)
    with pytest.raises(DuplicateBallot, match="already rated case 'case_a'"):
        cast_ballots(db, "alice", "case_a", all_picks("anyv2v"), order)
    cast_ballots(db, "alice", "case_b", all_picks("anyv2v"), order)  # now it is current
    cast_ballots(db, "bob", "case_a", all_picks("cogvideox"), order)  # raters move on independently
    rows = sorted(sqlite3.connect(db).execute("SELECT DISTINCT rater, case_id, pick FROM ballots"))
    assert rows == [("alice", "case_a", "fleximmt"), ("alice", "case_b", "anyv2v"), ("bob", "case_a", "cogvideox")]


def test_ballots_survive_closing_and_reopening_the_database(tmp_path):
    db = tmp_path / "votes.sqlite"
    cast_ballots(db, "alice", "case_a", all_picks("fleximmt", AC="anyv2v"))
    reopened = sqlite3.connect(db)
    assert reopened.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    rows = dict(reopened.execute("SELECT criterion, pick FROM ballots WHERE rater = 'alice' AND case_id = 'case_a'"))
    assert rows == {"MF": "fleximmt", "TC": "fleximmt", "TS": "fleximmt", "AC": "anyv2v"}


# -- the report ---------------------------------------------------------------------------------
def test_report_gives_each_methods_share_of_the_picks(tmp_path):
    db = tmp_path / "votes.sqlite"
    cast_ballots(db, "alice", "case_a", all_picks("fleximmt"))
    cast_ballots(db, "bob", "case_a", all_picks("fleximmt", AC="cogvideox"))
    cast_ballots(db, "alice", "case_b", all_picks("anyv2v", MF="fleximmt"))
    cast_ballots(db, "bob", "case_b", all_picks("anyv2v", MF="fleximmt", TS="fleximmt"))
    table = report(db)
    # hand counts over 4 ballots per criterion
    assert table["MF"] == pytest.approx({"anyv2v": 0.0, "cogvideox": 0.0, "fleximmt": 100.0})
    assert table["TC"] == pytest.approx({"anyv2v": 50.0, "cogvideox": 0.0, "fleximmt": 50.0})
    assert table["TS"] == pytest.approx({"anyv2v": 25.0, "cogvideox": 0.0, "fleximmt": 75.0})
    assert table["AC"] == pytest.approx({"anyv2v": 50.0, "cogvideox": 25.0, "fleximmt": 25.0})
    for criterion, column in table.items():
        assert abs(sum(column.values()) - 100.0) <= 1e-9, criterion


def test_report_columns_sum_to_100_with_uneven_counts(tmp_path):
    db = tmp_path / "votes.sqlite"
    for i, method in enumerate(["anyv2v", "fleximmt", "fleximmt", "cogvideox", "fleximmt", "anyv2v", "fleximmt"]):
        cast_ballots(db, f"rater{i}", "case_a", all_picks(method))
    for criterion, column in report(db).items():
        assert abs(sum(column.values()) - 100.0) <= 1e-9, criterion


def test_format_report_has_a_row_per_method_and_table_1_columns(tmp_path):
    db = tmp_path / "votes.sqlite"
    cast_ballots(db, "alice", "case_a", all_picks("fleximmt", AC="anyv2v"))
    table = report(db)
    assert format_report(table).splitlines() == [
        "| method | AC | TC | TS | MF |",
        "|---|---|---|---|---|",
        "| anyv2v | 100.000 | 0.000 | 0.000 | 0.000 |",
        "| fleximmt | 0.000 | 100.000 | 100.000 | 100.000 |",
    ]
    assert format_report(table, as_csv=True).splitlines()[0] == "method,AC,TC,TS,MF"


def test_add_cli_registers_rate_bound_to_localhost_and_rate_report():
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["rate", "--cases", "cases", "--db", "votes.sqlite"])
    assert (args.host, args.port, args.rater, callable(args.func)) == ("127.0.0.1", 7861, None, True)
    args = parser.parse_args(["rate-report", "--db", "votes.sqlite", "--csv"])
    assert args.csv and callable(args.func)


# -- end to end in a browser --------------------------------------------------------------------
@needs_chromium
def test_a_ballot_cast_by_clicking_in_chromium_reaches_the_database(cases_dir, tmp_path):
    pytest.importorskip("gradio")
    pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from fleximmt.apps.rate import build_app

    db = tmp_path / "votes.sqlite"
    port = free_port()
    demo = build_app(cases_dir, db)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True)
    driver = headless_chromium(tmp_path / "profile")
    picks = {"MF": 2, "TC": 1, "TS": 2, "AC": 3}  # criterion -> "Candidate k"
    try:
        driver.get(f"http://127.0.0.1:{port}/?rater=alice")
        wait = WebDriverWait(driver, 60)
        wait.until(ec.text_to_be_present_in_element((By.ID, "header"), "Case 1 of 2"))
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#candidate3 video")))
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#reference1 video")))
        assert not any(m in driver.page_source for m in METHODS)  # candidates are anonymous
        for criterion, number in picks.items():
            radio = wait.until(
                ec.presence_of_element_located(
                    (By.CSS_SELECTOR, f"#crit_{criterion.lower()} input[value='Candidate {number}']")
                )
            )
            driver.execute_script("arguments[0].click();", radio)
        driver.execute_script("arguments[0].click();", driver.find_element(By.ID, "submit"))
        wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "Saved your ballot"))
        wait.until(ec.text_to_be_present_in_element((By.ID, "header"), "Case 2 of 2"))
        driver.save_screenshot(str(tmp_path / "rate.png"))
    finally:
        driver.quit()
        demo.close()
    ballots = dict(
        sqlite3.connect(db).execute("SELECT criterion, pick FROM ballots WHERE rater = 'alice' AND case_id = 'case_a'")
    )
    order = load_cases(cases_dir)[0].order("alice")  # what alice saw as Candidate 1, 2, 3
    assert ballots == {c: order[n - 1] for c, n in picks.items()}


# -- the server, driven over HTTP as the page drives it -----------------------------------------
@pytest.fixture()
def rating_server(cases_dir, tmp_path):
    from fleximmt.apps.rate import serve

    db = tmp_path / "votes.sqlite"
    port = free_port()
    demo = serve(cases_dir, db, port=port, block=False)
    session = GradioSession(f"http://127.0.0.1:{port}/")
    yield session, db
    session.close()
    demo.close()


def ballot(name: str, case_on_page: str, picks: dict[str, str | None], shown=None) -> list:
    """The values Submit sends: the name box, the case the page displays, the slot of what the session
    was shown (a ``gr.State``: the server fills it in from its own record, whatever is sent), one pick
    per question."""
    return [name, case_on_page, shown, *[picks.get(c) for c in CRITERIA]]


def header_of(result: dict) -> str:
    """The case header among an event's outputs (``page``'s or ``on_submit``'s)."""
    values = [v.get("value") if isinstance(v, dict) else v for v in result["output"]["data"]]
    return next(v for v in values if isinstance(v, str) and v.startswith("###"))


def test_two_submits_sent_back_to_back_from_one_session_record_one_ballot_for_the_case_shown(rating_server, cases_dir):
    session, db = rating_server
    shown = session.call(session.fn_index("page"), ["alice"])
    assert header_of(shown).startswith("### Case 1 of 2")
    first = {"MF": "Candidate 2", "TC": "Candidate 1", "TS": "Candidate 2", "AC": "Candidate 3"}
    submit_fn = session.fn_index("on_submit")
    events = [
        session.join(submit_fn, ballot("alice", "case_a", first)),
        session.join(submit_fn, ballot("alice", "case_a", dict.fromkeys(CRITERIA, "Candidate 1"))),
    ]
    results = session.results(events)
    status = [results[e]["output"]["data"][0] for e in events]
    assert status[0] == "Saved your ballot for case 1 of 2."
    assert status[1].startswith("**Not saved: you have already rated case 1 of 2**")
    assert header_of(results[events[1]]).startswith("### Case 2 of 2")  # the refused page moves on to the current case
    rows = sqlite3.connect(db).execute("SELECT case_id, criterion, pick FROM ballots WHERE rater = 'alice'").fetchall()
    order = load_cases(cases_dir)[0].order("alice")
    assert sorted(rows) == sorted(("case_a", c, order[int(p[-1]) - 1]) for c, p in first.items())  # nothing for case_b


def test_a_submit_without_a_name_or_before_starting_says_what_to_do(rating_server):
    session, db = rating_server
    submit_fn = session.fn_index("on_submit")
    picks = dict.fromkeys(CRITERIA, "Candidate 1")  # picks the radios cannot hold before a case is shown
    no_name = session.call(submit_fn, ballot("", "", picks))["output"]["data"][0]
    assert no_name == "Type your rater name above, then press *Start / continue*."
    not_started = session.call(submit_fn, ballot("alice", "case_a", picks))["output"]["data"][0]
    assert not_started.startswith("This page has shown you no case yet: press *Start / continue*")
    session.call(session.fn_index("page"), ["alice"])
    renamed = session.call(submit_fn, ballot("bob", "case_a", picks))["output"]["data"][0]
    assert renamed.startswith("This page shows a case for 'alice': to rate as 'bob', press *Start / continue* first.")
    assert not any("not in the list of choices" in m for m in (no_name, not_started, renamed))
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM ballots").fetchone() == (0,)


def test_a_ballot_from_a_session_that_was_shown_no_case_is_refused(rating_server, cases_dir):
    session, db = rating_server
    session.call(session.fn_index("page"), ["alice"])  # alice's page shows her case_a
    picks = dict.fromkeys(CRITERIA, "Candidate 1")
    stranger = GradioSession(session.url)  # a script that never opened a page, sending alice's name and case
    try:
        submit_fn = stranger.fn_index("on_submit")
        for sent in (None, {"case": "case_a", "rater": "alice"}, "case_a"):
            message = stranger.call(submit_fn, ballot("alice", "case_a", picks, shown=sent))["output"]["data"][0]
            assert message.startswith("This page has shown you no case yet") and message.endswith("Nothing was saved.")
    finally:
        stranger.close()
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM ballots").fetchone() == (0,)
    # the session that was shown the case votes on it
    forged = {"case": "case_b", "rater": "bob"}  # ignored here too: the server knows what it showed
    saved = session.call(session.fn_index("on_submit"), ballot("alice", "case_a", picks, shown=forged))
    assert saved["output"]["data"][0] == "Saved your ballot for case 1 of 2."
    rows = set(sqlite3.connect(db).execute("SELECT rater, case_id, pick FROM ballots"))
    assert rows == {("alice", "case_a", load_cases(cases_dir)[0].order("alice")[0])}


def test_a_session_votes_only_on_the_case_it_was_shown(rating_server, cases_dir):
    first, db = rating_server
    second = GradioSession(first.url)  # another tab of alice's
    picks = dict.fromkeys(CRITERIA, "Candidate 2")
    try:
        for tab in (first, second):
            assert header_of(tab.call(tab.fn_index("page"), ["alice"])).startswith("### Case 1 of 2")
        submit_fn = second.fn_index("on_submit")
        assert (
            second.call(submit_fn, ballot("alice", "case_a", picks))["output"]["data"][0]
            == "Saved your ballot for case 1 of 2."
        )
        # case_b is alice's current case now, but the first tab was never shown it
        refused = first.call(submit_fn, ballot("alice", "case_b", picks))
        assert (
            refused["output"]["data"][0] == "**Not saved: this page was out of date**; it now shows your current case."
        )
        assert header_of(refused).startswith("### Case 2 of 2")  # now it is shown: its ballot counts
        assert (
            first.call(submit_fn, ballot("alice", "case_b", picks))["output"]["data"][0]
            == "Saved your ballot for case 2 of 2."
        )
    finally:
        second.close()
    cases = load_cases(cases_dir)
    rows = sorted(sqlite3.connect(db).execute("SELECT DISTINCT case_id, pick FROM ballots"))
    assert rows == [("case_a", cases[0].order("alice")[1]), ("case_b", cases[1].order("alice")[1])]


def test_the_rating_app_has_no_public_api(rating_server):
    from gradio_client import Client

    session, _ = rating_server
    api = Client(session.url, verbose=False).view_api(return_format="dict", print_info=False)
    assert api["named_endpoints"] == {} and api["unnamed_endpoints"] == {}


@needs_chromium
def test_a_second_tab_submitting_the_case_another_tab_rated_is_refused_in_the_page(cases_dir, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from fleximmt.apps.rate import serve

    db = tmp_path / "votes.sqlite"
    port = free_port()
    demo = serve(cases_dir, db, port=port, block=False)
    driver = headless_chromium(tmp_path / "profile")
    wait = WebDriverWait(driver, 60)

    def open_and_pick(number: int) -> None:
        driver.get(f"http://127.0.0.1:{port}/?rater=alice")
        wait.until(ec.text_to_be_present_in_element((By.ID, "header"), "Case 1 of 2"))
        for criterion in CRITERIA:
            radio = wait.until(
                ec.presence_of_element_located(
                    (By.CSS_SELECTOR, f"#crit_{criterion.lower()} input[value='Candidate {number}']")
                )
            )
            driver.execute_script("arguments[0].click();", radio)

    try:
        open_and_pick(1)
        first_tab = driver.current_window_handle
        driver.switch_to.new_window("tab")
        open_and_pick(2)  # the second tab shows case 1 too
        driver.switch_to.window(first_tab)
        driver.execute_script("arguments[0].click();", driver.find_element(By.ID, "submit"))
        wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "Saved your ballot for case 1 of 2."))
        driver.switch_to.window(driver.window_handles[-1])
        driver.execute_script("arguments[0].click();", driver.find_element(By.ID, "submit"))
        wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "Not saved: you have already rated case 1 of 2"))
        wait.until(ec.text_to_be_present_in_element((By.ID, "header"), "Case 2 of 2"))
    finally:
        driver.quit()
        demo.close()
    picks = set(sqlite3.connect(db).execute("SELECT case_id, pick FROM ballots WHERE rater = 'alice'"))
    assert picks == {("case_a", load_cases(cases_dir)[0].order("alice")[0])}  # the first tab's Candidate 1, once


def test_fleximmt_rate_stopped_with_sigterm_leaves_no_file_and_no_folder(cases_dir, tmp_path):
    import signal

    scratch = tmp_path / "server"
    cache = scratch / "gradio"
    with serving(["rate", "--cases", cases_dir, "--db", tmp_path / "votes.sqlite"], scratch) as (server, port):
        session = GradioSession(f"http://127.0.0.1:{port}/")
        session.call(session.fn_index("page"), ["alice"])  # the case's videos, served: copies in Gradio's cache
        session.close()
        served = list(cache.rglob("*.mp4"))
        assert len(served) == 4 and all(p.parent.parent == cache for p in served)  # a folder each
        assert list((scratch / "tmp").glob("fleximmt-rate-*"))  # the app's own anonymous copies
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
    assert set(scratch.rglob("*")) == {scratch / "tmp", cache}
