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

import json
import os
import re
import warnings

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from bumblefast.attention import ATTENTION, BACKENDS, PackedPlan, compute_dtype, resolve_backend
from bumblefast.kernels import get_ops
from bumblefast.kernels.dispatch import MODES
from bumblefast.kernels.modules import RMSNorm
from bumblefast.kernels.reference import rope_cos_sin
from bumblefast.labels import IGNORE_INDEX

SAFE_NAME = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"


class Attention(nn.Module):
    def __init__(self, config, owner: Bumblebee):
        super().__init__()
        h = config.hidden_size
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or h // self.n_heads
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)
        self._owner = [owner]  # list: not a submodule

    def forward(self, x, cos, sin, plan):
        owner = self._owner[0]
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(t, self.n_kv, self.head_dim)
        q, k = owner.ops(x.device).rope(q, k, cos, sin)
        o = ATTENTION[plan.backend](q, k, v, plan)
        return self.o_proj(o.reshape(t, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config, owner: Bumblebee):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)
        self._owner = [owner]

    def forward(self, x):
        act = self._owner[0].ops(x.device).swiglu(self.gate_proj(x), self.up_proj(x))
        return self.down_proj(act)


class DecoderLayer(nn.Module):
    def __init__(self, config, owner: Bumblebee):
        super().__init__()
        self.self_attn = Attention(config, owner)
        self.mlp = MLP(config, owner)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, owner.kernels)
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, config.rms_norm_eps, owner.kernels
        )

    def forward(self, x, cos, sin, plan):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, plan)
        return x + self.mlp(self.post_attention_layernorm(x))


class BumblebeeModel(nn.Module):
    """The decoder body, named ``model`` inside :class:`Bumblebee` as in HF."""

    def __init__(self, config, owner: Bumblebee):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, owner) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, owner.kernels)


class Bumblebee(nn.Module):
    """Qwen2 decoder for packed micro-batches. See the module docstring."""

    def __init__(self, config, attn_backend: str = "auto", kernels: str = "auto"):
        super().__init__()
        if getattr(config, "use_sliding_window", False):
            raise NotImplementedError(
                "sliding-window attention is not supported (use_sliding_window=True)"
            )
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
        self.model = BumblebeeModel(config, self)
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

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None):
        """normal(0, initializer_range) for linears and embeddings, zero biases, ones for norms.
        Deterministic for a given torch seed (or ``generator``)."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, nn.Linear):
                if not (m is self.lm_head and getattr(self.config, "tie_word_embeddings", False)):
                    m.weight.normal_(0.0, std, generator=generator)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, std, generator=generator)
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
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
                    kv_prefix.long().to(device), cu[1:] - cu[:-1], output_size=n_tok)
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
    def _hf_state_dict(self) -> dict:
        sd = self.state_dict()
        if getattr(self.config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)
        return {k: v.detach().contiguous() for k, v in sd.items()}

    def save_pretrained(self, path, max_shard_size="5GB", state_dict: dict | None = None):
        """Write ``config.json`` + ``model.safetensors`` (or shards + index) loadable by
        ``transformers.AutoModelForCausalLM.from_pretrained``."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        sd = state_dict if state_dict is not None else self._hf_state_dict()
        sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
        cfg = self.config
        cfg.architectures = ["Qwen2ForCausalLM"]
        dtypes = {v.dtype for v in sd.values()}
        if len(dtypes) == 1:
            cfg.dtype = next(iter(dtypes))  # written as "dtype" (4.57+) / read back by 5.x
        cfg.save_pretrained(path)
        from transformers import GenerationConfig

        try:  # a write error (disk, permissions) propagates: the checkpoint would be incomplete
            GenerationConfig.from_model_config(cfg).save_pretrained(path)
        except ValueError as e:  # settings transformers refuses to save: the weights are still fine
            warnings.warn(
                f"{path}: generation_config.json not written ({str(e).strip().splitlines()[0]}); "
                "generate() will use transformers' defaults",
                stacklevel=2,
            )
        limit = _parse_size(max_shard_size)
        shards, cur, cur_size = [], {}, 0
        for k, v in sd.items():
            n = v.numel() * v.element_size()
            if cur and cur_size + n > limit:
                shards.append(cur)
                cur, cur_size = {}, 0
            cur[k] = v
            cur_size += n
        shards.append(cur)
        for stale in os.listdir(path):
            if re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?", stale):
                os.remove(os.path.join(path, stale))
        meta = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], os.path.join(path, SAFE_NAME), metadata=meta)
            return
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(path, name), metadata=meta)
            for k, v in shard.items():
                weight_map[k] = name
                total += v.numel() * v.element_size()
        with open(os.path.join(path, SAFE_INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)

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
    ):
        """Load an HF Qwen2 checkpoint folder (ours or transformers'). ``torch_dtype``: a dtype,
        ``"auto"`` (config's), or None (fp32, as transformers)."""
        from safetensors.torch import load_file
        from transformers import AutoConfig

        config = config or AutoConfig.from_pretrained(path)
        torch_dtype = torch_dtype if torch_dtype is not None else dtype  # transformers' new name
        if torch_dtype == "auto":
            torch_dtype = (
                getattr(config, "dtype", None)
                or getattr(config, "torch_dtype", None)
                or torch.float32
            )
            if isinstance(torch_dtype, str):
                torch_dtype = getattr(torch, torch_dtype)
        dtype = torch_dtype or torch.float32
        model = cls.from_config(config, device="meta", attn_backend=attn_backend, kernels=kernels)
        model.to_empty(device=device or "cpu")
        model.to(dtype)
        index = os.path.join(path, SAFE_INDEX)
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.exists(os.path.join(path, SAFE_NAME)):
            files = [SAFE_NAME]
        else:
            raise FileNotFoundError(f"no {SAFE_NAME} or {SAFE_INDEX} in {path}")
        sd = {}
        for name in files:
            sd.update(load_file(os.path.join(path, name)))
        sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
        if getattr(config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {path} does not match the config: missing={missing} "
                f"unexpected={unexpected}"
            )
        model.tie_weights()
        return model


def rope_theta(config) -> float:
    """RoPE base; transformers 5 moved it into ``config.rope_parameters``."""
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?I?B)\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size must be like '5GB' or an int, got {size!r}")
    num, unit = float(m.group(1)), m.group(2)
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(num * base**power)
