"""Human evaluation (Appendix A.3, Figs. 8-9): raters see the prompt and the reference motions,
then the candidate videos anonymised ("Candidate 1..N") and shuffled per rater and case, and pick
one best video per criterion (MF, TC, TS, AC). A method's score is its share of all picks, so
every criterion's column sums to 100 (Table 1, right).

Cases on disk::

    CASES/<case_id>/references/*.mp4        the reference motion videos (up to 4 shown)
    CASES/<case_id>/candidates/<method>.mp4  one generated video per method (2 to 8)
    CASES/<case_id>/case.json                optional: {"prompt": "..."}

Ballots go to SQLite (WAL), one committed transaction per submit, one connection per request::

    ballots(rater, case_id, criterion, pick /* the method */, time, PRIMARY KEY (rater, case_id, criterion))

Raters open http://127.0.0.1:7861/?rater=NAME (or type their name); the page moves on to the next
case they have not rated and says when all are done. The server remembers which case it showed each
page session (and to which rater): a ballot counts only for that case, from that session, so a
client that never opened a page (or sends another case) has nothing saved.
"""

import argparse
import csv
import datetime as dt
import hashlib
import io
import json
import random
import secrets
import shutil
import signal
import sqlite3
import tempfile
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import FlexiMMTInputError

CRITERIA = {  # Fig. 9, in the order the page asks
    "MF": "Motion Fidelity: which video has objects whose movements are most similar to the Reference Motions?",
    "TC": "Temporal Consistency: which video is the smoothest and more realistic?",
    "TS": "Text Similarity: which video is most consistent with the description in the text?",
    "AC": "Appearance Consistency: which video has subsequent frames that are more consistent in appearance with the first frame?",
}
TABLE_ORDER = ("AC", "TC", "TS", "MF")  # the columns of Table 1's human evaluation
MAX_REFERENCES, MAX_CANDIDATES = 4, 8
LABELS = [f"Candidate {i + 1}" for i in range(MAX_CANDIDATES)]
SCHEMA = """CREATE TABLE IF NOT EXISTS ballots (
    rater TEXT NOT NULL, case_id TEXT NOT NULL, criterion TEXT NOT NULL, pick TEXT NOT NULL, time TEXT NOT NULL,
    PRIMARY KEY (rater, case_id, criterion))"""


# -- cases -------------------------------------------------------------------------------------
@dataclass
class RatingCase:
    id: str
    prompt: str
    references: list[Path]
    candidates: dict[str, Path]  # method -> video

    def order(self, rater: str) -> list[str]:
        """The methods in the order this rater sees them: shuffled, seeded by (rater, case)."""
        methods = sorted(self.candidates)
        random.Random(f"{rater}|{self.id}").shuffle(methods)  # str seeds hash with SHA-512: same in every process
        return methods


def load_cases(cases_dir: str | Path) -> list[RatingCase]:
    """Every ``<case_id>/`` under ``cases_dir`` that has a ``candidates/`` folder, sorted by id."""
    root = Path(cases_dir)
    if not root.is_dir():
        raise FlexiMMTInputError(f"--cases {str(root)!r} is not a folder of cases")
    cases = []
    for folder in sorted(p for p in root.iterdir() if (p / "candidates").is_dir()):
        candidates = {v.stem: v for v in sorted((folder / "candidates").glob("*.mp4"))}
        if not 2 <= len(candidates) <= MAX_CANDIDATES:
            raise FlexiMMTInputError(
                f"case {folder.name!r} has {len(candidates)} candidates: give 2 to {MAX_CANDIDATES}"
            )
        meta = json.loads((folder / "case.json").read_text()) if (folder / "case.json").is_file() else {}
        references = sorted((folder / "references").glob("*.mp4"))[:MAX_REFERENCES]
        cases.append(RatingCase(folder.name, meta.get("prompt", ""), references, candidates))
    if not cases:
        raise FlexiMMTInputError(f"no cases in {str(root)!r}: each case needs a candidates/ folder of .mp4 files")
    return cases


def served_copy(video: Path, cache: Path, salt: str) -> str:
    """A copy of ``video`` in ``cache`` under a name that reveals neither its method nor its path."""
    target = cache / (hashlib.sha256(f"{salt}|{video.resolve()}".encode()).hexdigest()[:20] + ".mp4")
    if not target.exists():
        shutil.copyfile(video, target)
    return str(target)


def page_view(case: RatingCase, rater: str, cache: Path, salt: str) -> dict:
    """Everything the browser receives for one case: prompt, references, and the candidates in this
    rater's order under anonymous labels and file names. No method name reaches it."""
    return {
        "prompt": case.prompt,
        "references": [served_copy(v, cache, salt) for v in case.references],
        "candidates": {
            LABELS[i]: served_copy(case.candidates[m], cache, salt) for i, m in enumerate(case.order(rater))
        },
    }


# -- ballots -----------------------------------------------------------------------------------
def connect(db_path: str | Path) -> sqlite3.Connection:
    """A new connection (sqlite3 objects belong to one thread): WAL, the ballots table created."""
    conn = sqlite3.connect(str(db_path), timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(SCHEMA)
    return conn


class DuplicateBallot(FlexiMMTInputError):
    """The rater already voted on this case and criterion."""


class StaleBallot(FlexiMMTInputError):
    """The ballot names a case that is not the rater's current one."""


def cast_ballots(
    db_path: str | Path, rater: str, case_id: str, picks: dict[str, str], case_ids: Sequence[str] | None = None
) -> None:
    """Record one pick (a method) per criterion in one committed transaction; a second ballot for the
    same rater, case and criterion is refused with :class:`DuplicateBallot` and nothing is written.
    With ``case_ids`` (every case, in the order raters meet them) the ballot must be for the rater's
    current case, the first of them the rater has not rated, checked in the same transaction; any
    other is refused with :class:`StaleBallot`."""
    rater = rater.strip()
    if not rater:
        raise FlexiMMTInputError("enter your rater name first")
    missing = [c for c in CRITERIA if not picks.get(c)]
    if missing:
        raise FlexiMMTInputError(f"pick one video for every question (missing: {', '.join(missing)})")
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    duplicate = DuplicateBallot(
        f"{rater!r} has already rated case {case_id!r}: each rater votes once per case and question"
    )
    conn = connect(db_path)
    conn.isolation_level = None  # the transaction below is explicit
    try:
        conn.execute("BEGIN IMMEDIATE")  # one writer from here on: the check and the insert see the same ballots
        try:
            if case_ids is not None:
                rated = {
                    row[0] for row in conn.execute("SELECT DISTINCT case_id FROM ballots WHERE rater = ?", (rater,))
                }
                if case_id in rated:
                    raise duplicate
                current = next((c for c in case_ids if c not in rated), None)
                if case_id != current:
                    raise StaleBallot(f"case {case_id!r} is not {rater!r}'s current case ({current!r}): rate that one")
            conn.executemany(
                "INSERT INTO ballots VALUES (?, ?, ?, ?, ?)", [(rater, case_id, c, picks[c], now) for c in CRITERIA]
            )
            conn.execute("COMMIT")  # all four ballots or none
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    except sqlite3.IntegrityError:
        raise duplicate from None
    finally:
        conn.close()


def already_rated(number: int, total: int) -> str:
    """The page's message for a second ballot on case ``number`` of ``total``."""
    return (
        f"**Not saved: you have already rated case {number} of {total}** (a second submit, or another tab); "
        "the page now shows your next case."
    )


def submit(
    db_path: str | Path, rater: str, case: RatingCase, picks: dict[str, str | None], cases: Sequence[RatingCase]
) -> tuple[bool, str]:
    """The page's Submit for the ``case`` the page showed ``rater``: de-anonymise ``picks`` (criterion ->
    "Candidate k", in the rater's order of the case) and cast them, refused unless ``case`` is the
    rater's current case. Returns (saved, message for the page); refusals are messages, not errors."""
    number = {c.id: i + 1 for i, c in enumerate(cases)}
    order = case.order(rater.strip())
    labels = LABELS[: len(order)]
    wrong = [p for p in picks.values() if p is not None and p not in labels]
    if wrong:
        return False, f"**Not saved: {wrong[0]!r} is not one of this case's videos ({', '.join(labels)}).**"
    chosen = {c: order[labels.index(p)] for c, p in picks.items() if p is not None}
    try:
        cast_ballots(db_path, rater, case.id, chosen, [c.id for c in cases])
    except DuplicateBallot:
        return False, already_rated(number[case.id], len(cases))
    except StaleBallot:
        return False, (
            f"**Not saved: case {number[case.id]} of {len(cases)} is not the case you are rating now**; "
            "the page now shows it."
        )
    except FlexiMMTInputError as err:
        return False, f"**Not saved: {err}.**"
    return True, f"Saved your ballot for case {number[case.id]} of {len(cases)}."


def rated_cases(db_path: str | Path, rater: str) -> set[str]:
    conn = connect(db_path)
    try:
        return {
            row[0] for row in conn.execute("SELECT DISTINCT case_id FROM ballots WHERE rater = ?", (rater.strip(),))
        }
    finally:
        conn.close()


# -- report ------------------------------------------------------------------------------------
def report(db_path: str | Path) -> dict[str, dict[str, float]]:
    """``table[criterion][method]``: the method's share (percent) of that criterion's picks. Every
    method picked anywhere appears in every column (0 where never picked); each column sums to 100."""
    if not Path(db_path).is_file():
        raise FlexiMMTInputError(f"ballot database {str(db_path)!r} does not exist")
    conn = connect(db_path)
    try:
        rows = conn.execute("SELECT criterion, pick, COUNT(*) FROM ballots GROUP BY criterion, pick").fetchall()
    finally:
        conn.close()
    methods = sorted({pick for _, pick, _ in rows})
    table = {}
    for criterion in TABLE_ORDER:
        counts = dict.fromkeys(methods, 0) | {pick: n for c, pick, n in rows if c == criterion}
        total = sum(counts.values())
        table[criterion] = {m: (100.0 * n / total if total else 0.0) for m, n in counts.items()}
    return table


def format_report(table: dict[str, dict[str, float]], as_csv: bool = False) -> str:
    """A Markdown table (or CSV) of :func:`report`: one row per method, columns AC, TC, TS, MF."""
    methods = sorted({m for col in table.values() for m in col})
    header = ["method", *TABLE_ORDER]
    rows = [[m, *[f"{table[c].get(m, 0.0):.3f}" for c in TABLE_ORDER]] for m in methods]
    if as_csv:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([header, *rows])
        return buf.getvalue()
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


# -- the app -----------------------------------------------------------------------------------
KEEP_FILES_S = 86400  # Gradio's copies of the served videos go a day after their last use, and at shutdown


def build_app(cases_dir: str | Path, db_path: str | Path, rater: str | None = None):
    """The rating page as a ``gradio.Blocks``; ``demo.launch()`` needs no extra arguments (every
    video is served from a private temporary copy). The server keeps, per page session, the case it
    showed and the rater it showed it to (``gr.State``: nothing the browser sends back); Submit
    counts the picks only for that case, and only while it is the rater's current one. A session
    that was shown no case has its ballots refused. Its events are private: no API for scripts."""
    import gradio as gr

    cases = load_cases(cases_dir)
    by_id = {c.id: c for c in cases}
    connect(db_path).close()
    cache = Path(tempfile.mkdtemp(prefix="fleximmt-rate-"))
    salt = secrets.token_hex(16)

    def page(name: str):
        """The rater's next unrated case: [what this session is shown (case and rater, or None), the case
        as the page holds it, header, references, candidates, radios]."""
        name = (name or "").strip()
        todo = [c for c in cases if c.id not in rated_cases(db_path, name)] if name else []
        if not todo:
            message = (
                f"All {len(cases)} cases are rated. Thank you!"
                if name
                else "Type your rater name above, then press *Start / continue*."
            )
            hidden = [gr.update(visible=False, value=None)] * (MAX_REFERENCES + MAX_CANDIDATES)
            return [None, "", f"### {message}", *hidden, *[gr.update(choices=[], value=None)] * len(CRITERIA)]
        case = todo[0]
        view = page_view(case, name, cache, salt)
        videos = view["references"] + [None] * MAX_REFERENCES
        refs = [gr.update(visible=videos[i] is not None, value=videos[i]) for i in range(MAX_REFERENCES)]
        shown = list(view["candidates"].items()) + [(None, None)] * MAX_CANDIDATES
        cands = [gr.update(visible=path is not None, label=label, value=path) for label, path in shown[:MAX_CANDIDATES]]
        header = f"### Case {cases.index(case) + 1} of {len(cases)}\n**Prompt:** {view['prompt'] or '(none)'}"
        radios = [gr.update(choices=list(view["candidates"]), value=None) for _ in CRITERIA]
        return [{"case": case.id, "rater": name}, case.id, header, *refs, *cands, *radios]

    with gr.Blocks(title="FlexiMMT human evaluation", delete_cache=(3600, KEEP_FILES_S)) as demo:
        gr.Markdown(
            "# Which video is best?\nWatch the reference motions, then the candidates, and pick one video per question."
        )
        rater_box = gr.Textbox(label="Your rater name", value=rater or "", elem_id="rater")
        start = gr.Button("Start / continue", elem_id="start")
        # what this session was shown, kept on the server ({"case": id, "rater": name}, or None): a
        # ballot counts for that case (the method order is recomputed from it), whatever the client sends
        shown = gr.State(None)
        # the case the page displays, sent back with the picks: only to tell a ballot made on an earlier
        # case (a second click) from one made on the case shown now; it never decides what is counted
        page_case = gr.Textbox(value="", visible="hidden", elem_id="shown_case")
        header = gr.Markdown(elem_id="header")
        gr.Markdown("## Reference motions")
        with gr.Row():
            references = [
                gr.Video(
                    label=f"Reference {i + 1}",
                    visible=False,
                    interactive=False,
                    height=240,
                    elem_id=f"reference{i + 1}",
                )
                for i in range(MAX_REFERENCES)
            ]
        gr.Markdown("## Candidates")
        with gr.Row():
            candidates = [
                gr.Video(label=LABELS[i], visible=False, interactive=False, height=240, elem_id=f"candidate{i + 1}")
                for i in range(MAX_CANDIDATES)
            ]
        radios = [gr.Radio(label=question, choices=[], elem_id=f"crit_{c.lower()}") for c, question in CRITERIA.items()]
        submit_button = gr.Button("Submit", variant="primary", elem_id="submit")
        status = gr.Markdown(elem_id="status")
        outputs = [shown, page_case, header, *references, *candidates, *radios]
        unchanged = [gr.update()] * len(outputs)

        def on_load(name: str, request: gr.Request):
            name = (request.query_params.get("rater") if request else None) or name
            return [name, *page(name)]

        def on_submit(name, case_on_page, shown_here, *picks):
            """Unprocessed values (preprocess=False): the picks are checked here, against the case this
            session was shown (``shown_here``, the server's own record of it)."""
            name = (name or "").strip()
            if not name:
                return ["Type your rater name above, then press *Start / continue*.", *unchanged]
            if not shown_here:
                return [
                    "This page has shown you no case yet: press *Start / continue* to see your first case, then "
                    "pick and submit. Nothing was saved.",
                    *unchanged,
                ]
            case_id, shown_for = shown_here["case"], shown_here["rater"]
            if name != shown_for:
                return [
                    f"This page shows a case for {shown_for!r}: to rate as {name!r}, press *Start / continue* "
                    "first. Nothing was saved.",
                    *unchanged,
                ]
            if case_on_page != case_id:  # the picks were made on a case this session showed before (a second click)
                number = next((i + 1 for i, c in enumerate(cases) if c.id == case_on_page), None)
                rated = number is not None and case_on_page in rated_cases(db_path, name)
                return [
                    already_rated(number, len(cases))
                    if rated
                    else "**Not saved: this page was out of date**; it now shows your current case.",
                    *page(name),
                ]
            picks = [p if isinstance(p, str) and p else None for p in picks]
            _saved, message = submit(db_path, name, by_id[case_id], dict(zip(CRITERIA, picks)), cases)
            rated = rated_cases(db_path, name)
            moved_on = case_id != next((c.id for c in cases if c.id not in rated), None)  # the page is behind
            return [message, *(page(name) if moved_on else unchanged)]

        private = {"api_visibility": "private"}  # the page calls these; no API for scripts
        demo.load(on_load, inputs=[rater_box], outputs=[rater_box, *outputs], **private)
        start.click(page, inputs=[rater_box], outputs=outputs, **private)
        submit_button.click(
            on_submit,
            inputs=[rater_box, page_case, shown, *radios],
            outputs=[status, *outputs],
            preprocess=False,
            **private,
        )
    demo.fleximmt_close = weakref.finalize(demo, shutil.rmtree, cache, ignore_errors=True)
    return demo


def serve(cases_dir, db_path, host: str = "127.0.0.1", port: int = 7861, rater: str | None = None, block: bool = True):
    """Build the app and serve it on ``host:port`` (this machine only by default); ``block=False``
    returns the running app at once (close it with ``demo.close()``; its served copies go then, and
    Gradio's copies of them with their folders)."""
    from contextlib import asynccontextmanager

    from gradio.utils import get_upload_folder

    from .gradio_cache import cache_entries, remove_served_files

    cache_dir = get_upload_folder()
    before = cache_entries(cache_dir)  # before Gradio makes its own folders there (building the page does)
    demo = build_app(cases_dir, db_path, rater)

    @asynccontextmanager
    async def lifespan(_):
        yield
        demo.fleximmt_close()
        remove_served_files(demo, cache_dir, before, older_than_s=KEEP_FILES_S)

    if block and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM closes the server as Ctrl+C does
    demo.queue().launch(
        server_name=host, server_port=port, prevent_thread_lock=not block, app_kwargs={"lifespan": lifespan}
    )
    return demo


def add_cli(subparsers) -> None:
    """Register ``rate`` and ``rate-report`` on an argparse subparsers object."""
    rate = subparsers.add_parser(
        "rate",
        help="web app for human evaluation (anonymised, shuffled candidates; ballots in SQLite)",
        description="Serve the human-evaluation page: reference motions, then the candidates anonymised and "
        "shuffled per rater, one pick per criterion (AC, TC, TS, MF). Open http://HOST:PORT/?rater=NAME.",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rate.add_argument("--cases", required=True, help="folder of cases (layout below)")
    rate.add_argument("--db", required=True, help="SQLite file for the ballots (created if missing)")
    rate.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    rate.add_argument("--port", type=int, default=7861, help="port (default: %(default)s)")
    rate.add_argument("--rater", help="fill in the rater's name (otherwise ?rater=NAME or typed on the page)")
    rate.set_defaults(func=lambda args: serve(args.cases, args.db, args.host, args.port, args.rater))
    rep = subparsers.add_parser(
        "rate-report",
        help="each method's share of the human picks per criterion",
        description="Print each method's share (percent) of the picks per criterion "
        "(AC, TC, TS, MF, as in Table 1); every column sums to 100.",
    )
    rep.add_argument("--db", required=True, help="the SQLite file `fleximmt rate` wrote")
    rep.add_argument("--csv", action="store_true", help="print CSV instead of a Markdown table")
    rep.set_defaults(func=lambda args: print(format_report(report(args.db), as_csv=args.csv), end=""))
