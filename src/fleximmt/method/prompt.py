"""Where each object's motion words sit among the prompt's T5 tokens (``Y_mo^k`` of Sec. 3.2)."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import FlexiMMTInputError


def prompt_token_ids(tokenizer, prompt: str, max_sequence_length: int) -> list[int]:
    """The prompt's token ids exactly as diffusers' CogVideoX ``encode_prompt`` produces them."""
    return tokenizer(
        prompt, padding="max_length", max_length=max_sequence_length, truncation=True, add_special_tokens=True
    ).input_ids


def find_word_spans(tokenizer, prompt: str, phrases: Sequence[str], max_sequence_length: int) -> list[list[int]]:
    """Token indices of each phrase inside the prompt as a diffusers pipeline tokenises it (see
    :func:`find_token_spans`)."""
    ids = prompt_token_ids(tokenizer, prompt, max_sequence_length)
    return find_token_spans(ids, phrases, lambda phrase: tokenizer(phrase, add_special_tokens=False).input_ids,
                            prompt, max_sequence_length)  # fmt: skip


def find_token_spans(ids: Sequence[int], phrases: Sequence[str], encode, prompt: str,
                     max_sequence_length: int) -> list[list[int]]:  # fmt: skip
    """Token indices of each phrase inside the prompt's token ids ``ids``; ``encode(phrase)`` gives a
    phrase's ids without special tokens (a diffusers tokenizer's, or a ComfyUI CLIP's).

    A phrase that occurs several times goes to the first occurrence no earlier phrase has taken
    (so "A dog jumps. A cat jumps." can give each object its own "jumps"); when all are taken
    the phrase shares the first one.
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
            raise FlexiMMTInputError(
                f"the prompt is empty, so the motion words {phrase!r} are not in it: write a prompt that describes "
                f"the scene and holds each object's motion words as they are, e.g. 'A dog {phrase}.'"
            )
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
