"""Where each object's motion words sit among the prompt's text tokens (``Y_mo^k`` of Sec. 3.2).

Motion words are found by their characters: the prompt is tokenised as the pipeline tokenises it,
with each token's character offsets, the words are looked up in the text as whole words, and their
span is the tokens whose characters overlap them. Tokenising the words alone and searching the
prompt's ids (:func:`find_token_spans`) fails on real tokenizers: T5 splits "(jumps)" into "(",
"j", "umps", ")" but "jumps" alone into "jumps"; a byte-level BPE (Qwen2.5) gives " jumps"
mid-sentence other ids than "jumps" alone. The id search remains for tokenizers without offsets.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from ..errors import FlexiMMTInputError


def prompt_token_ids(tokenizer, prompt: str, max_sequence_length: int) -> list[int]:
    """The prompt's token ids exactly as diffusers' ``encode_prompt`` produces them (CogVideoX, Wan; HunyuanVideo 1.5 after its chat template)."""
    return tokenizer(
        prompt, padding="max_length", max_length=max_sequence_length, truncation=True, add_special_tokens=True
    ).input_ids


def find_word_spans(
    tokenizer,
    text: str,
    phrases: Sequence[str],
    max_length: int,
    *,
    prompt_start: int = 0,
    skip_tokens: int = 0,
    prompt_end: int | None = None,
) -> list[list[int]]:
    """Token indices of each phrase of ``phrases`` among the ``max_length`` text tokens the
    transformer sees, found by characters (a "fast" tokenizer's offsets).

    ``text`` is what the pipeline hands its tokenizer: the prompt itself, or a template around it
    whose prompt is ``text[prompt_start:prompt_end]``. It is tokenised as diffusers' pipelines do
    (padding to, and truncation at, ``max_length + skip_tokens`` tokens; special tokens added);
    ``skip_tokens`` are the tokens the pipeline crops from the front before the transformer sees
    them (HunyuanVideo 1.5 crops its chat template's first 108), so every index returned is in
    ``[0, max_length)``. A phrase is found in the prompt only, never in the template, as whole
    words ("jumps" is not in "jumpsuit", "run" not in "runs"; any run of spaces between words
    matches any other), case-sensitively; its span is the tokens whose characters overlap it.

    A phrase that occurs several times goes to the first occurrence no earlier phrase has taken
    (so "A dog jumps. A cat jumps." gives each object its own "jumps"); when all are taken the
    phrase shares the first one. Raises ``FlexiMMTInputError`` for an empty phrase or prompt, a
    phrase not in the prompt (naming a case-insensitive or part-of-a-word match), or one past the
    length limit. A tokenizer without offsets (a "slow" Python tokenizer, e.g. ByT5's) falls back to
    :func:`find_token_spans` over the tokens after the crop (only the crop leaves a template out).
    """
    prompt = text[prompt_start:prompt_end]
    tokenizer_length = max_length + skip_tokens
    if not getattr(tokenizer, "is_fast", False):
        ids = prompt_token_ids(tokenizer, text, tokenizer_length)[skip_tokens:]
        encode = lambda phrase: tokenizer(phrase.strip(), add_special_tokens=False).input_ids
        return find_token_spans(ids, phrases, encode, prompt, max_length)
    kept = token_offsets(
        tokenizer(
            text,
            padding="max_length",
            max_length=tokenizer_length,
            truncation=True,
            add_special_tokens=True,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
        )
    )
    whole = token_offsets(
        tokenizer(
            text, add_special_tokens=True, return_offsets_mapping=True, return_special_tokens_mask=True, verbose=False
        )
    )
    prompt_end = len(text) if prompt_end is None else prompt_end
    taken: set[int] = set()
    spans = []
    for phrase in phrases:
        found = []
        for start, end in phrase_occurrences(text, phrase.strip(), prompt_start, prompt_end, phrase):
            span, full = overlapping(kept, start, end), overlapping(whole, start, end)
            if not full:
                raise FlexiMMTInputError(
                    f"motion words {phrase!r} are empty after tokenisation: name words of the prompt"
                )
            if len(span) == len(full):  # the length limit cuts none of its tokens
                found.append((start, span))
        if not found:
            raise FlexiMMTInputError(
                f"motion words {phrase!r} are cut off: the prompt is longer than the model's {max_length} text "
                f"tokens and the words lie past them; shorten the prompt or move the words earlier"
            )
        free = [(start, span) for start, span in found if start not in taken]
        start, span = free[0] if free else found[0]
        taken.add(start)
        if span[0] < skip_tokens:
            raise ValueError(
                f"motion words {phrase!r} lie among the {skip_tokens} tokens the pipeline crops "
                f"(prompt_start={prompt_start}): the adapter's prompt_start and skip_tokens disagree"
            )
        spans.append([i - skip_tokens for i in span])
    return spans


def token_offsets(encoding) -> list[tuple[int, int] | None]:
    """Every token's (start, end) characters in the text; None for special tokens and padding."""
    return [
        (start, end) if end > start and not special else None
        for (start, end), special in zip(encoding["offset_mapping"], encoding["special_tokens_mask"])
    ]


def overlapping(offsets: list[tuple[int, int] | None], start: int, end: int) -> list[int]:
    """The indices of the tokens whose characters overlap ``[start, end)``."""
    return [i for i, o in enumerate(offsets) if o is not None and o[0] < end and o[1] > start]


def phrase_occurrences(text: str, words: str, start: int, end: int, phrase: str) -> list[tuple[int, int]]:
    """(start, end) characters of every whole-word occurrence of ``words`` in ``text[start:end]``;
    raises ``FlexiMMTInputError`` naming the fix when there is none (``phrase`` as the user gave it)."""
    prompt = text[start:end]
    if not words:
        raise FlexiMMTInputError(f"motion words {phrase!r} are empty: name words of the prompt")
    if not prompt.strip():
        raise empty_prompt(phrase)
    pattern = whole_words(words)
    hits = [(m.start(), m.end()) for m in pattern.finditer(text, start, end)]
    if hits:
        return hits
    other_case = re.compile(pattern.pattern, re.IGNORECASE).search(text, start, end)
    if other_case:
        raise FlexiMMTInputError(
            f"motion words {phrase!r} are not in the prompt {prompt!r} as written, but {other_case.group()!r} is: "
            f"write the motion words with the prompt's letter case"
        )
    inside = re.compile(r"\w*" + r"\s+".join(map(re.escape, words.split())) + r"\w*").search(text, start, end)
    if inside:
        raise FlexiMMTInputError(
            f"motion words {phrase!r} are only part of longer words of the prompt ({inside.group()!r}): "
            f"name whole words, e.g. {inside.group()!r}"
        )
    raise FlexiMMTInputError(
        f"motion words {phrase!r} were not found among the tokens of the prompt {prompt!r}: copy the words "
        f"exactly as the prompt has them"
    )


def whole_words(words: str) -> re.Pattern:
    """``words`` as a pattern that matches them only as whole words: not preceded (followed) by a
    word character where they start (end) with one; any whitespace between words."""
    pattern = r"\s+".join(map(re.escape, words.split()))
    if re.match(r"\w", words[0]):
        pattern = r"(?<!\w)" + pattern
    if re.match(r"\w", words[-1]):
        pattern += r"(?!\w)"
    return re.compile(pattern)


def empty_prompt(phrase: str) -> FlexiMMTInputError:
    return FlexiMMTInputError(
        f"the prompt is empty, so the motion words {phrase!r} are not in it: write a prompt that describes "
        f"the scene and holds each object's motion words as they are, e.g. 'A dog {phrase}.'"
    )


def find_token_spans(
    ids: Sequence[int],
    phrases: Sequence[str],
    encode: Callable[[str], Sequence[int]],
    prompt: str,
    max_sequence_length: int,
) -> list[list[int]]:
    """Token indices of each phrase inside the prompt's token ids ``ids``; ``encode(phrase)`` gives a
    phrase's ids without special tokens (a slow diffusers tokenizer's, or a ComfyUI CLIP's).

    The id search: a phrase is found where its ids, tokenised alone, recur among the prompt's. It
    misses words a tokenizer splits differently inside a sentence (see the module's docstring), so
    :func:`find_word_spans` uses it only for tokenizers without character offsets. ComfyUI's native
    patch uses it too: a ComfyUI CLIP (``SPieceTokenizer`` for Wan's umT5) tokenises the prompt
    after parsing its weight syntax, one weighted segment at a time, and gives no offsets into the
    prompt. A phrase that occurs several times goes to the first occurrence no earlier phrase has
    taken; when all are taken the phrase shares the first one.
    """
    ids = list(ids)
    taken: set[int] = set()
    spans = []
    for phrase in phrases:
        words = list(encode(phrase))
        if not words:
            raise FlexiMMTInputError(f"motion words {phrase!r} are empty after tokenisation: name words of the prompt")
        starts = [i for i in range(len(ids) - len(words) + 1) if ids[i : i + len(words)] == words]
        if not starts and not prompt.strip():
            raise empty_prompt(phrase)
        if not starts:
            raise FlexiMMTInputError(
                f"motion words {phrase!r} were not found among the tokens of the prompt {prompt!r} "
                f"(cut to {max_sequence_length} tokens): copy the words exactly as the prompt has them"
            )
        free = [s for s in starts if s not in taken]
        start = free[0] if free else starts[0]
        taken.add(start)
        spans.append(list(range(start, start + len(words))))
    return spans
