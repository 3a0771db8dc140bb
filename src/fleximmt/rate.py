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
case they have not rated and says when all are done.
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
import sqlite3
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

from .errors import FlexiMMTInputError

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


def cast_ballots(db_path: str | Path, rater: str, case_id: str, picks: dict[str, str]) -> None:
    """Record one pick (a method) per criterion in one committed transaction; a second ballot for the
    same rater, case and criterion is refused with :class:`DuplicateBallot` and nothing is written."""
    rater = rater.strip()
    if not rater:
        raise FlexiMMTInputError("enter your rater name first")
    missing = [c for c in CRITERIA if not picks.get(c)]
    if missing:
        raise FlexiMMTInputError(f"pick one video for every question (missing: {', '.join(missing)})")
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    conn = connect(db_path)
    try:
        with conn:  # one transaction: all four ballots or none
            conn.executemany(
                "INSERT INTO ballots VALUES (?, ?, ?, ?, ?)", [(rater, case_id, c, picks[c], now) for c in CRITERIA]
            )
    except sqlite3.IntegrityError:
        raise DuplicateBallot(
            f"{rater!r} has already rated case {case_id!r}: each rater votes once per case and question"
        ) from None
    finally:
        conn.close()


def submit(
    db_path: str | Path, rater: str, case_id: str, order: list[str], picks: dict[str, str | None]
) -> tuple[bool, str]:
    """The page's Submit: de-anonymise ``picks`` (criterion -> "Candidate k") with the rater's
    ``order`` and cast them. Returns (saved, message for the page); refusals are messages, not errors."""
    chosen = {c: order[LABELS.index(p)] for c, p in picks.items() if p in LABELS[: len(order)]}
    try:
        cast_ballots(db_path, rater, case_id, chosen)
    except FlexiMMTInputError as err:
        return False, f"**Not saved: {err}.**"
    return True, f"Saved your ballot for case {case_id!r}."


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
def build_app(cases_dir: str | Path, db_path: str | Path, rater: str | None = None):
    """The rating page as a ``gradio.Blocks``; ``demo.launch()`` needs no extra arguments (every
    video is served from a private temporary copy)."""
    import gradio as gr

    cases = load_cases(cases_dir)
    connect(db_path).close()
    cache = Path(tempfile.mkdtemp(prefix="fleximmt-rate-"))
    salt = secrets.token_hex(16)

    def page(name: str):
        """The rater's next unrated case: [case_id, order, header, references, candidates, radios]."""
        name = (name or "").strip()
        todo = [c for c in cases if c.id not in rated_cases(db_path, name)] if name else []
        if not todo:
            message = f"All {len(cases)} cases are rated. Thank you!" if name else "Enter your name to start."
            hidden = [gr.update(visible=False, value=None)] * (MAX_REFERENCES + MAX_CANDIDATES)
            return [None, [], f"### {message}", *hidden, *[gr.update(choices=[], value=None)] * len(CRITERIA)]
        case = todo[0]
        view = page_view(case, name, cache, salt)
        videos = view["references"] + [None] * MAX_REFERENCES
        refs = [gr.update(visible=videos[i] is not None, value=videos[i]) for i in range(MAX_REFERENCES)]
        shown = list(view["candidates"].items()) + [(None, None)] * MAX_CANDIDATES
        cands = [gr.update(visible=path is not None, label=label, value=path) for label, path in shown[:MAX_CANDIDATES]]
        header = f"### Case {cases.index(case) + 1} of {len(cases)}\n**Prompt:** {view['prompt'] or '(none)'}"
        radios = [gr.update(choices=list(view["candidates"]), value=None) for _ in CRITERIA]
        return [case.id, case.order(name), header, *refs, *cands, *radios]

    with gr.Blocks(title="FlexiMMT human evaluation") as demo:
        gr.Markdown(
            "# Which video is best?\nWatch the reference motions, then the candidates, and pick one video per question."
        )
        rater_box = gr.Textbox(label="Your rater name", value=rater or "", elem_id="rater")
        start = gr.Button("Start / continue", elem_id="start")
        case_state, order_state = gr.State(None), gr.State([])  # kept on the server: the order names methods
        header = gr.Markdown(elem_id="header")
        gr.Markdown("## Reference motions")
        with gr.Row():
            references = [gr.Video(label=f"Reference {i + 1}", visible=False, interactive=False, height=240, elem_id=f"reference{i + 1}")
                          for i in range(MAX_REFERENCES)]  # fmt: skip
        gr.Markdown("## Candidates")
        with gr.Row():
            candidates = [gr.Video(label=LABELS[i], visible=False, interactive=False, height=240, elem_id=f"candidate{i + 1}")
                          for i in range(MAX_CANDIDATES)]  # fmt: skip
        radios = [gr.Radio(label=question, choices=[], elem_id=f"crit_{c.lower()}") for c, question in CRITERIA.items()]
        submit_button = gr.Button("Submit", variant="primary", elem_id="submit")
        status = gr.Markdown(elem_id="status")
        outputs = [case_state, order_state, header, *references, *candidates, *radios]

        def on_load(name: str, request: gr.Request):
            name = (request.query_params.get("rater") if request else None) or name
            return [name, *page(name)]

        def on_submit(name, case_id, order, *picks):
            if case_id is None:
                return ["Press *Start / continue* first.", *page(name)]
            saved, message = submit(db_path, name, case_id, order, dict(zip(CRITERIA, picks)))
            return [message, *(page(name) if saved else [gr.update()] * len(outputs))]

        private = {"api_visibility": "private"}  # the page calls these; no API for scripts
        demo.load(on_load, inputs=[rater_box], outputs=[rater_box, *outputs], **private)
        start.click(page, inputs=[rater_box], outputs=outputs, **private)
        submit_button.click(
            on_submit, inputs=[rater_box, case_state, order_state, *radios], outputs=[status, *outputs], **private
        )
    weakref.finalize(demo, shutil.rmtree, cache, ignore_errors=True)
    return demo


def serve(cases_dir, db_path, host: str = "127.0.0.1", port: int = 7861, rater: str | None = None, block: bool = True):
    """Build the app and serve it on ``host:port`` (this machine only by default); ``block=False``
    returns the running app at once (close it with ``demo.close()``)."""
    demo = build_app(cases_dir, db_path, rater)
    demo.queue().launch(server_name=host, server_port=port, prevent_thread_lock=not block)
    return demo


def add_cli(subparsers) -> None:
    """Register ``rate`` and ``rate-report`` on an argparse subparsers object."""
    rate = subparsers.add_parser(
        "rate", help="web app for human evaluation (anonymised, shuffled candidates; ballots in SQLite)",
        description="Serve the human-evaluation page: reference motions, then the candidates anonymised and "
                    "shuffled per rater, one pick per criterion (AC, TC, TS, MF). Open http://HOST:PORT/?rater=NAME.",
        epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    rate.add_argument("--cases", required=True, help="folder of cases (layout below)")
    rate.add_argument("--db", required=True, help="SQLite file for the ballots (created if missing)")
    rate.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    rate.add_argument("--port", type=int, default=7861, help="port (default: %(default)s)")
    rate.add_argument("--rater", help="fill in the rater's name (otherwise ?rater=NAME or typed on the page)")
    rate.set_defaults(func=lambda args: serve(args.cases, args.db, args.host, args.port, args.rater))
    rep = subparsers.add_parser("rate-report", help="each method's share of the human picks per criterion",
                                description="Print each method's share (percent) of the picks per criterion "
                                            "(AC, TC, TS, MF, as in Table 1); every column sums to 100.")  # fmt: skip
    rep.add_argument("--db", required=True, help="the SQLite file `fleximmt rate` wrote")
    rep.add_argument("--csv", action="store_true", help="print CSV instead of a Markdown table")
    rep.set_defaults(func=lambda args: print(format_report(report(args.db), as_csv=args.csv), end=""))
