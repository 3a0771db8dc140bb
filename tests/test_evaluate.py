"""The benchmark runner: generation, per-object metrics, summary, resume, failures, sharding."""

import csv
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import imageio.v3 as iio
import numpy as np
import pytest
from helpers import accelerate_launch
from PIL import Image

from fleximmt.evaluation.evaluate import read_manifest, run_benchmark
from fleximmt.toy import random_motion, tiny_pipeline


def square_video(velocity, frames=9, size=32, seed=0):
    rng = np.random.RandomState(seed)
    background = (rng.rand(size, size, 3) * 60 + 60).astype(np.uint8)
    texture = (rng.rand(10, 10, 3) * 200 + 40).astype(np.uint8)
    video = np.repeat(background[None], frames, 0)
    for t in range(frames):
        x = 11 + velocity * t
        video[t, 11:21, x : x + 10] = texture
    mask = np.zeros((size, size), np.uint8)
    mask[11:21, 11:21] = 255
    return video, mask


@pytest.fixture()
def bench(tmp_path):
    pipe = tiny_pipeline(0)
    for k, velocity in enumerate((1, -1)):
        video, mask = square_video(velocity, seed=k)
        iio.imwrite(tmp_path / f"ref{k}.mp4", video, fps=8, codec="libx264")
        Image.fromarray(mask).save(tmp_path / f"ref{k}_mask.png")
        random_motion(pipe.transformer, 4, seed=k).save(tmp_path / f"m{k}.safetensors")
    Image.fromarray(iio.imread(tmp_path / "ref0.mp4")[0]).save(tmp_path / "ref0_first.png")
    image = (np.random.RandomState(5).rand(32, 32, 3) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "image.png")
    left, right = np.zeros((32, 32), np.uint8), np.zeros((32, 32), np.uint8)
    left[4:20, 2:14], right[10:28, 16:30] = 255, 255
    Image.fromarray(left).save(tmp_path / "left.png")
    Image.fromarray(right).save(tmp_path / "right.png")
    objects = [
        {
            "mask": "left.png",
            "motion": "m0.safetensors",
            "motion_text": "jumps up",
            "reference": "ref0.mp4",
            "reference_mask": "ref0_mask.png",
        },
        {
            "mask": "right.png",
            "motion": "m1.safetensors",
            "motion_text": "slides left",
            "reference": "ref1.mp4",
            "reference_mask": "ref1_mask.png",
        },
    ]
    prompt = "A ball jumps up. A box slides left."
    cases = [
        {"id": "full", "image": "image.png", "prompt": prompt, "objects": objects, "steps": 2},
        {
            "id": "static",
            "image": "image.png",
            "prompt": prompt,
            "objects": objects,
            "steps": 2,
            "settings": {"mask_source": "static", "parts": ["m2v", "m2m"]},
        },
        # the reference scored against itself: a known answer (FF = 1, TF close to 1)
        {
            "id": "oracle",
            "method": "reference",
            "image": "ref0_first.png",
            "prompt": "A ball jumps up.",
            "objects": [{**objects[0], "mask": "ref0_mask.png"}],
            "video": "ref0.mp4",
        },
        {
            "id": "broken",
            "image": "image.png",
            "prompt": prompt,
            "objects": [{**objects[0], "motion": "missing.safetensors"}],
        },
    ]
    (tmp_path / "bench.jsonl").write_text("\n".join(json.dumps(c) for c in cases))
    return tmp_path, pipe


def test_runner_scores_every_object_summarises_and_resumes(bench):
    root, pipe = bench
    results = {r["id"]: r for r in run_benchmark(pipe, root / "bench.jsonl", root / "out", steps=2)}
    assert set(results) == {"full", "static", "oracle", "broken"}
    assert "missing.safetensors" in results["broken"]["error"] and "does not exist" in results["broken"]["error"]
    for case in ("full", "static"):
        assert len(results[case]["objects"]) == 2 and (root / "out" / "videos" / f"{case}.mp4").is_file()
        assert all(
            -1 <= o["tf"] <= 1 and 0 <= o["ff"] <= 1 and o["ff_estimator"] == "opencv-dis"
            for o in results[case]["objects"]
        )
    assert results["oracle"]["ff"] == pytest.approx(1.0, abs=1e-6) and results["oracle"]["tf"] > 0.9
    assert results["static"]["label"] != results["full"]["label"]
    rows = list(csv.DictReader((root / "out" / "summary.csv").read_text().splitlines()))
    assert {r["method"] for r in rows} == {results[c]["label"] for c in results}
    summary = (root / "out" / "summary.md").read_text()
    assert "| method | AC | TC | TS | TF | FF | cases | failed |" in summary

    calls = []
    real_call = type(pipe).__call__
    type(pipe).__call__ = lambda self, *a, **k: calls.append(1) or real_call(self, *a, **k)
    try:
        again = {r["id"]: r for r in run_benchmark(pipe, root / "bench.jsonl", root / "out", steps=2)}
    finally:
        type(pipe).__call__ = real_call
    assert calls == []  # finished cases are skipped, videos reused
    assert again["full"] == results["full"]


def test_manifest_errors_name_the_line(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"image": "a.png", "prompt": "x"}\n')
    with pytest.raises(ValueError, match="line 1 lacks \\['objects'\\]"):
        read_manifest(tmp_path / "m.jsonl")
    (tmp_path / "m.jsonl").write_text('{"image": "a.png", "prompt": "x", "objects": [], "settings": {"alpa": 1}}\n')
    with pytest.raises(ValueError, match="unknown settings"):
        read_manifest(tmp_path / "m.jsonl")


def test_two_processes_share_the_cases_each_once(bench):
    root, pipe = bench
    pipe.save_pretrained(root / "model")
    result = accelerate_launch(
        [
            "evaluate",
            "--model",
            root / "model",
            "--manifest",
            root / "bench.jsonl",
            "--out",
            root / "dist",
            "--steps",
            2,
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    processes = {
        c: json.loads((root / "dist" / "cases" / f"{c}.json").read_text())["process"]
        for c in ("full", "static", "oracle", "broken")
    }
    assert processes == {"full": 0, "static": 1, "oracle": 0, "broken": 1}
    assert result.stdout.count("summary:") == 1


def test_the_release_estimators_are_chosen_from_the_command_line(bench, monkeypatch):
    import fleximmt.evaluation.metrics as metrics
    from fleximmt.apps import cli

    root, pipe = bench
    chosen = []
    real_ff, real_tf = metrics.flow_fidelity_result, metrics.trajectory_fidelity_result
    monkeypatch.setattr(
        metrics, "flow_fidelity_result", lambda *a, flow="dis", **k: chosen.append(("ff", flow)) or real_ff(*a, **k)
    )
    monkeypatch.setattr(
        metrics,
        "trajectory_fidelity_result",
        lambda *a, tracker="lk", **k: chosen.append(("tf", tracker)) or real_tf(*a, **k),
    )
    monkeypatch.setattr(cli, "load_pipeline", lambda args: pipe)
    manifest = root / "oracle.jsonl"
    manifest.write_text(next(line for line in (root / "bench.jsonl").read_text().splitlines() if '"oracle"' in line))
    code = cli.main(
        [
            "evaluate",
            "--manifest",
            str(manifest),
            "--out",
            str(root / "o1"),
            "--flow",
            "raft",
            "--tracker",
            "cotracker",
            "--model",
            "tiny",
        ]
    )
    assert code == 0 and chosen == [("tf", "cotracker"), ("ff", "raft")]
    chosen.clear()
    assert cli.main(["evaluate", "--manifest", str(manifest), "--out", str(root / "o2"), "--model", "tiny"]) == 0
    assert chosen == [("tf", "lk"), ("ff", "dis")]  # the offline estimators by default
