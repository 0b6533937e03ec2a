"""Helpers shared by the end-to-end tests (imported as `helpers`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "models" / "bumblebee-tiny"


def subprocess_env(**extra) -> dict:
    """Environment for a `bumblefast` child process: one thread (the suite shares 2 cores),
    DeepSpeed's compiled ops in the per-checkout cache, unbuffered output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def save_tiny_model(out: Path, tokenizer_dir: Path, seed: int = 0, chatty: bool = False) -> Path:
    """A seeded random tiny bumblebee in HF format with the demo tokenizer. chatty: weights
    scaled up so replies depend on the context, and no special tokens, so replies never stop
    before max_new_tokens (for chat/serve tests)."""
    from transformers import AutoConfig, AutoTokenizer

    from bumblefast.model import Bumblebee

    torch.manual_seed(seed)
    model = Bumblebee(AutoConfig.from_pretrained(TINY), attn_backend="sdpa", kernels="reference").init_weights()
    if chatty:
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 2:
                    p.mul_(8.0)
            model.lm_head.weight[:3] = 0  # (tied) the three ChatML specials are never the argmax
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out
