"""Shared fixtures: the demo tokenizer (trained once per session), paths, a one-rank world."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
DEMO_DATA = ROOT / "datasets" / "demo"
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def demo_tokenizer_dir(tmp_path_factory) -> Path:
    from bumblefast.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    files = [DEMO_DATA / f for f in ("pretrain.json", "sft_alpaca.json", "sft_sharegpt.json", "dpo.json")]
    train_tokenizer(files, 1024, out)
    return out


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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
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
