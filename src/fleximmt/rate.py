"""Human evaluation (Appendix A.3, Figs. 8-9): raters see the reference motions, then the
candidate videos anonymised and shuffled, and pick one best per criterion (AC, TC, TS, MF). A
method's score is its share of all picks (columns sum to 100).

Cases on disk::

    CASES/<case_id>/references/*.mp4        the reference motion videos
    CASES/<case_id>/candidates/<method>.mp4  one generated video per method
    CASES/<case_id>/case.json                optional: {"prompt": "..."}

Ballots go to SQLite, one committed transaction per submit (WAL): ``ballots(rater, case_id,
criterion, pick, time)`` with one ballot per rater, case and criterion.
"""


import argparse
import csv
import datetime as dt
import hashlib
import io
import json
import random
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import FlexiMMTInputError

CRITERIA = {
    "MF": "Motion Fidelity: which video has objects whose movements are most similar to the Reference Motions?",
    "TC": "Temporal Consistency: which video is the smoothest and more realistic?",
    "TS": "Text Similarity: which video is most consistent with the description in the text?",
    "AC": "Appearance Consistency: which video has subsequent frames that are more consistent in appearance with the first frame?",
}
MAX_REFERENCES, MAX_CANDIDATES = 4, 8
SCHEMA = """CREATE TABLE IF NOT EXISTS ballots (
    rater TEXT NOT NULL, case_id TEXT NOT NULL, criterion TEXT NOT NULL, pick TEXT NOT NULL, time TEXT NOT NULL,
    PRIMARY KEY (rater, case_id, criterion))"""


@dataclass
class RatingCase:
    id: str
    prompt: str
    references: list[Path]
    candidates: dict[str, Path]  # method -> video

    def order(self, rater: str) -> list[str]:
        """The methods in the order this rater sees them: shuffled, seeded by (rater, case)."""
        methods = sorted(self.candidates)
        random.Random(f"{rater}|{self.id}").shuffle(methods)
        return methods


def load_cases(cases_dir: str | Path) -> list[RatingCase]:
    root = Path(cases_dir)
    if not root.is_dir():
        raise FlexiMMTInputError(f"--cases {str(root)!r} is not a folder of cases")
    cases = []
    for folder in sorted(p for p in root.iterdir() if (p / "candidates").is_dir()):
        candidates = {v.stem: v for v in sorted((folder / "candidates").glob("*.mp4"))}
        if not 2 <= len(candidates) <= MAX_CANDIDATES:
            raise FlexiMMTInputError(f"case {folder.name!r} has {len(candidates)} candidates: give 2 to {MAX_CANDIDATES}")
        meta = json.loads((folder / "case.json").read_text()) if (folder / "case.json").is_file() else {}
        references = sorted((folder / "references").glob("*.mp4"))[:MAX_REFERENCES]
        cases.append(RatingCase(folder.name, meta.get("prompt", ""), references, candidates))
    if not cases:
        raise FlexiMMTInputError(f"no cases in {str(root)!r}: each case needs a candidates/ folder of .mp4 files")
    return cases


# -- ballots -----------------------------------------------------------------------------------
def connect(db_path: str | Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(db_path), timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(SCHEMA)
    return conn


class DuplicateBallot(FlexiMMTInputError):
    """The rater already voted on this case and criterion."""


def cast_ballots(db_path: str | Path, rater: str, case_id: str, picks: dict[str, str]) -> None:
    """Record one pick per criterion in one transaction; a second ballot is refused."""
    if not rater.strip():
        raise FlexiMMTInputError("enter your rater name first")
    missing = [c for c in CRITERIA if not picks.get(c)]
    if missing:
        raise FlexiMMTInputError(f"pick one video for every criterion (missing: {', '.join(missing)})")
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    conn = connect(db_path)
    try:
        with conn:  # one transaction: all four ballots or none
            conn.executemany("INSERT INTO ballots VALUES (?, ?, ?, ?, ?)",
                             [(rater, case_id, c, picks[c], now) for c in CRITERIA])  # fmt: skip
    except sqlite3.IntegrityError:
        raise DuplicateBallot(f"{rater!r} has already rated case {case_id!r}: each rater votes once per case") from None
    finally:
        conn.close()


def rated_cases(db_path: str | Path, rater: str) -> set[str]:
    conn = connect(db_path)
    try:
        return {row[0] for row in conn.execute("SELECT DISTINCT case_id FROM ballots WHERE rater = ?", (rater,))}
    finally:
        conn.close()


def report(db_path: str | Path) -> dict[str, dict[str, float]]:
    """Each method's share (percent) of the picks per criterion; every column sums to 100."""
    if not Path(db_path).is_file():
        raise FlexiMMTInputError(f"ballot database {str(db_path)!r} does not exist")
    conn = connect(db_path)
    try:
        rows = conn.execute("SELECT criterion, pick, COUNT(*) FROM ballots GROUP BY criterion, pick").fetchall()
    finally:
        conn.close()
    methods = sorted({pick for _, pick, _ in rows})
    table = {}
    for criterion in CRITERIA:
        counts = {m: 0 for m in methods}
        counts.update({pick: n for c, pick, n in rows if c == criterion})
        total = sum(counts.values())
        table[criterion] = {m: (100.0 * n / total if total else 0.0) for m, n in counts.items()}
    return table


def format_report(table: dict[str, dict[str, float]], as_csv: bool = False) -> str:
    methods = sorted({m for col in table.values() for m in col})
    header = ["method", *CRITERIA]
    rows = [[m, *[f"{table[c].get(m, 0.0):.3f}" for c in CRITERIA]] for m in methods]
    if as_csv:
        buf = io.StringIO()
        csv.writer(buf).writerows([header, *rows])
        return buf.getvalue()
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


# -- the app -----------------------------------------------------------------------------------
def anonymous_copy(video: Path, cache: Path, case_id: str, method: str) -> str:
    """A copy of a candidate under a name that does not reveal its method."""
    name = hashlib.sha256(f"{case_id}|{method}|{video.stat().st_mtime_ns}".encode()).hexdigest()[:16] + ".mp4"
    target = cache / name
    if not target.exists():
        shutil.copyfile(video, target)
    return str(target)


def build_app(cases_dir: str | Path, db_path: str | Path, rater: str | None = None):
    import gradio as gr

    cases = load_cases(cases_dir)
    connect(db_path).close()
    cache = Path(tempfile.mkdtemp(prefix="fleximmt-rate-"))
    labels = [f"Candidate {i + 1}" for i in range(MAX_CANDIDATES)]

    def page(name: str):
        """Everything the page shows for the rater's next unrated case (no method names)."""
        done = rated_cases(db_path, name) if name else set()
        todo = [c for c in cases if c.id not in done]
        if not name or not todo:
            message = "Enter your name to start." if not name else f"All {len(cases)} cases are rated. Thank you!"
            hidden = [gr.update(visible=False, value=None)] * (MAX_REFERENCES + MAX_CANDIDATES)
            return [None, [], f"### {message}", *hidden, *[gr.update(choices=[], value=None)] * len(CRITERIA)]
        case = todo[0]
        order = case.order(name)
        refs = [gr.update(visible=i < len(case.references), value=str(case.references[i]) if i < len(case.references) else None)
                for i in range(MAX_REFERENCES)]  # fmt: skip
        cands = [gr.update(visible=i < len(order), label=labels[i],
                           value=anonymous_copy(case.candidates[order[i]], cache, case.id, order[i]) if i < len(order) else None)
                 for i in range(MAX_CANDIDATES)]  # fmt: skip
        header = f"### Case {cases.index(case) + 1} of {len(cases)}\n**Prompt:** {case.prompt or '(none)'}"
        radios = [gr.update(choices=labels[: len(order)], value=None) for _ in CRITERIA]
        return [case.id, order, header, *refs, *cands, *radios]

    with gr.Blocks(title="FlexiMMT human evaluation") as demo:
        gr.Markdown("# Which video is best?\nWatch the reference motions, then the candidates, and pick one video per question.")
        rater_box = gr.Textbox(label="Your rater name", value=rater or "", elem_id="rater")
        start = gr.Button("Start / continue", elem_id="start")
        case_state, order_state = gr.State(None), gr.State([])
        header = gr.Markdown(elem_id="header")
        gr.Markdown("## Reference motions")
        with gr.Row():
            references = [gr.Video(label=f"Reference {i + 1}", visible=False, interactive=False, height=240) for i in range(MAX_REFERENCES)]
        gr.Markdown("## Candidates")
        with gr.Row():
            candidates = [gr.Video(label=labels[i], visible=False, interactive=False, height=240, elem_id=f"candidate{i + 1}")
                          for i in range(MAX_CANDIDATES)]  # fmt: skip
        radios = [gr.Radio(label=question, choices=[], elem_id=f"crit_{c.lower()}") for c, question in CRITERIA.items()]
        submit = gr.Button("Submit", variant="primary", elem_id="submit")
        status = gr.Markdown(elem_id="status")
        outputs = [case_state, order_state, header, *references, *candidates, *radios]

        def on_load(name: str, request: gr.Request):
            name = (request.query_params.get("rater") if request else None) or name
            return [name, *page(name)]

        def on_submit(name, case_id, order, *picks):
            if case_id is None:
                return ["Press *Start* first.", *page(name)]
            try:
                chosen = {c: order[labels.index(p)] if p in labels else None for c, p in zip(CRITERIA, picks)}
                cast_ballots(db_path, name, case_id, chosen)
            except FlexiMMTInputError as err:
                return [f"**{err}**", case_id, order, *[gr.update()] * (len(outputs) - 2)]
            return [f"Saved your ballot for case {case_id!r}.", *page(name)]

        demo.load(on_load, inputs=[rater_box], outputs=[rater_box, *outputs])
        start.click(page, inputs=[rater_box], outputs=outputs)
        submit.click(on_submit, inputs=[rater_box, case_state, order_state, *radios], outputs=[status, *outputs])
    demo.fleximmt_allowed_paths = [str(Path(cases_dir).resolve()), str(cache)]
    return demo


def serve(cases_dir, db_path, host: str = "127.0.0.1", port: int = 7861, rater: str | None = None, block: bool = True):
    demo = build_app(cases_dir, db_path, rater)
    demo.queue().launch(server_name=host, server_port=port, allowed_paths=demo.fleximmt_allowed_paths,
                        prevent_thread_lock=not block)  # fmt: skip
    return demo


def add_cli(subparsers) -> None:
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
    rate.add_argument("--rater", help="fill in the rater's name")
    rate.set_defaults(func=lambda args: serve(args.cases, args.db, args.host, args.port, args.rater))
    rep = subparsers.add_parser("rate-report", help="each method's share of the human picks per criterion",
                                description="Print each method's share (percent) of the picks per criterion; "
                                            "every column sums to 100.")  # fmt: skip
    rep.add_argument("--db", required=True, help="the SQLite file `fleximmt rate` wrote")
    rep.add_argument("--csv", action="store_true", help="print CSV instead of a Markdown table")
    rep.set_defaults(func=lambda args: print(format_report(report(args.db), as_csv=args.csv), end=""))
