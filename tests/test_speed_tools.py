"""FlexiMMT with the tools diffusers' users run for speed and memory (issue 20, items 4-7), on tiny random
CogVideoX and Wan models: caches (``enable_cache``), LoRAs (``load_lora_weights`` / ``set_adapters``),
quantized base models (optimum-quanto, torchao, GGUF; bitsandbytes on CUDA) and group offloading. Each
either keeps objects and masks working or is refused by name; without objects each gives diffusers'
own result."""

import numpy as np
import pytest
import torch
from diffusers import CogVideoXImageToVideoPipeline, WanImageToVideoPipeline
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)
from helpers import spy_optimiser
from PIL import Image
from wan_names import original_name

from fleximmt import FlexiMMTPipeline, FlexiMMTWanPipeline, ObjectMotion
from fleximmt.errors import FlexiMMTInputError
from fleximmt.method.attention import FlexiMMTState
from fleximmt.toy.tiny import random_motion, tiny_components, tiny_wan_components

PROMPT = "A ball jumps up. A box slides left."
WORDS = ["jumps up", "slides left"]
STEPS = 4
LAYERS = 3  # RMPM's default feature blocks are then blocks 0 and 1 of 3 (CogVideoX: 30/42, Wan: 70%)
FAMILIES = {
    "cogvideox": dict(
        size=32,
        make=tiny_components,
        ours=FlexiMMTPipeline,
        theirs=CogVideoXImageToVideoPipeline,
        call=dict(height=32, width=32, num_frames=9, max_sequence_length=16),
        scale=4.0,
        attention=[r"transformer_blocks\.\d+\.attn1"],
        tensor_format="BFCHW",
    ),
    "wan": dict(
        size=64,
        make=lambda seed, **kw: tiny_wan_components(seed, "2.1", **kw),
        ours=FlexiMMTWanPipeline,
        theirs=WanImageToVideoPipeline,
        call=dict(height=64, width=64, num_frames=9, max_sequence_length=24),
        scale=30.0,
        attention=[r"blocks\.\d+\.attn1", r"blocks\.\d+\.attn2"],
        tensor_format="BCFHW",
    ),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_pipe(family: str, theirs: bool = False, layers: int = LAYERS, **config):
    spec = FAMILIES[family]
    pipe = spec["theirs" if theirs else "ours"](**spec["make"](0, num_layers=layers, **config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def picture(size: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(0).rand(size, size, 3) * 255).astype(np.uint8))


def box(size: int, y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[int(y0 * size) : int(y1 * size), int(x0 * size) : int(x1 * size)] = True
    return m


def objects(family: str, transformer, experts: int = 1) -> list[ObjectMotion]:
    size, scale = FAMILIES[family]["size"], FAMILIES[family]["scale"]
    masks = [box(size, 0.05, 0.5, 0.05, 0.5), box(size, 0.3, 0.95, 0.4, 0.95)]
    return [
        ObjectMotion(masks[k], random_motion(transformer, 4, seed=k + 1, scale=scale, experts=experts), WORDS[k])
        for k in range(2)
    ]


def run(pipe, family: str, steps: int = STEPS, **kw):
    call = {**FAMILIES[family]["call"], "num_inference_steps": steps, "output_type": "latent", **kw}
    size = FAMILIES[family]["size"]
    return pipe(picture(size), PROMPT, generator=torch.Generator().manual_seed(0), **call)


def rel(a, b) -> float:
    a, b = torch.as_tensor(np.asarray(a)).double(), torch.as_tensor(np.asarray(b)).double()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def reference():
    """``reference(family, steps, **config)``: a plain float pipeline's run with objects (``return_masks``),
    without any of the tools under test; each computed once."""
    done = {}

    def get(family: str, steps: int, **config):
        key = (family, steps, *sorted(config.items()))
        if key not in done:
            pipe = make_pipe(family, **config)
            done[key] = run(pipe, family, steps=steps, objects=objects(family, pipe.transformer), return_masks=True)
        return done[key]

    return get


# -- 4. caches -------------------------------------------------------------------------------------------
CACHES = ["FirstBlockCache", "TaylorSeer", "MagCache", "FasterCache", "PAB"]


def cache_config(name: str, pipe, family: str):
    """Each cache set to skip often within STEPS steps (its first step always runs whole)."""
    spec = FAMILIES[family]
    timestep = lambda: pipe.current_timestep
    if name == "FirstBlockCache":
        return FirstBlockCacheConfig(threshold=float("inf"))  # every step after the first skips blocks 1 and 2
    if name == "TaylorSeer":
        return TaylorSeerCacheConfig(
            cache_interval=2,
            disable_cache_before_step=1,
            taylor_factors_dtype=torch.float32,
            cache_identifiers=spec["attention"],
        )
    if name == "MagCache":
        return MagCacheConfig(
            threshold=float("inf"),
            max_skip_steps=1,
            retention_ratio=0.2,
            num_inference_steps=STEPS,
            mag_ratios=[1.0] * STEPS,
        )
    if name == "FasterCache":
        if (
            family == "wan"
        ):  # Wan runs its branches as two calls: only the guidance-distilled form runs (diffusers' too)
            return FasterCacheConfig(
                spatial_attention_timestep_skip_range=(-1, 990),
                is_guidance_distilled=True,
                current_timestep_callback=timestep,
                attention_weight_callback=lambda _: 0.5,
                tensor_format=spec["tensor_format"],
            )
        return FasterCacheConfig(
            spatial_attention_timestep_skip_range=(-1, 1001),
            unconditional_batch_skip_range=3,
            unconditional_batch_timestep_skip_range=(-1, 1001),
            current_timestep_callback=timestep,
            attention_weight_callback=lambda _: 0.5,
            tensor_format=spec["tensor_format"],
        )
    return PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=3,
        spatial_attention_timestep_skip_range=(-1, 1001),
        current_timestep_callback=timestep,
    )


def cache_call(name: str, family: str) -> dict:
    # FasterCache on Wan is the guidance-distilled form: one branch, guidance 1
    return {"guidance_scale": 1.0} if (name, family) == ("FasterCache", "wan") else {}


def cached(name: str, family: str, theirs: bool = False):
    pipe = make_pipe(family, theirs)
    pipe.transformer.enable_cache(cache_config(name, pipe, family))
    return pipe


@pytest.fixture(scope="module")
def uncached_latents():
    """diffusers' own result without a cache, per (family, call), computed once."""
    out = {}

    def get(family: str, **call):
        key = (family, *sorted(call.items()))
        if key not in out:
            out[key] = run(make_pipe(family, theirs=True), family, **call).frames
        return out[key]

    return get


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", CACHES)
def test_a_cache_without_objects_gives_diffusers_result_with_the_same_cache(name, family, uncached_latents):
    ours = run(cached(name, family), family, **cache_call(name, family)).frames
    theirs = run(cached(name, family, theirs=True), family, **cache_call(name, family)).frames
    assert torch.equal(ours, theirs)
    assert not torch.equal(theirs, uncached_latents(family, **cache_call(name, family)))  # the cache did skip work


def spy_on_captures(monkeypatch) -> tuple[list[set], callable]:
    """Which feature blocks delivered RMPM's features in each step, seen from the processors' calls."""
    seen: list[set] = [set()]
    observe = FlexiMMTState.observe

    def spy(self, block, video_out, rows=None):
        if self.capturing(block):
            seen[-1].add(block)
        return observe(self, block, video_out, rows)

    def next_step(pipe, step, timestep, kwargs):
        seen.append(set())
        return {}

    monkeypatch.setattr(FlexiMMTState, "observe", spy)
    return seen, next_step


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", CACHES)
def test_with_objects_a_step_whose_blocks_a_cache_skipped_keeps_the_last_masks(name, family, monkeypatch, reference):
    """A step whose capture missed a feature block (FirstBlockCache's blocks past the first, a skipped step,
    reused attention) gives no new masks: the next step's masks are its own; a step whose feature blocks
    all ran gives RMPM's masks of its features."""
    pipe = cached(name, family)
    seen, next_step = spy_on_captures(monkeypatch)
    masks = run(
        pipe,
        family,
        objects=objects(family, pipe.transformer),
        return_masks=True,
        callback_on_step_end=next_step,
        **cache_call(name, family),
    ).masks[0]
    feature_blocks = {0, 1}
    partial = [s for s in range(STEPS - 1) if seen[s] != feature_blocks]
    assert seen[0] == feature_blocks and partial, seen  # the first step ran whole, a later one did not
    for s in range(STEPS - 1):
        assert torch.equal(masks[s + 1], masks[s]) == (s in partial), s
    if (name, family) != ("FasterCache", "wan"):  # guidance 1 there: another call than the uncached one
        assert torch.equal(masks[:2], reference(family, STEPS).masks[0, :2])  # step 0 ran whole: RMPM's masks from it


def test_fastercache_needing_both_branches_in_one_batch_is_refused_on_wan_with_objects():
    """FasterCache (not guidance-distilled) splits one [uncond | cond] batch; Wan runs two calls (diffusers'
    own Wan pipeline fails on it too): with objects it is refused by name."""
    pipe = make_pipe("wan")
    pipe.transformer.enable_cache(
        FasterCacheConfig(
            current_timestep_callback=lambda: pipe.current_timestep,
            attention_weight_callback=lambda _: 0.5,
            tensor_format="BCFHW",
        )
    )
    with pytest.raises(FlexiMMTInputError, match=r"FasterCache.*is_guidance_distilled=True"):
        run(pipe, "wan", steps=2, objects=objects("wan", pipe.transformer))


# -- 5. LoRAs --------------------------------------------------------------------------------------------
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def save_lora(transformer, folder, pipeline_class) -> str:
    """A LoRA of ``transformer`` (peft, random A and B so that it acts) saved as diffusers saves LoRAs."""
    from peft import LoraConfig, get_peft_model_state_dict

    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=LORA_TARGETS))
    pipeline_class.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(transformer))
    return str(folder)


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    """Per family, a folder holding ``pytorch_lora_weights.safetensors`` for its tiny transformer."""
    root = tmp_path_factory.mktemp("loras")
    return {
        family: save_lora(make_pipe(family).transformer, root / family, FAMILIES[family]["theirs"])
        for family in FAMILIES
    }


def with_lora(family, lora_files, fuse: float | None = None, **load):
    pipe = make_pipe(family)
    pipe.load_lora_weights(lora_files[family], adapter_name="style", **load)
    if fuse is not None:
        pipe.fuse_lora(lora_scale=fuse)
    return pipe


@pytest.mark.parametrize("family", FAMILIES)
def test_a_lora_acts_with_objects_as_its_fused_weights_do_loaded_before_or_after_the_processors(
    family, lora_files, reference
):
    """FlexiMMT's processors are installed at the first call with objects; a LoRA loaded before or after
    wraps the same projections, which the motion tokens pass through too: unfused equals fused."""
    before = with_lora(family, lora_files)
    after = make_pipe(family)
    run(after, family, steps=1, objects=objects(family, after.transformer))  # installs FlexiMMT's processors
    after.load_lora_weights(lora_files[family], adapter_name="style")
    fused = with_lora(family, lora_files, fuse=1.0)
    got = {
        name: run(p, family, steps=1, objects=objects(family, p.transformer)).frames
        for name, p in dict(before=before, after=after, fused=fused).items()
    }
    assert torch.equal(got["before"], got["after"])
    assert rel(got["before"], got["fused"]) < 1e-5
    assert rel(got["before"], reference(family, 1).frames) > 1e-3  # the LoRA acts


@pytest.mark.parametrize("family", FAMILIES)
def test_set_adapters_weights_act_with_objects(family, lora_files, reference):
    """Weights set after the processors are installed: 0 is the model without the LoRA, 0.5 the LoRA fused at 0.5."""
    pipe = with_lora(family, lora_files)
    run(pipe, family, steps=1, objects=objects(family, pipe.transformer))
    half_fused = with_lora(family, lora_files, fuse=0.5)
    expected = {
        0.0: reference(family, 1).frames,
        0.5: run(half_fused, family, steps=1, objects=objects(family, half_fused.transformer)).frames,
    }
    for weight, want in expected.items():
        pipe.set_adapters(["style"], [weight])
        assert rel(run(pipe, family, steps=1, objects=objects(family, pipe.transformer)).frames, want) < 1e-5, weight


def wan22(layers: int = LAYERS):
    pipe = FlexiMMTWanPipeline(**tiny_wan_components(0, "2.2", num_layers=layers))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_lora_on_wan_2_2s_second_expert_acts_with_objects(lora_files):
    """``load_into_transformer_2=True`` puts the LoRA on the low-noise expert alone (step 1 of 2 here)."""
    loaded, fused, plain = wan22(), wan22(), wan22()
    for pipe in (loaded, fused):
        pipe.load_lora_weights(lora_files["wan"], adapter_name="low", load_into_transformer_2=True)
    fused.fuse_lora(components=["transformer_2"])
    assert loaded.get_list_adapters() == {"transformer_2": ["low"]}
    got = [
        run(p, "wan", steps=2, objects=objects("wan", p.transformer, experts=2)).frames for p in (loaded, fused, plain)
    ]
    assert rel(got[0], got[1]) < 1e-5 and rel(got[0], got[2]) > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_step_distilled_use_guidance_1_in_4_steps_runs_rmpm_on_its_one_pass(family, lora_files):
    """A step-distilled LoRA's use - guidance 1 (no unconditional pass), 4 steps: RMPM reads the one pass
    there is, so its first propagated masks are those a guided call gets from its conditional pass."""
    pipe = with_lora(family, lora_files)
    distilled = run(
        pipe, family, steps=4, guidance_scale=1.0, objects=objects(family, pipe.transformer), return_masks=True
    )
    guided = run(pipe, family, steps=4, objects=objects(family, pipe.transformer), return_masks=True)
    assert distilled.masks.shape[:2] == (1, 4)
    assert torch.equal(distilled.masks[0, 1], guided.masks[0, 1])
    assert not torch.equal(distilled.masks[0, 1], distilled.masks[0, 0])  # RMPM moved the masks


def moving_square(size: int, frames: int = 9) -> np.ndarray:
    video = np.full((frames, size, size, 3), 90, np.uint8)
    step = size // 16
    for t in range(frames):
        video[t, size // 4 : size // 2, step * (1 + t) : step * (1 + t) + size // 4] = 220
    return video


def train(pipe, family: str, out, **kw):
    from fleximmt import train_motion

    size = FAMILIES[family]["size"]
    kw = {
        "steps": 1,
        "tokens_per_motion": 4,
        "lr_warmup_steps": 0,
        "height": size,
        "width": size,
        "num_frames": 9,
        "max_windows": 1,
        "lr": 0.05,
        **kw,
    }
    return train_motion(pipe, moving_square(size), "A red ball jumps up.", "ball", "jumps up", out, **kw)


@pytest.fixture
def initial_tokens(monkeypatch) -> list[torch.Tensor]:
    """The motion tokens as training starts (copied when train_motion makes its optimiser)."""
    tokens = []
    spy_optimiser(
        monkeypatch, lambda params: tokens.append(torch.stack([p.detach().cpu().clone() for p in params]).squeeze(0))
    )
    return tokens


def plain_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors a tensor is made of (a quantized weight's data and scales)."""
    if type(tensor) in (torch.Tensor, torch.nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
        return [tensor.detach().clone()]
    names, _ = tensor.__tensor_flatten__()
    return [t for name in names for t in plain_tensors(getattr(tensor, name))]


def frozen_state(pipe) -> list[tuple[dict, list[bool]]]:
    return [
        ({k: plain_tensors(v) for k, v in m.state_dict().items()}, [p.requires_grad for p in m.parameters()])
        for m in pipe.components.values()
        if isinstance(m, torch.nn.Module)
    ]


def assert_unchanged(pipe, before) -> None:
    for (state, flags), (now, now_flags) in zip(before, frozen_state(pipe)):
        assert state.keys() == now.keys()
        for key, parts in state.items():
            assert len(parts) == len(now[key]) and all(torch.equal(a, b) for a, b in zip(parts, now[key])), key
        assert flags == now_flags


@pytest.mark.parametrize("family", FAMILIES)
def test_training_through_a_lora_changes_only_the_tokens_and_the_motion_records_the_lora(
    family, lora_files, tmp_path, initial_tokens
):
    from fleximmt import MotionTokens

    pipe = with_lora(family, lora_files)
    pipe.set_adapters(["style"], [0.8])
    before = frozen_state(pipe)
    trained = train(pipe, family, tmp_path / "m.safetensors")
    assert_unchanged(pipe, before)  # the LoRA's weights, scale and requires_grad included
    assert trained.tokens.shape == initial_tokens[0].shape and not torch.equal(trained.tokens, initial_tokens[0])
    loaded = MotionTokens.load(tmp_path / "m.safetensors")
    assert loaded.metadata["base_loras"] == [
        {"component": "transformer", "adapter": "style", "fused": False, "weight": 0.8}
    ]


def test_a_motion_file_without_base_loras_still_loads(tmp_path):
    from fleximmt import MotionTokens
    from fleximmt.method.motion import motion_metadata

    old = MotionTokens(torch.zeros(2, 4, 8), name="old", steps=3)  # written before base_loras was recorded
    old.save(tmp_path / "old.safetensors")
    loaded = MotionTokens.load(tmp_path / "old.safetensors")
    assert loaded.base_loras is None and "LoRA" not in motion_metadata(loaded)


# -- 6. quantized base models ------------------------------------------------------------------------------
cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (bitsandbytes, float8): runs on a GPU machine"
)


def quanto_int8(family: str, **config):
    from optimum.quanto import freeze, qint8, quantize

    pipe = make_pipe(family, **config)
    quantize(pipe.transformer, weights=qint8)
    freeze(pipe.transformer)
    return pipe


def torchao_int8(family: str, folders, **config):
    """diffusers' own route: ``from_pretrained(..., quantization_config=PipelineQuantizationConfig(...))``."""
    from diffusers import PipelineQuantizationConfig, TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    quantization = PipelineQuantizationConfig(quant_mapping={"transformer": TorchAoConfig(Int8WeightOnlyConfig())})
    pipe = FAMILIES[family]["ours"].from_pretrained(
        folders[family], quantization_config=quantization, torch_dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_wan_gguf(transformer, path) -> int:
    """``transformer``'s weights as a GGUF file in the original checkpoint's names (what the community's Wan
    GGUFs hold), every block weight whose rows are whole Q8_0 blocks in Q8_0; returns how many."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="wan")
    quantized = 0
    for key, tensor in transformer.state_dict().items():
        array = tensor.detach().float().numpy()
        if key.startswith("blocks.") and array.ndim == 2 and array.shape[1] % 32 == 0:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(original_name(key), gguf.quants.quantize(array, q8), raw_dtype=q8)
            quantized += 1
        else:
            writer.add_tensor(original_name(key), array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return quantized


GGUF_WAN = dict(head_dim=16)  # a width of 32: the attention weights are whole Q8_0 blocks


def gguf_wan(folders):
    from diffusers import GGUFQuantizationConfig, WanTransformer3DModel

    transformer = WanTransformer3DModel.from_single_file(
        str(folders["gguf"]),
        config=str(folders["wan-gguf"]),
        subfolder="transformer",
        torch_dtype=torch.float32,
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
    )
    pipe = FlexiMMTWanPipeline(**{**make_pipe("wan", **GGUF_WAN).components, "transformer": transformer})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Saved tiny pipelines (``from_pretrained`` with a quantization config) and a tiny Wan GGUF transformer."""
    root = tmp_path_factory.mktemp("models")
    out = {family: root / family for family in FAMILIES}
    for family, folder in out.items():
        make_pipe(family).save_pretrained(folder)
    out["wan-gguf"], out["gguf"] = root / "wan-gguf", root / "wan-q8_0.gguf"
    reference = make_pipe("wan", **GGUF_WAN)
    reference.save_pretrained(out["wan-gguf"])
    # per block: q, k, v, o of both attentions, the image keys and values, the two feed-forward layers
    assert write_wan_gguf(reference.transformer, out["gguf"]) == (2 * 4 + 2 + 2) * LAYERS
    return out


def test_the_gguf_names_are_the_original_checkpoints():
    """The file's names go through diffusers' own conversion back to the model's."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    state = make_pipe("wan", **GGUF_WAN).transformer.state_dict()
    assert set(convert_wan_transformer_to_diffusers({original_name(k): v for k, v in state.items()})) == set(state)


QUANTIZED = {
    "quanto-int8-cogvideox": ("cogvideox", lambda folders: quanto_int8("cogvideox"), {}),
    "quanto-int8-wan": ("wan", lambda folders: quanto_int8("wan"), {}),
    "torchao-int8wo-cogvideox": ("cogvideox", lambda folders: torchao_int8("cogvideox", folders), {}),
    "torchao-int8wo-wan": ("wan", lambda folders: torchao_int8("wan", folders), {}),
    "gguf-q8_0-wan": ("wan", gguf_wan, GGUF_WAN),
}


def quantized_layers(transformer) -> int:
    """How many attention projections hold a quantized weight (not a plain tensor)."""
    return sum(
        type(m.weight) not in (torch.Tensor, torch.nn.Parameter)
        for name, m in transformer.named_modules()
        if name.endswith(("to_q", "to_k", "to_v"))
    )


@pytest.mark.parametrize("kind", QUANTIZED)
def test_a_quantized_base_model_runs_objects_close_to_its_float_model(kind, folders, reference):
    family, load, config = QUANTIZED[kind]
    pipe = load(folders)
    assert quantized_layers(pipe.transformer) == (3 * 2 * LAYERS if family == "wan" else 3 * LAYERS)
    got = run(pipe, family, steps=2, objects=objects(family, pipe.transformer)).frames
    assert rel(got, reference(family, 2, **config).frames) < 0.02
    assert rel(got, run(pipe, family, steps=2).frames) > 0.01  # the motion tokens act through quantized layers


@pytest.mark.parametrize("kind", QUANTIZED)
def test_training_through_a_frozen_quantized_model_changes_only_the_tokens(kind, folders, tmp_path, initial_tokens):
    family, load, _ = QUANTIZED[kind]
    pipe = load(folders)
    before = frozen_state(pipe)
    trained = train(pipe, family, tmp_path / "m.safetensors")
    assert_unchanged(pipe, before)
    assert not torch.equal(trained.tokens, initial_tokens[0])  # gradients reached them through quantized layers


@cuda
@pytest.mark.parametrize("backend", ["bitsandbytes_4bit", "bitsandbytes_8bit"])
def test_bitsandbytes_via_pipeline_quantization_config_runs_objects_and_trains_only_the_tokens(
    backend, folders, tmp_path, initial_tokens
):
    pytest.importorskip("bitsandbytes")
    from diffusers import PipelineQuantizationConfig

    kwargs = (
        {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.float32}
        if backend.endswith("4bit")
        else {"load_in_8bit": True}
    )
    quantization = PipelineQuantizationConfig(
        quant_backend=backend, quant_kwargs=kwargs, components_to_quantize=["transformer"]
    )
    pipe = FlexiMMTWanPipeline.from_pretrained(
        folders["wan"], quantization_config=quantization, torch_dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.to("cuda")
    assert quantized_layers(pipe.transformer) == 3 * 2 * LAYERS
    got = run(pipe, "wan", steps=2, objects=objects("wan", pipe.transformer)).frames
    assert rel(got, run(pipe, "wan", steps=2).frames) > 0.01
    before = frozen_state(pipe)
    trained = train(pipe, "wan", tmp_path / "m.safetensors")
    assert_unchanged(pipe, before)
    assert not torch.equal(trained.tokens, initial_tokens[0])


@cuda
def test_torchao_float8_weight_only_runs_objects_where_the_gpu_has_float8(folders):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 needs compute capability 8.9 or newer")
    from diffusers import PipelineQuantizationConfig, TorchAoConfig
    from torchao.quantization import Float8WeightOnlyConfig

    quantization = PipelineQuantizationConfig(quant_mapping={"transformer": TorchAoConfig(Float8WeightOnlyConfig())})
    pipe = FlexiMMTWanPipeline.from_pretrained(
        folders["wan"], quantization_config=quantization, torch_dtype=torch.bfloat16
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.to("cuda")
    got = run(pipe, "wan", steps=2, objects=objects("wan", pipe.transformer)).frames
    assert torch.isfinite(got).all() and rel(got, run(pipe, "wan", steps=2).frames) > 0.01


# -- 7. group offloading -------------------------------------------------------------------------------
OFFLOADS = {
    "block_level": dict(offload_type="block_level", num_blocks_per_group=1),
    "leaf_level": dict(offload_type="leaf_level"),
}


def group_offloaded(family: str, kind: str, onload: str = "cpu", **extra):
    pipe = make_pipe(family)
    pipe.transformer.enable_group_offload(torch.device(onload), torch.device("cpu"), **OFFLOADS[kind], **extra)
    return pipe


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", OFFLOADS)
def test_group_offloading_gives_the_same_video_and_masks_with_objects(kind, family, reference):
    pipe = group_offloaded(family, kind)
    got, want = (
        run(pipe, family, steps=2, objects=objects(family, pipe.transformer), return_masks=True),
        reference(family, 2),
    )
    assert torch.equal(got.frames, want.frames) and torch.equal(got.masks, want.masks)


def test_group_offloading_every_component_of_the_pipeline_gives_the_same_video_with_objects():
    """``pipe.enable_group_offload``: the text and image encoders and the VAE too (the small-card rows of
    BENCHMARKS.md), decoded frames compared."""
    pipe, plain = make_pipe("wan"), make_pipe("wan")
    pipe.enable_group_offload(torch.device("cpu"), torch.device("cpu"), offload_type="leaf_level")
    got, want = (
        run(p, "wan", steps=1, objects=objects("wan", p.transformer), output_type="np", return_masks=True)
        for p in (pipe, plain)
    )
    assert np.array_equal(got.frames, want.frames) and torch.equal(got.masks, want.masks)


@pytest.fixture(scope="module")
def trained_without_offload(tmp_path_factory) -> torch.Tensor:
    return train(make_pipe("wan"), "wan", tmp_path_factory.mktemp("plain") / "m.safetensors").tokens


@pytest.mark.parametrize("kind", OFFLOADS)
def test_training_through_a_group_offloaded_transformer_trains_the_same_tokens(kind, tmp_path, trained_without_offload):
    pipe = group_offloaded("wan", kind)
    assert torch.equal(train(pipe, "wan", tmp_path / "m.safetensors").tokens, trained_without_offload)


@cuda
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", OFFLOADS)
def test_group_offloading_to_the_cpu_with_streams_keeps_tokens_and_masks_on_the_gpu(kind, family, monkeypatch):
    """Weights wait on the CPU and stream to the GPU block by block; the motion tokens and every step's
    masks live on the GPU (the onload device), and the video is the one without offloading."""
    places = []
    set_masks = FlexiMMTState.set_video_masks

    def spy(self, video_masks, video=0, parts=None):
        places.append((video_masks.device.type, self.videos[video].motion_tokens.device.type))
        return set_masks(self, video_masks, video, parts)

    monkeypatch.setattr(FlexiMMTState, "set_video_masks", spy)
    pipe = group_offloaded(family, kind, "cuda", use_stream=True)
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module) and name != "transformer":
            module.to("cuda")
    reference = make_pipe(family).to("cuda")
    got, want = (
        run(p, family, steps=2, objects=objects(family, p.transformer), return_masks=True) for p in (pipe, reference)
    )
    assert places and set(places) == {("cuda", "cuda")}
    assert rel(got.frames.cpu(), want.frames.cpu()) < 1e-4 and torch.equal(got.masks, want.masks)


def test_the_small_card_tables_int8_weights_bound_torchaos_own():
    """BENCHMARKS.md's 24 GB / 16 GB rows count an int8 transformer as ``benchmarks/memory.py`` does; torchao's
    quantized tensors of a tiny one take at most that, and no less than 95% of it."""
    import importlib.util
    import sys
    from pathlib import Path

    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    folder = Path(__file__).parent.parent / "benchmarks"
    sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location("fleximmt_bench_memory_cards", folder / "memory.py")
    memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory)
    transformer = make_pipe("wan", **GGUF_WAN).transformer.to(torch.bfloat16)
    counted = memory.scheme_bytes(transformer, "int8")
    quantize_(transformer, Int8WeightOnlyConfig())
    stored = sum(t.numel() * t.element_size() for v in transformer.state_dict().values() for t in plain_tensors(v))
    assert 0.95 * counted <= stored <= counted
