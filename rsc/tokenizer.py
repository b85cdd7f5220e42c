"""CLIP BPE tokenizers built offline from the merges file that ``open_clip`` ships.

transformers and diffusers ship no CLIP vocabulary and nothing may be downloaded
here, so tiny test models and the toy world build a real CLIP tokenizer from
``open_clip/bpe_simple_vocab_16e6.txt.gz``: the same byte-level BPE as SD's
tokenizer, truncated to the first ``num_merges`` merges.
"""

from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

# Full CLIP uses 49152 - 256 - 2 merges; the first line of the file is a header.
FULL_CLIP_NUM_MERGES = 48894
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode character table used by byte-level BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {byte: chr(code) for byte, code in zip(printable, codes)}


def clip_bpe_path() -> Path:
    """Path of CLIP's BPE merges file inside the installed ``open_clip`` package."""
    # find_spec avoids importing open_clip (and timm) just to locate a data file.
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "open_clip_torch is required to build CLIP tokenizers offline: pip install open_clip_torch"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"CLIP BPE merges file not found at {path}; reinstall open_clip_torch")
    return path


@lru_cache(maxsize=1)
def _all_merges() -> tuple[tuple[str, str], ...]:
    lines = gzip.open(clip_bpe_path()).read().decode("utf-8").split("\n")
    return tuple(tuple(line.split()) for line in lines[1 : FULL_CLIP_NUM_MERGES + 1])  # type: ignore[misc]


def clip_vocab_and_merges(num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary and merge list truncated to the first ``num_merges`` merges."""
    if not 0 <= num_merges <= FULL_CLIP_NUM_MERGES:
        raise ValueError(f"num_merges must be in [0, {FULL_CLIP_NUM_MERGES}], got {num_merges}")
    merges = list(_all_merges()[:num_merges])
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}, merges


def build_clip_tokenizer(num_merges: int = 1000, model_max_length: int = 77) -> CLIPTokenizer:
    """A real CLIP BPE tokenizer with a prefix of CLIP's merges, built in memory.

    Its vocabulary size is ``512 + num_merges + 2``; with ``num_merges=48894`` it is
    SD 1.x's tokenizer. Save it with ``save_pretrained`` like any tokenizer.
    """
    vocab, merges = clip_vocab_and_merges(num_merges)
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=model_max_length,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
    )
