"""Model presets, parameter counts per family and FLOP formulas against transformers and torch's FLOP counter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT

from bumblefast import flops

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
    # by the full name: the NVL parts are not their SXM namesakes (a substring match gave 989)
    assert flops.peak_tflops("NVIDIA H200 NVL") == 835.0
    assert flops.peak_tflops("NVIDIA H100 NVL") == 835.0
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert flops.peak_tflops(" nvidia  h200 ") == 989.0  # case and spacing only
    assert flops.peak_tflops("NVIDIA H200 Something New") is None  # unknown: no MFU, not a guess
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
    assert "qwen2 -> Qwen2ForCausalLM; head_dim 128, q/k/v bias yes, o_proj bias no" in out


FAMILY_CONFIGS = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=48)),
    "qwen3_bias": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=48, attention_bias=True)),
    "llama_bias": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True)),
    "llama3_tied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            tie_word_embeddings=True,
            rope_scaling=dict(
                rope_type="llama3",
                factor=32.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8192,
            ),
        ),
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(head_dim=48, sliding_window=None)),
}


@pytest.mark.parametrize("case", FAMILY_CONFIGS)
def test_param_count_matches_transformers_per_family(case, tmp_path):
    """flops.param_count of a config.json (biases and q/k norms per family) equals transformers'
    own class; `model info` names the detected family and its switches."""
    import transformers

    from bumblefast.modelinfo import model_info

    cfg_cls, model_cls, extra = FAMILY_CONFIGS[case]
    kw = dict(hidden_size=192, intermediate_size=320, num_hidden_layers=3, num_attention_heads=6)
    cfg = getattr(transformers, cfg_cls)(vocab_size=1000, num_key_value_heads=2, **kw, **extra)
    cfg.save_pretrained(tmp_path)
    with torch.device("meta"):
        model = getattr(transformers, model_cls)(cfg)
    assert flops.param_count(load(tmp_path)) == sum(p.numel() for p in model.parameters())
    info = model_info(tmp_path)
    assert f"{cfg.model_type} -> {model_cls}; head_dim {extra.get('head_dim', 32)}" in info
    assert f"q/k norm {'yes' if cfg.model_type == 'qwen3' else 'no'}" in info
    if case == "llama3_tied":
        assert "rope llama3 (factor 32.0, low_freq_factor 1.0, high_freq_factor 4.0, " in info
        assert "tied embeddings yes" in info


def test_model_info_unsupported_model_type(tmp_path):
    from bumblefast.config import UserError
    from bumblefast.modelinfo import model_info

    cfg = load(ROOT / "configs/models/bumblebee-tiny")
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, model_type="gemma2")))
    with pytest.raises(
        UserError, match="model_type 'gemma2' is not supported; supported: qwen2, qwen3, llama, mistral"
    ):
        model_info(tmp_path)
