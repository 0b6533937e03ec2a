"""Shared fixtures: the demo tokenizer (trained once per session) and paths."""

from __future__ import annotations

import os
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
