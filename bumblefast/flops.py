"""Parameter and FLOP counts: the one home of the formulas behind `model info` and MFU.

Convention (docs/performance.md): training FLOPs = 6 * N_matmul per token, where N_matmul
counts every weight a token is multiplied by (all non-embedding weights plus the LM head,
once even when tied), plus causal attention from the actual document lengths: a document
of s tokens costs 6 * L * d_attn * s * (s + 1) (QK^T and AV, forward 2 * 2 * d_attn per
visited key, backward twice the forward, each query visiting (s + 1) / 2 keys on average).
Cross-document pairs are never counted because they are never computed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

# Dense bf16 tensor-core peaks (TFLOP/s), matched against torch.cuda.get_device_name().
PEAK_TFLOPS_BF16 = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 125.0,
    "RTX 4090": 165.0,
}


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _dims(cfg: Any) -> tuple[int, int, int, int, int, int, int]:
    h = _get(cfg, "hidden_size")
    n_heads = _get(cfg, "num_attention_heads")
    head_dim = _get(cfg, "head_dim") or h // n_heads
    kv = _get(cfg, "num_key_value_heads", n_heads)
    return h, _get(cfg, "num_hidden_layers"), n_heads, kv, head_dim, _get(cfg, "intermediate_size"), _get(cfg, "vocab_size")


def layer_params(cfg: Any) -> int:
    """One decoder layer: q/k/v (with bias), o (no bias), SwiGLU MLP, two RMSNorms."""
    h, _, n_heads, kv, hd, inter, _ = _dims(cfg)
    q = h * n_heads * hd + n_heads * hd
    k = v = h * kv * hd + kv * hd
    o = n_heads * hd * h
    mlp = 3 * h * inter
    return q + k + v + o + mlp + 2 * h


def param_count(cfg: Any) -> int:
    """Stored parameters, as `sum(p.numel())` of transformers' Qwen2ForCausalLM."""
    h, layers, *_, vocab = _dims(cfg)
    embed = vocab * h
    head = 0 if _get(cfg, "tie_word_embeddings", True) else vocab * h
    return embed + layers * layer_params(cfg) + h + head


def matmul_params(cfg: Any) -> int:
    """Weights each token is multiplied by: all but the embedding lookup, plus the LM head."""
    h, layers, *_, vocab = _dims(cfg)
    return layers * layer_params(cfg) + h + vocab * h


def attention_flops(cfg: Any, doc_lens: Iterable[int], kv_prefix: Iterable[int] | None = None) -> float:
    """Training FLOPs of causal attention over documents of the given lengths; a document
    with a shared prefix of p keys (DPO shared prompt) also attends those: s * p more pairs."""
    h, layers, n_heads, _, hd, _, _ = _dims(cfg)
    d_attn = n_heads * hd
    doc_lens = list(doc_lens)
    prefix = list(kv_prefix) if kv_prefix is not None else [0] * len(doc_lens)
    return float(sum(6 * layers * d_attn * s * (s + 1 + 2 * p) for s, p in zip(doc_lens, prefix, strict=True)))


def train_flops(cfg: Any, doc_lens: Iterable[int], kv_prefix: Iterable[int] | None = None) -> float:
    """Training FLOPs (forward + backward) of one pass over these documents."""
    doc_lens = list(doc_lens)
    return 6.0 * matmul_params(cfg) * sum(doc_lens) + attention_flops(cfg, doc_lens, kv_prefix)


def train_flops_per_token(cfg: Any, seq_len: int) -> float:
    """FLOPs per token when every document is `seq_len` long (pretraining rows)."""
    return train_flops(cfg, [seq_len]) / seq_len


def peak_tflops(device_name: str, override: float | None = None) -> float | None:
    """Dense bf16 peak of a device by name; None where unknown (then MFU is not reported)."""
    if override:
        return float(override)
    name = device_name.upper()
    for key in sorted(PEAK_TFLOPS_BF16, key=len, reverse=True):
        if key.upper() in name:
            return PEAK_TFLOPS_BF16[key]
    return None
