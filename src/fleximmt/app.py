"""``fleximmt app``: multi-object motion transfer in the browser (Gradio).

The model loads once per server; requests queue. Transfer tab: an image, up to ``SLOTS``
objects (each drawn with a brush, uploaded as a PNG, clicked for SAM, or named for
Grounding-DINO + SAM when those weights are given), a motion per object from the library or an
uploaded file, a prompt with each object's motion words highlighted, a preview of the masks on the
latent token grid, then the video and the mask-propagation overlay. Learn tab: a reference video
and its words in, a motion in the library out, with a progress bar and a loss curve.
"""

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import FlexiMMTInputError
from .masks import mask_to_token_grid
from .motion import MotionTokens, ObjectMotion, load_mask
from .video import PALETTE, mask_overlay, save_video

logger = logging.getLogger(__name__)
SLOTS = 3
MASK_MODES = ("draw", "png", "points", "words")


# -- the motion library ------------------------------------------------------------------------
@dataclass
class LibraryEntry:
    name: str
    path: Path
    motion_words: str
    caption: str
    preview: Path | None


class MotionLibrary:
    """Motion files in a folder, each with an optional ``<name>.gif`` preview of its reference."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def entries(self) -> list[LibraryEntry]:
        out = []
        for path in sorted(self.folder.glob("*.safetensors")):
            if path.name.endswith((".ckpt.safetensors", ".latents.safetensors")):
                continue
            try:
                meta = MotionTokens.load(path).metadata
            except FlexiMMTInputError as err:
                logger.warning("skipping %s: %s", path, err)
                continue
            gif = path.with_suffix(".gif")
            out.append(LibraryEntry(path.stem, path, meta.get("motion_words") or "", meta.get("caption") or "",
                                    gif if gif.is_file() else None))  # fmt: skip
        return out

    def get(self, name: str) -> LibraryEntry:
        for entry in self.entries():
            if entry.name == name:
                return entry
        raise FlexiMMTInputError(f"motion {name!r} is not in the library {str(self.folder)!r}")


# -- pure helpers (tested without a browser) ---------------------------------------------------
def motion_metadata(motion: MotionTokens) -> str:
    """A motion file's metadata as one Markdown line (caption, words, shape, training steps)."""
    meta = motion.metadata
    blocks, d_m, dim = motion.tokens.shape
    parts = [f"caption: *{meta['caption']}*" if meta.get("caption") else None,
             f"concept: `{meta['concept_words']}`" if meta.get("concept_words") else None,
             f"motion words: `{meta['motion_words']}`" if meta.get("motion_words") else None,
             f"{blocks} blocks x {d_m} tokens x {dim}",
             f"{meta['steps']} training steps" if meta.get("steps") else None]  # fmt: skip
    return " · ".join(p for p in parts if p)
def highlight(prompt: str, motion_words: list[str]) -> list[tuple[str, str | None]]:
    """The prompt split into (text, label) pieces, each object's motion words labelled."""
    spans = []
    for k, words in enumerate(motion_words):
        if words and words in prompt:
            start = prompt.index(words)
            while any(s < start + len(words) and start < e for s, e, _ in spans) and words in prompt[start + 1 :]:
                start = prompt.index(words, start + 1)
            spans.append((start, start + len(words), f"object {k + 1}"))
    pieces, pos = [], 0
    for start, end, label in sorted(spans):
        if start < pos:
            continue
        pieces += [(prompt[pos:start], None), (prompt[start:end], label)]
        pos = end
    pieces.append((prompt[pos:], None))
    return [p for p in pieces if p[0]]


def drawn_mask(editor_value) -> np.ndarray | None:
    """The brush strokes of a Gradio ImageEditor value as a bool mask (None when nothing is drawn)."""
    if not editor_value or not editor_value.get("layers"):
        return None
    layers = [np.asarray(layer) for layer in editor_value["layers"] if layer is not None]
    if not layers:
        return None
    alpha = [layer[..., 3] if layer.ndim == 3 and layer.shape[-1] == 4 else layer.any(-1) for layer in layers]
    mask = np.any([a > 0 for a in alpha], axis=0)
    return mask if mask.any() else None


def grid_preview(image: np.ndarray, masks: list[torch.Tensor], grid_h: int, grid_w: int, scale: int = 4) -> np.ndarray:
    """The objects' masks on the latent token grid, tinted over the image (what MDMA sees at frame 1)."""
    height, width = image.shape[:2]
    grids = torch.stack([mask_to_token_grid(m, grid_h, grid_w) for m in masks])[:, None]  # [K, 1, h, w]
    tinted = mask_overlay(image[None], grids, temporal_factor=4)[0]
    big = np.asarray(Image.fromarray(tinted).resize((width * scale // 2 or width, height * scale // 2 or height), Image.NEAREST))
    return big


# -- the app -----------------------------------------------------------------------------------
class TransferApp:
    """Everything the page calls, around one pipeline loaded once."""

    def __init__(self, pipe, library: MotionLibrary, out_dir: Path, segmenter=None, detector=None):
        self.pipe, self.library, self.out_dir = pipe, library, out_dir
        self.segmenter, self.detector = segmenter, detector
        out_dir.mkdir(parents=True, exist_ok=True)

    def object_mask(self, image: np.ndarray, mode: str, editor, png, points: str, words: str, k: int) -> torch.Tensor:
        height, width = image.shape[:2]
        if mode == "draw":
            mask = drawn_mask(editor)
            if mask is None:
                raise FlexiMMTInputError(f"object {k}: draw its mask with the brush, or choose another way to give it")
            mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.NEAREST)) > 127
            return torch.from_numpy(mask)
        if mode == "png":
            if png is None:
                raise FlexiMMTInputError(f"object {k}: upload its mask PNG")
            return load_mask(png)
        from . import segment

        if mode == "points":
            if self.segmenter is None:
                raise FlexiMMTInputError("clicking objects needs SAM: start the app with --sam PATH")
            coords = [list(map(float, p.split(","))) for p in points.replace(";", " ").split()]
            box = [c for c in coords if len(c) == 4]
            clicks = [c for c in coords if len(c) == 2]
            return segment.masks_from_points(image, points=clicks or None, boxes=box[:1] or None, segmenter=self.segmenter)[0]
        if self.segmenter is None or self.detector is None:
            raise FlexiMMTInputError("naming objects needs Grounding-DINO and SAM: start the app with --detector and --sam")
        return segment.masks_from_words(image, [words], detector=self.detector, segmenter=self.segmenter)[0]

    def motion(self, choice: str | None, upload) -> MotionTokens:
        if upload is not None:
            return MotionTokens.load(upload)
        if not choice:
            raise FlexiMMTInputError("choose a motion from the library or upload a motion file")
        return MotionTokens.load(self.library.get(choice).path)

    def objects(self, image, slots: list[tuple]) -> list[ObjectMotion]:
        objects = []
        for k, (use, mode, editor, png, points, words, choice, upload, motion_words) in enumerate(slots, 1):
            if not use:
                continue
            mask = self.object_mask(image, mode, editor, png, points, words, k)
            objects.append(ObjectMotion(mask, self.motion(choice, upload), motion_words or ""))
        return objects

    def preview(self, image, slots) -> np.ndarray:
        if image is None:
            raise FlexiMMTInputError("upload an image first")
        objects = self.objects(image, slots)
        grid = self.pipe.token_grid(*self.pipe.default_size())
        return grid_preview(image, [o.mask_tensor for o in objects], grid.height, grid.width)

    def generate(self, image, prompt: str, slots, steps: int, seed: int, progress=None) -> tuple[str, str]:
        if image is None:
            raise FlexiMMTInputError("upload an image first")
        objects = self.objects(image, slots)
        height, width, _ = self.pipe.default_size()
        picture = Image.fromarray(image).convert("RGB")
        if picture.size != (width, height):
            picture = picture.resize((width, height))
            for obj in objects:
                obj._mask = torch.from_numpy(np.asarray(Image.fromarray(obj.mask_tensor.numpy().astype(np.uint8) * 255)
                                                        .resize((width, height), Image.NEAREST)) > 127)  # fmt: skip
        def on_step(pipe, step, timestep, callback_kwargs):
            if progress is not None:
                progress((step + 1) / int(steps), desc=f"denoising step {step + 1}/{int(steps)}")
            return {}

        result = self.pipe(image=picture, prompt=prompt, objects=objects, num_inference_steps=int(steps),
                           generator=torch.Generator().manual_seed(int(seed)), output_type="np", return_masks=bool(objects),
                           max_sequence_length=self.pipe.transformer.config.max_text_seq_length,
                           callback_on_step_end=on_step)  # fmt: skip
        folder = Path(tempfile.mkdtemp(dir=self.out_dir))
        video = save_video(result.frames[0], folder / "fleximmt.mp4")
        overlay = video
        if objects:
            overlay = save_video(mask_overlay(result.frames[0], result.masks[0, -1],
                                              frame_index=self.pipe.mask_frame_index(len(result.frames[0]))),
                                 folder / "masks.mp4")  # fmt: skip
        return str(video), str(overlay)

    def learn(self, video, caption, concept, motion_words, name, steps: int, tokens: int, on_step=None) -> LibraryEntry:
        from .data import read_video
        from .train import train_motion

        if video is None:
            raise FlexiMMTInputError("upload a reference video")
        name = (name or Path(video).stem).strip().replace("/", "_")
        output = self.library.folder / f"{name}.safetensors"
        train_motion(self.pipe, video, caption, concept, motion_words, output, steps=int(steps),
                     tokens_per_motion=int(tokens), callback=on_step)  # fmt: skip
        frames, _ = read_video(video)
        save_video(frames[:: max(1, len(frames) // 24)], output.with_suffix(".gif"))
        return self.library.get(name)


def build_app(pipe, motions_dir: str | Path, segmenter=None, detector=None, examples: list[str | Path] | None = None):
    """The Gradio Blocks of the app; ``examples`` are image files offered as bundled examples."""
    import gradio as gr

    app = TransferApp(pipe, MotionLibrary(motions_dir), Path(tempfile.mkdtemp(prefix="fleximmt-app-")), segmenter, detector)
    height, width, frames = pipe.default_size()

    def library_choices():
        return [e.name for e in app.library.entries()]

    def safely(fn):
        def run(*args):
            try:
                return fn(*args)
            except (FlexiMMTInputError, ValueError) as err:
                raise gr.Error(str(err)) from None

        return run

    with gr.Blocks(title="FlexiMMT") as demo:
        gr.Markdown(f"# FlexiMMT\nMake the objects of an image move, each with its own motion. "
                    f"Model: `{getattr(pipe, 'name_or_path', '') or 'built-in'}` ({width}x{height}, {frames} frames).")  # fmt: skip
        with gr.Tab("Transfer"):
            with gr.Row():
                image = gr.Image(label="Image", type="numpy", elem_id="image", height=256)
                preview = gr.Image(label="Masks on the latent grid", type="numpy", interactive=False, elem_id="preview", height=256)
            if examples:
                gr.Examples([[str(p)] for p in examples], inputs=[image], label="bundled example images")
            prompt = gr.Textbox(label="Prompt (each object's motion words must appear in it)", elem_id="prompt")
            highlighted = gr.HighlightedText(label="Motion words in the prompt", elem_id="highlight",
                                             color_map={f"object {k + 1}": "#%02x%02x%02x" % tuple(int(c) for c in PALETTE[k])
                                                        for k in range(SLOTS)})  # fmt: skip
            slots = []
            for k in range(1, SLOTS + 1):
                with gr.Accordion(f"Object {k}", open=k <= 2):
                    use = gr.Checkbox(label="use this object", value=k <= 2, elem_id=f"use_{k}")
                    mode = gr.Radio(list(MASK_MODES), value="png" if k > 0 else "draw", label="mask from",
                                    elem_id=f"mode_{k}")  # fmt: skip
                    with gr.Row():
                        editor = gr.ImageEditor(label="draw the mask", type="numpy", elem_id=f"editor_{k}", height=256)
                        png = gr.File(label="mask PNG", file_types=[".png"], type="filepath", elem_id=f"png_{k}")
                    points = gr.Textbox(label="clicks 'x,y x,y' or a box 'x0,y0,x1,y1' (SAM)", elem_id=f"points_{k}")
                    words = gr.Textbox(label="object's name (Grounding-DINO + SAM)", elem_id=f"words_{k}")
                    with gr.Row():
                        choice = gr.Radio(library_choices(), label="motion from the library", elem_id=f"motion_{k}")
                        upload = gr.File(label="or a motion file", file_types=[".safetensors"], type="filepath",
                                         elem_id=f"motion_file_{k}")  # fmt: skip
                        motion_preview = gr.Image(label="reference", interactive=False, height=128)
                    motion_info = gr.Markdown(elem_id=f"motion_info_{k}")
                    motion_words = gr.Textbox(label="motion words (from the motion file; edit to match the prompt)",
                                              elem_id=f"motion_words_{k}")  # fmt: skip

                    def on_choice(name, prompt_text):
                        entry = app.library.get(name) if name else None
                        info = motion_metadata(MotionTokens.load(entry.path)) if entry else ""
                        return (entry.motion_words if entry else "", str(entry.preview) if entry and entry.preview else None,
                                info)  # fmt: skip

                    def on_upload(path):
                        if not path:
                            return "", ""
                        try:
                            motion = MotionTokens.load(path)
                        except (FlexiMMTInputError, ValueError) as err:
                            raise gr.Error(str(err)) from None
                        return motion.metadata.get("motion_words") or "", motion_metadata(motion)

                    choice.change(on_choice, [choice, prompt], [motion_words, motion_preview, motion_info])
                    upload.change(on_upload, upload, [motion_words, motion_info])
                slots.append((use, mode, editor, png, points, words, choice, upload, motion_words))
            with gr.Row():
                steps = gr.Slider(1, 100, value=50 if frames > 17 else 10, step=1, label="denoising steps")
                seed = gr.Number(value=0, precision=0, label="seed")
            with gr.Row():
                show = gr.Button("Show masks", elem_id="show_masks")
                go = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Row():
                video = gr.Video(label="FlexiMMT video", elem_id="video_out", height=256)
                overlay = gr.Video(label="propagated masks", elem_id="overlay_out", height=256)
            flat = [c for slot in slots for c in slot]

            def unpack(values):
                return [tuple(values[i : i + 9]) for i in range(0, len(values), 9)]

            def on_image(img):
                return [gr.update(value={"background": img, "layers": [], "composite": img}) for _ in range(SLOTS)]

            def on_words(text, *mw):
                return highlight(text or "", list(mw))

            image.change(on_image, image, [s[2] for s in slots])  # an upload or a bundled example
            for box in [prompt, *[s[8] for s in slots]]:
                box.change(on_words, [prompt, *[s[8] for s in slots]], highlighted)
            show.click(safely(lambda img, *v: app.preview(img, unpack(v))), [image, *flat], preview)
            def on_generate(img, text, n, s, *v, progress=gr.Progress()):
                return app.generate(img, text, unpack(v), n, s, progress)

            go.click(safely(on_generate), [image, prompt, steps, seed, *flat], [video, overlay])
        with gr.Tab("Learn"):
            gr.Markdown("Train a motion on one reference video of one moving object; it joins the library.")
            ref = gr.Video(label="reference video", sources=["upload"], elem_id="ref_video")
            caption = gr.Textbox(label="caption", placeholder="A man is doing yoga.", elem_id="caption")
            with gr.Row():
                concept = gr.Textbox(label="concept words (the object)", placeholder="man", elem_id="concept")
                learn_words = gr.Textbox(label="motion words", placeholder="is doing yoga", elem_id="learn_words")
                name = gr.Textbox(label="motion name", placeholder="yoga", elem_id="motion_name")
            with gr.Row():
                learn_steps = gr.Slider(10, 2000, value=200, step=10, label="training steps")
                tokens = gr.Slider(4, 226, value=226 if frames > 17 else 16, step=1, label="motion tokens per block")
            train = gr.Button("Learn the motion", variant="primary", elem_id="learn")
            curve = gr.LinePlot(x="step", y="loss", label="training loss", elem_id="loss_curve")
            learned = gr.Markdown(elem_id="learned")

            def on_learn(video_path, cap, con, words_, nm, n, tok, progress=gr.Progress()):
                import pandas as pd

                losses = []

                def on_step(step, loss):
                    losses.append((step, loss))
                    progress(step / n, desc=f"step {step}/{int(n)}, loss {loss:.4f}")

                try:
                    entry = app.learn(video_path, cap, con, words_, nm, n, tok, on_step)
                except (FlexiMMTInputError, ValueError) as err:
                    raise gr.Error(str(err)) from None
                frame = pd.DataFrame(losses, columns=["step", "loss"])
                updates = [gr.update(choices=library_choices()) for _ in range(SLOTS)]
                return [frame, f"Learned **{entry.name}** ({entry.path}); it is in the library now.", *updates]

            train.click(on_learn, [ref, caption, concept, learn_words, name, learn_steps, tokens],
                        [curve, learned, *[s[6] for s in slots]])  # fmt: skip
    demo.fleximmt = app
    return demo


def add_cli(subparsers, load_pipeline, add_model_options) -> None:
    import argparse

    parser = subparsers.add_parser(
        "app", help="the web app: transfer motions and learn new ones in the browser",
        description="Serve the FlexiMMT web app. The model loads once; requests queue. Binds to 127.0.0.1 "
                    "unless --host says otherwise.", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  fleximmt app                       (the toy model that ships with fleximmt; runs on a CPU)\n"
               "  fleximmt app --model tiny --motions motions/   (a tiny RANDOM-weight model)\n"
               "  fleximmt app --model THUDM/CogVideoX-5b-I2V --sam facebook/sam-vit-base "
               "--detector IDEA-Research/grounding-dino-tiny",
    )  # fmt: skip
    parser.add_argument("--motions", default="motions", help="the motion library folder (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    parser.add_argument("--sam", help="SAM (hub id or folder) for clicked or named objects")
    parser.add_argument("--detector", help="Grounding-DINO (hub id or folder) for named objects")
    add_model_options(parser)
    parser.set_defaults(model="toy")

    def run(args):
        pipe = load_pipeline(args)
        examples = None
        if args.model == "toy":
            from .toy.lab import EXAMPLE_DIR

            examples = sorted(EXAMPLE_DIR.glob("*.png"))
        demo = build_app(pipe, args.motions, args.sam, args.detector, examples)
        demo.queue().launch(server_name=args.host, server_port=args.port)

    parser.set_defaults(func=run)
