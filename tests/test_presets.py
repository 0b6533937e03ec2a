"""Model presets and FLOP formulas against transformers' Qwen2 and torch's FLOP counter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bumblefast import flops

ROOT = Path(__file__).resolve().parent.parent
PRESETS = sorted((ROOT / "configs" / "models").iterdir())


def load(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_param_count_matches_transformers_qwen2(preset):
    from transformers import AutoConfig, Qwen2ForCausalLM

    cfg = AutoConfig.from_pretrained(preset)
    assert cfg.model_type == "qwen2"
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    assert flops.param_count(load(preset)) == sum(p.numel() for p in model.parameters())
    assert (preset / "generation_config.json").is_file()


def test_1_5b_preset_values():
    cfg = load(ROOT / "configs/models/bumblebee-1.5b")
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]) == (1536, 28, 12)
    assert (cfg["num_key_value_heads"], cfg["intermediate_size"], cfg["vocab_size"]) == (2, 8960, 151936)
    assert cfg["rope_theta"] == 1e6 and cfg["tie_word_embeddings"] is True
    assert abs(flops.param_count(cfg) / 1e9 - 1.54) < 0.005


def test_train_flops_match_torch_flop_counter():
    """Forward + backward FLOPs of transformers' eager Qwen2 on one document, counted by
    torch, equal our formula with the attention term taken non-causal (eager attention
    computes the full square and masks it); biases and norms are not matmuls (<0.5%)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = load(ROOT / "configs/models/bumblebee-tiny")
    qcfg = Qwen2Config(**cfg)
    qcfg._attn_implementation = "eager"
    model = Qwen2ForCausalLM(qcfg)
    s = 48
    with FlopCounterMode(display=False) as counter:
        model(torch.randint(0, cfg["vocab_size"], (1, s)), use_cache=False).logits.sum().backward()
    layers, d = cfg["num_hidden_layers"], cfg["hidden_size"]
    full_square_attention = 12 * layers * d * s * s
    ours = 6 * flops.matmul_params(cfg) * s + full_square_attention
    assert counter.get_total_flops() == pytest.approx(ours, rel=5e-3)
    # the causal count we report is the same matmuls minus the half the mask throws away
    assert flops.attention_flops(cfg, [s]) == 6 * layers * d * s * (s + 1)


def test_attention_flops_follow_document_lengths():
    cfg = load(ROOT / "configs/models/bumblebee-1.5b")
    one_row = flops.train_flops(cfg, [2048])
    packed = flops.train_flops(cfg, [512] * 4)
    assert packed < one_row  # same tokens, no cross-document attention
    assert one_row - packed == pytest.approx(flops.attention_flops(cfg, [2048]) - 4 * flops.attention_flops(cfg, [512]))


def test_peak_tflops_lookup():
    assert flops.peak_tflops("NVIDIA H200") == 989.0
    assert flops.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert flops.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert flops.peak_tflops("cpu") is None
    assert flops.peak_tflops("cpu", override=1.5) == 1.5


def test_model_info_cli():
    out = subprocess.run(
        [sys.executable, "-m", "bumblefast", "model", "info", str(ROOT / "configs/models/bumblebee-1.5b")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "1,543,714,304 (1.54B)" in out and "FLOPs/token" in out
