"""Shared fixtures: the demo tokenizers and tiny models (made once per session), the real
sample data, streaming's shared-memory clean-up, a one-rank world. Paths and plain helpers
(prep, free_port, save_tiny_model) live in helpers.py."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest
from helpers import DEMO, ROOT, SHARED_DATA, free_port, save_tiny_model

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def demo_tokenizer_dir(tmp_path_factory) -> Path:
    from bumblefast.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    files = [DEMO / f for f in ("pretrain.json", "sft_alpaca.json", "sft_sharegpt.json", "dpo.json")]
    train_tokenizer(files, 1024, out)
    return out


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> str:
    """A BPE tokenizer trained on every demo JSON file (the prep/shards tests' vocabulary)."""
    from bumblefast.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(sorted(glob.glob(str(DEMO / "*.json"))), 1024, out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, demo_tokenizer_dir) -> Path:
    """A seeded random tiny bumblebee with the demo tokenizer, in HF format."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"), demo_tokenizer_dir)


@pytest.fixture(scope="session")
def chatty_model_dir(tmp_path_factory, demo_tokenizer_dir) -> Path:
    """The tiny model with context-dependent replies that never stop early (chat/serve tests)."""
    return save_tiny_model(tmp_path_factory.mktemp("chatty_model"), demo_tokenizer_dir, chatty=True)


@pytest.fixture
def clean_shm():
    """Streaming's stale shared memory removed before and after (a killed reader leaves it)."""
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    yield
    clean_stale_shared_memory()


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real sample data not present at {SHARED_DATA} (only in the dev workspace)")
    return SHARED_DATA


@pytest.fixture
def one_rank():
    """A world of one in this process (in-process `train(cfg)`); the environment is restored
    afterwards, so the subprocess tests that follow do not inherit a rank or a port."""
    import torch

    saved = dict(os.environ)
    port = free_port()
    os.environ.update(
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    os.environ.clear()
    os.environ.update(saved)
