"""The words every tiny model's tokenizer knows, and the offline T5 tokenizer on them that CogVideoX's T5 and
Wan's UMT5 read (HunyuanVideo 1.5's Qwen and LTX-2's Gemma tokenizers are built from the same words in their
families' tiny modules)."""

from __future__ import annotations

WORDS = [
    "A",
    "An",
    "The",
    "a",
    "an",
    "the",
    "and",
    "is",
    "are",
    "on",
    "in",
    "with",
    "of",
    "to",
    "at",
    "its",
    "from",
    "red",
    "green",
    "blue",
    "yellow",
    "white",
    "black",
    "orange",
    "purple",
    "small",
    "big",
    "left",
    "right",
    "middle",
    "ball",
    "box",
    "star",
    "circle",
    "square",
    "triangle",
    "sprite",
    "dog",
    "cat",
    "man",
    "tiger",
    "rabbit",
    "jumps",
    "jumping",
    "moves",
    "moving",
    "slides",
    "sliding",
    "rolls",
    "rolling",
    "spins",
    "spinning",
    "walks",
    "walking",
    "runs",
    "up",
    "down",
    "left",
    "right",
    "around",
    "quickly",
    "slowly",
    "still",
    "stands",
    "bounces",
    "zigzags",
    "circles",
    "grows",
    "shrinks",
    "doing",
    "yoga",
    "snow",
    "ground",
    "background",
    ".",
    ",",
]


def tiny_tokenizer(words: tuple[str, ...] = WORDS):
    """An offline T5 tokenizer whose vocabulary is ``words`` (no download)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    seen = set()
    for w in words:
        # punctuation both glued to the previous word ("up.") and standing alone ("up .")
        for piece in [w, "\u2581" + w] if w in ".," else ["\u2581" + w]:
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, -1.0))
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def tiny_t5_encoder(model_class: type, config_class: type, vocab_size: int, text_dim: int, layers: int = 1):
    """A tiny T5-family text encoder (``model_class`` of ``config_class``: T5's or umT5's) for a tokenizer of
    ``vocab_size`` (:func:`tiny_tokenizer`'s: pad 0, end 1), random weights."""
    config = config_class(
        vocab_size=vocab_size,
        d_model=text_dim,
        d_kv=8,
        d_ff=2 * text_dim,
        num_layers=layers,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
    )
    return model_class(config)
