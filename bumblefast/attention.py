"""Causal attention over a packed token stream that never crosses document boundaries.

Inputs are flat: q ``[T, Hq, D]``, k/v ``[T, Hk, D]`` (GQA: Hq a multiple of Hk), documents
delimited by ``cu_seqlens`` (int32 ``[n_docs + 1]``). Backends:

- ``flash``: flash-attn ``flash_attn_varlen_func`` (CUDA, optional install).
- ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` (CUDA, torch >= 2.10).
- ``sdpa``: CPU and fallback. The stream is split at ``cu_seqlens``, documents are bucketed by
  length into padded batches, and each bucket runs causal SDPA, so the cost follows the sum
  of squared document lengths (within the bucket padding factor), not ``T**2``.
- ``sdpa_mask``: one SDPA over the whole stream with a block-diagonal causal mask. O(T**2),
  the simple reference the others are tested against.

``auto`` picks flash > varlen on CUDA, sdpa elsewhere; an explicit backend that cannot run
raises ``RuntimeError``.

Shared prefixes (DPO with a shared prompt). ``kv_prefix`` (int ``[n_docs]``, optional) lets a
document's queries also attend the first ``kv_prefix[d]`` tokens of the document before it,
ahead of its own: its keys/values are that prefix's then its own (a gathered K/V stream), and
causality is aligned bottom-right (query ``i`` of a document with prefix ``p`` sees keys
``0..p+i``). A shared-prompt pair is document A = prompt + chosen and document B = the
rejected reply with ``kv_prefix = len(prompt) - 1`` (its first token repeats the prompt's last,
so it predicts the reply's first token): B attends the prompt, never the chosen reply. Every
backend runs the same formulation: flash/varlen with separate ``cu_seqlens_q`` /
``cu_seqlens_k`` over the gathered K/V, sdpa per document with a lower-right causal mask,
sdpa_mask with one ``[T, T]`` mask (the reference).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

BACKENDS = ("auto", "flash", "varlen", "sdpa", "sdpa_mask")

# A bucket holds documents whose length is within this factor of its longest one, so padding
# at most doubles a document's attention FLOPs; documents up to SMALL_DOC tokens share one
# bucket regardless (their padding costs less than extra launches).
BUCKET_RATIO = 2**0.5
SMALL_DOC = 64


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@functools.lru_cache(maxsize=1)
def _varlen_fn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the attention inputs will have: autocast's for ``device`` when it is on
    (weights may stay fp32 under bf16 autocast), else ``dtype`` (the weights' / activations')."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


def choose_backend(backend: str, device_type: str, dtype: torch.dtype | None, flash: bool, varlen: bool) -> str:
    """Pure resolution rule (testable without a GPU): ``auto`` takes the varlen kernels only on
    CUDA for fp16/bf16 compute (flash kernels have no fp32), else per-document SDPA; an
    explicit backend that cannot run raises ``RuntimeError``."""
    if backend not in BACKENDS:
        raise ValueError(f"attn_backend must be one of {BACKENDS}, got {backend!r}")
    cuda = device_type == "cuda"
    if backend == "auto":
        half = dtype in (None, torch.float16, torch.bfloat16)
        if cuda and half and flash:
            return "flash"
        if cuda and half and varlen:
            return "varlen"
        return "sdpa"
    if backend == "flash" and not (cuda and flash):
        raise RuntimeError(
            "attn_backend='flash' needs CUDA and the flash-attn package "
            "(pip install bumblefast[flash]); use attn_backend='auto'."
        )
    if backend == "varlen" and not (cuda and varlen):
        raise RuntimeError(
            "attn_backend='varlen' needs CUDA and torch >= 2.10 (torch.nn.attention.varlen); use attn_backend='auto'."
        )
    return backend


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The backend to run on ``device`` for compute dtype ``dtype`` (see :func:`compute_dtype`;
    None: assume half precision)."""
    cuda = device.type == "cuda"
    return choose_backend(
        backend, device.type, dtype, cuda and flash_attn_available(), cuda and _varlen_fn() is not None
    )


def refused_backends(device: torch.device, dtype: torch.dtype | None = None) -> dict[str, str]:
    """Why ``auto`` did not take each backend faster than the one it resolves to (the GPU
    run's gpu_env.json): {backend: reason}, empty when the fastest runs."""
    chosen = resolve_backend("auto", device, dtype)
    cuda = device.type == "cuda"
    half = dtype in (None, torch.float16, torch.bfloat16)
    why = {}
    for name, missing in (
        ("flash", "flash-attn is not installed"),
        ("varlen", "torch.nn.attention.varlen is missing (torch < 2.10)"),
    ):
        if name == chosen:
            break
        why[name] = "needs CUDA" if not cuda else (f"no {dtype} kernels" if not half else missing)
    return why


@dataclass
class PackedPlan:
    """Per-forward description of the packed stream, shared by every layer."""

    cu_seqlens: torch.Tensor  # int32 [n_docs + 1] on the tokens' device
    max_seqlen: int
    n_tokens: int
    backend: str = "sdpa"
    # sdpa: document lengths, and buckets of document indices (longest first)
    doc_lens: list = field(default_factory=list)
    doc_buckets: list = field(default_factory=list)
    # shared prefixes (see the module docstring); None when no document has one
    kv_prefix: list | None = None
    prefix_buckets: list = field(default_factory=list)  # sdpa: buckets of prefixed documents
    kv_index: torch.Tensor | None = None  # flash/varlen: gathered K/V stream -> token index
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_k: int = 0
    _mask: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        cu_seqlens: torch.Tensor,
        max_seqlen: int | None,
        n_tokens: int,
        backend: str,
        kv_prefix: torch.Tensor | None = None,
    ):
        prefix = None
        if kv_prefix is not None:
            prefix = [int(p) for p in kv_prefix.tolist()]
            if not any(prefix):
                prefix = None
        bounds = (
            cu_seqlens.tolist()
            if backend in ("sdpa", "sdpa_mask") or max_seqlen is None or prefix is not None
            else None
        )
        if bounds is not None:
            if bounds[0] != 0 or bounds[-1] != n_tokens or any(b > a for a, b in zip(bounds[1:], bounds)):
                raise ValueError(f"cu_seqlens must rise from 0 to the token count {n_tokens}, got {bounds}")
            max_seqlen = max((b - a for a, b in zip(bounds, bounds[1:])), default=0)
        plan = cls(
            cu_seqlens=cu_seqlens.to(torch.int32),
            max_seqlen=int(max_seqlen),
            n_tokens=n_tokens,
            backend=backend,
        )
        if prefix is not None:
            plan._prefix(bounds, prefix)
        if backend == "sdpa":
            plan._bucket(bounds)
        return plan

    def _prefix(self, bounds, prefix):
        """Check the prefixes; flash/varlen: the gathered K/V index and its cu_seqlens."""
        lens = [b - a for a, b in zip(bounds, bounds[1:])]
        if len(prefix) != len(lens):
            raise ValueError(f"kv_prefix has {len(prefix)} entries for {len(lens)} documents")
        for d, p in enumerate(prefix):
            if p < 0 or (p and (d == 0 or p > lens[d - 1] or lens[d] == 0)):
                raise ValueError(
                    f"kv_prefix[{d}] = {p}: a prefix is at most the previous document's length "
                    f"({lens[d - 1] if d else 0} tokens) and needs queries of its own"
                )
        self.kv_prefix = prefix
        if self.backend not in ("flash", "varlen"):
            return
        device = self.cu_seqlens.device
        parts, cu_k = [], [0]
        for d, (a, b) in enumerate(zip(bounds, bounds[1:])):
            if prefix[d]:
                parts.append(torch.arange(bounds[d - 1], bounds[d - 1] + prefix[d]))
            parts.append(torch.arange(a, b))
            cu_k.append(cu_k[-1] + prefix[d] + b - a)
        self.kv_index = torch.cat(parts).to(device)
        self.cu_seqlens_k = torch.tensor(cu_k, dtype=torch.int32, device=device)
        self.max_seqlen_k = max(b - a for a, b in zip(cu_k, cu_k[1:]))

    def _bucket(self, bounds):
        """Group documents whose lengths are within BUCKET_RATIO of the bucket's longest (all
        documents up to SMALL_DOC tokens together): padding at most doubles a document's cost."""
        self.doc_lens = [b - a for a, b in zip(bounds, bounds[1:])]
        prefix = self.kv_prefix or [0] * len(self.doc_lens)
        # plain documents by their length, prefixed ones apart by their key length
        self.doc_buckets = _buckets([(n, i) for i, n in enumerate(self.doc_lens) if n > 0 and not prefix[i]])
        self.prefix_buckets = _buckets_2d(
            [(n + prefix[i], n, i) for i, n in enumerate(self.doc_lens) if n > 0 and prefix[i]]
        )

    def block_mask(self, device) -> torch.Tensor:
        """Boolean ``[T, T]`` mask, True where attention is allowed (same doc, causal)."""
        if self._mask is None:
            doc = torch.repeat_interleave(
                torch.arange(len(self.cu_seqlens) - 1, device=device),
                (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long().to(device),
            )
            pos = torch.arange(self.n_tokens, device=device)
            self._mask = (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])
            if self.kv_prefix is not None:  # + the first kv_prefix[d] tokens of document d - 1
                cu = self.cu_seqlens.long().to(device)
                p = torch.tensor(self.kv_prefix, device=device)
                src = torch.cat([cu[:1], cu[:-2]])  # start of the previous document
                lo, hi = src[doc], src[doc] + p[doc]
                self._mask |= (pos[None, :] >= lo[:, None]) & (pos[None, :] < hi[:, None])
        return self._mask


def _buckets(docs: list) -> list:
    """Group (length, index) pairs whose lengths are within BUCKET_RATIO of the bucket's longest
    (all up to SMALL_DOC together), longest first: padding at most doubles a document's cost."""
    out: list = []
    cur: list = []
    top = 0
    for length, i in sorted(docs, reverse=True):
        if cur and not (length * BUCKET_RATIO >= top or top <= SMALL_DOC):
            out.append(cur)
            cur = []
        if not cur:
            top = length
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def _buckets_2d(docs: list) -> list:
    """Prefixed documents (key length, query length, index): a bucket pads both, so a document
    joins the first bucket whose key and query lengths are both within BUCKET_RATIO of its own
    (or all up to SMALL_DOC): a prompt of 2000 keys with a 5-token reply never pads to a
    200-token reply's queries."""
    buckets: list = []  # [top key length, lowest query length, highest query length, members]
    for lk, lq, i in sorted(docs, reverse=True):
        for b in buckets:
            lo, hi = min(lq, b[1]), max(lq, b[2])
            if (lk * BUCKET_RATIO >= b[0] or b[0] <= SMALL_DOC) and (hi <= BUCKET_RATIO * lo or hi <= SMALL_DOC):
                b[1], b[2] = lo, hi
                b[3].append(i)
                break
        else:
            buckets.append([lk, lq, lq, [i]])
    return [b[3] for b in buckets]


def _sdpa(q, k, v, **kw):
    """SDPA on ``[B, H, L, D]`` with GQA. On CPU, SDPA takes the k/v heads as they are
    (``enable_gqa``: the flash kernel keeps k/v for backward at ``n_kv`` heads, 1/7 of the
    repeated copies at the 0.5B shape); elsewhere they are repeated, because CUDA's
    memory-efficient kernel has no GQA and would fall back to the math path."""
    if k.shape[1] != q.shape[1]:
        if q.device.type == "cpu":
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, **kw)


def attention_sdpa(q, k, v, plan: PackedPlan):
    """Per-document causal SDPA, documents of similar length batched (padded) per bucket.

    Documents are contiguous in the stream, so ``split`` gives views whose backward is one
    ``cat``; each bucket is padded with ``pad_sequence`` and its output rows are taken back
    with ``unbind`` + a slice per document. No gather/scatter over the whole stream: index
    ops there cost a full-size zero tensor per bucket in backward, which made this path
    slower than the padded baseline on CPU."""
    lens = plan.doc_lens
    if not lens:
        return torch.empty_like(q)
    qs, ks, vs = q.split(lens), k.split(lens), v.split(lens)
    outs: list = [None] * len(lens)
    if plan.prefix_buckets:
        _sdpa_prefixed(qs, ks, vs, plan, outs)
    for bucket in plan.doc_buckets:
        if len(bucket) == 1:
            i = bucket[0]
            o = _sdpa(
                qs[i].transpose(0, 1)[None], ks[i].transpose(0, 1)[None], vs[i].transpose(0, 1)[None], is_causal=True
            )
            outs[i] = o[0].transpose(0, 1)
            continue
        qb, kb, vb = (pad_sequence([t[i] for i in bucket], batch_first=True).transpose(1, 2) for t in (qs, ks, vs))
        ob = _sdpa(qb, kb, vb, is_causal=True).transpose(1, 2)  # [B, L, H, D]; padding is after
        for row, i in zip(ob.unbind(0), bucket):  # every real query, so causality hides it
            outs[i] = row[: lens[i]]
    return torch.cat(outs)


def _sdpa_prefixed(qs, ks, vs, plan: PackedPlan, outs: list) -> None:
    """Documents with a shared prefix: keys/values = the previous document's first p tokens
    then their own, causal aligned bottom-right (query i sees keys 0..p+i), one padded SDPA
    per bucket of similar key lengths with an explicit mask."""
    lens, prefix = plan.doc_lens, plan.kv_prefix
    for bucket in plan.prefix_buckets:
        kk = [torch.cat([ks[i - 1][: prefix[i]], ks[i]]) for i in bucket]
        vv = [torch.cat([vs[i - 1][: prefix[i]], vs[i]]) for i in bucket]
        qb, kb, vb = (pad_sequence(t, batch_first=True).transpose(1, 2) for t in ([qs[i] for i in bucket], kk, vv))
        lq, lk = qb.shape[2], kb.shape[2]
        p = torch.tensor([prefix[i] for i in bucket], device=qb.device)
        # key j is visible to query i when j <= i + p (padded keys lie past every real query's reach)
        mask = torch.arange(lk, device=qb.device)[None, None, :] <= (
            torch.arange(lq, device=qb.device)[None, :, None] + p[:, None, None]
        )
        ob = _sdpa(qb, kb, vb, attn_mask=mask[:, None]).transpose(1, 2)
        for row, i in zip(ob.unbind(0), bucket):
            outs[i] = row[: lens[i]]


def attention_sdpa_mask(q, k, v, plan: PackedPlan):
    mask = plan.block_mask(q.device)
    o = _sdpa(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask)
    return o[0].transpose(0, 1)


def attention_flash(q, k, v, plan: PackedPlan):
    from flash_attn import flash_attn_varlen_func

    cu = plan.cu_seqlens
    if plan.kv_index is not None:  # shared prefixes: gathered K/V, causal aligned bottom-right
        k, v = k.index_select(0, plan.kv_index), v.index_select(0, plan.kv_index)
        return flash_attn_varlen_func(q, k, v, cu, plan.cu_seqlens_k, plan.max_seqlen, plan.max_seqlen_k, causal=True)
    return flash_attn_varlen_func(q, k, v, cu, cu, plan.max_seqlen, plan.max_seqlen, causal=True)


@functools.lru_cache(maxsize=1)
def _varlen_params() -> frozenset:
    return frozenset(inspect.signature(_varlen_fn()).parameters)


def attention_varlen(q, k, v, plan: PackedPlan):
    fn, params = _varlen_fn(), _varlen_params()
    kw = {}
    if "is_causal" in params:  # torch 2.10 / 2.11
        kw["is_causal"] = True
    else:  # newer: causal is a (-1, 0) window
        kw["window_size"] = (-1, 0)
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    cu = plan.cu_seqlens
    if plan.kv_index is not None:  # shared prefixes: separate q/k lengths, causal bottom-right
        k, v = k.index_select(0, plan.kv_index), v.index_select(0, plan.kv_index)
        return fn(q, k, v, cu, plan.cu_seqlens_k, plan.max_seqlen, plan.max_seqlen_k, **kw)
    return fn(q, k, v, cu, cu, plan.max_seqlen, plan.max_seqlen, **kw)


ATTENTION = {
    "flash": attention_flash,
    "varlen": attention_varlen,
    "sdpa": attention_sdpa,
    "sdpa_mask": attention_sdpa_mask,
}
