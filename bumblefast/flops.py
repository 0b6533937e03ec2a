"""Parameter and FLOP counts: the one home of the formulas behind `model info` and MFU.

Convention (docs/performance.md): FLOPs are counted by what a step computes. Per token and
matmul weight (N_matmul: every weight a token is multiplied by, all non-embedding weights
plus the LM head, once even when tied; LoRA adapters are matmul weights too):

- forward: 2;
- activation gradients: 2, for every matmul whose input needs a gradient (with a frozen
  embedding, as in LoRA, the first layer's q/k/v inputs do not);
- weight gradients: 2, only for trained weights (LoRA: the adapters alone);
- a live DPO reference (adapter disabled, or a frozen copy): one more forward of the base
  model; a precomputed reference: 0.

So full training is 6 * N_matmul per token. The LM head's share counts only the rows with a
target (``head_tokens``; None: every row): a row no loss reads needs no logits, as a pair of
tokens in different documents needs no attention score; our fused heads skip such rows (the
prompt of an SFT or DPO sample), a peer that computes them does work no loss reads.

Causal attention from the actual document lengths: a document of s tokens costs
2 * L * d_attn * s * (s + 1) forward (QK^T and AV, 2 * 2 * d_attn per visited key, each query
visiting (s + 1) / 2 keys on average) and twice that backward.
Cross-document pairs are never counted because they are never computed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

# Dense bf16 tensor-core peaks (TFLOP/s) by the full name torch.cuda.get_device_name() gives
# (NVIDIA's datasheets halve the "with sparsity" figure). Keyed by the full name on purpose: a
# family match would give "NVIDIA H200 NVL" (835) the SXM H200's 989.
PEAK_TFLOPS_BF16 = {
    "NVIDIA H200": 989.0,  # SXM
    "NVIDIA H200 NVL": 835.0,
    "NVIDIA H100 80GB HBM3": 989.0,  # SXM
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA GH200 480GB": 989.0,
    "NVIDIA B200": 2250.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA L40S": 362.0,
    "NVIDIA L4": 121.0,
    "NVIDIA A10G": 125.0,
    "NVIDIA GeForce RTX 4090": 165.0,
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
    return (
        h,
        _get(cfg, "num_hidden_layers"),
        n_heads,
        kv,
        head_dim,
        _get(cfg, "intermediate_size"),
        _get(cfg, "vocab_size"),
    )


def layer_params(cfg: Any) -> int:
    """One decoder layer: q/k/v, o, SwiGLU MLP, two RMSNorms, with the biases and q/k norms of
    the config's family (model.py FAMILIES; Qwen2: bias on q/k/v only)."""
    from bumblefast.model import arch_of

    arch = arch_of(cfg)
    h, _, n_heads, kv, hd, inter, _ = _dims(cfg)
    q = h * n_heads * hd + arch.qkv_bias * n_heads * hd
    k = v = h * kv * hd + arch.qkv_bias * kv * hd
    o = n_heads * hd * h + arch.o_bias * h
    mlp = 3 * h * inter + arch.mlp_bias * (2 * inter + h)
    return q + k + v + o + mlp + 2 * h + arch.qk_norm * 2 * hd


def param_count(cfg: Any) -> int:
    """Stored parameters, as `sum(p.numel())` of transformers' class of the config's family."""
    h, layers, *_, vocab = _dims(cfg)
    embed = vocab * h
    head = 0 if _get(cfg, "tie_word_embeddings", True) else vocab * h
    return embed + layers * layer_params(cfg) + h + head


def matmul_params(cfg: Any) -> int:
    """Weights each token is multiplied by: every layer's weight matrices and the LM head (not
    the embedding lookup, biases or norms, which add or scale)."""
    h, layers, *_, vocab = _dims(cfg)
    return layers * sum(i * o for i, o in linear_shapes(cfg).values()) + vocab * h


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


LIVE_REFERENCES = ("adapter", "copy")


def forward_flops(
    cfg: Any, doc_lens: Iterable[int], kv_prefix: Iterable[int] | None = None, head_tokens: int | None = None
) -> float:
    """One forward of the base model, no backward: what reference scoring computes (the LoRA
    adapter disabled, or a frozen copy), and what a live reference adds to a DPO step."""
    doc_lens = list(doc_lens)
    total = 2.0 * matmul_params(cfg) * sum(doc_lens) + attention_flops(cfg, doc_lens, kv_prefix) / 3
    return total - 2.0 * _head_rows_skipped(cfg, doc_lens, head_tokens)


def _head_rows_skipped(cfg: Any, doc_lens: list, head_tokens: int | None) -> float:
    """LM-head weights times the rows without a target (0 when head_tokens is None)."""
    if head_tokens is None:
        return 0.0
    tokens = sum(doc_lens)
    if not 0 <= head_tokens <= tokens:
        raise ValueError(f"head_tokens must be between 0 and the {tokens} tokens, got {head_tokens}")
    h, *_, vocab = _dims(cfg)
    return float(vocab * h * (tokens - head_tokens))


def row_flops(cfg: Any, work: Mapping[str, Any]) -> float:
    """FLOPs of one benchmark row's round, from its own description ``work``: ``parts`` (a list
    of such descriptions, e.g. reference scoring then policy steps: their sum), or
    ``doc_lens`` with optional ``kv_prefix`` and either ``forward_only=True`` (scoring) or the
    training step's ``lora_rank``/``lora_targets``/``reference`` (step_flops)."""
    if "parts" in work:
        return sum(row_flops(cfg, part) for part in work["parts"])
    if work.get("forward_only"):
        return forward_flops(cfg, work["doc_lens"], work.get("kv_prefix"), work.get("head_tokens"))
    lora = work.get("lora_rank") or 0
    return step_flops(
        cfg,
        work["doc_lens"],
        lora_rank=lora,
        lora_targets=work.get("lora_targets", ()) if lora else (),
        reference=work.get("reference"),
        kv_prefix=work.get("kv_prefix"),
        head_tokens=work.get("head_tokens"),
    )


def row_layout_shares(cfg: Any, work: Mapping[str, Any]) -> dict[str, float]:
    """The fraction of a row's FLOPs (row_flops) in each GEMM layout a step runs: its forwards
    (a scoring pass, a live reference's, the step's own) in ``forward``; the rest is backward, in
    ``input_grad`` over a frozen base (LoRA: only the rank-r adapters have weight gradients), and
    split alike between ``input_grad`` and ``weight_grad`` in full training. What a row's GEMM
    ceiling is mixed from (benchmarks/harness.gemm_rate); parts: each by its FLOPs."""
    if work.get("forward_only"):
        return {"forward": 1.0}
    total = row_flops(cfg, work)
    if "parts" in work:
        shares: dict[str, float] = {}
        for part in work["parts"]:
            weight = row_flops(cfg, part) / total
            for layout, share in row_layout_shares(cfg, part).items():
                shares[layout] = shares.get(layout, 0.0) + weight * share
        return shares
    fwd = forward_flops(cfg, work["doc_lens"], work.get("kv_prefix"), work.get("head_tokens"))
    if work.get("reference") in LIVE_REFERENCES:
        fwd *= 2
    back = 1.0 - fwd / total
    if work.get("lora_rank"):
        return {"forward": fwd / total, "input_grad": back}
    return {"forward": fwd / total, "input_grad": back / 2, "weight_grad": back / 2}


def linear_shapes(cfg: Any) -> dict[str, tuple[int, int]]:
    """(in, out) features of each decoder-layer linear, by its module name."""
    h, _, n_heads, kv, hd, inter, _ = _dims(cfg)
    return {
        "q_proj": (h, n_heads * hd),
        "k_proj": (h, kv * hd),
        "v_proj": (h, kv * hd),
        "o_proj": (n_heads * hd, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }


def step_flops(
    cfg: Any,
    doc_lens: Iterable[int],
    lora_rank: int = 0,
    lora_targets: Iterable[str] = (),
    reference: str | None = None,
    kv_prefix: Iterable[int] | None = None,
    head_tokens: int | None = None,
) -> float:
    """FLOPs of one training pass over these documents, counted by what is computed (module
    docstring): full training (``lora_rank=0``) or LoRA on ``lora_targets``; ``reference`` is
    the DPO reference (``adapter``/``copy``: a live forward, ``precomputed``/None: none);
    ``kv_prefix``: shared-prompt keys each document also attends (attention_flops);
    ``head_tokens``: the rows with a target, where the LM head is needed (None: all)."""
    doc_lens = list(doc_lens)
    tokens = sum(doc_lens)
    h, layers, *_, vocab = _dims(cfg)
    attn_fwd = attention_flops(cfg, doc_lens, kv_prefix) / 3
    base = matmul_params(cfg)
    skipped = _head_rows_skipped(cfg, doc_lens, head_tokens)
    if not lora_rank:
        total = 6.0 * base * tokens + 3 * attn_fwd - 6.0 * skipped
    else:
        shapes = linear_shapes(cfg)
        targets = set(lora_targets)
        unknown = targets - set(shapes)
        if unknown:
            raise ValueError(f"lora_targets: {sorted(unknown)} are not decoder-layer linears {sorted(shapes)}")
        adapter = {m: lora_rank * (i + o) for m, (i, o) in shapes.items() if m in targets}
        adapters = layers * sum(adapter.values())
        # Walk layer 0 (frozen embedding and norms): nothing needs a gradient before the first
        # adapter; later layers read a residual stream that does (when any adapter exists).
        no_input_grad = 0
        for name in ("q_proj", "k_proj", "v_proj"):  # read the first layer's normed input
            no_input_grad += shapes[name][0] * shapes[name][1] + (lora_rank * shapes[name][0] if name in adapter else 0)
        attn_grad = any(m in adapter for m in ("q_proj", "k_proj", "v_proj"))
        needs = attn_grad
        if not needs:  # o_proj reads the attention output, gate/up the residual: no gradient yet
            no_input_grad += _mm(shapes, "o_proj", adapter, lora_rank)
            needs = "o_proj" in adapter
        if not needs:
            no_input_grad += _mm(shapes, "gate_proj", adapter, lora_rank) + _mm(shapes, "up_proj", adapter, lora_rank)
            needs = "gate_proj" in adapter or "up_proj" in adapter
            if not needs:
                no_input_grad += _mm(shapes, "down_proj", adapter, lora_rank)
        if not adapter:
            raise ValueError("lora_targets: name at least one decoder-layer linear for LoRA")
        # layer 0's attention backward: per score/value matmul (half its forward), dQ if q needs a
        # gradient, dK if k, dP if either, dV if v; later layers run all four (twice the forward)
        q, k, v = ("q_proj" in adapter), ("k_proj" in adapter), ("v_proj" in adapter)
        attn_layers = layers - 1 + (q + k + (q or k) + v) / 4
        total = (
            2.0 * (base + adapters) * tokens
            + attn_fwd  # forward
            + 2.0 * (base + adapters - no_input_grad) * tokens
            + 2 * attn_fwd * attn_layers / layers
            + 2.0 * adapters * tokens
            - 4.0 * skipped  # the frozen head's forward and input gradient
        )  # weight gradients: the adapters only
    if reference in LIVE_REFERENCES:
        total += forward_flops(cfg, doc_lens, kv_prefix, head_tokens)
    elif reference not in (None, "none", "precomputed"):
        raise ValueError(f"reference must be one of {LIVE_REFERENCES}, 'precomputed' or None, got {reference!r}")
    return total


def _mm(shapes: dict, name: str, adapter: dict, rank: int) -> int:
    """Matmul weights of one linear with its adapter's first (input-reading) matrix."""
    i, o = shapes[name]
    return i * o + (rank * i if name in adapter else 0)


def train_flops_per_token(cfg: Any, seq_len: int) -> float:
    """FLOPs per token when every document is `seq_len` long (pretraining rows)."""
    return train_flops(cfg, [seq_len]) / seq_len


def peak_tflops(device_name: str, override: float | None = None) -> float | None:
    """Dense bf16 peak of a device by its full name (case and surrounding spaces ignored); None
    where unknown (then MFU is not reported: pass the peak as ``override``)."""
    if override:
        return float(override)
    wanted = " ".join(device_name.split()).upper()
    return next((v for k, v in PEAK_TFLOPS_BF16.items() if k.upper() == wanted), None)
