"""The ``fleximmt`` command line: generate, train, inspect, demo (and more as they land)."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import warnings
from pathlib import Path

from ..errors import FlexiMMTInputError
from ..method.kernels import DEFAULT_KERNEL, MASK_KERNELS
from ..method.masks import RMPM_METHODS
from ..method.pipeline import INITIAL_MASKS, MASK_SOURCES, about_object
from ..method.presets import PRESETS
from ..models import SUPPORTED, adapters, default_model, family_defaults

logger = logging.getLogger(__name__)

TINY = "tiny"
TOY = "toy"
EXAMPLES = {
    "fleximmt": """examples:
  fleximmt demo                                   (learn two motions and transfer them on the shipped toy model, minutes on a CPU)
  fleximmt train --video walk.mp4 --caption "A tiger walks on the snow." --concept tiger \\
      --motion-words walks --out walk.safetensors
  fleximmt inspect walk.safetensors
  fleximmt generate --image scene.png --prompt "A tiger walks on the snow." \\
      --object tiger.png:walk.safetensors:walks --out out.mp4

Run 'fleximmt COMMAND --help' for a command's options.""",
    "inspect": """examples:
  fleximmt inspect walk.safetensors
  fleximmt inspect walk.safetensors --json | jq .d_m""",
    "demo": """examples:
  fleximmt demo                          (the shipped toy model; writes demo-output/)
  fleximmt demo --train-steps 100        (learn the two motions faster, less faithfully)
  fleximmt demo --model tiny --steps 4   (every stage on a tiny RANDOM-weight model: a smoke test)""",
    "generate": """examples:
  fleximmt generate --image scene.png --prompt "A tiger walks on the snow. A man is crouching." \\
      --object tiger.png:walk.safetensors:"walks" --object man.png:crouch.safetensors:"is crouching" \\
      --out out.mp4 --masks-out masks.mp4
  fleximmt generate --model ./CogVideoX-5b-I2V --cpu-offload --vae-tiling ...   (a local copy, less GPU memory)
  fleximmt generate --model Wan-AI/Wan2.1-I2V-14B-480P-Diffusers --frames 81 ...   (Wan: motions learned on Wan)
  fleximmt generate --model tiny ...   (a tiny random-weight model: checks that everything runs, makes noise)""",
    "train": """examples:
  fleximmt train --video yoga.mp4 --caption "A man is doing yoga." --concept man \\
      --motion-words "is doing yoga" --out yoga.safetensors
  fleximmt train --dataset motions.csv --out-dir motions/      (one motion per row)
  fleximmt train --model Wan-AI/Wan2.2-I2V-A14B-Diffusers ...   (Wan 2.2: one token set per expert)
  accelerate launch -m fleximmt train ...                       (several GPUs or nodes)
dataset columns (CSV with header, or JSON lines): video, caption, concept_words, motion_words,
  and optionally start, end (frames), fps, name""",
}


# options whose default is the model's own: their help names each registered family's (``%(families)s``)
MODEL_SETTINGS = {"guidance": "guidance_scale", "frames": "num_frames", "height": "height", "width": "width"}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The commands' help. ``%(families)s`` in an option's help reads, when help is shown, every registered
    family's default for it (``MODEL_SETTINGS``; for ``--model``, their default checkpoints): the families
    are imported then, not whenever the command line starts."""

    def _expand_help(self, action: argparse.Action) -> str:
        if "%(families)" not in (action.help or ""):
            return super()._expand_help(action)
        action = copy.copy(action)
        if action.dest == "model":
            action.families = ", ".join(cls.default_model for cls in adapters())
        else:
            action.families = family_defaults(MODEL_SETTINGS[action.dest])
        return super()._expand_help(action)


MASK_KERNEL_HELP = (
    "how MDMA is computed, each exactly: auto (grouped attention, no N x N mask), flex (one FlexAttention call; "
    "compiles first; training with it needs a GPU) or dense (the N x N reference)"
)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive whole number")
    return value


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = HelpFormatter  # --model's help names every family's default checkpoint
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=default_model(),
        help=f"hub id or local folder of a {SUPPORTED} image-to-video model, its family chosen by its "
        "model_index.json (default: %(default)s; each family's: %(families)s); 'toy' is the small model trained "
        "on the toy world that ships with fleximmt (64x64, 17 frames, runs on a CPU); 'tiny' builds a tiny "
        "random-weight model",
    )
    group.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        help="weights' precision (default: bfloat16 on a GPU, float32 on a CPU)",
    )
    group.add_argument("--cpu-offload", action="store_true", help="keep idle models on the CPU (less GPU memory)")
    group.add_argument("--vae-tiling", action="store_true", help="decode the video in tiles (less memory)")


def load_pipeline(args):
    """The pipeline ``--model`` names: toy, tiny, or a checkpoint of a supported family (by its model_index.json)."""
    import torch

    from ..models.loading import load_pipeline as load_checkpoint

    if args.model == TINY:
        from ..toy import tiny_pipeline

        logger.warning("--model tiny: a tiny model with RANDOM weights; its videos are noise")
        pipe = tiny_pipeline(0)
    elif args.model == TOY:
        from ..toy.lab import load_toy_pipeline

        pipe = load_toy_pipeline()
    else:
        cuda = torch.cuda.is_available()
        dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
        try:
            with warnings.catch_warnings():  # newer diffusers renamed torch_dtype; older ones only know it
                warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
                pipe = load_checkpoint(args.model, torch_dtype=dtype)
        except OSError as err:
            raise FlexiMMTInputError(
                f"could not load the model {args.model!r} ({str(err).splitlines()[0]}): give a local folder "
                f"with a {SUPPORTED} image-to-video pipeline, or log in and download it first"
            ) from None
        if args.cpu_offload and cuda:
            pipe.enable_model_cpu_offload()
        elif cuda:
            pipe.to("cuda")
        elif args.cpu_offload:
            logger.warning("--cpu-offload: no GPU found, so the model runs on the CPU anyway")
    if args.vae_tiling:
        pipe.vae.enable_tiling()
    pipe.set_progress_bar_config(disable=False, desc="denoising")
    return pipe


def parse_object(spec: str) -> tuple[str, str, str]:
    """``MASK.png:MOTION.safetensors:motion words`` -> (mask path, motion path, motion words);
    split on the first two colons, so the motion words may hold colons but the paths may not."""
    parts = spec.split(":", 2)
    if len(parts) != 3 or not all(p.strip() for p in parts):
        raise FlexiMMTInputError(
            f"--object {spec!r}: write MASK.png:MOTION.safetensors:motion words, e.g. "
            'dog.png:jump.safetensors:"jumps up"'
        )
    return parts[0], parts[1], parts[2].strip()


# -- generate ------------------------------------------------------------------------------
TRANSFER_OPTIONS = (
    "mask_source",
    "anchors",
    "alpha",
    "rmpm_method",
    "initial_masks",
    "mask_kernel",
    "preset",
)  # passed as given


def cmd_generate(args) -> None:
    import torch
    from PIL import Image

    from ..evaluation.video import check_video_path, mask_overlay, save_video
    from ..method.motion import ObjectMotion

    out = check_video_path(args.out)
    masks_out = check_video_path(args.masks_out) if args.masks_out else None
    image_path = Path(args.image)
    if not image_path.is_file():
        raise FlexiMMTInputError(f"--image {args.image!r} does not exist")
    try:
        image = Image.open(image_path).convert("RGB")
    except Exception as err:
        raise FlexiMMTInputError(f"--image {args.image!r} is not a readable image ({err})") from None
    objects = []
    for number, spec in enumerate(
        args.object or [], 1
    ):  # numbered as the pipeline numbers them: object 1 is the first --object
        with about_object(number):
            objects.append(ObjectMotion(*parse_object(spec)))
    if masks_out and not objects:
        logger.warning("--masks-out: no --object given, so there are no masks to draw; skipping it")
    pipe = load_pipeline(args)
    given = pipe.call_settings(
        guidance_scale=args.guidance, num_frames=args.frames, height=args.height, width=args.width
    )
    # FlexiMMT's options only as given: the pipeline's defaults, or --preset's, fill the rest
    options = {name: getattr(args, name) for name in TRANSFER_OPTIONS if getattr(args, name) is not None}
    output = pipe(
        image=image,
        prompt=args.prompt,
        objects=objects,
        num_inference_steps=args.steps,
        generator=torch.Generator().manual_seed(args.seed),
        output_type="np",
        return_masks=bool(objects),
        **options,
        **given,
    )
    frames = output.frames[0]
    written = [save_video(frames, out, fps=args.fps)]
    if args.gif and out.suffix.lower() != ".gif":
        written.append(save_video(frames, out.with_suffix(".gif"), fps=args.fps))
    if masks_out and objects:
        overlay = mask_overlay(frames, output.masks[0, -1], frame_index=pipe.mask_frame_index(len(frames)))
        written.append(save_video(overlay, masks_out, fps=args.fps))
    for path in written:
        print(f"wrote {path}")


# -- inspect -------------------------------------------------------------------------------
def cmd_inspect(args) -> None:
    from ..method.motion import MotionTokens

    motion = MotionTokens.load(args.motion)
    info = {
        "file": args.motion,
        "blocks": motion.num_blocks,
        "d_m": motion.d_m,
        "dim": motion.dim,
        "parameters": motion.tokens.numel(),
        "dtype": str(motion.tokens.dtype).replace("torch.", ""),
        **motion.metadata,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")


# -- train ---------------------------------------------------------------------------------
TRAIN_OPTIONS = {  # CLI flag -> TrainSettings field
    "preset": "preset",
    "steps": "steps",
    "tokens": "tokens_per_motion",
    "seed": "seed",
    "lr": "lr",
    "warmup_steps": "lr_warmup_steps",
    "frames": "num_frames",
    "height": "height",
    "width": "width",
    "fps": "fps",
    "max_windows": "max_windows",
    "dmem_drop": "dmem_drop",
    "image_dropout": "image_dropout",
    "frame_diff_scale": "frame_diff_scale",
    "checkpoint_every": "checkpoint_every",
    "mixed_precision": "mixed_precision",
    "gradient_checkpointing": "gradient_checkpointing",
    "vae_slicing": "vae_slicing",
    "mask_kernel": "mask_kernel",
}


def cmd_train(args) -> None:
    from ..training.train import process_state, read_dataset, train_dataset, train_motion

    settings = {field: getattr(args, flag) for flag, field in TRAIN_OPTIONS.items() if getattr(args, flag) is not None}
    if args.no_train_mask:
        settings["train_mask"] = False
    if args.vae_tiling:
        settings["vae_tiling"] = True
    if args.no_offload:
        settings["offload_after_caching"] = False
    if args.dataset:
        if not args.out_dir:
            raise FlexiMMTInputError("--dataset needs --out-dir, the folder for one motion file per row")
        rows = read_dataset(args.dataset)
        pipe = load_pipeline(args)
        for path in train_dataset(pipe, rows, args.out_dir, resume=args.resume, **settings):
            print(f"wrote {path}")
        return
    missing = [
        f"--{n.replace('_', '-')}"
        for n in ("video", "caption", "concept", "motion_words", "out")
        if not getattr(args, n)
    ]
    if missing:
        raise FlexiMMTInputError(f"missing {', '.join(missing)} (or give --dataset FILE --out-dir DIR)")
    pipe = load_pipeline(args)
    steps = settings.pop("steps", 2000)
    tokens = settings.pop("tokens_per_motion", 226)
    seed = settings.pop("seed", 0)
    motion = train_motion(
        pipe,
        args.video,
        args.caption,
        args.concept,
        args.motion_words,
        args.out,
        steps=steps,
        tokens_per_motion=tokens,
        seed=seed,
        resume=args.resume,
        **settings,
    )
    if process_state().is_main_process:  # under accelerate launch, the main process writes the file
        print(f"wrote {args.out}: {motion}")


# -- demo ----------------------------------------------------------------------------------
def cmd_demo(args) -> None:
    from ..toy.demo import run_demo

    out = Path(args.out)
    if args.model == TOY:
        from ..toy.demo import run_toy_demo

        summary = run_toy_demo(out, steps=args.steps or 20, train_steps=args.train_steps)
    else:
        summary = run_demo(out, steps=args.steps or 10)
    print(f"\nfleximmt demo finished in {summary['seconds']} s. Outputs in {out.resolve()}:")
    for name in summary["files"]:
        print(f"  {out / name}")
    if args.model == TOY:
        print(
            f"\nprompt: {summary['prompt']}\nper-object averages (tf, ff: higher is better; traj_err in pixels, leak: lower is better):"
        )
        for variant, values in summary["variants"].items():
            print(f"  {variant:10s} " + "  ".join(f"{k} {v:.3f}" for k, v in values.items()))
        print(
            "\nThe toy model (64x64, 17 frames, trained on this CPU) follows one sprite's caption well but animates "
            "scenes of several sprites poorly;\ndocs/toy-world.md and BENCHMARKS.md say what it shows."
        )
        return
    print(
        "\nNOTE: the built-in model has RANDOM weights, so the video is noise. The demo shows that every stage runs "
        "end to end:\ntwo objects, two motion files, MDMA attention, RMPM mask propagation, video and mask overlay."
    )


# -- evaluate ------------------------------------------------------------------------------
def cmd_evaluate(args) -> None:
    from ..evaluation.evaluate import run_benchmark

    pipe = load_pipeline(args)
    clip = None
    if args.clip:
        from ..evaluation.metrics import load_clip

        clip = load_clip(args.clip)
    results = run_benchmark(
        pipe,
        args.manifest,
        args.out,
        clip=clip,
        steps=args.steps,
        propagation=args.mask_propagation,
        flow=args.flow,
        tracker=args.tracker,
    )
    from ..training.train import process_state

    if process_state().is_main_process:
        failed = sum("error" in r for r in results)
        print(f"{len(results)} cases ({failed} failed); summary: {Path(args.out) / 'summary.md'}")
        print((Path(args.out) / "summary.md").read_text())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleximmt",
        description="FlexiMMT: make the objects of an image move, each with a motion learned from its own reference video.",
        epilog=EXAMPLES["fleximmt"],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens (INFO level)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    formatter = HelpFormatter

    gen = sub.add_parser(
        "generate",
        help="transfer motions onto the objects of an image",
        epilog=EXAMPLES["generate"],
        formatter_class=formatter,
        description="Generate a video from IMAGE in which each --object moves with its motion.",
    )
    gen.add_argument("--image", required=True, help="the first frame (PNG/JPEG)")
    gen.add_argument("--prompt", required=True, help="the text prompt; it must contain every object's motion words")
    gen.add_argument(
        "--object",
        action="append",
        metavar="MASK:MOTION:WORDS",
        help="an object: its first-frame mask PNG (image size), its motion file and the prompt's words "
        "for its motion; repeat for up to 8 objects (none: plain image-to-video); messages number "
        "them in this order ('object 2: ...' is the second --object)",
    )
    gen.add_argument("--out", required=True, help="output video (.mp4 or .gif)")
    gen.add_argument("--masks-out", help="also write the propagated object masks over the video (.mp4 or .gif)")
    gen.add_argument("--gif", action="store_true", help="also write a .gif beside --out")
    gen.add_argument("--steps", type=_positive_int, default=50, help="denoising steps (default: %(default)s)")
    gen.add_argument(
        "--guidance",
        type=float,
        help="classifier-free guidance scale (default: the pipeline's: %(families)s)",
    )
    gen.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    gen.add_argument(
        "--frames",
        type=_positive_int,
        help="frame count (default: the model's own: %(families)s)",
    )
    gen.add_argument(
        "--height",
        type=_positive_int,
        help="video height (default: the model's own: %(families)s)",
    )
    gen.add_argument(
        "--width",
        type=_positive_int,
        help="video width (default: the model's own: %(families)s)",
    )
    gen.add_argument(
        "--fps", type=_positive_int, default=8, help="frame rate of the written video (default: %(default)s)"
    )
    gen.add_argument(
        "--preset",
        choices=PRESETS,
        help="release: the authors' released inference, exactly (RMPM's released form, no masks at step 0, "
        "the dynamic stop at alpha 0.05, their mask resize and precision); an option given here wins "
        "(docs/method.md#the-release-preset)",
    )
    gen.add_argument(
        "--mask-source",
        choices=MASK_SOURCES,
        help="object masks on later frames: propagated (rmpm), the first frame's (static), "
        "from QK attention (qk) or everywhere (none) (default: rmpm)",
    )
    gen.add_argument(
        "--rmpm-method",
        choices=RMPM_METHODS,
        help="Eqs. 12-13 (paper) or the authors' label propagation (released) (default: paper; "
        "released with --preset release)",
    )
    gen.add_argument(
        "--initial-masks",
        choices=INITIAL_MASKS,
        help="RMPM's step 0: the first-frame masks on every frame, or none as in the authors' release "
        "(default: first_frame; none with --preset release)",
    )
    gen.add_argument("--anchors", type=_positive_int, help="RMPM anchor frames W (default: 3)")
    gen.add_argument(
        "--alpha",
        type=float,
        help="dynamic RMPM: from step 5 on, keep the masks once every object changes by less than this "
        "fraction (e.g. 0.05) (default: none, update every step; 0.05 with --preset release)",
    )
    gen.add_argument(
        "--mask-kernel",
        choices=MASK_KERNELS,
        help=MASK_KERNEL_HELP + f" (default: {DEFAULT_KERNEL}; dense with --preset release)",
    )
    add_model_options(gen)
    gen.set_defaults(func=cmd_generate)

    tr = sub.add_parser(
        "train",
        help="learn a motion (motion tokens) from a reference video",
        epilog=EXAMPLES["train"],
        formatter_class=formatter,
        description="Train motion tokens on one reference video (or one per row of --dataset); "
        "the video model stays frozen. Defaults are fleximmt's (docs/method.md#the-releases-recipe says where "
        "they differ from the authors' release); --preset release trains as the release does.",
    )
    tr.add_argument(
        "--preset",
        choices=PRESETS,
        help="release: the authors' training recipe (no warm-up, learning rate scaled by the processes, 12 "
        "random crops cycled, 10%% of captions dropped, the video encoded anew each step, bicubic resize, bf16, "
        "their token initialisation, DMEM drop and dense masked attention); an option given here wins "
        "(docs/method.md#the-releases-recipe)",
    )
    tr.add_argument("--video", help="reference video with one moving object")
    tr.add_argument("--caption", help='its caption, e.g. "A man is doing yoga."')
    tr.add_argument("--concept", help="the caption's words naming the object, e.g. man")
    tr.add_argument("--motion-words", help='the caption\'s words describing the motion, e.g. "is doing yoga"')
    tr.add_argument("--out", help="the motion file to write (.safetensors)")
    tr.add_argument("--dataset", help="CSV or JSON-lines file: one motion per row (see below)")
    tr.add_argument("--out-dir", help="with --dataset: folder for the motion files")
    tr.add_argument("--resume", action="store_true", help="continue from the checkpoint beside --out")
    tr.add_argument("--steps", type=_positive_int, help="training steps (default: 2000)")
    tr.add_argument("--lr", type=float, help="AdamW learning rate (default: 3e-3)")
    tr.add_argument(
        "--warmup-steps", type=int, help="learning-rate warm-up steps (default: 100; 0 with --preset release)"
    )
    tr.add_argument("--tokens", type=_positive_int, help="motion tokens per block, d_m (default: 226)")
    tr.add_argument(
        "--frames",
        type=_positive_int,
        help="frames per training window (default: the model's: %(families)s)",
    )
    tr.add_argument("--height", type=_positive_int, help="training height (default: the model's: %(families)s)")
    tr.add_argument("--width", type=_positive_int, help="training width (default: the model's: %(families)s)")
    tr.add_argument("--fps", type=float, help="subsample the reference to about this frame rate (default: 8)")
    tr.add_argument("--max-windows", type=_positive_int, help="windows of the reference to train on (default: 4)")
    tr.add_argument("--dmem-drop", type=float, help="DMEM: share of mask positives dropped (default: 0.3)")
    tr.add_argument("--no-train-mask", action="store_true", help="train without DMEM's mask (the 'w/o Train' ablation)")
    tr.add_argument("--image-dropout", type=float, help="probability of a zeroed image condition (default: 0.05)")
    tr.add_argument(
        "--frame-diff-scale",
        type=float,
        help="scale of x[k+1] in the frame-difference loss (default: 1; sqrt 2 with --preset release)",
    )
    tr.add_argument("--checkpoint-every", type=_positive_int, help="steps between checkpoints (default: 200)")
    tr.add_argument("--seed", type=int, help="random seed (default: 0)")
    tr.add_argument(
        "--mixed-precision",
        choices=["no", "bf16", "fp16"],
        help="autocast precision (default: no; bf16 with --preset release)",
    )
    tr.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="recompute activations in the backward pass: less memory, about 30%% more time (default: on "
        "when the activations would pass 8 GiB, as for every real-size model; off for the toy model)",
    )
    tr.add_argument(
        "--vae-slicing", action="store_true", default=None, help="encode the reference in slices (less memory)"
    )
    tr.add_argument(
        "--mask-kernel",
        choices=MASK_KERNELS,
        help=MASK_KERNEL_HELP + f" (default: {DEFAULT_KERNEL}; dense with --preset release)",
    )
    tr.add_argument(
        "--no-offload", action="store_true", help="keep text encoder and VAE on the GPU after caching latents"
    )
    add_model_options(tr)
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser(
        "evaluate",
        help="run a benchmark manifest: generate, score (TF, FF, AC/TC/TS), summarise",
        formatter_class=formatter,
        description="Generate what is missing, compute every metric per object, write one JSON per "
        "case and a summary table (Markdown and CSV) grouped by method/ablation. "
        "Resumes: finished cases are skipped; failing cases are recorded and skipped.",
        epilog="manifest format: see fleximmt/evaluation/evaluate.py (JSON lines: image, prompt, objects with "
        "mask, motion, motion_text, reference, reference_mask; method; settings)\n"
        "several processes: accelerate launch -m fleximmt evaluate ...",
    )
    ev.add_argument("--manifest", required=True, help="JSON-lines benchmark file, one case a line")
    ev.add_argument("--out", required=True, help="results folder (cases/*.json, videos/, summary.md, summary.csv)")
    ev.add_argument(
        "--steps", type=_positive_int, help="denoising steps for cases that do not set their own (default: 50)"
    )
    ev.add_argument(
        "--clip",
        help="CLIP model (hub id or folder) for AC/TC/TS, e.g. openai/clip-vit-base-patch32; "
        "without it those columns stay empty",
    )
    ev.add_argument(
        "--mask-propagation",
        default="flow",
        choices=["flow", "sam2"],
        help="per-frame object masks for FF: optical flow (offline) or SAM 2 (the release; weights "
        "needed) (default: %(default)s)",
    )
    ev.add_argument(
        "--flow",
        default="dis",
        choices=["dis", "raft"],
        help="FF's optical flow: OpenCV DIS (offline) or RAFT-large, 20 iterations (the release; needs "
        "torchvision and RAFT_CHECKPOINT or torchvision's weights) (default: %(default)s)",
    )
    ev.add_argument(
        "--tracker",
        default="lk",
        choices=["lk", "cotracker"],
        help="TF's point tracker: OpenCV Lucas-Kanade (offline) or CoTracker (the release; "
        "COTRACKER_CHECKPOINT) (default: %(default)s)",
    )
    add_model_options(ev)
    ev.set_defaults(func=cmd_evaluate)

    from .rate import add_cli as add_rate_commands

    add_rate_commands(sub)

    from .app import add_cli as add_app_command

    add_app_command(sub, load_pipeline, add_model_options)

    ins = sub.add_parser(
        "inspect",
        help="show a motion file's shape and metadata",
        epilog=EXAMPLES["inspect"],
        formatter_class=formatter,
        description="Print a motion file's blocks, tokens, width and training metadata.",
    )
    ins.add_argument("motion", help="a .safetensors motion file")
    ins.add_argument("--json", action="store_true", help="print JSON")
    ins.set_defaults(func=cmd_inspect)

    demo = sub.add_parser(
        "demo",
        help="learn two motions and transfer them on the shipped toy model",
        epilog=EXAMPLES["demo"],
        formatter_class=formatter,
        description="On the toy model that ships with fleximmt: learn two motions from bundled "
        "reference videos (or reuse those in OUT/motions), move the two objects of a "
        "bundled image with them, and compare FlexiMMT with motion tokens without "
        "masks and with plain image-to-video. Writes fleximmt.mp4, masks.mp4, "
        "side_by_side.gif and metrics.json. --model tiny runs every stage on a tiny "
        "RANDOM-weight model instead (its video is noise).",
    )
    demo.add_argument("--out", default="demo-output", help="output folder (default: %(default)s)")
    demo.add_argument(
        "--model", choices=[TOY, TINY], default=TOY, help="toy (trained) or tiny (random) (default: %(default)s)"
    )
    demo.add_argument("--steps", type=_positive_int, help="denoising steps (default: 20 on toy, 10 on tiny)")
    demo.add_argument(
        "--train-steps", type=_positive_int, default=300, help="training steps per motion on toy (default: %(default)s)"
    )
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        args.func(args)
    except (ValueError, OSError) as err:  # bad input (FlexiMMTInputError is a ValueError), missing/unwritable files
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
