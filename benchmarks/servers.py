"""What the two servers hold, measured from outside as clients see them (BENCHMARKS.md, "The servers").

Transfer app (``fleximmt app`` on the toy model, its own process): N clients send /generate at
once through ``gradio_client``; the k-th answer's latency shows the runs going one at a time. Then
more requests one after another, and the server's memory (RSS) and disk (its temp folders) after
each batch, and once ``--keep-files`` seconds have passed. Rating app (``fleximmt rate``, its own
process): R raters, each in a session of its own, rate every case over plain HTTP as the page does;
ballots per second, and every ballot checked in the database afterwards.

    .venv/bin/python benchmarks/servers.py [--clients 4] [--requests 8] [--steps 10] [--raters 8] [--cases 10]
"""

from __future__ import annotations

import argparse
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import GradioSession


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], scratch: Path, port: int) -> subprocess.Popen:
    """``fleximmt ARGS`` in a process whose temp folders (TMPDIR, GRADIO_TEMP_DIR) are under ``scratch``."""
    (scratch / "tmp").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TMPDIR=str(scratch / "tmp"), GRADIO_TEMP_DIR=str(scratch / "gradio"), HF_HUB_OFFLINE="1")
    log = open(scratch / "server.log", "w")  # noqa: SIM115 - the server writes to it while it runs
    server = subprocess.Popen(
        [sys.executable, "-m", "fleximmt", *args, "--port", str(port)], env=env, stdout=log, stderr=log
    )
    import httpx

    for _ in range(600):
        try:
            httpx.get(f"http://127.0.0.1:{port}/config", timeout=2).raise_for_status()
            return server
        except Exception:
            if server.poll() is not None:
                raise RuntimeError(f"the server stopped: see {scratch / 'server.log'}") from None
            time.sleep(0.5)
    raise RuntimeError("the server did not start in 5 minutes")


def rss_mb(server: subprocess.Popen) -> float:
    return psutil.Process(server.pid).memory_info().rss / 2**20


def disk(scratch: Path) -> str:
    """Bytes, files and folders under the server's temp folders."""
    files = [p for p in scratch.rglob("*") if p.is_file() and p.name != "server.log"]
    folders = [p for p in scratch.rglob("*") if p.is_dir()]
    if os.environ.get("SHOW_FILES"):
        print(*[p.relative_to(scratch) for p in files], sep="\n  ")
    return f"{sum(p.stat().st_size for p in files) / 2**20:.2f} MiB in {len(files)} files, {len(folders)} folders"


def transfer(args, scratch: Path) -> None:
    from gradio_client import Client, handle_file

    from fleximmt.toy import random_motion
    from fleximmt.toy.lab import EXAMPLE_DIR, load_toy_pipeline

    motions = scratch / "motions"
    motions.mkdir(parents=True)
    transformer = load_toy_pipeline().transformer
    for seed, (name, words) in enumerate([("right", "moves right"), ("bounce", "bounces")]):
        random_motion(transformer, 16, seed=seed, name=name, motion_words=words).save(motions / f"{name}.safetensors")
    port = free_port()
    server = start(["app", "--motions", str(motions), "--keep-files", str(args.keep_files)], scratch / "app", port)
    url = f"http://127.0.0.1:{port}/"
    inputs = dict(
        image=handle_file(str(EXAMPLE_DIR / "scene_0.png")),
        prompt="A square moves right. A circle bounces.",
        object_1_mask_png=handle_file(str(EXAMPLE_DIR / "masks" / "scene_0_object_0.png")),
        object_1_motion="right",
        object_1_motion_words="moves right",
        object_2_mask_png=handle_file(str(EXAMPLE_DIR / "masks" / "scene_0_object_1.png")),
        object_2_motion="bounce",
        object_2_motion_words="bounces",
        steps=args.steps,
    )
    try:
        print(
            f"## transfer app (toy model, {args.steps} steps), server RSS at start {rss_mb(server):.0f} MiB, "
            f"disk {disk(scratch / 'app')}"
        )
        Client(url, verbose=False).predict(**inputs, api_name="/generate")  # warm-up
        warm = rss_mb(server)
        clients = [Client(url, verbose=False, download_files=str(scratch / "downloads")) for _ in range(args.clients)]
        latencies: list[float] = []
        barrier = threading.Barrier(args.clients)

        def one(client, seed):
            barrier.wait()
            begin = time.perf_counter()
            client.predict(**inputs, seed=seed, api_name="/generate")
            latencies.append(time.perf_counter() - begin)

        threads = [threading.Thread(target=one, args=(c, seed)) for seed, c in enumerate(clients, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        latencies.sort()
        print(f"{args.clients} concurrent requests, latency of the k-th answer (s):")
        print("| k | " + " | ".join(str(k + 1) for k in range(len(latencies))) + " |")
        print("|---|" + "---|" * len(latencies))
        print("| latency | " + " | ".join(f"{t:.1f}" for t in latencies) + " |")
        gaps = np.diff([0.0, *latencies])
        print(f"gaps between answers: median {np.median(gaps[1:]):.1f} s (one run each)")
        print(
            f"after warm-up + {args.clients} requests: RSS {rss_mb(server):.0f} MiB (after warm-up {warm:.0f}), "
            f"disk {disk(scratch / 'app')}"
        )
        done = 1 + args.clients
        for _batch in range(2):
            for _ in range(args.requests):
                clients[0].predict(**inputs, seed=done, api_name="/generate")  # a seed per request: every video differs
                done += 1
            print(f"after {done} requests: RSS {rss_mb(server):.0f} MiB, disk {disk(scratch / 'app')}")
        job = clients[0].submit(**{**inputs, "steps": 200}, api_name="/generate")
        time.sleep(3)
        begin = time.perf_counter()
        job.cancel()
        clients[1].predict(**{**inputs, "steps": 1}, api_name="/generate")
        print(
            f"a 200-step run cancelled, then a 1-step request: answered {time.perf_counter() - begin:.1f} s after the cancel"
        )
        wait = args.keep_files + min(args.keep_files, 600) + 2
        time.sleep(wait)
        print(
            f"{wait} s later (--keep-files {args.keep_files}): RSS {rss_mb(server):.0f} MiB, disk {disk(scratch / 'app')}"
        )
        clients[0].predict(**inputs, seed=done, api_name="/generate")  # a run sweeps the folders Gradio emptied
        print(f"one more request: RSS {rss_mb(server):.0f} MiB, disk {disk(scratch / 'app')}")
    finally:
        server.terminate()
        server.wait(30)
    print(f"after shutdown: disk {disk(scratch / 'app')}")


def rating(args, scratch: Path) -> None:
    import imageio.v3 as iio

    rng = np.random.RandomState(0)
    for c in range(args.cases):
        folder = scratch / "cases" / f"case_{c:02d}"
        (folder / "candidates").mkdir(parents=True)
        (folder / "references").mkdir()
        for video in [
            folder / "references" / "ref.mp4",
            *[folder / "candidates" / f"{m}.mp4" for m in ("a", "b", "c")],
        ]:
            iio.imwrite(video, (rng.rand(8, 64, 64, 3) * 255).astype(np.uint8), fps=8, codec="libx264")
    db = scratch / "votes.sqlite"
    port = free_port()
    server = start(["rate", "--cases", str(scratch / "cases"), "--db", str(db)], scratch / "rate", port)
    url = f"http://127.0.0.1:{port}/"
    refused: list[str] = []

    def rater(name: str) -> None:
        rng = np.random.RandomState(int(name[5:]))
        session = GradioSession(url)
        page, submit = session.fn_index("page"), session.fn_index("on_submit")
        shown = session.call(page, [name])["output"]["data"]
        for _ in range(args.cases):
            picks = [f"Candidate {rng.randint(1, 4)}" for _ in range(4)]
            out = session.call(submit, [name, shown[1], None, *picks])["output"][
                "data"
            ]  # name, case on the page, state, picks
            if not out[0].startswith("Saved"):
                refused.append(out[0])
            shown = out[1:]
        session.close()

    try:
        threads = [threading.Thread(target=rater, args=(f"rater{r}",)) for r in range(args.raters)]
        begin = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - begin
        ballots = args.raters * args.cases
        rows = sqlite3.connect(db).execute("SELECT COUNT(*), COUNT(DISTINCT rater || case_id) FROM ballots").fetchone()
        print(f"## rating app: {args.raters} raters x {args.cases} cases, each rater in a session of its own")
        print(
            f"{ballots} ballots in {wall:.1f} s: {ballots / wall:.1f} ballots/s; database: {rows[0]} picks, "
            f"{rows[1]} (rater, case) pairs; refused: {len(refused)}"
        )
        print(f"server RSS {rss_mb(server):.0f} MiB, disk {disk(scratch / 'rate')}")
    finally:
        server.terminate()
        server.wait(30)
    print(f"after shutdown: disk {disk(scratch / 'rate')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4, help="concurrent /generate requests")
    parser.add_argument("--requests", type=int, default=8, help="requests per later batch (two batches)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per request")
    parser.add_argument("--keep-files", type=int, default=20, help="the transfer server's --keep-files")
    parser.add_argument("--raters", type=int, default=8)
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--only", choices=("transfer", "rating"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fleximmt-servers-") as scratch:
        if args.only != "rating":
            transfer(args, Path(scratch))
        if args.only != "transfer":
            rating(args, Path(scratch))


if __name__ == "__main__":
    main()
