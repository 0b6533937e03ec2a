"""Bumblebee: the lean decoder BumbleFast trains, for the Hugging Face families that share one
shape: Qwen2/Qwen2.5, Qwen3, Llama (2, 3.x) and Mistral.

They are all RMSNorm pre-norm decoders with RoPE, GQA and a SwiGLU MLP; what differs is a few
switches, read from the HF config by the family table below (q/k/v and o_proj biases, an MLP
bias, Qwen3's RMSNorm of q and k per head, the RoPE frequency rule), so there is one model,
not a copy per family. Parameter names equal transformers' ``<Family>ForCausalLM`` state-dict
keys, so HF checkpoints load and save both ways and peft LoRA targets (``q_proj`` ...) apply
unchanged. The model runs on a packed micro-batch: a flat token stream ``[T]`` with
``cu_seqlens`` and per-document ``position_ids``; attention never crosses documents (see
``attention.py``). Elementwise ops and the LM-head losses come from the ``bumblefast.kernels``
dispatch; the losses hold at most one chunk of the ``[T, vocab]`` logits.

Deferred init (ZeRO-3 / big models)::

    model = Bumblebee.from_config(config, device="meta")   # no memory
    model.to_empty(device="cuda"); model.init_weights()   # or load a checkpoint
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from bumblefast.attention import ATTENTION, BACKENDS, PackedPlan, compute_dtype, resolve_backend
from bumblefast.config import UserError
from bumblefast.kernels import get_ops, lean
from bumblefast.kernels.dispatch import MODES
from bumblefast.kernels.modules import RMSNorm
from bumblefast.labels import IGNORE_INDEX


# ---------------------------------------------------------------------------- families
class Family(NamedTuple):
    """How one HF ``model_type`` maps onto this model. A bias entry is a constant of the family
    or the name of the config key that decides it (read as transformers' own class reads it)."""

    architecture: str  # written to config.json's `architectures`
    qkv_bias: bool | str
    o_bias: bool | str
    mlp_bias: bool | str
    qk_norm: bool  # RMSNorm over head_dim of q and k before RoPE (Qwen3)


FAMILIES = {
    "qwen2": Family("Qwen2ForCausalLM", qkv_bias=True, o_bias=False, mlp_bias=False, qk_norm=False),
    "qwen3": Family("Qwen3ForCausalLM", "attention_bias", "attention_bias", mlp_bias=False, qk_norm=True),
    "llama": Family("LlamaForCausalLM", "attention_bias", "attention_bias", "mlp_bias", qk_norm=False),
    "mistral": Family("MistralForCausalLM", qkv_bias=False, o_bias=False, mlp_bias=False, qk_norm=False),
}
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # LoRA targets


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    """A config key from a transformers config or a config.json dict (None counts as absent)."""
    value = cfg.get(key) if isinstance(cfg, Mapping) else getattr(cfg, key, None)
    return default if value is None else value


@dataclass(frozen=True)
class Arch:
    """One checkpoint's resolved switches (see :func:`arch_of`)."""

    model_type: str
    architecture: str
    head_dim: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    rope: dict  # rope_type, rope_theta and that type's keys
    sliding_window: int | None  # tokens a query may look back, None: the whole document
    tied: bool


def arch_of(cfg: Any) -> Arch:
    """The family switches of a config (a transformers config or a config.json dict); an
    unsupported model_type, activation, RoPE type or dropout fails naming what is supported."""
    model_type = _get(cfg, "model_type")
    if model_type not in FAMILIES:
        raise UserError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(FAMILIES)} (config.json's model_type)"
        )
    fam = FAMILIES[model_type]
    act = _get(cfg, "hidden_act", "silu")
    if act != "silu":
        raise UserError(f"{model_type}: hidden_act {act!r} is not supported; the MLP is SwiGLU (silu)")
    if _get(cfg, "attention_dropout", 0.0):
        raise UserError(f"{model_type}: attention_dropout {_get(cfg, 'attention_dropout')} is not supported (0.0)")
    rope = rope_parameters(cfg)
    if rope["rope_type"] not in ROPE_INIT:
        raise UserError(
            f"{model_type}: rope_scaling rope_type {rope['rope_type']!r} is not supported; "
            f"supported: {', '.join(ROPE_INIT)}"
        )
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UserError(f"{model_type}: partial_rotary_factor {rope['partial_rotary_factor']} is not supported (1.0)")

    def flag(entry: bool | str) -> bool:
        return entry if isinstance(entry, bool) else bool(_get(cfg, entry, False))

    window = _get(cfg, "sliding_window")  # Mistral: every layer; Qwen2/3: the layers layer_types names
    layer_types = _get(cfg, "layer_types")
    if model_type == "llama" or (layer_types is not None and "sliding_attention" not in layer_types):
        window = None
    if model_type.startswith("qwen") and not _get(cfg, "use_sliding_window", False):
        window = None
    return Arch(
        model_type=model_type,
        architecture=fam.architecture,
        head_dim=_get(cfg, "head_dim") or _get(cfg, "hidden_size") // _get(cfg, "num_attention_heads"),
        qkv_bias=flag(fam.qkv_bias),
        o_bias=flag(fam.o_bias),
        mlp_bias=flag(fam.mlp_bias),
        qk_norm=fam.qk_norm,
        rope=rope,
        sliding_window=window,
        tied=bool(_get(cfg, "tie_word_embeddings", False)),
    )


# ---------------------------------------------------------------------------- RoPE
def rope_parameters(cfg: Any) -> dict:
    """``rope_type``, ``rope_theta`` and the type's own keys. transformers 4.x keeps them in
    ``rope_theta`` + ``rope_scaling`` (older files: ``type``), 5.x in one ``rope_parameters``."""
    p = dict(_get(cfg, "rope_parameters") or _get(cfg, "rope_scaling") or {})
    p["rope_type"] = p.get("rope_type", p.get("type", "default"))
    p.pop("type", None)
    p.setdefault("rope_theta", float(_get(cfg, "rope_theta", 10000.0)))
    p.setdefault("max_position_embeddings", _get(cfg, "max_position_embeddings"))
    if p["rope_type"] in ("llama3", "yarn"):
        p.setdefault("original_max_position_embeddings", p["max_position_embeddings"])
    return p


def _default_freqs(p: dict, dim: int) -> tuple[torch.Tensor, float]:
    """theta^(-2i/d) (Su et al. 2021), computed as transformers does (int64 arange, fp32)."""
    return 1.0 / (p["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim)), 1.0


def _linear_freqs(p: dict, dim: int) -> tuple[torch.Tensor, float]:
    """Position interpolation (Chen et al. 2023): every frequency divided by `factor`."""
    inv_freq, att = _default_freqs(p, dim)
    return inv_freq / p["factor"], att


def _llama3_freqs(p: dict, dim: int) -> tuple[torch.Tensor, float]:
    """Llama 3.1's rule: wavelengths shorter than original_max / high_freq_factor are kept,
    longer than original_max / low_freq_factor divided by `factor`, those between blended
    linearly in original_max / wavelength (transformers' `_compute_llama3_parameters`)."""
    inv_freq, att = _default_freqs(p, dim)
    factor, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / lo, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / hi) * ~(wavelen > old / lo)
    return torch.where(medium, smoothed, scaled), att


def _yarn_freqs(p: dict, dim: int) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023, arXiv 2309.00071): frequencies ramped between interpolated
    (low) and kept (high) over the dimensions rotating beta_slow..beta_fast times in the original
    context, and cos/sin scaled by 0.1 ln(factor) + 1 (or mscale/mscale_all_dim, or
    attention_factor); transformers' `_compute_yarn_parameters`."""
    base, old = p["rope_theta"], p["original_max_position_embeddings"]
    factor = p.get("factor") or p["max_position_embeddings"] / old

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    att = p.get("attention_factor")
    if att is None:
        m, m_all = p.get("mscale"), p.get("mscale_all_dim")
        att = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)

    def correction_dim(rotations):
        return (dim * math.log(old / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(p.get("beta_fast") or 32), correction_dim(p.get("beta_slow") or 1)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").to(dtype=torch.float) / dim)
    keep = 1 - ramp
    return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep, att


# rope_type -> (inv_freq [head_dim / 2] fp32, cos/sin scale). "dynamic" (NTK) and "longrope"
# change with the sequence length at run time and are refused by arch_of.
ROPE_INIT = {"default": _default_freqs, "linear": _linear_freqs, "llama3": _llama3_freqs, "yarn": _yarn_freqs}


def rope_frequencies(arch: Arch) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (fp32, CPU, as transformers computes them at init) and cos/sin scale."""
    return ROPE_INIT[arch.rope["rope_type"]](arch.rope, arch.head_dim)


# ---------------------------------------------------------------------------- modules
class Attention(nn.Module):
    """q/k/v/o projections (biases per family), Qwen3's q/k RMSNorm, RoPE from the `kernels`
    dispatch, attention per document."""

    def __init__(self, config, arch: Arch, kernels: str = "auto"):
        super().__init__()
        h = config.hidden_size
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = arch.head_dim
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=arch.qkv_bias)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=arch.qkv_bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=arch.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=arch.o_bias)
        self.qk_norm = arch.qk_norm
        if arch.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, kernels)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, kernels)
        self.kernels = kernels

    def forward(self, x, cos, sin, plan):
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(t, self.n_kv, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = get_ops(self.kernels, x.device).rope(q, k, cos, sin)
        o = ATTENTION[plan.backend](q, k, v, plan)
        return self.o_proj(o.reshape(t, self.n_heads * self.head_dim))


class DownProj(nn.Linear):
    """The MLP's down projection. ``down_proj(gate, up)`` applies SwiGLU and the projection as one
    :func:`kernels.lean.swiglu_linear`, which recomputes ``silu(gate) * up`` in backward instead of
    keeping it. It stays a module (ZeRO-3 gathers its weight in its hooks) and an ``nn.Linear``
    (same state-dict key; peft wraps it as any linear)."""

    def forward(self, x, up=None):
        return super().forward(x) if up is None else lean.swiglu_linear(x, up, self.weight, self.bias)


class MLP(nn.Module):
    """SwiGLU from the `kernels` dispatch; where that is the lean CPU path, fused with down_proj."""

    def __init__(self, config, arch: Arch, kernels: str = "auto"):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=arch.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=arch.mlp_bias)
        self.down_proj = DownProj(i, h, bias=arch.mlp_bias)
        self.kernels = kernels

    def forward(self, x):
        swiglu = get_ops(self.kernels, x.device).swiglu
        gate, up = self.gate_proj(x), self.up_proj(x)
        # fused only unwrapped (a peft LoRA layer adds its own path on the product) and without
        # autocast (the Function runs its matmuls in the inputs' dtype)
        if swiglu is lean.swiglu and type(self.down_proj) is DownProj and not torch.is_autocast_enabled(x.device.type):
            return self.down_proj(gate, up)
        return self.down_proj(swiglu(gate, up))


class DecoderLayer(nn.Module):
    def __init__(self, config, arch: Arch, kernels: str = "auto"):
        super().__init__()
        self.self_attn = Attention(config, arch, kernels)
        self.mlp = MLP(config, arch, kernels)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels)

    def forward(self, x, cos, sin, plan):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, plan)
        return x + self.mlp(self.post_attention_layernorm(x))


class BumblebeeModel(nn.Module):
    """The decoder body, named ``model`` inside :class:`Bumblebee` as in HF: embedding, the
    layer loop (each layer recomputed in backward when gradient checkpointing is on), final norm."""

    def __init__(self, config, arch: Arch, kernels: str = "auto"):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, arch, kernels) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels)
        self.gradient_checkpointing = False
        self.checkpoint_kwargs: dict = {}

    def forward(self, input_ids, cos, sin, plan: PackedPlan) -> torch.Tensor:
        """Final-norm hidden states ``[T, hidden]`` of a flat packed stream, given its rotary
        tables and attention plan (:meth:`Bumblebee.hidden_states` makes both)."""
        x = self.embed_tokens(input_ids)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                x = checkpoint(layer, x, cos, sin, plan, **self.checkpoint_kwargs)
            else:
                x = layer(x, cos, sin, plan)
        return self.norm(x)


@torch.no_grad()
def init_parameters(
    model: nn.Module,
    std: float,
    generator: torch.Generator | None = None,
    gather=None,
    write: bool = True,
) -> None:
    """The one weight init, of training (bumblefast/train/build.py) and tests alike: in
    ``named_parameters()`` order (a tied lm_head is the embedding, listed once), ones for norms,
    zeros for biases, normal(0, std) for the rest, drawn in fp32 on the CPU from ``generator``
    (default: torch's global one), so the values depend on the seed only, not on the dtype,
    the device or ZeRO-3 partitioning. A CUDA ``generator`` draws there instead (benchmarks:
    1.5B draws take ~5-30 s on one CPU thread, well under a second on a GPU). ``gather(p)``:
    a context in which ``p`` is whole (ZeRO-3's GatheredParameters); ``write``: whether this
    rank writes (ZeRO-3: rank 0)."""
    for name, p in model.named_parameters():
        with gather(p) if gather is not None else contextlib.nullcontext():
            if name.endswith("norm.weight"):
                value = torch.ones(p.shape)
            elif name.endswith(".bias"):
                value = torch.zeros(p.shape)
            else:
                value = torch.empty(p.shape, device=generator.device if generator is not None else None)
                value.normal_(0.0, std, generator=generator)
            if write:
                p.copy_(value.to(p.dtype))


class Bumblebee(nn.Module):
    """Decoder of any family in FAMILIES, for packed micro-batches. See the module docstring."""

    def __init__(self, config, attn_backend: str = "auto", kernels: str = "auto"):
        super().__init__()
        if kernels not in MODES:
            raise ValueError(f"kernels must be one of {MODES}, got {kernels!r}")
        if attn_backend not in BACKENDS:  # device checks happen on the first forward
            raise ValueError(f"attn_backend must be one of {BACKENDS}, got {attn_backend!r}")
        self.config = config
        self.arch = arch_of(config)
        self.attn_backend = attn_backend
        self.kernels = kernels
        self._rope: dict = {}  # device -> (inv_freq, cos/sin scale), made once per device
        self.model = BumblebeeModel(config, self.arch, kernels)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config, device="meta", dtype=None, **kw) -> Bumblebee:
        """Build without allocating (``device="meta"``); then ``to_empty`` + ``init_weights``."""
        with torch.device(device):
            model = cls(config, **kw)
        if dtype is not None:
            model.to(dtype)
        return model

    def tie_weights(self):
        if getattr(self.config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def to_empty(self, *, device, recurse: bool = True):
        super().to_empty(device=device, recurse=recurse)
        self.tie_weights()  # materialising gives each module a fresh Parameter
        return self

    def init_weights(self, generator: torch.Generator | None = None):
        """Random init (``init_parameters``, normal(0, initializer_range)); deterministic for a
        given torch seed (or ``generator``). Returns the model."""
        init_parameters(self, self.config.initializer_range, generator)
        return self

    # ------------------------------------------------------------------ dispatch
    def ops(self, device):
        return get_ops(self.kernels, device)

    def resolved_attn(self, device, dtype=None) -> str:
        """The attention backend a forward on ``device`` with compute dtype ``dtype`` runs."""
        return resolve_backend(self.attn_backend, torch.device(device), dtype)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **_):
        """Recompute each decoder layer in backward (activation checkpointing per layer)."""
        self.model.gradient_checkpointing = True
        self.model.checkpoint_kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}

    def gradient_checkpointing_disable(self):
        self.model.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    # ------------------------------------------------------------------ forward
    @staticmethod
    def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, n_tokens: int) -> torch.Tensor:
        cu = cu_seqlens.long()
        starts = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1], output_size=n_tokens)
        return torch.arange(n_tokens, device=cu.device) - starts

    def hidden_states(self, batch) -> torch.Tensor:
        """Final-norm hidden states ``[T, hidden]`` of a packed batch (``shards.collate.PackedBatch``:
        ``input_ids``, ``position_ids``, ``cu_seqlens``, ``max_seqlen``, ``kv_prefix``). A
        ``kv_prefix`` ``[n_docs]``: document d also attends the first ``kv_prefix[d]`` tokens of
        document d - 1 and its positions start there (a shared DPO prompt; see attention.py)."""
        return self._hidden(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen, batch.kv_prefix)

    def _hidden(self, input_ids, position_ids, cu_seqlens, max_seqlen=None, kv_prefix=None) -> torch.Tensor:
        device = input_ids.device
        n_tok = input_ids.shape[0]
        if position_ids is None:
            position_ids = self.positions_from_cu_seqlens(cu_seqlens, n_tok)
            if kv_prefix is not None:
                cu = cu_seqlens.long()
                position_ids = position_ids + torch.repeat_interleave(
                    kv_prefix.long().to(device), cu[1:] - cu[:-1], output_size=n_tok
                )
        dtype = self.model.embed_tokens.weight.dtype  # the embedding's output dtype
        # the dtype q/k/v will have: autocast's when on (the embedding output stays fp32 there)
        backend = self.resolved_attn(device, compute_dtype(device, dtype))
        plan = PackedPlan.build(cu_seqlens, max_seqlen, n_tok, backend, kv_prefix)
        self._check_window(plan)
        cos, sin = self.rope_cos_sin(position_ids, dtype)
        return self.model(input_ids, cos, sin, plan)

    def rope_cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables ``[T, head_dim]`` (halves duplicated, HF layout) for per-token positions,
        in fp32 as transformers' rotary embedding computes them, scaled by the rope type's factor."""
        device = position_ids.device
        if device not in self._rope:
            inv_freq, scale = rope_frequencies(self.arch)
            self._rope[device] = (inv_freq.to(device), scale)
        inv_freq, scale = self._rope[device]
        freqs = position_ids.float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)

    def _check_window(self, plan: PackedPlan) -> None:
        """Sliding-window attention is not implemented: a document (with its shared prefix) no
        longer than the window attends exactly as with full causal attention, a longer one fails."""
        window = self.arch.sliding_window
        span = max(plan.max_seqlen, plan.max_seqlen_k)
        if window is not None and span > window:
            raise NotImplementedError(
                f"{self.arch.model_type}: sliding_window {window} is shorter than a document here ({span} "
                "tokens); sliding-window attention is not implemented: keep documents (cutoff_len) <= "
                f"{window}, or set sliding_window null if the checkpoint was trained without one"
            )

    def _flatten(self, input_ids, position_ids, cu_seqlens):
        if input_ids.dim() == 2:  # [B, S] unpacked: each row one causal document
            b, s = input_ids.shape
            if cu_seqlens is not None:
                raise ValueError("pass cu_seqlens only with flat [T] input_ids")
            cu_seqlens = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=input_ids.device)
            if position_ids is None:
                position_ids = torch.arange(s, device=input_ids.device).repeat(b)
            return input_ids.reshape(-1), position_ids.reshape(-1), cu_seqlens, s
        if cu_seqlens is None:  # one document
            n = input_ids.shape[0]
            cu_seqlens = torch.tensor([0, n], dtype=torch.int32, device=input_ids.device)
            return input_ids, position_ids, cu_seqlens, n
        return input_ids, position_ids, cu_seqlens, None

    def forward(self, input_ids, position_ids=None, cu_seqlens=None, max_seqlen=None):
        """Logits: ``[T, V]`` for flat packed input, ``[B, S, V]`` for ``[B, S]`` input."""
        shape = input_ids.shape
        ids, pos, cu, ms = self._flatten(input_ids, position_ids, cu_seqlens)
        h = self._hidden(ids, pos, cu, max_seqlen if max_seqlen is not None else ms)
        logits = self.lm_head(h)
        return logits.view(*shape, -1)

    def lm_loss(self, batch):
        """``(loss_sum, n_targets)`` of a packed batch: summed next-token CE over ``labels != -100``
        (labels are already shifted: ``labels[i]`` is the target at position ``i``) via the fused
        linear-CE, never the full logits. Divide by the global target count yourself. The DPO
        head (per-segment log-probs) is ``train.objectives.segment_stats``."""
        h = self.hidden_states(batch)
        ops = self.ops(h.device)
        loss = ops.fused_linear_cross_entropy(h, self.lm_head.weight, batch.labels, reduction="sum")
        return loss, (batch.labels != IGNORE_INDEX).sum()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    # ------------------------------------------------------------------ HF checkpoints
    def save_pretrained(self, path, max_shard_size="5GB", state_dict: dict | None = None):
        """Write a folder ``transformers.AutoModelForCausalLM.from_pretrained`` loads (model_io.py)."""
        from bumblefast.model_io import save_pretrained

        save_pretrained(self, path, max_shard_size=max_shard_size, state_dict=state_dict)

    @classmethod
    def from_pretrained(
        cls,
        path,
        torch_dtype=None,
        device=None,
        attn_backend="auto",
        kernels="auto",
        config=None,
        dtype=None,
    ) -> Bumblebee:
        """Load an HF checkpoint folder of a family in FAMILIES (ours or transformers'). ``torch_dtype`` (or its new
        name ``dtype``): a dtype, ``"auto"`` (config's), or None (fp32, as transformers)."""
        from bumblefast.model_io import load_pretrained

        return load_pretrained(
            cls,
            path,
            torch_dtype if torch_dtype is not None else dtype,
            device,
            config,
            attn_backend=attn_backend,
            kernels=kernels,
        )
