"""``fleximmt app``: multi-object motion transfer in the browser (Gradio), and over HTTP for scripts.

The model loads once per server. Transfer tab: an image, up to ``SLOTS`` objects (each drawn with
a brush, uploaded as a PNG, clicked for SAM, or named for Grounding-DINO + SAM when those weights
are given), a motion per object from the library or an uploaded file, a prompt with each object's
motion words highlighted, a preview of the masks on the latent token grid, then the video and the
mask-propagation overlay. Learn tab: a reference video and its words in, a motion in the library
out, with a progress bar and a loss curve.

How the server behaves (docs/web-apps.md):

- **One run at a time.** Every generation and every training runs in one worker thread
  (:class:`ModelWorker`), in the order they come. Stop (or a client that cancels, closes its page
  or goes away) ends a run at its next denoising or training step; a run cancelled while it waits
  never starts. A stopped training keeps its last checkpoint, and Learn with the same name and
  settings continues from it.
- **Images.** Any image up to ``MAX_IMAGE_PIXELS`` opens; the image and every mask are resized
  together to the model's size (the aspect ratio changes when it differs; the page says so). A mask
  PNG must have the image's size. Uploads are capped (:func:`upload_limit`).
- **Disk.** The app keeps the video files of its last two runs (Gradio serves its own copy of
  each); Gradio's copies of uploads and results are removed ``keep_files`` seconds after they were
  made, and everything at shutdown, with the folders Gradio kept them in (:mod:`.gradio_cache`).
- **API.** ``/generate``, ``/show_masks`` and ``/learn`` are named endpoints whose inputs have
  names (``image``, ``prompt``, ``object_1_mask_png``, ...); the page's other events are private.
  They check what they are sent as the page's widgets would: whole step counts up to the page's
  limits (``max_steps``), and every message about one object starts "Object k: ".
"""

import asyncio
import concurrent.futures
import contextvars
import inspect
import logging
import re
import shutil
import signal
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import FlexiMMTInputError, ObjectInputError
from ..evaluation.video import PALETTE, grid_preview, mask_overlay, save_video
from ..method.kernels import DEFAULT_KERNEL, MASK_KERNELS
from ..method.motion import MotionTokens, ObjectMotion, check_motion_name, load_mask, motion_metadata
from .gradio_cache import cache_entries, remove_empty_folders, remove_served_files

logger = logging.getLogger(__name__)
SLOTS = 3
MASK_MODES = ("draw", "png", "points", "words")
MAX_IMAGE_PIXELS = 50_000_000  # what the app opens; PIL itself refuses beyond 2 x 89 megapixels
MIN_UPLOAD_BYTES = 200 * 2**20  # the upload cap: this, or more when the model's motion files are larger
KEEP_FILES_S = 3600  # uploads and results stay this long (seconds), then go
QUEUE_SIZE = 32  # requests waiting beyond this are refused ("queue is full")
MAX_STEPS = 100  # denoising steps a run may take, on the page and over the API (serve's max_steps, --max-steps)
MAX_TRAIN_STEPS, MAX_TOKENS = 2000, 226  # Learn's training steps and motion tokens per block, page and API


# -- images: read with limits, fit to the model ---------------------------------------------
def declared_size(path: str | Path) -> tuple[int, int] | None:
    """The ``(width, height)`` an image file's header declares, read as ``Image.open`` reads it but
    without PIL's decompression-bomb guard (no pixel is decoded); None when no PIL plugin reads it."""
    Image.init()
    with open(path, "rb") as fp:
        prefix = fp.read(16)
        for format_id in Image.ID:  # the plugins PIL registered (Image.register_open), in its order
            factory, accept = Image.OPEN[format_id]
            accepted = accept(prefix) if accept else True
            if not accepted or isinstance(accepted, str):
                continue
            fp.seek(0)
            try:
                return factory(fp, str(path)).size
            except Exception:
                continue
    return None


def read_image(path: str | Path, what: str = "the image", header_only: bool = False) -> Image.Image:
    """Open an image file (EXIF rotation applied) if it has at most ``MAX_IMAGE_PIXELS`` pixels;
    ``header_only`` checks it without decoding the pixels (the result then has only a ``size``)."""
    name = Path(path).name

    def too_large(size: tuple[int, int] | None) -> FlexiMMTInputError:
        shape = f"is {size[0]} x {size[1]} pixels" if size else "is too large to open"
        return FlexiMMTInputError(
            f"{what} ({name}) {shape}: this app takes images of at most "
            f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels; scale it down first"
        )

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, before decoding
            with Image.open(path) as img:
                width, height = img.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise too_large((width, height))
                if header_only:
                    orientation = img.getexif().get(0x0112, 1)  # EXIF rotations by 90 degrees swap the sides
                    return Image.new("1", (height, width) if orientation in (5, 6, 7, 8) else (width, height))
                img.load()
                return ImageOps.exif_transpose(img)
    except Image.DecompressionBombError:  # PIL's own guard, raised while reading the header: read its size past it
        raise too_large(declared_size(path)) from None
    except FlexiMMTInputError:
        raise
    except (OSError, SyntaxError, ValueError):
        raise FlexiMMTInputError(f"{what} ({name}) is not an image this app can read: give a PNG or JPEG") from None


def size_note(image_size: tuple[int, int], model_size: tuple[int, int]) -> str:
    """What happens to an image of ``(width, height)`` on a model of ``(width, height)``: the rule, for the page."""
    (w, h), (mw, mh) = image_size, model_size
    if (w, h) == (mw, mh):
        return f"The image is {w} x {h}, the model's own size: it is used as it is."
    note = f"The image is {w} x {h}; the model makes {mw} x {mh} videos, so the image and its masks are resized to {mw} x {mh} together"
    if abs(w / h - mw / mh) > 0.01:
        note += f": the picture is stretched (aspect ratio {w / h:.2f} becomes {mw / mh:.2f})"
    return note + f". Mask PNGs must be {w} x {h}, like the image."


def fit_to_model(
    image: np.ndarray, masks: list[torch.Tensor], width: int, height: int
) -> tuple[Image.Image, list[torch.Tensor]]:
    """The image (bicubic) and its masks (nearest), resized together to the model's ``width x height``."""
    picture = Image.fromarray(image).convert("RGB")
    if picture.size == (width, height):
        return picture, masks
    resized = [
        torch.from_numpy(
            np.asarray(Image.fromarray(m.numpy().astype(np.uint8) * 255).resize((width, height), Image.NEAREST)) > 127
        )
        for m in masks
    ]
    return picture.resize((width, height), Image.BICUBIC), resized


def whole_number(value: Any, name: str, low: int, high: int, what: str) -> int:
    """``value`` (as an API call sends it: a JSON number) as an int, if it is a whole number from
    ``low`` to ``high``; ``name`` and ``what`` say what it counts in the message otherwise."""
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if number is None or not np.isfinite(number) or number != int(number) or not low <= number <= high:
        raise FlexiMMTInputError(f"{name}={value!r}: give a whole number of {what} from {low} to {high}")
    return int(number)


def numbered(k: int, err: FlexiMMTInputError) -> FlexiMMTInputError:
    """``err`` as a message about the page's object ``k`` ("Object k: ..."), numbered once."""
    message = str(err)
    return err if message.startswith(f"Object {k}: ") else FlexiMMTInputError(f"Object {k}: {message}")


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
            out.append(
                LibraryEntry(
                    path.stem,
                    path,
                    meta.get("motion_words") or "",
                    meta.get("caption") or "",
                    gif if gif.is_file() else None,
                )
            )
        return out

    def get(self, name: str) -> LibraryEntry:
        entries = self.entries()
        for entry in entries:
            if entry.name == name:
                return entry
        names = ", ".join(e.name for e in entries) or "none yet"
        raise FlexiMMTInputError(
            f"motion {name!r} is not in the motion library (it has: {names}): choose one of them or upload a motion file"
        )


# -- pure helpers (tested without a browser) ---------------------------------------------------
def highlight(prompt: str, motion_words: list[str]) -> list[tuple[str, str | None]]:
    """The prompt split into (text, label) pieces, each object's motion words labelled "Object k"."""
    spans = []
    for k, words in enumerate(motion_words):
        if words and words in prompt:
            start = prompt.index(words)
            while any(s < start + len(words) and start < e for s, e, _ in spans) and words in prompt[start + 1 :]:
                start = prompt.index(words, start + 1)
            spans.append((start, start + len(words), f"Object {k + 1}"))
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


def hide_paths(message: str, folders: list[str | Path]) -> str:
    """``message`` with every path under one of ``folders`` replaced by its file name (no server paths for users)."""
    for folder in sorted({str(Path(f)) for f in folders}, key=len, reverse=True):
        message = re.sub(re.escape(folder) + r"[^\s'\"]*", lambda m: Path(m.group(0)).name, message)
    return message


@dataclass
class ObjectInput:
    """One object as the page (or an API call) gives it: ``object_<k>_<field>`` in ``/generate``."""

    use: bool = True
    mask_from: str = "png"  # one of MASK_MODES
    brush: dict | None = None  # an ImageEditor value: {"layers": [RGBA arrays], ...}
    mask_png: str | None = None  # path of a PNG of the image's size
    points: str = ""  # SAM: clicks "x,y x,y" or a box "x0,y0,x1,y1"
    name: str = ""  # Grounding-DINO + SAM: the object's name
    motion: str | None = None  # a motion of the library, by name
    motion_file: str | None = None  # or the path of an uploaded motion file
    motion_words: str = ""  # the prompt's words for this object's motion


OBJECT_FIELDS = tuple(f.name for f in fields(ObjectInput))


def with_object_parameters(fn: Callable) -> Callable:
    """``fn(..., **objects)`` declared with a keyword parameter ``object_<k>_<field>=None`` for every
    object and field of :class:`ObjectInput`: the API lists each by name, and each may be left out."""
    signature = inspect.signature(fn)
    params = [p for p in signature.parameters.values() if p.kind != p.VAR_KEYWORD]
    params += [
        inspect.Parameter(f"object_{k}_{f}", inspect.Parameter.KEYWORD_ONLY, default=None)
        for k in range(1, SLOTS + 1)
        for f in OBJECT_FIELDS
    ]
    fn.__signature__ = signature.replace(parameters=params)
    return fn


# -- one model, one run at a time ---------------------------------------------------------------
class Cancelled(Exception):
    """A run stopped because its client cancelled it or went away."""


class ModelWorker:
    """Runs every job on the model in one thread, one at a time, in the order they come.

    :meth:`run` hands a job a :class:`threading.Event` that is set when the caller is cancelled
    (asyncio cancellation: Gradio's Stop and ``/cancel``) or ``client_gone()`` becomes true; the
    job checks it at each step and raises :class:`Cancelled`. A job cancelled before it starts
    never starts. ``runs`` counts the jobs started, ``stop_requests`` the jobs asked to stop,
    ``cancelled`` the jobs that stopped early."""

    def __init__(self, poll_s: float = 0.5):
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleximmt-model")
        self.poll_s = poll_s
        self.runs = self.stop_requests = self.cancelled = 0
        self._stops: set[threading.Event] = set()  # of the jobs not yet finished

    def _execute(self, job: Callable[[threading.Event], Any], stop: threading.Event) -> tuple[bool, Any]:
        if stop.is_set():
            return False, None
        self.runs += 1
        try:
            return True, job(stop)
        except Cancelled:
            self.cancelled += 1
            return False, None  # the exception and the run's tensors go with this frame
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    async def run(
        self, job: Callable[[threading.Event], Any], client_gone: Callable[[], bool] = lambda: False
    ) -> tuple[bool, Any]:
        """``(True, result)`` of ``job(stop)``, or ``(False, None)`` when it was stopped."""
        stop = threading.Event()
        self._stops.add(stop)
        context = contextvars.copy_context()  # Gradio's progress bar finds its event through it
        waiting = asyncio.wrap_future(self._pool.submit(context.run, self._execute, job, stop))
        waiting.add_done_callback(
            lambda f: f.cancelled() or f.exception()
        )  # an abandoned job's error is not logged as lost
        waiting.add_done_callback(lambda _: self._stops.discard(stop))
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=self.poll_s)
                if done:
                    return waiting.result()
                if not stop.is_set() and client_gone():
                    logger.info("client went away: stopping its run")
                    self._stop(stop)
        except asyncio.CancelledError:
            self._stop(stop)
            raise

    def _stop(self, stop: threading.Event) -> None:
        if not stop.is_set():
            self.stop_requests += 1
            stop.set()

    def shutdown(self) -> None:
        """Stop every job at its next step and take no more."""
        for stop in list(self._stops):
            self._stop(stop)
        self._pool.shutdown(wait=False, cancel_futures=True)


def _gradio_client_gone() -> Callable[[], bool]:
    """For the running Gradio event: has its client gone (closed the page, dropped the connection)?
    Gradio marks such an event not ``alive`` but lets its function run on; this reads that flag."""
    from gradio.context import LocalContext

    blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
    events = getattr(getattr(blocks, "_queue", None), "event_ids_to_events", None)
    if events is None or event_id is None:
        return lambda: False

    def gone() -> bool:
        event = events.get(event_id)
        return event is not None and not getattr(event, "alive", True)

    return gone


# -- the app -----------------------------------------------------------------------------------
class TransferApp:
    """Everything the page calls, around one pipeline loaded once. ``generate`` and ``learn`` use
    the model and run on :attr:`worker` when called from the page; ``stop`` ends them at a step."""

    def __init__(
        self,
        pipe,
        library: MotionLibrary,
        out_dir: Path,
        segmenter=None,
        detector=None,
        keep_runs: int = 2,
        max_steps: int = MAX_STEPS,
    ):
        self.pipe, self.library, self.out_dir = pipe, library, Path(out_dir)
        self.segmenter, self.detector = segmenter, detector
        self.keep_runs, self.max_steps = keep_runs, max_steps
        self.worker = ModelWorker()
        self.out_dir.mkdir(parents=True, exist_ok=True)

    @property
    def model_size(self) -> tuple[int, int]:
        """(width, height) of the videos the model makes."""
        height, width, _ = self.pipe.default_size()
        return width, height

    def object_mask(self, image: np.ndarray, obj: ObjectInput, k: int) -> torch.Tensor:
        height, width = image.shape[:2]
        if obj.mask_from not in MASK_MODES:
            raise FlexiMMTInputError(f"Object {k}: mask_from {obj.mask_from!r} is not one of {', '.join(MASK_MODES)}")
        if obj.mask_from == "draw":
            mask = drawn_mask(obj.brush)
            if mask is None:
                raise FlexiMMTInputError(f"Object {k}: draw its mask with the brush, or choose another way to give it")
            if mask.shape != (height, width):  # strokes are drawn over the image as shown
                mask = (
                    np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.NEAREST))
                    > 127
                )
            return torch.from_numpy(mask)
        if obj.mask_from == "png":
            if not obj.mask_png:
                raise FlexiMMTInputError(f"Object {k}: upload its mask PNG (white object on black, the image's size)")
            mask = load_mask(read_image(obj.mask_png, "its mask PNG"))
            if tuple(mask.shape) != (height, width):
                raise FlexiMMTInputError(
                    f"Object {k}: the mask PNG is {mask.shape[1]} x {mask.shape[0]} but the image is {width} x {height}: "
                    "give a mask of the image's size (image and masks are resized to the model together)"
                )
            return mask
        from ..evaluation import segment

        if obj.mask_from == "points":
            if self.segmenter is None:
                raise FlexiMMTInputError(f"Object {k}: clicking objects needs SAM: start the app with --sam PATH")
            try:
                coords = [[float(v) for v in p.split(",")] for p in obj.points.replace(";", " ").split()]
            except ValueError:
                coords = []
            box = [c for c in coords if len(c) == 4]
            clicks = [c for c in coords if len(c) == 2]
            if not (box or clicks) or len(box) + len(clicks) != len(coords):
                raise FlexiMMTInputError(
                    f"Object {k}: give clicks as 'x,y x,y' or a box as 'x0,y0,x1,y1' (pixels), not {obj.points!r}"
                )
            return segment.masks_from_points(
                image, points=clicks or None, boxes=box[:1] or None, segmenter=self.segmenter
            )[0]
        if self.segmenter is None or self.detector is None:
            raise FlexiMMTInputError(
                f"Object {k}: naming objects needs Grounding-DINO and SAM: start the app with --detector and --sam"
            )
        if not obj.name.strip():
            raise FlexiMMTInputError(f"Object {k}: type the object's name, e.g. 'the red square'")
        return segment.masks_from_words(image, [obj.name], detector=self.detector, segmenter=self.segmenter)[0]

    def motion(self, obj: ObjectInput, k: int) -> MotionTokens:
        if obj.motion_file:
            return MotionTokens.load(obj.motion_file)
        if not obj.motion:
            raise FlexiMMTInputError(f"Object {k}: choose a motion from the library or upload a motion file")
        return MotionTokens.load(self.library.get(obj.motion).path)

    def objects(self, image: np.ndarray, inputs: list[ObjectInput]) -> dict[int, ObjectMotion]:
        """The used objects by their number on the page (from 1); every message about one starts "Object k: "."""
        objects = {}
        for k, obj in enumerate(inputs, 1):
            if not obj.use:
                continue
            try:
                mask = self.object_mask(image, obj, k)
                if not mask.any():
                    raise FlexiMMTInputError(
                        "its mask is empty, so its motion would move nothing: mark the object (white "
                        "on black in a PNG, or with the brush), or untick 'use this object'"
                    )
                motion = self.motion(obj, k)
            except FlexiMMTInputError as err:
                raise numbered(k, err) from None
            if not (obj.motion_words or "").strip():
                suggestion = motion.metadata.get("motion_words")
                hint = f" (its motion file says {suggestion!r})" if suggestion else ""
                raise FlexiMMTInputError(
                    f"Object {k}: type its motion words, the words of the prompt that describe how it "
                    f"moves, e.g. 'jumps up'{hint}"
                )
            objects[k] = ObjectMotion(mask, motion, obj.motion_words.strip())
        return objects

    def fitted(
        self, image: np.ndarray, objects: dict[int, ObjectMotion]
    ) -> tuple[Image.Image, dict[int, ObjectMotion]]:
        """The image and the objects resized to the model's size; a mask that vanishes on the way is refused."""
        width, height = self.model_size
        picture, masks = fit_to_model(image, [o.mask_tensor for o in objects.values()], width, height)
        for k, mask in zip(objects, masks):
            if not mask.any():
                raise FlexiMMTInputError(
                    f"Object {k}: its mask is too small: nothing of it is left once the image is "
                    f"resized to the model's {width} x {height}; give a larger mask"
                )
        return picture, {k: ObjectMotion(m, o.motion, o.motion_text) for m, (k, o) in zip(masks, objects.items())}

    def preview(self, image: np.ndarray | None, inputs: list[ObjectInput]) -> np.ndarray:
        if image is None:
            raise FlexiMMTInputError("upload an image first")
        objects = self.objects(image, inputs)
        if not objects:
            raise FlexiMMTInputError("tick 'use this object' for at least one object to see its mask")
        grid = self.pipe.token_grid(*self.pipe.default_size())
        picture, objects = self.fitted(image, objects)
        return grid_preview(np.asarray(picture), [o.mask_tensor for o in objects.values()], grid.height, grid.width)

    def _run_folder(self) -> Path:
        """A new folder for one run's files; only the newest ``keep_runs`` folders stay (the page got
        Gradio's copy of an earlier run's files when that run ended)."""
        old = sorted(self.out_dir.glob("run-*"), key=lambda p: p.stat().st_mtime)
        for folder in old[: max(0, len(old) - self.keep_runs + 1)]:
            shutil.rmtree(folder, ignore_errors=True)
        return Path(tempfile.mkdtemp(prefix="run-", dir=self.out_dir))

    def generate(
        self,
        image: np.ndarray | None,
        prompt: str,
        inputs: list[ObjectInput],
        steps: int,
        seed: int,
        progress=None,
        stop: threading.Event | None = None,
        mask_kernel: str = DEFAULT_KERNEL,
    ) -> tuple[str, str]:
        """The video and the mask overlay (paths); raises :class:`Cancelled` at the first step after ``stop`` is set.
        ``mask_kernel``: how MDMA is computed (every kernel exactly)."""
        if image is None:
            raise FlexiMMTInputError("upload an image first")
        steps = whole_number(steps, "steps", 1, self.max_steps, "denoising steps")
        picture, numbered_objects = self.fitted(image, self.objects(image, inputs))
        objects, numbers = list(numbered_objects.values()), list(numbered_objects)

        def on_step(pipe, step, timestep, callback_kwargs):
            if stop is not None and stop.is_set():
                raise Cancelled(f"stopped after denoising step {step + 1}/{steps}")
            if progress is not None:
                progress((step + 1) / steps, desc=f"denoising step {step + 1}/{steps}")
            return {}

        if stop is not None and stop.is_set():
            raise Cancelled("stopped before the first step")
        try:
            result = self.pipe(
                image=picture,
                prompt=prompt or "",
                objects=objects,
                num_inference_steps=steps,
                generator=torch.Generator().manual_seed(int(seed or 0)),
                output_type="np",
                return_masks=bool(objects),
                callback_on_step_end=on_step,
                mask_kernel=mask_kernel,
            )
        except ObjectInputError as err:  # the pipeline numbers the objects it got; the page numbers its slots
            raise FlexiMMTInputError(f"Object {numbers[err.number - 1]}: {err.reason}") from None
        folder = self._run_folder()
        video = save_video(result.frames[0], folder / "fleximmt.mp4")
        overlay = video
        if objects:
            overlay = save_video(
                mask_overlay(
                    result.frames[0], result.masks[0, -1], frame_index=self.pipe.mask_frame_index(len(result.frames[0]))
                ),
                folder / "masks.mp4",
            )
        return str(video), str(overlay)

    def checkpoint_every(self, steps: int) -> int:
        """How often Learn saves its checkpoint: about 20 times a run, at least every 50 steps."""
        from ..training.train import checkpoint_interval

        return checkpoint_interval(steps)

    def learn(
        self,
        video,
        caption,
        concept,
        motion_words,
        name,
        steps: int,
        tokens: int,
        on_step=None,
        stop: threading.Event | None = None,
        resume: bool = True,
        mask_kernel: str = DEFAULT_KERNEL,
    ) -> LibraryEntry:
        """Train a motion into the library; ``resume`` continues a stopped run of the same name and settings."""
        from ..training.data import read_video
        from ..training.train import cache_path, checkpoint_path, train_motion

        if video is None:
            raise FlexiMMTInputError("upload a reference video")
        steps = whole_number(steps, "steps", 1, MAX_TRAIN_STEPS, "training steps")
        tokens = whole_number(tokens, "tokens_per_block", 1, MAX_TOKENS, "motion tokens per block")
        if not (motion_words or "").strip():
            raise FlexiMMTInputError(
                "type the motion words: the words of the caption that describe the motion, e.g. 'is doing yoga'"
            )
        if not (concept or "").strip():
            raise FlexiMMTInputError(
                "type the concept words: the words of the caption that name the moving object, e.g. 'man'"
            )
        name = check_motion_name((name or "").strip() or Path(video).stem)
        output = self.library.folder / f"{name}.safetensors"
        checkpoint = checkpoint_path(output)
        had_checkpoint = resume and checkpoint.is_file()

        def callback(step, loss):
            if stop is not None and stop.is_set():
                raise Cancelled(f"stopped after training step {step}")
            if on_step is not None:
                on_step(step, loss)

        frames, _ = read_video(video)  # read now: an upload may be gone by the end of a long run
        try:
            train_motion(
                self.pipe,
                video,
                caption,
                concept.strip(),
                motion_words.strip(),
                output,
                steps=steps,
                tokens_per_motion=tokens,
                callback=callback,
                resume=resume,
                checkpoint_every=self.checkpoint_every(steps),
                mask_kernel=mask_kernel,
            )
        except FlexiMMTInputError as err:
            if had_checkpoint:
                raise FlexiMMTInputError(
                    f"{err} (on this page: untick 'continue a stopped run' to start over)"
                ) from None
            raise
        checkpoint.unlink(missing_ok=True)  # the run is complete: its resumable state and encoded reference go
        cache_path(output).unlink(missing_ok=True)
        save_video(frames[:: max(1, len(frames) // 24)], output.with_suffix(".gif"))
        return self.library.get(name)


def mask_kernel_choice(elem_id: str):
    """The page's choice of FlexiMMT's mask kernel, beside a tab's other settings."""
    import gradio as gr

    return gr.Dropdown(
        list(MASK_KERNELS),
        value=DEFAULT_KERNEL,
        label="mask kernel (how MDMA is computed; the same result: auto groups, dense is the reference, "
        "flex compiles first and trains on a GPU only)",
        elem_id=elem_id,
    )


def upload_limit(pipe) -> int:
    """The largest upload (bytes): ``MIN_UPLOAD_BYTES``, or more when one of this model's motion files
    (float32, as many tokens as the text) is larger."""
    adapter = pipe.adapter
    blocks, dim = adapter.motion_shape()
    motion = blocks * adapter.default_text_length() * dim * 4 * adapter.num_experts
    return max(MIN_UPLOAD_BYTES, int(motion * 1.25))


def _path(payload) -> str | None:
    """The server path of an uploaded file as Gradio hands it over unprocessed (checked to be an upload)."""
    if isinstance(payload, dict):
        return payload.get("path")
    return None


def _read_layers(editor_payload) -> dict | None:
    """An ImageEditor value as Gradio hands it over unprocessed: its layers read as RGBA arrays."""
    if not isinstance(editor_payload, dict):
        return None
    layers = [
        np.asarray(read_image(p, "a brush layer").convert("RGBA"))
        for p in map(_path, editor_payload.get("layers") or [])
        if p
    ]
    return {"layers": layers}


def build_app(
    pipe,
    motions_dir: str | Path,
    segmenter=None,
    detector=None,
    examples: list[str | Path] | None = None,
    keep_files: int = KEEP_FILES_S,
    max_steps: int = MAX_STEPS,
):
    """The Gradio Blocks of the app; ``examples`` are image files offered as bundled examples.
    Gradio's copies of uploads and results go ``keep_files`` seconds after they were made. A run
    takes at most ``max_steps`` denoising steps, from the page or the API."""
    import gradio as gr
    from gradio.utils import get_upload_folder

    if max_steps < 1:
        raise FlexiMMTInputError(f"max_steps={max_steps}: give the most denoising steps a run may take, at least 1")
    out_dir = Path(tempfile.mkdtemp(prefix="fleximmt-app-"))
    app = TransferApp(pipe, MotionLibrary(motions_dir), out_dir, segmenter, detector, max_steps=max_steps)
    height, width, frames = pipe.default_size()
    limit_mb = upload_limit(pipe) // 2**20
    private_folders = [
        tempfile.gettempdir(),
        get_upload_folder(),
        out_dir,
        app.library.folder.resolve(),
        app.library.folder,
    ]

    def public(err: Exception) -> str:
        return hide_paths(str(err), private_folders)

    def user_error(err: Exception) -> "gr.Error":
        return gr.Error(public(err), print_exception=False)

    def library_choices():
        return [e.name for e in app.library.entries()]

    def image_of(payload) -> np.ndarray | None:
        path = _path(payload)
        return None if path is None else np.asarray(read_image(path).convert("RGB"))

    cache_dir, swept = get_upload_folder(), [time.monotonic()]

    def sweep() -> None:
        """At most once a minute, after a run: Gradio's emptied cache folders go too (disk stays bounded)."""
        if time.monotonic() - swept[0] > 60:
            swept[0] = time.monotonic()
            remove_empty_folders(cache_dir, keep_files)

    def objects_of(fields_: dict) -> list[ObjectInput]:
        inputs = []
        for k in range(1, SLOTS + 1):
            value = {f: fields_.get(f"object_{k}_{f}") for f in OBJECT_FIELDS}
            try:
                brush = _read_layers(value["brush"]) if value["use"] and value["mask_from"] == "draw" else None
            except FlexiMMTInputError as err:
                raise numbered(k, err) from None
            inputs.append(
                ObjectInput(
                    use=bool(value["use"]),
                    mask_from=value["mask_from"] or "png",
                    brush=brush,
                    mask_png=_path(value["mask_png"]),
                    points=value["points"] or "",
                    name=value["name"] or "",
                    motion=value["motion"] or None,
                    motion_file=_path(value["motion_file"]),
                    motion_words=value["motion_words"] or "",
                )
            )
        return inputs

    with gr.Blocks(title="FlexiMMT", delete_cache=(min(keep_files, 600), keep_files)) as demo:
        model_name = getattr(pipe, "name_or_path", "") or "built-in"
        if Path(model_name).exists():  # a local folder: its name, not the server's file system
            model_name = Path(model_name).name
        gr.Markdown(
            f"# FlexiMMT\nMake the objects of an image move, each with its own motion. "
            f"Model: `{model_name}` ({width}x{height}, {frames} frames)."
        )
        with gr.Tab("Transfer"):
            with gr.Row():
                image = gr.Image(label="Image", type="filepath", elem_id="image", height=256)
                preview = gr.Image(
                    label="Masks on the latent grid", type="numpy", interactive=False, elem_id="preview", height=256
                )
            image_info = gr.Markdown(
                f"Images up to {MAX_IMAGE_PIXELS // 1_000_000} megapixels and uploads up to {limit_mb} MB. The model makes "
                f"{width} x {height} videos: the image and its masks are resized to that together (stretched when the "
                "aspect ratio differs). A mask PNG must have the image's size.",
                elem_id="image_info",
            )
            if examples:
                gr.Examples([[str(p)] for p in examples], inputs=[image], label="bundled example images")
            prompt = gr.Textbox(
                label="Prompt (each object's motion words must appear in it)", value="", elem_id="prompt"
            )
            highlighted = gr.HighlightedText(
                label="Motion words in the prompt",
                elem_id="highlight",
                color_map={
                    f"Object {k + 1}": "#{:02x}{:02x}{:02x}".format(*tuple(int(c) for c in PALETTE[k]))
                    for k in range(SLOTS)
                },
            )
            slots: list[dict] = []
            for k in range(1, SLOTS + 1):
                with gr.Accordion(f"Object {k}", open=k <= 2):
                    slot = {
                        "use": gr.Checkbox(label="use this object", value=k <= 2, elem_id=f"use_{k}"),
                        "mask_from": gr.Radio(list(MASK_MODES), value="png", label="mask from", elem_id=f"mode_{k}"),
                    }
                    with gr.Row():
                        slot["brush"] = gr.ImageEditor(
                            label="draw the mask", type="numpy", elem_id=f"editor_{k}", height=256
                        )
                        slot["mask_png"] = gr.File(
                            label="mask PNG (the image's size)",
                            file_types=[".png"],
                            type="filepath",
                            elem_id=f"png_{k}",
                        )
                    slot["points"] = gr.Textbox(
                        label="clicks 'x,y x,y' or a box 'x0,y0,x1,y1' (SAM)", value="", elem_id=f"points_{k}"
                    )
                    slot["name"] = gr.Textbox(
                        label="object's name (Grounding-DINO + SAM)", value="", elem_id=f"words_{k}"
                    )
                    with gr.Row():
                        slot["motion"] = gr.Radio(
                            library_choices(), label="motion from the library", elem_id=f"motion_{k}"
                        )
                        slot["motion_file"] = gr.File(
                            label="or a motion file",
                            file_types=[".safetensors"],
                            type="filepath",
                            elem_id=f"motion_file_{k}",
                        )
                        motion_preview = gr.Image(label="reference", interactive=False, height=128)
                    motion_info = gr.Markdown(elem_id=f"motion_info_{k}")
                    slot["motion_words"] = gr.Textbox(
                        label="motion words (the prompt's words for this motion; the motion file suggests them)",
                        value="",
                        elem_id=f"motion_words_{k}",
                    )

                    def on_choice(name, number=k):  # number: this slot's, bound now
                        try:
                            entry = app.library.get(name) if name else None
                            info = motion_metadata(MotionTokens.load(entry.path)) if entry else ""
                        except FlexiMMTInputError as err:
                            raise user_error(numbered(number, err)) from None
                        return (
                            entry.motion_words if entry else "",
                            str(entry.preview) if entry and entry.preview else None,
                            info,
                        )

                    def on_upload(path, number=k):
                        if not path:
                            return "", ""
                        try:
                            motion = MotionTokens.load(path)
                        except FlexiMMTInputError as err:
                            raise user_error(numbered(number, err)) from None
                        return motion.metadata.get("motion_words") or "", motion_metadata(motion)

                    slot["motion"].change(
                        on_choice,
                        slot["motion"],
                        [slot["motion_words"], motion_preview, motion_info],
                        api_visibility="private",
                    )
                    slot["motion_file"].change(
                        on_upload, slot["motion_file"], [slot["motion_words"], motion_info], api_visibility="private"
                    )
                slots.append(slot)
            with gr.Row():
                steps = gr.Slider(
                    1,
                    max_steps,
                    value=min(max_steps, 50 if frames > 17 else 10),
                    step=1,
                    label=f"denoising steps (at most {max_steps})",
                    elem_id="steps",
                )
                seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed")
                kernel = mask_kernel_choice("mask_kernel")
            with gr.Row():
                show = gr.Button("Show masks", elem_id="show_masks")
                go = gr.Button("Generate", variant="primary", elem_id="generate")
                stop = gr.Button("Stop", variant="stop", elem_id="stop")
            gr.Markdown("One run at a time: requests wait in a queue. Stop ends a run at its next denoising step.")
            with gr.Row():
                video = gr.Video(label="FlexiMMT video", elem_id="video_out", height=256)
                overlay = gr.Video(label="propagated masks", elem_id="overlay_out", height=256)
            object_inputs = {f"object_{k}_{f}": slot[f] for k, slot in enumerate(slots, 1) for f in OBJECT_FIELDS}

            def on_image(payload):
                try:
                    picture = None if _path(payload) is None else read_image(_path(payload), header_only=True)
                except FlexiMMTInputError as err:
                    gr.Warning(public(err))
                    return [f"**{public(err)}**", *[gr.update(value=None) for _ in range(SLOTS)]]
                if picture is None:
                    return [gr.update(), *[gr.update(value=None) for _ in range(SLOTS)]]
                note = size_note(picture.size, app.model_size)
                path = _path(payload)
                return [
                    note,
                    *[gr.update(value={"background": path, "layers": [], "composite": path}) for _ in range(SLOTS)],
                ]

            def on_words(text, *motion_words):
                return highlight(text or "", list(motion_words))

            # unprocessed inputs (preprocess=False): the app opens the files itself, with its own limits and messages
            image.change(
                on_image, image, [image_info, *[s["brush"] for s in slots]], preprocess=False, api_visibility="private"
            )
            for box in [prompt, *[s["motion_words"] for s in slots]]:
                box.change(
                    on_words, [prompt, *[s["motion_words"] for s in slots]], highlighted, api_visibility="private"
                )

            @with_object_parameters
            def show_masks(image, **objects):
                """The objects' masks on the model's latent token grid, over the image resized to the model."""
                try:
                    return app.preview(image_of(image), objects_of(objects))
                except FlexiMMTInputError as err:
                    raise user_error(err) from None

            @with_object_parameters
            async def generate(image, prompt, steps, seed, mask_kernel, progress=gr.Progress(), **objects):  # noqa: B008 - gradio's way
                """Make the image's objects move: returns the video and the propagated-mask overlay.
                mask_kernel: how MDMA is computed (auto, dense or flex; the same video).
                Inputs per object k (1 to 3): object_k_use, object_k_mask_from (draw/png/points/words),
                object_k_mask_png, object_k_motion (a library motion's name) or object_k_motion_file,
                object_k_motion_words (the prompt's words for its motion)."""

                def job(stop):  # on the model's worker thread: files are read there, not in the server's event loop
                    try:
                        return app.generate(
                            image_of(image), prompt, objects_of(objects), steps, seed, progress, stop, mask_kernel
                        )
                    finally:
                        sweep()

                try:
                    finished, result = await app.worker.run(job, _gradio_client_gone())
                except FlexiMMTInputError as err:
                    raise user_error(err) from None
                if not finished:
                    raise gr.Error("Stopped: the run was cancelled.", print_exception=False)
                return result

            show.click(
                show_masks,
                inputs=[image],
                inputs_kwargs=object_inputs,
                outputs=preview,
                api_name="show_masks",
                preprocess=False,
                concurrency_id="masks",
            )
            generating = go.click(
                generate,
                inputs=[image, prompt, steps, seed, kernel],
                inputs_kwargs=object_inputs,
                outputs=[video, overlay],
                api_name="generate",
                preprocess=False,
                concurrency_id="model",
                concurrency_limit=1,
            )
        with gr.Tab("Learn"):
            gr.Markdown(
                "Train a motion on one reference video of one moving object; it joins the library. "
                "Stop ends training at its next step; a checkpoint is saved every few steps, and Learn with "
                "the same name and settings continues from it."
            )
            ref = gr.Video(label="reference video", sources=["upload"], elem_id="ref_video")
            caption = gr.Textbox(label="caption", placeholder="A man is doing yoga.", value="", elem_id="caption")
            with gr.Row():
                concept = gr.Textbox(label="concept words (the object)", placeholder="man", value="", elem_id="concept")
                learn_words = gr.Textbox(
                    label="motion words", placeholder="is doing yoga", value="", elem_id="learn_words"
                )
                name = gr.Textbox(label="motion name", placeholder="yoga", value="", elem_id="motion_name")
            with gr.Row():
                learn_steps = gr.Slider(
                    10, MAX_TRAIN_STEPS, value=200, step=10, label="training steps", elem_id="learn_steps"
                )
                tokens = gr.Slider(
                    4, MAX_TOKENS, value=MAX_TOKENS if frames > 17 else 16, step=1, label="motion tokens per block"
                )
                learn_kernel = mask_kernel_choice("learn_mask_kernel")
                resume = gr.Checkbox(
                    label="continue a stopped run of this name (same settings)", value=True, elem_id="resume"
                )
            with gr.Row():
                train = gr.Button("Learn the motion", variant="primary", elem_id="learn")
                stop_learning = gr.Button("Stop", variant="stop", elem_id="stop_learning")
            curve = gr.LinePlot(x="step", y="loss", label="training loss", elem_id="loss_curve")
            learned = gr.Markdown(elem_id="learned")

            async def learn(
                video,
                caption,
                concept_words,
                motion_words,
                name,
                steps,
                tokens_per_block,
                mask_kernel,
                resume,
                progress=gr.Progress(),  # noqa: B008 - gradio's way
            ):
                """Learn a motion from a reference video into the library; returns the loss curve and a message."""
                import pandas as pd

                losses = []

                def on_step(step, loss):
                    losses.append((step, loss))
                    progress(step / steps, desc=f"step {step}/{int(steps)}, loss {loss:.4f}")

                def job(stop):
                    try:
                        return app.learn(
                            video,
                            caption,
                            concept_words,
                            motion_words,
                            name,
                            steps,
                            tokens_per_block,
                            on_step,
                            stop,
                            bool(resume),
                            mask_kernel,
                        )
                    finally:
                        sweep()

                try:
                    finished, entry = await app.worker.run(job, _gradio_client_gone())
                except FlexiMMTInputError as err:
                    raise user_error(err) from None
                if not finished:
                    raise gr.Error(
                        "Stopped: training was cancelled; Learn with the same name and settings continues it.",
                        print_exception=False,
                    )
                frame = pd.DataFrame(losses, columns=["step", "loss"])
                return frame, f"Learned **{entry.name}**; it is in the motion library now."

            learning = train.click(
                learn,
                [ref, caption, concept, learn_words, name, learn_steps, tokens, learn_kernel, resume],
                [curve, learned],
                api_name="learn",
                concurrency_id="model",
                concurrency_limit=1,
            )
            learning.success(
                lambda: [gr.update(choices=library_choices()) for _ in range(SLOTS)],
                None,
                [s["motion"] for s in slots],
                api_visibility="private",
            )
        stop.click(None, None, None, cancels=[generating])
        stop_learning.click(None, None, None, cancels=[learning])
    demo.fleximmt = app
    demo.fleximmt_close = weakref.finalize(demo, _close, app)  # at shutdown (serve), else when the process ends
    return demo


def _close(app: TransferApp) -> None:
    app.worker.shutdown()
    shutil.rmtree(app.out_dir, ignore_errors=True)


def serve(
    pipe,
    motions_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 7860,
    *,
    segmenter=None,
    detector=None,
    examples: list[str | Path] | None = None,
    keep_files: int = KEEP_FILES_S,
    max_file_size: int | None = None,
    max_steps: int = MAX_STEPS,
    block: bool = True,
):
    """Build the app and serve it on ``host:port`` (this machine only by default), its queue bounded
    (``QUEUE_SIZE``), uploads capped (``max_file_size`` bytes, default :func:`upload_limit`) and runs
    (``max_steps`` denoising steps); ``block=False`` returns the running app at once (close it with
    ``demo.close()``). At shutdown the run folders go, and Gradio's copies with their folders."""
    from contextlib import asynccontextmanager

    from gradio.utils import get_upload_folder

    if keep_files < 1:
        raise FlexiMMTInputError(f"keep_files={keep_files}: give the seconds uploads and results stay, at least 1")
    cache_dir = get_upload_folder()
    before = cache_entries(cache_dir)  # before Gradio makes its own folders there (building the page does)
    demo = build_app(pipe, motions_dir, segmenter, detector, examples, keep_files=keep_files, max_steps=max_steps)

    @asynccontextmanager
    async def lifespan(_):
        yield
        demo.fleximmt_close()  # the server stops: the worker ends and the run folders go
        remove_served_files(demo, cache_dir, before, older_than_s=keep_files)

    if block and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM closes the server as Ctrl+C does
    demo.queue(max_size=QUEUE_SIZE).launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        max_file_size=max_file_size or upload_limit(pipe),
        app_kwargs={"lifespan": lifespan},
    )
    return demo


def add_cli(subparsers, load_pipeline, add_model_options) -> None:
    import argparse

    parser = subparsers.add_parser(
        "app",
        help="the web app: transfer motions and learn new ones in the browser",
        description="Serve the FlexiMMT web app. The model loads once; requests queue and run one at a time. "
        "Binds to 127.0.0.1 unless --host says otherwise.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  fleximmt app                       (the toy model that ships with fleximmt; runs on a CPU)\n"
        "  fleximmt app --model tiny --motions motions/   (a tiny RANDOM-weight model)\n"
        "  fleximmt app --model THUDM/CogVideoX-5b-I2V --sam facebook/sam-vit-base "
        "--detector IDEA-Research/grounding-dino-tiny",
    )
    parser.add_argument("--motions", default="motions", help="the motion library folder (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    parser.add_argument("--sam", help="SAM (hub id or folder) for clicked or named objects")
    parser.add_argument("--detector", help="Grounding-DINO (hub id or folder) for named objects")
    parser.add_argument(
        "--keep-files",
        type=int,
        default=KEEP_FILES_S,
        metavar="SECONDS",
        help="uploads and results are deleted this long after they were made, and all at shutdown "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--max-upload-mb",
        type=int,
        help="largest upload in MB (default: 200, or more when the model's motion files are larger)",
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        default=MAX_STEPS,
        help="the most denoising steps a run may take, on the page and over the API (default: %(default)s)",
    )
    add_model_options(parser)
    parser.set_defaults(model="toy")

    def run(args):
        pipe = load_pipeline(args)
        examples = None
        if args.model == "toy":
            from ..toy.lab import EXAMPLE_DIR

            examples = sorted(EXAMPLE_DIR.glob("*.png"))
        serve(
            pipe,
            args.motions,
            args.host,
            args.port,
            segmenter=args.sam,
            detector=args.detector,
            examples=examples,
            keep_files=args.keep_files,
            max_file_size=args.max_upload_mb and args.max_upload_mb * 2**20,
            max_steps=args.max_steps,
        )

    parser.set_defaults(func=run)
