"""The offline CLIP tokenizer is CLIP's BPE, not an approximation of it."""

from __future__ import annotations

import pytest
from transformers import CLIPTokenizer

from rsc.tokenizer import FULL_CLIP_NUM_MERGES, build_clip_tokenizer


def test_full_merges_reproduce_sd_token_ids() -> None:
    tokenizer = build_clip_tokenizer(FULL_CLIP_NUM_MERGES)
    assert len(tokenizer) == 49408  # SD 1.x's vocabulary size
    # Token ids of SD 1.x's tokenizer (openai/clip-vit-large-patch14) for this prompt.
    ids = tokenizer("a photo of an astronaut riding a horse").input_ids
    assert ids == [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 49407]


def test_prefix_tokenizer_round_trips_and_saves(tmp_path) -> None:
    tokenizer = build_clip_tokenizer(num_merges=1000, model_max_length=16)
    assert len(tokenizer) == 512 + 1000 + 2
    encoded = tokenizer("a photo of a belor woman", padding="max_length", max_length=16).input_ids
    assert len(encoded) == 16
    assert encoded[0] == tokenizer.bos_token_id and encoded[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(encoded, skip_special_tokens=True) == "a photo of a belor woman"
    tokenizer.save_pretrained(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert reloaded("a photo of a belor woman").input_ids == tokenizer("a photo of a belor woman").input_ids
    assert reloaded.model_max_length == 16


def test_bad_merge_count() -> None:
    with pytest.raises(ValueError, match="num_merges"):
        build_clip_tokenizer(num_merges=FULL_CLIP_NUM_MERGES + 1)
