"""Helpers shared by the end-to-end tests (imported as `helpers`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from bumblefast.train.distributed import free_port  # noqa: F401 (the tests' one home for it)

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "datasets" / "demo"
TINY = ROOT / "configs" / "models" / "bumblebee-tiny"
SHARED_DATA = ROOT.parent / "shared" / "data"


HOOKS_SCRIPT = ROOT / "tests" / "train_hooks.py"  # the CLI with the trainer's test callbacks

# `bumblefast train` settings every end-to-end test shares: deterministic, small, no extras
TRAIN_DEFAULTS = {
    "warmup_ratio": 0,
    "logging_steps": 1,
    "save_steps": 1000,
    "gradient_checkpointing": "false",
    "kernels": "reference",
    "seed": 0,
    "deepspeed_config_path": ROOT / "configs" / "deepspeed" / "ds_z0.json",
}


def train_command(stage: str, *extra: str, nproc: int = 1, hooks: bool = False, **flags) -> list[str]:
    """`bumblefast train --stage STAGE` with TRAIN_DEFAULTS < flags (as --key value) < extra
    (later flags win); nproc > 1 under torchrun; hooks: tests/train_hooks.py instead of the CLI."""
    entry = [str(HOOKS_SCRIPT)] if hooks else ["-m", "bumblefast"]
    launcher = [sys.executable, *entry]
    if nproc > 1:
        port = str(29500 + os.getpid() % 1000 + 200 * (stage == "dpo"))
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
        launcher += ["--master_port", port, *entry]
    args = [x for k, v in {**TRAIN_DEFAULTS, **flags}.items() for x in (f"--{k}", str(v))]
    return [*launcher, "train", "--stage", stage, *args, *extra]


def prep(tok, out: Path, stage: str, inputs=(), seq_len: int = 256, **kw) -> dict:
    """`bumblefast prep` in this process (no progress bar): the stage's inputs into shards at `out`."""
    from bumblefast.config import PrepConfig
    from bumblefast.prep.run import run_prep

    cfg = PrepConfig(
        stage=stage,
        input=[str(p) for p in inputs],
        tokenizer_name_or_path=str(tok),
        seq_len=seq_len,
        output_dir=str(out),
        **kw,
    )
    return run_prep(cfg, progress=False)


DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def subprocess_env(**extra) -> dict:
    """Environment for a `bumblefast` child process: one thread (the suite shares 2 cores),
    DeepSpeed's compiled ops in the per-checkout cache, unbuffered output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    for key in DIST_ENV:  # a child starts its own world (an in-process one_rank run may have set these)
        env.pop(key, None)
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
