"""Motion words found by their characters in the prompt (``method/prompt.find_word_spans``), with the
real tokenizers of the model families, read from ComfyUI's source (not part of fleximmt; the
Makefile's ``../shared/comfyui``, or $COMFYUI): T5 (CogVideoX's; umT5 for Wan is not there, so T5
stands in for it), Qwen2.5 (HunyuanVideo 1.5's, with its chat template and crop) and ByT5 (a slow
tokenizer: the id search). Every expectation is exact token indices, checked by decoding the ids the
pipeline itself would give the transformer at those indices back to the words."""

import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from fleximmt import ObjectMotion
from fleximmt.errors import FlexiMMTInputError, ObjectInputError
from fleximmt.method.prompt import find_token_spans, find_word_spans

COMFYUI = Path(os.environ.get("COMFYUI") or Path(__file__).resolve().parents[1] / ".." / "shared" / "comfyui")
ENCODERS = COMFYUI / "comfy" / "text_encoders"
L = 226  # CogVideoX-5B's text length


def load(name):
    folder = ENCODERS / name
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent: it holds the real {name} (ComfyUI's source; set COMFYUI)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def t5():
    return load("t5_tokenizer")


@pytest.fixture(scope="module")
def qwen():
    return load("qwen25_tokenizer")


@pytest.fixture(scope="module")
def byt5():
    return load("byt5_tokenizer")


@pytest.fixture(scope="module", params=["t5", "qwen"])
def fast(request):
    return request.param, load({"t5": "t5_tokenizer", "qwen": "qwen25_tokenizer"}[request.param])


def pipeline_ids(tokenizer, text, max_length=L):
    """The ids as diffusers' ``encode_prompt`` gives them to the text encoder (not fleximmt's code)."""
    return tokenizer(
        text, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True
    ).input_ids


def words_at(tokenizer, ids, spans):
    return [tokenizer.decode([ids[i] for i in span]).strip() for span in spans]


# (prompt, phrases, {tokenizer: spans}, what the tokens at the spans decode to)
FOUND = {
    "brackets": (
        "The cat (jumps) while the dog runs.",
        ["jumps", "runs"],
        {"t5": [[3, 4], [9]], "qwen": [[3, 4], [9]]},
        ["jumps", "runs"],
    ),
    "punctuation": (
        "A dog jumps, then rolls over!",
        ["jumps", "rolls over"],
        {"t5": [[2, 3], [6, 7]], "qwen": [[2], [5, 6]]},
        ["jumps", "rolls over"],
    ),
    "quotes": (
        "The dog \"runs\" and the cat says 'hi'.",
        ["runs", "hi"],
        {"t5": [[3, 4], [12, 13]], "qwen": [[3], [10]]},
        ["runs", "hi"],
    ),
    "hyphen": ("A boy high-fives a girl.", ["high-fives"], {"t5": [[2, 3, 4, 5]], "qwen": [[2, 3, 4]]}, ["high-fives"]),
    "repeated": (
        "A dog jumps. A cat jumps.",
        ["jumps", "jumps", "jumps"],  # the third shares the first
        {"t5": [[2, 3], [7, 8], [2, 3]], "qwen": [[2], [6], [2]]},
        ["jumps"] * 3,
    ),
    "prefix": (
        "The kids run and the dog runs.",
        ["runs", "run"],
        {"t5": [[6], [2]], "qwen": [[6], [2]]},
        ["runs", "run"],
    ),
    "case": ("The Dog Jumps.", ["Jumps"], {"t5": [[2, 3]], "qwen": [[2, 3]]}, ["Jumps"]),
}


@pytest.mark.parametrize("case", list(FOUND))
def test_motion_words_are_the_tokens_their_characters_overlap(fast, case):
    name, tokenizer = fast
    prompt, phrases, spans, words = FOUND[case]
    assert find_word_spans(tokenizer, prompt, phrases, L) == spans[name]
    assert words_at(tokenizer, pipeline_ids(tokenizer, prompt), spans[name]) == words


def test_the_id_search_misses_words_the_tokenizer_splits_inside_the_sentence(t5, qwen):
    """Why characters: T5 splits "(jumps)" into "(", "j", "umps", ")"; Qwen's " runs" is not "runs"."""
    for tokenizer, phrase in [(t5, "jumps"), (qwen, "runs")]:
        prompt = "The cat (jumps) while the dog runs."
        ids = tokenizer(phrase, add_special_tokens=False).input_ids
        with pytest.raises(FlexiMMTInputError, match="were not found"):
            find_token_spans(pipeline_ids(tokenizer, prompt), [phrase], lambda _, ids=ids: ids, prompt, L)


REFUSED = {
    "inside a longer word": (
        "A dog wears a jumpsuit.",
        "jumps",
        "only part of longer words of the prompt ('jumpsuit')",
    ),
    "a prefix of a word": ("The dog runs.", "run", "only part of longer words of the prompt ('runs')"),
    "other letter case": (
        "The Dog Jumps.",
        "jumps",
        (
            "not in the prompt 'The Dog Jumps.' as written, but 'Jumps' is: "
            "write the motion words with the prompt's letter case"
        ),
    ),
    "absent": (
        "The dog runs.",
        "flies away",
        "motion words 'flies away' were not found among the tokens of the prompt",
    ),
    "empty": ("The dog runs.", "  ", "motion words '  ' are empty: name words of the prompt"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_motion_words_not_in_the_prompt_as_whole_words_are_refused_naming_the_fix(fast, case):
    prompt, phrase, message = REFUSED[case]
    with pytest.raises(FlexiMMTInputError) as err:
        find_word_spans(fast[1], prompt, [phrase], L)
    assert message in str(err.value)


def test_an_empty_prompt_is_named_as_such(fast):
    with pytest.raises(FlexiMMTInputError) as err:
        find_word_spans(fast[1], " ", ["jumps up"], L)
    assert str(err.value) == (
        "the prompt is empty, so the motion words 'jumps up' are not in it: write a prompt that "
        "describes the scene and holds each object's motion words as they are, e.g. "
        "'A dog jumps up.'"
    )


def test_words_cut_by_the_length_limit_are_refused_naming_the_limit(t5, qwen):
    prompt = "A dog sits while a cat jumps over the fence."
    # T5 keeps 9 tokens and its end token at 10: "▁jump" is the 9th, its "s" is cut
    with pytest.raises(FlexiMMTInputError) as err:
        find_word_spans(t5, prompt, ["jumps"], 10)
    assert str(err.value) == (
        "motion words 'jumps' are cut off: the prompt is longer than the model's 10 text tokens "
        "and the words lie past them; shorten the prompt or move the words earlier"
    )
    assert find_word_spans(t5, prompt, ["cat"], 10) == [[7]]
    assert words_at(t5, pipeline_ids(t5, prompt, 10), [[7]]) == ["cat"]
    # Qwen adds no end token: 7 tokens keep " jumps" (the 7th) and cut " over"
    assert find_word_spans(qwen, prompt, ["jumps"], 7) == [[6]]
    assert words_at(qwen, pipeline_ids(qwen, prompt, 7), [[6]]) == ["jumps"]
    with pytest.raises(FlexiMMTInputError, match=r"'jumps over' are cut off: .* model's 7 text tokens"):
        find_word_spans(qwen, prompt, ["jumps over"], 7)


def test_a_repeated_phrase_past_the_limit_is_not_an_occurrence(t5):
    prompt = "A dog jumps. A cat jumps."  # T5: the second "▁jump" "s" are tokens 7, 8
    assert find_word_spans(t5, prompt, ["jumps", "jumps"], 8) == [[2, 3], [2, 3]]  # shares the kept one


# -- a chat template around the prompt, its front cropped (HunyuanVideo 1.5 with Qwen2.5) ----------
@pytest.fixture(scope="module")
def hunyuan_template():
    """HunyuanVideo 1.5's system message and crop, as diffusers' pipeline defines them."""
    import inspect

    module = pytest.importorskip("diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5")
    defaults = inspect.signature(module.HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters
    return defaults["system_message"].default, defaults["crop_start"].default


def chat(qwen, system, prompt):
    """The templated text and where the prompt sits in it."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    text = qwen.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    start = text.index("<|im_start|>user\n") + len("<|im_start|>user\n")
    return messages, text, start, start + len(prompt)


def test_a_template_s_words_never_count_and_indices_are_after_the_crop(qwen, hunyuan_template):
    system, crop = hunyuan_template
    prompt = "A dancer's movements are slow."
    messages, text, start, end = chat(qwen, system, prompt)
    assert (
        "movements" in system and len(qwen(text[:start]).input_ids) == crop == 108
    )  # the crop is the template's front
    spans = find_word_spans(qwen, text, ["movements", "slow"], 40, prompt_start=start, skip_tokens=crop, prompt_end=end)
    assert spans == [[3], [5]]
    seen = qwen.apply_chat_template(
        messages,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        padding="max_length",
        max_length=40 + crop,
        truncation=True,
    ).input_ids[crop:]
    assert len(seen) == 40 and words_at(qwen, seen, spans) == ["movements", "slow"]
    for phrase in ["transitions", "assistant"]:  # in the template only (before and after the prompt)
        with pytest.raises(
            FlexiMMTInputError, match=re.escape(f"'{phrase}' were not found among the tokens of the prompt {prompt!r}")
        ):
            find_word_spans(qwen, text, [phrase], 40, prompt_start=start, skip_tokens=crop, prompt_end=end)
    with pytest.raises(FlexiMMTInputError, match=r"'slow' are cut off: .* model's 5 text tokens"):
        find_word_spans(qwen, text, ["slow"], 5, prompt_start=start, skip_tokens=crop, prompt_end=end)


# -- a tokenizer without offsets ------------------------------------------------------------------
def test_a_slow_tokenizer_falls_back_to_the_id_search(byt5):
    assert not byt5.is_fast  # ByT5: one token per byte, no offsets
    prompt = "The cat (jumps) while the dog runs."
    spans = find_word_spans(byt5, prompt, ["jumps", "runs"], 64)
    assert spans == [list(range(9, 14)), list(range(30, 34))]
    assert words_at(byt5, pipeline_ids(byt5, prompt, 64), spans) == ["jumps", "runs"]
    # the crop: indices count from the first token the transformer sees
    assert find_word_spans(byt5, "user: " + prompt, ["jumps"], 64, prompt_start=6, skip_tokens=6) == [
        list(range(9, 14))
    ]


# -- through the families' adapters ----------------------------------------------------------------
PROMPT = "The cat (jumps) while the dog runs."


def with_real_tokenizer(pipe, tokenizer):
    """``pipe`` with ``tokenizer`` and a tiny T5 text encoder of its vocabulary (random weights)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    d_model = pipe.text_encoder.config.d_model
    pipe.tokenizer = tokenizer
    pipe.text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=d_model,
            d_kv=8,
            d_ff=2 * d_model,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
        )
    ).eval()
    return pipe


@pytest.fixture(scope="module")
def cogvideox(t5):
    from fleximmt.toy import tiny_pipeline

    return with_real_tokenizer(tiny_pipeline(0), t5)


def motions(pipe, words):
    from fleximmt.toy import random_motion

    size = 32
    masks = [np.zeros((size, size), bool) for _ in words]
    for k, mask in enumerate(masks):
        mask[: size // 2, k * size // 2 : (k + 1) * size // 2] = True
    return [
        ObjectMotion(m, random_motion(pipe.transformer, 4, seed=k + 1), w) for k, (m, w) in enumerate(zip(masks, words))
    ]


def test_cogvideox_finds_motion_words_as_its_t5_tokenizes_the_prompt(cogvideox, t5):
    spans = cogvideox.adapter.word_spans(PROMPT, ["jumps", "runs"], 16)
    assert spans == [[3, 4], [9]]
    assert words_at(t5, pipeline_ids(t5, PROMPT, 16), spans) == ["jumps", "runs"]


def test_the_pipeline_and_training_find_words_through_the_adapter(cogvideox, monkeypatch):
    from PIL import Image

    from fleximmt.training.train import TrainSettings, prepare_conditions

    adapter_class = type(cogvideox.adapter)
    calls = []
    real = adapter_class.word_spans

    def recorded(self, prompt, phrases, text_len):
        calls.append((prompt, list(phrases), text_len))
        return real(self, prompt, phrases, text_len)

    monkeypatch.setattr(adapter_class, "word_spans", recorded)
    image = Image.fromarray(np.full((32, 32, 3), 128, np.uint8))
    cogvideox(
        image=image,
        prompt=PROMPT,
        objects=motions(cogvideox, ["jumps", "runs"]),
        num_inference_steps=1,
        max_sequence_length=16,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    )
    assert calls[-1] == (PROMPT, ["jumps", "runs"], 16)
    frames = np.random.RandomState(0).randint(0, 255, (9, 32, 32, 3), dtype=np.uint8)
    cond = prepare_conditions(
        cogvideox.adapter, frames, PROMPT, "cat", "jumps", TrainSettings(max_windows=1), (32, 32, 9), None, 0
    )
    assert calls[-2:] == [(PROMPT, ["jumps"], 16), (PROMPT, ["cat"], 16)]
    assert cond.member[0].nonzero().flatten().tolist() == [3, 4]
    assert cond.concept_member[0].nonzero().flatten().tolist() == [1]


def test_words_missing_from_the_prompt_are_named_by_their_object(cogvideox):
    from PIL import Image

    image = Image.fromarray(np.full((32, 32, 3), 128, np.uint8))
    with pytest.raises(ObjectInputError) as err:
        cogvideox(
            image=image,
            prompt=PROMPT,
            objects=motions(cogvideox, ["jumps", "run"]),
            num_inference_steps=1,
            max_sequence_length=16,
            output_type="latent",
        )
    assert str(err.value).startswith(
        "object 2: motion words 'run' are only part of longer words of the prompt ('runs')"
    )


def test_wan_finds_motion_words_in_the_prompt_as_its_pipeline_cleans_it(t5):
    """Wan's umT5 tokenizer is not in ComfyUI's source: T5's (the same sentencepiece kind) stands in.
    Wan cleans the prompt (HTML entities, runs of spaces) before tokenising it; the words are
    found in the cleaned text."""
    from diffusers.pipelines.wan.pipeline_wan_i2v import prompt_clean

    from fleximmt.toy.tiny import tiny_wan_pipeline

    pipe = tiny_wan_pipeline(0)
    pipe.tokenizer = t5
    prompt = "The cat  (jumps) &amp; the dog runs."
    spans = pipe.adapter.word_spans(prompt, ["jumps", "runs"], 24)
    cleaned = prompt_clean(prompt)
    assert cleaned == "The cat (jumps) & the dog runs."
    assert spans == [[3, 4], [10]]  # T5 splits "&" into "▁", "&"
    assert words_at(t5, pipeline_ids(t5, cleaned, 24), spans) == ["jumps", "runs"]
