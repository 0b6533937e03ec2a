"""Embedding rows vs tokenizer size: a fresh model is sized to its tokenizer; trained weights
grow only when asked (`--resize_vocab`).

A preset's `vocab_size` (151,936 for bumblebee, Qwen2's) is right for Qwen2's tokenizer and
wrong for any other: a 32k tokenizer on the 1.5B preset leaves ~120k embedding rows (~185M
parameters) that no token id ever reaches, and a 2,000-token tokenizer on the tiny preset
(1,024 rows) cannot run at all. Random init has nothing to preserve, so pretraining from a
preset takes the tokenizer's size, rounded up to a multiple of VOCAB_MULTIPLE: the embedding
and LM-head matmuls then have tile-aligned shapes (tensor cores work on 8/16-wide tiles, and
GEMM kernels pick their fastest tilings for multiples of 64/128; Qwen2's 151,936 = 1187 x 128
follows the same rule). The padding rows are never a target, so they only cost memory.
"""

from __future__ import annotations

from typing import Any

VOCAB_MULTIPLE = 128


def padded_vocab_size(n_tokens: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """`n_tokens` rounded up to a multiple of `multiple`."""
    return -(-n_tokens // multiple) * multiple


def fresh_vocab_size(n_tokens: int, override: int | None = None) -> int:
    """Embedding rows of a randomly initialised model for a tokenizer of `n_tokens` ids:
    `override` (--vocab_size) when given, else the padded tokenizer size."""
    from bumblefast.config import UserError

    if override is None:
        return padded_vocab_size(n_tokens)
    if override < n_tokens:
        raise UserError(f"vocab_size: {override} is smaller than the tokenizer's {n_tokens} tokens")
    return override


def grow_embeddings(model: Any, new_size: int) -> None:
    """Give `model` (a Bumblebee) `new_size` embedding rows (and LM-head rows when untied);
    each new row is the mean of the trained rows, so a new token starts as an "average"
    token instead of a random direction that would dominate the softmax (Hewitt 2021,
    "Initializing new word embeddings"; transformers' `mean_resizing`, without its 1e-9
    covariance noise)."""
    import torch

    emb = model.get_input_embeddings()
    old_size, hidden = emb.weight.shape
    if new_size <= old_size:
        return
    tied = getattr(model.config, "tie_word_embeddings", False)
    with torch.no_grad():
        new_emb = torch.nn.Embedding(new_size, hidden, dtype=emb.weight.dtype, device=emb.weight.device)
        new_emb.weight[:old_size] = emb.weight
        new_emb.weight[old_size:] = emb.weight.mean(0, dtype=torch.float32).to(emb.weight.dtype)
        model.model.embed_tokens = new_emb
        if not tied:
            head = model.get_output_embeddings()
            new_head = torch.nn.Linear(hidden, new_size, bias=False, dtype=head.weight.dtype, device=head.weight.device)
            new_head.weight[:old_size] = head.weight
            new_head.weight[old_size:] = head.weight.mean(0, dtype=torch.float32).to(head.weight.dtype)
            model.lm_head = new_head
    model.config.vocab_size = new_size
    model.tie_weights()
