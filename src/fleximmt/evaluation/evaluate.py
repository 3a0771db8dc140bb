"""The benchmark runner of Tables 1-6: generate what is missing, score every object, summarise.

A manifest is JSON lines, one case a line::

    {"id": "tiger_man", "image": "images/tiger_man.png",
     "prompt": "A tiger walks on the snow. A man is crouching.",
     "objects": [{"mask": "masks/tiger.png", "motion": "motions/walk.safetensors", "motion_text": "walks",
                  "reference": "refs/walk.mp4", "reference_mask": "refs/walk_mask.png"}, ...],
     "method": "fleximmt", "settings": {"mask_source": "static", "anchors": 1, "alpha": 0.05,
                                        "parts": ["m2v", "m2m"], "rmpm_method": "released"},
     "seed": 0, "steps": 50, "video": "optional/already/generated.mp4"}

Paths are relative to the manifest. ``mask``/``reference_mask`` may be replaced by ``words``/
``reference_words`` (Grounding-DINO + SAM, when their weights are present). A case with a
``video`` is scored as it is (baselines made elsewhere); otherwise FlexiMMT generates it with the
case's settings. One JSON per case goes to ``out/cases/``; finished cases are skipped on a rerun, a
failing case is recorded with its error, and under ``accelerate launch`` each process takes its
share of the cases. The summary (``summary.md``, ``summary.csv``) is shaped like Table 1, one row
per method/ablation.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import FlexiMMTInputError
from ..method.motion import ObjectMotion, atomic_write, load_mask

logger = logging.getLogger(__name__)

METRICS = ("ac", "tc", "ts", "tf", "ff")
SETTING_KEYS = ("parts", "mask_source", "anchors", "alpha", "rmpm_method", "context_text", "feature_blocks")


@dataclass
class Case:
    id: str
    image: Path
    prompt: str
    objects: list[dict]
    method: str = "fleximmt"
    settings: dict = field(default_factory=dict)
    seed: int = 0
    steps: int | None = None
    video: Path | None = None

    @property
    def label(self) -> str:
        """Method plus its ablation settings, the row of the summary table."""
        if not self.settings:
            return self.method
        extras = ", ".join(f"{k}={v}" for k, v in sorted(self.settings.items()))
        return f"{self.method} ({extras})"


def read_manifest(path: str | Path) -> list[Case]:
    path = Path(path)
    if not path.is_file():
        raise FlexiMMTInputError(f"manifest {str(path)!r} does not exist: give a JSON-lines file, one case a line")
    base = path.parent
    cases, seen = [], set()
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as err:
            raise FlexiMMTInputError(f"manifest line {number} is not JSON ({err})") from None
        missing = [k for k in ("image", "prompt", "objects") if k not in raw]
        if missing:
            raise FlexiMMTInputError(f"manifest line {number} lacks {missing}: every case needs image, prompt, objects")
        unknown = set(raw.get("settings", {})) - set(SETTING_KEYS)
        if unknown:
            raise FlexiMMTInputError(
                f"manifest line {number}: unknown settings {sorted(unknown)}; allowed {list(SETTING_KEYS)}"
            )
        resolve = lambda p: None if p is None else (Path(p) if Path(p).is_absolute() else base / p)
        objects = []
        for obj in raw["objects"]:
            obj = dict(obj)
            for key in ("mask", "motion", "reference", "reference_mask"):
                if key in obj:
                    obj[key] = resolve(obj[key])
            objects.append(obj)
        case_id = str(raw.get("id", f"case{number:04d}"))
        if case_id in seen:
            raise FlexiMMTInputError(f"manifest line {number}: case id {case_id!r} appears twice")
        seen.add(case_id)
        cases.append(
            Case(
                case_id,
                resolve(raw["image"]),
                raw["prompt"],
                objects,
                raw.get("method", "fleximmt"),
                raw.get("settings", {}),
                int(raw.get("seed", 0)),
                raw.get("steps"),
                resolve(raw.get("video")),
            )
        )
    return cases


def _uint8(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
    return frames


def _first_mask(image, entry: dict, key: str, words_key: str, detector_kwargs: dict) -> torch.Tensor:
    if entry.get(key) is not None:
        return load_mask(entry[key])
    if entry.get(words_key):
        from .segment import masks_from_words

        return masks_from_words(image, [entry[words_key]], **detector_kwargs)[0]
    raise FlexiMMTInputError(f"an object needs {key!r} (a PNG) or {words_key!r} (words to segment)")


def _resize_mask(mask: torch.Tensor, height: int, width: int) -> np.ndarray:
    import torch.nn.functional as F

    if tuple(mask.shape) == (height, width):
        return mask.numpy().astype(bool)
    return F.interpolate(mask[None, None].float(), (height, width), mode="nearest")[0, 0].numpy() > 0.5


def generate(pipe, case: Case, out_dir: Path, steps: int | None) -> Path:
    """Generate the case's video with FlexiMMT (its settings) unless it exists already."""
    from PIL import Image

    from .video import save_video

    path = out_dir / "videos" / f"{case.id}.mp4"
    if path.is_file():
        return path
    image = Image.open(case.image).convert("RGB")
    objects = [
        ObjectMotion(_first_mask(image, o, "mask", "words", {}), o["motion"], o["motion_text"]) for o in case.objects
    ]
    kwargs = dict(case.settings)
    if "parts" in kwargs:
        kwargs["parts"] = tuple(kwargs["parts"])
    output = pipe(
        image=image,
        prompt=case.prompt,
        objects=objects,
        num_inference_steps=case.steps or steps or 50,
        generator=torch.Generator().manual_seed(case.seed),
        output_type="np",
        **kwargs,
    )
    save_video(_uint8(output.frames[0]), path)
    return path


def score_case(
    case: Case, video_path: Path, clip=None, propagation: str = "flow", flow: str = "dis", tracker: str = "lk"
) -> dict:
    """Every metric for one case: TF and FF per object, AC/TC/TS per video (when CLIP is given);
    ``flow`` ("dis" | "raft") and ``tracker`` ("lk" | "cotracker") pick FF's and TF's estimators."""
    from PIL import Image

    from ..training.data import read_video
    from .metrics import clip_scores, flow_fidelity_result, trajectory_fidelity_result
    from .segment import propagate_masks

    gen, _ = read_video(video_path)
    height, width = gen.shape[1:3]
    image = Image.open(case.image).convert("RGB")
    objects = []
    for k, obj in enumerate(case.objects):
        gen_first = _resize_mask(_first_mask(image, obj, "mask", "words", {}), height, width)
        ref, _ = read_video(obj["reference"])
        ref_image = Image.fromarray(ref[0])
        ref_first = _first_mask(ref_image, obj, "reference_mask", "reference_words", {}).numpy().astype(bool)
        gen_masks = propagate_masks(gen, torch.from_numpy(gen_first)[None], method=propagation)[0].numpy()
        ref_masks = propagate_masks(ref, torch.from_numpy(ref_first)[None], method=propagation)[0].numpy()
        tf = trajectory_fidelity_result(gen, ref, gen_first, ref_first, tracker=tracker)
        ff = flow_fidelity_result(gen, ref, gen_masks, ref_masks, flow=flow)
        objects.append(
            {
                "object": k,
                "motion": str(obj.get("motion")),
                "tf": tf.value,
                "ff": ff.value,
                "tf_estimator": tf.estimator,
                "ff_estimator": ff.estimator,
            }
        )
    result = {
        "id": case.id,
        "method": case.method,
        "label": case.label,
        "settings": case.settings,
        "video": str(video_path),
        "objects": objects,
        "tf": float(np.mean([o["tf"] for o in objects])),
        "ff": float(np.mean([o["ff"] for o in objects])),
        "mask_propagation": propagation,
    }
    if clip is not None:
        scores = clip_scores(gen, case.prompt, model=clip)
        result.update({k: scores[k] for k in ("ac", "tc", "ts")}, clip_model=str(scores.get("model")))
    return result


def run_benchmark(
    pipe,
    manifest: str | Path,
    out_dir: str | Path,
    *,
    clip=None,
    steps: int | None = None,
    propagation: str = "flow",
    flow: str = "dis",
    tracker: str = "lk",
) -> list[dict]:
    """Generate, score and summarise every case of ``manifest`` into ``out_dir`` (resumable)."""
    from ..training.train import process_state

    state = process_state()
    out_dir = Path(out_dir)
    cases = read_manifest(manifest)
    mine = cases[state.process_index :: state.num_processes]
    bar = tqdm(mine, desc=f"evaluating (process {state.process_index})", disable=not state.is_local_main_process)
    for case in bar:
        result_path = out_dir / "cases" / f"{case.id}.json"
        if result_path.is_file() and "error" not in json.loads(result_path.read_text()):
            continue  # finished on an earlier run
        try:
            video = case.video if case.video is not None else generate(pipe, case, out_dir, steps)
            result = score_case(case, video, clip=clip, propagation=propagation, flow=flow, tracker=tracker)
        except Exception as err:  # record and go on: one bad case must not stop a long run
            logger.warning("case %s failed: %s", case.id, err)
            result = {
                "id": case.id,
                "method": case.method,
                "label": case.label,
                "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc(limit=5),
            }
        result["process"] = state.process_index
        atomic_write(result_path, lambda tmp, r=result: Path(tmp).write_text(json.dumps(r, indent=2)))
    state.wait_for_everyone()
    results = [
        json.loads((out_dir / "cases" / f"{c.id}.json").read_text())
        for c in cases
        if (out_dir / "cases" / f"{c.id}.json").is_file()
    ]
    if state.is_main_process:
        write_summary(results, out_dir)
    return results


def summarise(results: list[dict]) -> list[dict]:
    """Mean of every metric per method/ablation label (failed cases counted apart)."""
    rows: dict[str, dict[str, Any]] = {}
    for r in results:
        row = rows.setdefault(r["label"], {"method": r["label"], "cases": 0, "failed": 0, **{m: [] for m in METRICS}})
        if "error" in r:
            row["failed"] += 1
            continue
        row["cases"] += 1
        for m in METRICS:
            if m in r:
                row[m].append(r[m])
    return [{**row, **{m: (float(np.mean(row[m])) if row[m] else math.nan) for m in METRICS}} for row in rows.values()]


def write_summary(results: list[dict], out_dir: Path) -> None:
    table = summarise(results)
    header = ["method", *[m.upper() for m in METRICS], "cases", "failed"]
    fmt = lambda v: "-" if isinstance(v, float) and math.isnan(v) else (f"{v:.3f}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table:
        lines.append("| " + " | ".join(fmt(row[k]) for k in ["method", *METRICS, "cases", "failed"]) + " |")
    atomic_write(out_dir / "summary.md", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    for row in table:
        writer.writerow([row["method"], *[row[m] for m in METRICS], row["cases"], row["failed"]])
    atomic_write(out_dir / "summary.csv", lambda tmp: Path(tmp).write_text(buf.getvalue()))
