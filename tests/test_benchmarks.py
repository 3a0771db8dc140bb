"""benchmarks/gpu.py's dry mode on a CPU: every code path the GPU run takes, on a tiny config, and
its JSON carries every field the GPU run will fill."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_gpu_module():
    spec = importlib.util.spec_from_file_location("fleximmt_bench_gpu", BENCHMARKS / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RUN_FIELDS = {"fits", "error", "steps_s", "s_per_step", "peak_gib", "peak_activations_gib"}


def test_gpu_benchmark_dry_run_writes_every_field(tmp_path):
    gpu = load_gpu_module()
    out = tmp_path / "gpu.json"
    with torch.random.fork_rng():
        assert (
            gpu.main(
                [
                    "--device",
                    "cpu",
                    "--tiny",
                    "--steps",
                    "1",
                    "--train-steps",
                    "1",
                    "--more-objects",
                    "1",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
    result = json.loads(out.read_text())
    for field in (
        "device",
        "torch",
        "diffusers",
        "model",
        "tiny",
        "dtype",
        "size",
        "video_tokens",
        "text_tokens",
        "objects",
        "tokens_per_motion",
        "weights_gib",
        "paper_release_s_per_step_a800",
    ):
        assert field in result, field
    assert result["tiny"] is True and result["device"] == "cpu" and result["video_tokens"] == 3 * 4 * 6
    assert set(result["inference"]) == {
        "diffusers",
        "fleximmt_auto",
        "diffusers_again",
        "fleximmt_auto_k1",
        "fleximmt_dense",
    }
    for name, run in result["inference"].items():
        assert RUN_FIELDS | {"backend", "objects", "ratio"} <= set(run), name
        assert run["fits"] and len(run["steps_s"]) == 1 and run["s_per_step"] > 0 and run["ratio"] > 0, name
        assert run["peak_gib"] is None  # CUDA's counter only
    # ratios are to the mean of diffusers' runs before and after FlexiMMT's
    assert result["inference"]["diffusers"]["ratio"] + result["inference"]["diffusers_again"]["ratio"] == pytest.approx(
        2
    )
    assert (
        result["inference"]["fleximmt_auto"]["objects"] == 3 and result["inference"]["fleximmt_auto_k1"]["objects"] == 1
    )
    expected = {f"{kind}_checkpointing_{on}" for kind in ("plain", "fleximmt") for on in ("on", "off")}
    assert set(result["training"]) == expected
    for name, run in result["training"].items():
        assert RUN_FIELDS | {"fleximmt", "gradient_checkpointing"} <= set(run), name
        assert run["fits"] and run["s_per_step"] > 0, name


@pytest.mark.parametrize("model", ["wan2.1", "wan2.2-5b"])
def test_gpu_benchmark_dry_run_on_wan(model, tmp_path, monkeypatch):
    """Wan's path: two batch-1 calls per step, FlexiMMT in attn2 (the cross form), training with
    checkpointing (whose recomputation must see the motion tokens: it raised before the fix)."""
    from fleximmt.method.attention import FlexiMMTState

    calls = []
    cross = FlexiMMTState.cross_attention
    monkeypatch.setattr(FlexiMMTState, "cross_attention", lambda self, *a: calls.append(a[0]) or cross(self, *a))
    gpu = load_gpu_module()
    out = tmp_path / "gpu.json"
    with torch.random.fork_rng():
        assert (
            gpu.main(
                ["--device", "cpu", "--tiny", "--model", model, "--steps", "1", "--train-steps", "1", "--out", str(out)]
            )
            == 0
        )
    result = json.loads(out.read_text())
    assert result["model"].startswith("Wan2") and result["text_tokens"] == 512
    assert all(
        run["fits"] and run["s_per_step"] > 0 for run in [*result["inference"].values(), *result["training"].values()]
    )
    layers = gpu.CHECKPOINTS[model][1].tiny["num_layers"]
    # inference: auto and dense x 2 steps (warm-up + 1) x 2 calls (cond, uncond); training: 2 steps without
    # checkpointing, 2 with it, where each block's attn2 runs again in the backward pass
    assert len(calls) == layers * (2 * 2 * 2 + 2 + 2 * 2)


def test_gpu_benchmark_dry_run_on_hunyuan15(tmp_path, monkeypatch):
    """HunyuanVideo 1.5's path: the guider's two batch-1 forwards per step, each with its own padded text
    (the adapter's hook names each row's text form: padded keys left out), FlexiMMT in the joint attention,
    training with checkpointing (whose recomputation must see the motion tokens)."""
    from fleximmt.method.attention import FlexiMMTState

    texts = []
    joint = FlexiMMTState.joint_attention

    def spy(self, block, query, key, value, text_len, *rest, **kw):
        texts.append(kw.get("texts", rest[1] if len(rest) > 1 else None))
        return joint(self, block, query, key, value, text_len, *rest, **kw)

    monkeypatch.setattr(FlexiMMTState, "joint_attention", spy)
    gpu = load_gpu_module()
    out = tmp_path / "gpu.json"
    with torch.random.fork_rng():
        assert (
            gpu.main(
                [
                    "--device",
                    "cpu",
                    "--tiny",
                    "--model",
                    "hunyuan1.5",
                    "--steps",
                    "1",
                    "--train-steps",
                    "1",
                    "--more-objects",
                    "1",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
    result = json.loads(out.read_text())
    true = gpu.CHECKPOINTS["hunyuan1.5"][1]
    assert result["model"].startswith("HunyuanVideo-1.5") and result["text_tokens"] == true.tiny_text["prompt"]
    assert result["baseline"] == "diffusers' HunyuanVideo15AttnProcessor2_0"
    assert all(
        run["fits"] and run["s_per_step"] > 0 for run in [*result["inference"].values(), *result["training"].values()]
    )
    layers = true.tiny["num_layers"]
    # inference: auto, dense and K = 1 x 2 steps (warm-up + 1) x 2 forwards (cond, uncond); training: 2 steps
    # without checkpointing, 2 with it, where each block's attention runs again in the backward pass
    assert len(texts) == layers * (3 * 2 * 2 + 2 + 2 * 2)
    image, text = true.tiny_text["image"], true.tiny_text
    inference = {tuple(t) for t in texts[: layers * 4]}
    assert inference == {((image, image + text["valid"]),), ((image, image + text["valid_negative"]),)}


def test_gpu_benchmark_dry_run_on_ltx2(tmp_path, monkeypatch):
    """LTX-2's path: a step is the pipeline's three forwards (CFG's rows [negative | positive], then spatio-temporal
    and modality guidance's of the positive prompt), FlexiMMT in attn2 through the adapter's hook (rows per forward),
    training with checkpointing (whose recomputation must see the motion tokens)."""
    from fleximmt.method.attention import FlexiMMTState

    rows = []
    cross = FlexiMMTState.cross_with
    monkeypatch.setattr(
        FlexiMMTState,
        "cross_with",
        lambda self, block, query, *a, **k: (
            rows.append(self.rows.of_batch(query.shape[0])[0]) or cross(self, block, query, *a, **k)
        ),
    )
    gpu = load_gpu_module()
    out = tmp_path / "gpu.json"
    with torch.random.fork_rng():
        assert (
            gpu.main(
                [
                    "--device",
                    "cpu",
                    "--tiny",
                    "--model",
                    "ltx2",
                    "--steps",
                    "1",
                    "--train-steps",
                    "1",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
    result = json.loads(out.read_text())
    true = gpu.CHECKPOINTS["ltx2"][1]
    assert result["model"].startswith("LTX-2") and result["text_tokens"] == true.tiny_text["prompt"]
    assert all(
        run["fits"] and run["s_per_step"] > 0 for run in [*result["inference"].values(), *result["training"].values()]
    )
    layers = true.tiny["num_layers"]
    step = [[0, 0]] * layers + [[0]] * 2 * layers  # one step: CFG's forward, then STG's and modality guidance's
    # in gpu.py's order: auto x 2 steps (warm-up + 1) x 3 forwards; training (one video, rows None), 2 steps without
    # checkpointing and 2 with it, where each block's attn2 runs again in the backward pass; dense as auto
    assert rows == step * 2 + [None] * layers * (2 + 2 * 2) + step * 2


def test_gpu_benchmark_time_limit_keeps_what_it_measured(tmp_path):
    """Past --time-limit no further variant starts; the JSON (written after every variant) says which were skipped."""
    gpu = load_gpu_module()
    out = tmp_path / "gpu.json"
    with torch.random.fork_rng():
        assert gpu.main(["--device", "cpu", "--tiny", "--steps", "1", "--time-limit", "0", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["inference"]["diffusers"]["s_per_step"] > 0  # the baseline always runs
    assert result["inference"]["fleximmt_auto"]["error"] == "skipped: time"
    assert result["inference"]["fleximmt_dense"]["error"] == "skipped: time"
    assert all(run["error"] == "skipped: time" and run["s_per_step"] is None for run in result["training"].values())
    assert not list(tmp_path.glob("*.tmp"))


def test_gpu_benchmark_profile_writes_one_table_per_variant(tmp_path):
    """--profile DIR: one more step of each variant under torch.profiler, not counted in its timings."""
    gpu = load_gpu_module()
    with torch.random.fork_rng():
        assert (
            gpu.main(
                [
                    "--device",
                    "cpu",
                    "--tiny",
                    "--steps",
                    "1",
                    "--train-steps",
                    "1",
                    "--skip-dense",
                    "--checkpointing",
                    "off",
                    "--profile",
                    str(tmp_path / "prof"),
                    "--out",
                    str(tmp_path / "g.json"),
                ]
            )
            == 0
        )
    tables = {p.name: p.read_text() for p in (tmp_path / "prof").iterdir()}
    assert set(tables) == {
        "diffusers.txt",
        "fleximmt_k_3_auto.txt",
        "diffusers_again.txt",
        "plain_fwd_bwd.txt",
        "fleximmt_train.txt",
    }
    assert "scaled_dot_product" in tables["diffusers.txt"] and "grouped by Python stack" in tables["fleximmt_train.txt"]
    result = json.loads((tmp_path / "g.json").read_text())
    assert (
        len(result["inference"]["fleximmt_auto"]["steps_s"]) == 1
        and len(result["training"]["fleximmt_checkpointing_off"]["steps_s"]) == 1
    )
    assert set(result["training"]) == {"plain_checkpointing_off", "fleximmt_checkpointing_off"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the benchmark itself")
def test_gpu_benchmark_without_cuda_says_so_and_exits_0(tmp_path, capsys):
    gpu = load_gpu_module()
    assert gpu.main(["--out", str(tmp_path / "gpu.json")]) == 0
    assert "needs CUDA" in capsys.readouterr().out
    assert not (tmp_path / "gpu.json").exists()


def load_memory_module():
    sys.path.insert(0, str(BENCHMARKS))  # memory.py imports block.py and gpu.py from its folder
    spec = importlib.util.spec_from_file_location("fleximmt_bench_memory", BENCHMARKS / "memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_benchmark_counters_agree_with_the_cpu_allocator():
    """The meta-device counters BENCHMARKS.md's memory tables rest on, against real runs of small
    models: live bytes of a VAE decode and a CogVideoX block against the CPU allocator, a Wan block's
    saved-for-backward bytes on meta against the same block on the CPU (FlexiMMT's and diffusers'),
    a Wan transformer's forward + backward, and every registered checkpoint's tiny transformer through a
    training step's forward + backward as ``MetaRun`` counts it on meta (the family's own inputs, HunyuanVideo
    1.5's masks' counts given to KnownMasks, the layouts built on the CPU and moved) against the same run on the
    CPU with real values, FlexiMMT's processors and diffusers'."""
    memory = load_memory_module()
    ratios = {**memory.validate(), **memory.validate_wan()}
    for model in memory.CHECKPOINTS:
        ratios.update(memory.validate_family(model))
    assert len(ratios) == 5 + 2 * len(memory.CHECKPOINTS)
    for name, ratio in ratios.items():
        assert abs(ratio - 1) < 0.01, (name, ratio)


def test_memory_benchmark_builds_each_checkpoints_other_models_from_its_adapter():
    """The encoders and VAEs memory.py counts are built from the configs each adapter module declares
    (``TrueSize.components``), as the classes the family's pipeline takes: at the sizes of the models the checkpoints
    ship (parameters in billions; T5 v1.1 XXL's encoder, umT5-XXL's, OpenCLIP ViT-H/14, Qwen2.5-VL-7B's language
    model, ByT5-small's encoder with Glyph-SDXL-v2's vocabulary, SigLIP so400m, Gemma 3 12B with its vision tower)."""
    import inspect

    memory = load_memory_module()
    expected = {
        "5b": {"vae": 0.216, "text_encoder": 4.762},
        "wan2.1": {"vae": 0.127, "text_encoder": 5.681, "image_encoder": 0.631},
        "wan2.2-5b": {"vae": 0.705, "text_encoder": 5.681},
        "hunyuan1.5": {"vae": 1.261, "text_encoder": 7.071, "text_encoder_2": 0.219, "image_encoder": 0.428},
        "ltx2": {"vae": 1.222, "audio_vae": 0.053, "vocoder": 0.056, "text_encoder": 12.187, "connectors": 1.431},
    }
    for model, sizes in expected.items():
        adapter, _ = memory.CHECKPOINTS[model]
        components = memory.meta_components(model)
        takes = inspect.signature(adapter.pipeline_class.__init__).parameters
        assert list(components) == list(sizes), model
        for name, module in components.items():
            assert isinstance(module, memory.component_class(adapter.pipeline_class, name)) and name in takes
            assert round(sum(p.numel() for p in module.parameters()) / 1e9, 3) == sizes[name], (model, name)
            assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in module.parameters())


def test_memory_benchmark_counts_every_registered_checkpoint(tmp_path):
    """``memory.py --model ... --tiny``: every checkpoint a family's adapter declares (``--model``'s choices are the
    registered true sizes) is counted through ``MetaRun`` with no line of memory.py naming it: FlexiMMT's step holds
    more than diffusers' (the motion tokens and their layout), gradient checkpointing lowers the training step, and
    the rows add the weights and the optimiser's bytes to those peaks."""
    memory = load_memory_module()
    models = list(memory.CHECKPOINTS)
    assert {"5b", "wan2.1", "hunyuan1.5", "ltx2"} <= set(models)
    out = tmp_path / "memory.json"
    reports = memory.main(["--model", *models, "--tiny", "--objects", "2", "--tokens", "8", "--out", str(out)])
    assert json.loads(out.read_text()).keys() == reports.keys()
    counted = {report["model"]: report for family in reports.values() for report in family}
    assert set(counted) == set(models)
    for model, report in counted.items():
        peaks, rows = report["peaks_gib"], {label: total for label, total, _ in report["rows"]}
        assert peaks["step_flexi"] > peaks["step_plain"] > 0, model
        assert peaks["train_flexi_ckpt"] < peaks["train_flexi_nockpt"], model
        assert peaks["train_plain_ckpt"] < peaks["train_plain_nockpt"], model
        weights = rows["inference, diffusers, the transformer's phase"] - peaks["step_plain"]
        assert weights > 0, model
        ckpt = rows["training step, gradient_checkpointing=True, encoders/VAE offloaded after caching (the defaults)"]
        assert ckpt > weights + peaks["train_flexi_ckpt"], model  # the optimiser's bytes on top


@pytest.mark.comfy
def test_memory_benchmark_counts_learn_motion_native_through_comfyuis_blocks():
    """The step behind benchmarks/memory.py's Learn Motion (native) rows (``--small-cards --comfyui``), on a small
    ComfyUI Wan 2.1 I2V model of 4 blocks: its count against the CPU allocator, and on meta against the CPU
    (``validate_comfy_wan``); gradient checkpointing through ComfyUI's blocks (the training patch's
    ``double_block`` replacement and injection) more than halves the peak; and the bf16 copy of its weight each
    layer of an fp8 model makes at each call is kept for the backward pass of one block at a time with
    checkpointing - about one block's Linear weights in bf16 - and of every block without it (autograd keeps a
    layer's weight for the gradient of its input; the first block's layers before the motion tokens join keep none)."""
    from comfy_server import COMFYUI

    memory = load_memory_module()
    ratios = memory.validate_comfy_wan(COMFYUI)
    assert len(ratios) == 2
    for name, ratio in ratios.items():
        assert abs(ratio - 1) < 0.01, (name, ratio)
    comfy = memory.import_comfyui(COMFYUI)
    cfg = memory.wan_config("wan2.1", **memory.COMFY_WAN_SMALL_CFG)
    peaks = {}
    for weights in ("bf16", "fp8_scaled"):
        for checkpointing in (True, False):
            patcher = memory.comfy_wan_patcher(comfy, weights, memory.COMFY_WAN_SMALL)
            with memory.comfy_wan_training(patcher, 16, checkpointing, memory.COMFY_WAN_SMALL_SIZE, cfg) as step:
                peaks[weights, checkpointing] = memory.measure_peak(step, counter=memory.StorageBytes, grad=True)
    block = patcher.model.diffusion_model.blocks[0]
    block_weights = sum(m.weight.numel() * 2 for m in block.modules() if isinstance(m, torch.nn.Linear))
    assert peaks["bf16", True] < 0.5 * peaks["bf16", False], peaks
    kept = {ckpt: peaks["fp8_scaled", ckpt] - peaks["bf16", ckpt] for ckpt in (True, False)}
    assert 0.5 * block_weights < kept[True] < 1.5 * block_weights, (kept, block_weights)
    assert kept[False] > 2 * block_weights, (kept, block_weights)


@pytest.mark.comfy
@pytest.mark.parametrize("checkpointing", [True, False])
def test_memory_learn_native_asks_comfyui_to_keep_free_what_its_wan21_14b_step_counts(checkpointing):
    """``learn.training_memory`` - what *Learn Motion (native)* asks ComfyUI's model management to keep free for a step
    (``memory_required``) - against the step benchmarks/memory.py counts through ComfyUI's own Wan 2.1 I2V 14B on meta
    (``comfy_wan_patcher``, 480x832, the whole 40 blocks: a count takes about 3 s), at the longest and the shortest
    training window, with Learn's 226 tokens, bf16 weights used in place and fp8_scaled ones cast per call. The ask
    covers the step and is at most 1.15x it. With checkpointing the step a bf16 model's ask must cover is the one with
    per-call weight copies: ComfyUI loads a model partially exactly when it does not fit beside the ask, and then
    streams its layers as copies. (The ask was 16.50 GiB at 81 frames before, against 20.96 counted.)"""
    from comfy_server import COMFYUI

    memory = load_memory_module()
    comfy = memory.import_comfyui(COMFYUI)
    from fleximmt.apps.comfy.learn import training_memory
    from fleximmt.training.train import TrainSettings

    tokens = TrainSettings().tokens_per_motion  # Learn's 226 a motion on a model other than the toy one
    height, width, _ = memory.WAN_GEOMETRY["wan2.1"]
    patchers = {weights: memory.comfy_wan_patcher(comfy, weights) for weights in ("bf16", "fp8_scaled")}
    for frames in (81, 17):
        size = (height, width, frames)
        counted = {}
        for weights, patcher in patchers.items():
            with memory.comfy_wan_training(patcher, tokens, checkpointing, size) as step:
                counted[weights] = memory.measure_peak(step, counter=memory.StorageBytes, grad=True)
        for weights, patcher in patchers.items():
            asked = training_memory(memory.comfy_wan_trainer(patcher), size, checkpointing)
            step = counted["fp8_scaled"] if checkpointing else counted[weights]
            assert step <= asked <= 1.15 * step, (frames, weights, asked / memory.GiB, step / memory.GiB)


@pytest.mark.parametrize("model", ["5b", "wan2.1"])
def test_gpu_benchmark_applies_the_backend_and_cache_to_every_variant(model, tmp_path, monkeypatch):
    """--attention-backend and --cache on diffusers' variants and FlexiMMT's alike (a spy on diffusers'
    backend registry); CogVideoX's baseline is then FlexiMMT's processor without objects, and says so."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    used = set()
    for name, fn in list(_AttentionBackendRegistry._backends.items()):
        monkeypatch.setitem(
            _AttentionBackendRegistry._backends,
            name,
            lambda *a, _fn=fn, _name=name, **kw: used.add(AttentionBackendName(_name).value) or _fn(*a, **kw),
        )
    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", _AttentionBackendRegistry._active_backend)
    gpu = load_gpu_module()
    out = tmp_path / "gpu.json"
    with torch.random.fork_rng():
        assert (
            gpu.main(
                [
                    "--device",
                    "cpu",
                    "--tiny",
                    "--model",
                    model,
                    "--steps",
                    "2",
                    "--skip-training",
                    "--attention-backend",
                    "_native_math",
                    "--cache",
                    "first-block:0.05",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
    result = json.loads(out.read_text())
    assert used == {"_native_math"}
    assert result["attention_backend"] == "_native_math" and result["cache"] == "first-block:0.05"
    assert ("without objects" in result["baseline"]) == (model == "5b")
    assert all(run["fits"] and len(run["steps_s"]) == 2 for run in result["inference"].values())


def test_block_benchmark_runs_one_hunyuan15_block(tmp_path):
    """benchmarks/block.py --model hunyuan1.5 at a tiny video (13 s: the text alone is 1,985 tokens): the
    true-size block (16 heads x 128) with its padded text (729 image + 120 valid of 1,000 prompt tokens),
    diffusers' processor and FlexiMMT's through the same block; FlexiMMT's masked call computes only the
    valid text queries."""
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("fleximmt_bench_block", BENCHMARKS / "block.py")
    block = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(block)
    with torch.random.fork_rng():
        result = block.main(
            [
                "inference",
                "--model",
                "hunyuan1.5",
                "--height",
                "32",
                "--width",
                "48",
                "--frames",
                "1",
                "--objects",
                "2",
                "--tokens",
                "4",
                "--repeats",
                "1",
                "--out",
                str(tmp_path / "i.json"),
            ]
        )
    assert result["video_tokens"] == 1 * 2 * 3 and set(result["runs"]) == {"diffusers", "fleximmt K=2"}
    layout = result["layouts"]["2"]
    assert layout["text_queries"] == 729 + 120 and layout["masked_rows"] == 849 + layout["merged_video_queries"]
    assert all(run["cpu_s"][0] > 0 for run in result["runs"].values())
    assert json.loads((tmp_path / "i.json").read_text())["model"] == "hunyuan1.5"


def test_block_benchmark_runs_one_ltx2_block(tmp_path):
    """benchmarks/block.py --model ltx2 at a tiny video: the true-size block (video 32 heads x 128, audio 32 x 64) with
    the inputs a one-block model's forward hands it (1,024 text tokens, the audio stream's), diffusers' processors and
    FlexiMMT's through the same block, CFG's two rows."""
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("fleximmt_bench_block", BENCHMARKS / "block.py")
    block = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(block)
    with torch.random.fork_rng():
        result = block.main(
            [
                "inference",
                "--model",
                "ltx2",
                "--height",
                "64",
                "--width",
                "64",
                "--frames",
                "9",
                "--objects",
                "2",
                "--tokens",
                "4",
                "--repeats",
                "1",
                "--out",
                str(tmp_path / "i.json"),
            ]
        )
    assert result["video_tokens"] == 2 * 2 * 2 and set(result["runs"]) == {"diffusers", "fleximmt K=2"}
    assert sum(result["layouts"]["2"]["groups"]) == 8  # every video query in one of attn2's groups
    assert all(run["cpu_s"][0] > 0 for run in result["runs"].values())
