"""Bumblebee: the lean Qwen2-architecture decoder BumbleFast trains.

Parameter names equal transformers' ``Qwen2ForCausalLM`` state-dict keys, so HF checkpoints
load and save both ways and peft LoRA targets (``q_proj`` ...) apply unchanged. The model
runs on a packed micro-batch: a flat token stream ``[T]`` with ``cu_seqlens`` and
per-document ``position_ids``; attention never crosses documents (see ``attention.py``).
Elementwise ops and the LM-head losses come from the ``bumblefast.kernels`` dispatch; the
losses never materialise the ``[T, vocab]`` logits.

Deferred init (ZeRO-3 / big models)::

    model = Bumblebee.from_config(config, device="meta")   # no memory
    model.to_empty(device="cuda"); model.init_weights()   # or load a checkpoint
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from bumblefast.attention import ATTENTION, BACKENDS, PackedPlan, compute_dtype, resolve_backend
from bumblefast.kernels import get_ops
from bumblefast.kernels.dispatch import MODES
from bumblefast.kernels.modules import RMSNorm
from bumblefast.kernels.reference import rope_cos_sin
from bumblefast.labels import IGNORE_INDEX


class Attention(nn.Module):
    """q/k/v/o projections, RoPE from the `kernels` dispatch, attention per document."""

    def __init__(self, config, kernels: str = "auto"):
        super().__init__()
        h = config.hidden_size
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or h // self.n_heads
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)
        self.kernels = kernels

    def forward(self, x, cos, sin, plan):
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(t, self.n_kv, self.head_dim)
        q, k = get_ops(self.kernels, x.device).rope(q, k, cos, sin)
        o = ATTENTION[plan.backend](q, k, v, plan)
        return self.o_proj(o.reshape(t, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU from the `kernels` dispatch."""

    def __init__(self, config, kernels: str = "auto"):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)
        self.kernels = kernels

    def forward(self, x):
        act = get_ops(self.kernels, x.device).swiglu(self.gate_proj(x), self.up_proj(x))
        return self.down_proj(act)


class DecoderLayer(nn.Module):
    def __init__(self, config, kernels: str = "auto"):
        super().__init__()
        self.self_attn = Attention(config, kernels)
        self.mlp = MLP(config, kernels)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels)

    def forward(self, x, cos, sin, plan):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, plan)
        return x + self.mlp(self.post_attention_layernorm(x))


class BumblebeeModel(nn.Module):
    """The decoder body, named ``model`` inside :class:`Bumblebee` as in HF."""

    def __init__(self, config, kernels: str = "auto"):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, kernels) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels)


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
    the device or ZeRO-3 partitioning. ``gather(p)``: a context in which ``p`` is whole
    (ZeRO-3's GatheredParameters); ``write``: whether this rank writes (ZeRO-3: rank 0)."""
    for name, p in model.named_parameters():
        with gather(p) if gather is not None else contextlib.nullcontext():
            if name.endswith("norm.weight"):
                value = torch.ones(p.shape)
            elif name.endswith(".bias"):
                value = torch.zeros(p.shape)
            else:
                value = torch.empty(p.shape).normal_(0.0, std, generator=generator)
            if write:
                p.copy_(value.to(p.dtype))


class Bumblebee(nn.Module):
    """Qwen2 decoder for packed micro-batches. See the module docstring."""

    def __init__(self, config, attn_backend: str = "auto", kernels: str = "auto"):
        super().__init__()
        if getattr(config, "use_sliding_window", False):
            raise NotImplementedError("sliding-window attention is not supported (use_sliding_window=True)")
        rs = getattr(config, "rope_scaling", None) or {}
        if rs.get("rope_type", rs.get("type", "default")) != "default":
            raise NotImplementedError(f"rope scaling {rs} is not supported; only default RoPE")
        if kernels not in MODES:
            raise ValueError(f"kernels must be one of {MODES}, got {kernels!r}")
        if attn_backend not in BACKENDS:  # device checks happen on the first forward
            raise ValueError(f"attn_backend must be one of {BACKENDS}, got {attn_backend!r}")
        self.config = config
        self.attn_backend = attn_backend
        self.kernels = kernels
        self.gradient_checkpointing = False
        self._ckpt_kwargs: dict = {}
        self.last_attn_backend: str | None = None  # what the last forward ran (benchmark labels)
        self.model = BumblebeeModel(config, kernels)
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
        self.gradient_checkpointing = True
        self._ckpt_kwargs = dict(gradient_checkpointing_kwargs or {})
        self._ckpt_kwargs.setdefault("use_reentrant", False)

    def gradient_checkpointing_disable(self):
        self.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.gradient_checkpointing

    # ------------------------------------------------------------------ forward
    @staticmethod
    def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, n_tokens: int) -> torch.Tensor:
        cu = cu_seqlens.long()
        starts = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1], output_size=n_tokens)
        return torch.arange(n_tokens, device=cu.device) - starts

    def hidden_states(self, input_ids, position_ids, cu_seqlens, max_seqlen=None, kv_prefix=None) -> torch.Tensor:
        """Final-norm hidden states ``[T, hidden]`` of a flat packed stream. ``kv_prefix``
        (optional, ``[n_docs]``): document d also attends the first ``kv_prefix[d]`` tokens of
        document d - 1 and its positions start there (a shared DPO prompt; see attention.py)."""
        device = input_ids.device
        n_tok = input_ids.shape[0]
        if position_ids is None:
            position_ids = self.positions_from_cu_seqlens(cu_seqlens, n_tok)
            if kv_prefix is not None:
                cu = cu_seqlens.long()
                position_ids = position_ids + torch.repeat_interleave(
                    kv_prefix.long().to(device), cu[1:] - cu[:-1], output_size=n_tok
                )
        x = self.model.embed_tokens(input_ids)
        # the dtype q/k/v will have: autocast's when on (the embedding output stays fp32 there)
        backend = self.resolved_attn(device, compute_dtype(device, x.dtype))
        plan = PackedPlan.build(cu_seqlens, max_seqlen, n_tok, backend, kv_prefix)
        self.last_attn_backend = backend
        head_dim = self.model.layers[0].self_attn.head_dim if len(self.model.layers) else 1
        cos, sin = rope_cos_sin(position_ids, head_dim, rope_theta(self.config), x.dtype)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, plan, **self._ckpt_kwargs)
            else:
                x = layer(x, cos, sin, plan)
        return self.model.norm(x)

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
        h = self.hidden_states(ids, pos, cu, max_seqlen if max_seqlen is not None else ms)
        logits = self.lm_head(h)
        return logits.view(*shape, -1)

    def lm_loss(self, input_ids, position_ids, cu_seqlens, max_seqlen, labels):
        """``(loss_sum, n_targets)``: summed next-token CE over ``labels != -100`` (labels are
        already shifted: ``labels[i]`` is the target at position ``i``) via the fused
        linear-CE, never the full logits. Divide by the global target count yourself."""
        h = self.hidden_states(input_ids, position_ids, cu_seqlens, max_seqlen)
        ops = self.ops(h.device)
        loss = ops.fused_linear_cross_entropy(h, self.lm_head.weight, labels, reduction="sum")
        return loss, (labels != IGNORE_INDEX).sum()

    def segment_logps(
        self,
        input_ids,
        position_ids,
        cu_seqlens,
        max_seqlen,
        labels,
        segment_ids,
        n_segments,
        return_counts: bool = False,
        kv_prefix=None,
    ):
        """Summed target log-probs per segment, fp32 ``[n_segments]`` (DPO's policy/ref logps).

        ``segment_ids[i]`` is the segment of token ``i``; tokens with ``labels == -100`` add 0.
        With ``return_counts=True`` returns ``(logps, counts)``, counts being the number of
        target tokens per segment (int64), e.g. for length-normalised objectives.
        ``kv_prefix``: shared-prompt rows (see :meth:`hidden_states`).
        """
        h = self.hidden_states(input_ids, position_ids, cu_seqlens, max_seqlen, kv_prefix)
        ops = self.ops(h.device)
        logps = ops.fused_linear_logprob(h, self.lm_head.weight, labels, segment_ids, n_segments)
        if not return_counts:
            return logps
        counts = torch.zeros(n_segments, dtype=torch.long, device=h.device)
        counts.index_add_(0, segment_ids, (labels != IGNORE_INDEX).long())
        return logps, counts

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
        """Load an HF Qwen2 checkpoint folder (ours or transformers'). ``torch_dtype`` (or its new
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


def rope_theta(config) -> float:
    """RoPE base; transformers 5 moved it into ``config.rope_parameters``."""
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)
