"""Bumblebee vs transformers' own classes per family (Qwen2, Qwen3, Llama incl. llama3/yarn RoPE,
Mistral), packing isolation, attention backends, HF checkpoint round trips, losses,
checkpointing and deferred init. fp32, tiny shapes."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from bumblefast.attention import ATTENTION, PackedPlan
from bumblefast.config import UserError
from bumblefast.kernels import reference as R
from bumblefast.model import FAMILIES, Bumblebee, rope_frequencies
from bumblefast.shards.collate import PackedBatch

# Same math, different op order: fp32 noise only.
ATOL, RTOL = 2e-5, 1e-4
CUDA = torch.cuda.is_available()


HF_CLASSES = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}
LLAMA3_ROPE = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
)
YARN_ROPE = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32)
# Each family's distinguishing switches, small: head_dim 24 != hidden / heads (16) where the
# family reads head_dim; at head_dim 16 the llama3 case has a wavelength in each band (kept,
# blended, divided) and the yarn case one on its ramp (test_rope_frequencies_match_transformers
# checks both rules at real sizes).
FAMILY_KW = {
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", dict(head_dim=24)),
    "qwen3_bias": ("qwen3", dict(head_dim=24, attention_bias=True, tie_word_embeddings=False)),
    "llama3": ("llama", dict(rope_theta=5e5, rope_scaling=LLAMA3_ROPE, tie_word_embeddings=False)),
    "llama_bias_yarn": ("llama", dict(attention_bias=True, mlp_bias=True, rope_theta=1e4, rope_scaling=YARN_ROPE)),
    "mistral": ("mistral", dict(head_dim=24, sliding_window=None, tie_word_embeddings=False)),
}
FAMILY_CASES = list(FAMILY_KW)


def tiny_config(model_type: str = "qwen2", **kw):
    base = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        initializer_range=0.05,
    )
    base.update(kw)
    cfg = HF_CLASSES[model_type][0](**base)
    cfg._attn_implementation = "sdpa"  # HF side: plain SDPA (no cache in our comparisons)
    return cfg


def family_config(case: str, **kw):
    model_type, extra = FAMILY_KW[case]
    return tiny_config(model_type, **{**extra, **kw})


def make_model(cfg=None, seed=0, **kw) -> Bumblebee:
    torch.manual_seed(seed)
    model = Bumblebee(cfg or tiny_config(), **kw)
    model.init_weights()
    # non-trivial biases and norms (q/k norms too) so a wrong mapping cannot hide
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_from(model: Bumblebee):
    """transformers' own class of the model's family (not our table's), same weights."""
    hf = HF_CLASSES[model.config.model_type][1](model.config).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    if model.config.tie_word_embeddings:
        hf.tie_weights()
    return hf


def packed_batch(lens, vocab=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (sum(lens),), generator=g)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    pos = Bumblebee.positions_from_cu_seqlens(cu, sum(lens))
    return ids, pos, cu, max(lens)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("case", FAMILY_CASES)
def test_state_dict_keys_equal_hf(case, tied):
    cfg = family_config(case, tie_word_embeddings=tied)
    ours = Bumblebee(cfg)
    theirs = HF_CLASSES[cfg.model_type][1](cfg).state_dict()
    assert set(ours.state_dict()) == set(theirs)
    for k, v in ours.state_dict().items():
        assert v.shape == theirs[k].shape, k
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert isinstance(getattr(ours.model.layers[0].self_attn, name), torch.nn.Linear)


@pytest.mark.parametrize("case", [*FAMILY_CASES, "qwen2_untied"])
def test_logits_and_grads_match_hf(case):
    cfg = tiny_config(tie_word_embeddings=False) if case == "qwen2_untied" else family_config(case)
    model = make_model(cfg)
    hf = hf_from(model)
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(3))
    ours = model(ids)
    theirs = hf(input_ids=ids, use_cache=False).logits
    assert ours.shape == theirs.shape == (2, 40, 96)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)
    probe = torch.randn_like(ours)
    (ours * probe).sum().backward()
    (theirs * probe).sum().backward()
    hf_params = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, hf_params[name].grad, atol=1e-4, rtol=1e-4, msg=name)


def test_fused_down_proj_and_peft_lora_on_it_match_hf():
    """On CPU the MLP runs SwiGLU + down_proj as one Function (kernels/lean.py) while down_proj
    is our DownProj; once peft wraps down_proj it takes the plain path, so the adapter's term on
    the SwiGLU product is applied. Logits and adapter gradients equal transformers' + peft's."""
    from peft import LoraConfig, get_peft_model

    from bumblefast.model import DownProj

    model = make_model(tiny_config())
    hf = hf_from(model)
    assert type(model.model.layers[0].mlp.down_proj) is DownProj  # the fused path (test_logits_and_grads_match_hf)
    lora = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["gate_proj", "up_proj", "down_proj"])
    ours, theirs = get_peft_model(model, LoraConfig(**lora)), get_peft_model(hf, LoraConfig(**lora))
    assert type(model.model.layers[0].mlp.down_proj) is not DownProj
    g = torch.Generator().manual_seed(11)
    theirs_params = dict(theirs.named_parameters())
    with torch.no_grad():  # non-zero B on both: the adapters change the output
        for name, p in ours.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
                theirs_params[name].copy_(p)
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(3))
    a, b = ours(ids), theirs(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    with torch.no_grad(), ours.disable_adapter():
        assert not torch.allclose(ours(ids), a, atol=1e-3)
    probe = torch.randn_like(a)
    (a * probe).sum().backward()
    (b * probe).sum().backward()
    for name, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, theirs_params[name].grad, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize(
    "case,backend", [(c, "sdpa") for c in FAMILY_CASES] + [("qwen2", "sdpa_mask"), ("qwen3", "sdpa_mask")]
)
def test_packed_equals_separate_documents(case, backend):
    model = make_model(family_config(case), attn_backend=backend)
    lens = [5, 1, 37, 3]
    ids, pos, cu, ms = packed_batch(lens)
    packed = model(ids, pos, cu, ms)
    assert packed.shape == (sum(lens), 96)
    starts = cu.tolist()
    separate = torch.cat([model(ids[a:b][None])[0] for a, b in zip(starts, starts[1:])])
    torch.testing.assert_close(packed, separate, atol=ATOL, rtol=RTOL)
    # and equals HF run per document
    hf = hf_from(model)
    hf_sep = torch.cat([hf(input_ids=ids[a:b][None], use_cache=False).logits[0] for a, b in zip(starts, starts[1:])])
    torch.testing.assert_close(packed, hf_sep, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_packed_matches_hf_packed_position_ids(case):
    """transformers isolates packed docs from position_ids when use_cache=False (4.57 SDPA
    path); our packed logits agree. Fails if transformers does not: the benchmarks' packed
    transformers baselines rely on it."""
    model = make_model(family_config(case))
    hf = hf_from(model)
    ids, pos, cu, ms = packed_batch([4, 7, 2])
    theirs = hf(input_ids=ids[None], position_ids=pos[None], use_cache=False).logits[0]
    ours = model(ids, pos, cu, ms)
    starts = cu.tolist()
    sep = torch.cat([hf(input_ids=ids[a:b][None], use_cache=False).logits[0] for a, b in zip(starts, starts[1:])])
    assert torch.allclose(theirs, sep, atol=1e-4), "transformers does not isolate packed docs via position_ids"
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)


ROPE_CASES = {
    "default": None,
    "linear": dict(rope_type="linear", factor=4.0),
    "llama3": dict(LLAMA3_ROPE, original_max_position_embeddings=8192),  # Llama 3.1's values
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32768),  # Qwen3's
    "yarn_mscale": dict(rope_type="yarn", factor=40.0, mscale=1.0, mscale_all_dim=0.7, beta_fast=16),
    "yarn_old_key": dict(type="yarn", factor=2.0),  # `type`: how older config.json files name it
}


@pytest.mark.parametrize("case", ROPE_CASES)
def test_rope_frequencies_match_transformers(case):
    """Each supported rope_type's frequencies and cos/sin scale equal transformers' rotary
    embedding at a real size (Llama 3.1 8B: head_dim 128, theta 5e5, 131072 positions)."""
    cfg = tiny_config(
        "llama",
        hidden_size=256,
        num_attention_heads=2,
        head_dim=128,
        rope_theta=5e5,
        max_position_embeddings=131072,
        rope_scaling=ROPE_CASES[case],
    )
    with torch.device("meta"):
        model = Bumblebee(cfg)
    rotary = LlamaForCausalLM(cfg).model.rotary_emb
    inv_freq, scale = rope_frequencies(model.arch)
    default, _ = rope_frequencies(Bumblebee(tiny_config("llama", rope_theta=5e5, head_dim=128)).arch)
    assert inv_freq.dtype == torch.float32 and inv_freq.shape == (64,)
    torch.testing.assert_close(inv_freq, rotary.inv_freq, atol=0, rtol=1e-6)
    assert scale == pytest.approx(rotary.attention_scaling, rel=1e-12)
    if case != "default":
        assert not torch.allclose(inv_freq, default)  # the rule did change the frequencies
    pos = torch.tensor([0, 1, 7, 100_000])
    cos, sin = model.rope_cos_sin(pos, torch.float32)
    want_cos, want_sin = rotary(torch.zeros(1, 4, 1), pos[None])
    torch.testing.assert_close(cos, want_cos[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, want_sin[0], atol=1e-6, rtol=0)


def test_unsupported_configs_fail_naming_what_is_supported():
    from transformers import GPT2Config

    with pytest.raises(UserError, match="model_type 'gpt2' is not supported; supported: qwen2, qwen3, llama, mistral"):
        Bumblebee(GPT2Config())
    assert list(FAMILIES) == ["qwen2", "qwen3", "llama", "mistral"]
    for rope_type in ("dynamic", "longrope"):
        scaling = dict(rope_type=rope_type, factor=2.0)
        if rope_type == "longrope":
            scaling.update(short_factor=[1.0] * 8, long_factor=[2.0] * 8, original_max_position_embeddings=128)
        with pytest.raises(UserError, match=f"rope_type '{rope_type}'.*supported: default, linear, llama3, yarn"):
            Bumblebee(tiny_config("llama", rope_scaling=scaling))
    with pytest.raises(UserError, match="hidden_act 'gelu'"):
        Bumblebee(tiny_config("llama", hidden_act="gelu"))


def test_sliding_window_shorter_than_a_document_fails_clearly():
    """Sliding-window attention is not implemented: documents up to the window attend as
    transformers' Mistral (whose window is then moot), a longer document fails naming it."""
    model = make_model(family_config("mistral", sliding_window=8))
    assert model.arch.sliding_window == 8
    hf = hf_from(model)
    ids, pos, cu, ms = packed_batch([8, 5, 3])
    starts = cu.tolist()
    sep = torch.cat([hf(input_ids=ids[a:b][None], use_cache=False).logits[0] for a, b in zip(starts, starts[1:])])
    torch.testing.assert_close(model(ids, pos, cu, ms), sep, atol=ATOL, rtol=RTOL)
    ids, pos, cu, ms = packed_batch([9, 3])
    with pytest.raises(NotImplementedError, match="sliding_window 8 is shorter than a document here \\(9 tokens\\)"):
        model(ids, pos, cu, ms)
    # Qwen2/3 slide only the layers layer_types names: none when max_window_layers covers all
    assert (
        Bumblebee(tiny_config(use_sliding_window=True, sliding_window=8, max_window_layers=2)).arch.sliding_window
        is None
    )
    assert (
        Bumblebee(tiny_config(use_sliding_window=True, sliding_window=8, max_window_layers=1)).arch.sliding_window == 8
    )
    assert Bumblebee(family_config("mistral")).arch.sliding_window is None


def test_bucketed_sdpa_matches_block_mask_fwd_bwd():
    """The per-document bucketed SDPA equals one SDPA with a block-diagonal causal mask."""
    lens = [1, 2, 3, 17, 40, 33, 200, 90, 5, 64, 70, 130]  # several buckets, small docs merged
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    T = sum(lens)
    g = torch.Generator().manual_seed(0)
    q0, k0, v0 = (
        torch.randn(T, 4, 8, generator=g),
        torch.randn(T, 2, 8, generator=g),
        torch.randn(T, 2, 8, generator=g),
    )
    plan = PackedPlan.build(cu, None, T, "sdpa")
    assert len(plan.doc_buckets) >= 3
    assert sorted(i for b in plan.doc_buckets for i in b) == list(range(len(lens)))  # each doc once
    # padding is bounded: a bucket's width is at most sqrt(2)x each of its docs, or a small doc
    for bucket in plan.doc_buckets:
        width = max(lens[i] for i in bucket)
        assert width <= max(64, 1.42 * min(lens[i] for i in bucket))
    mplan = PackedPlan.build(cu, None, T, "sdpa_mask")
    outs, grads = [], []
    do = torch.randn(T, 4, 8, generator=g)
    for fn, p in ((ATTENTION["sdpa"], plan), (ATTENTION["sdpa_mask"], mplan)):
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        o = fn(q, k, v, p)
        outs.append(o)
        grads.append(torch.autograd.grad(o, (q, k, v), do))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bad_cu_seqlens_rejected():
    model = make_model()
    ids, pos, cu, ms = packed_batch([3, 4])
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(ids, pos, torch.tensor([0, 3, 6], dtype=torch.int32), ms)


def test_explicit_attention_backend_fails_loudly_on_cpu():
    ids, pos, cu, ms = packed_batch([3, 4])
    for backend in ("flash", "varlen"):
        model = make_model(attn_backend=backend)
        with pytest.raises(RuntimeError, match=backend):
            model(ids, pos, cu, ms)
    with pytest.raises(ValueError):
        Bumblebee(tiny_config(), attn_backend="nope")
    with pytest.raises(ValueError):
        Bumblebee(tiny_config(), kernels="nope")


def _shifted_labels(ids, cu):
    labels = torch.full_like(ids, -100)
    for a, b in zip(cu.tolist(), cu.tolist()[1:]):
        labels[a : b - 1] = ids[a + 1 : b]
    return labels


def test_lm_loss_matches_logits_cross_entropy():
    model = make_model()
    ids, pos, cu, ms = packed_batch([6, 1, 8])
    labels = _shifted_labels(ids, cu)
    loss, n = model.lm_loss(PackedBatch.from_tensors(ids, cu, labels, position_ids=pos))
    assert n.item() == 12
    loss.backward()
    got = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    ref = torch.nn.functional.cross_entropy(model(ids, pos, cu, ms), labels, reduction="sum")
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-5)
    for k, p in model.named_parameters():
        torch.testing.assert_close(got[k], p.grad, atol=1e-4, rtol=1e-4, msg=k)


def test_dpo_head_matches_reference():
    """objectives.segment_stats, the one DPO head, against per-token log-softmax of the logits."""
    from bumblefast.train.objectives import segment_stats

    model = make_model()
    ids, pos, cu, ms = packed_batch([5, 4, 6])
    labels = _shifted_labels(ids, cu)
    labels[0] = -100  # e.g. a prompt token
    batch = PackedBatch.from_tensors(ids, cu, labels, position_ids=pos)
    seg = batch.segment_ids
    assert seg.tolist() == torch.repeat_interleave(torch.arange(3), (cu[1:] - cu[:-1]).long()).tolist()
    logps, counts, mean_logits = segment_stats(model, batch)
    logits = model(ids, pos, cu, ms)
    keep = labels != -100
    per_token = torch.zeros_like(labels, dtype=torch.float32)
    per_token[keep] = torch.log_softmax(logits[keep], -1).gather(1, labels[keep, None])[:, 0]
    ref = torch.zeros(3).index_add(0, seg, per_token)
    torch.testing.assert_close(logps, ref, atol=1e-4, rtol=1e-5)
    assert counts.tolist() == [3, 3, 5]
    ref_mean = torch.zeros(3).index_add(0, seg, logits.mean(-1) * keep) / counts
    torch.testing.assert_close(mean_logits, ref_mean.detach(), atol=1e-5, rtol=1e-5)
    # gradient path: d(sum logps)/d params equals the materialised reference's
    g = torch.tensor([1.0, -1.0, 0.5])
    got = torch.autograd.grad((logps * g).sum(), list(model.parameters()))
    ref2 = R.fused_linear_logprob(model.hidden_states(batch), model.lm_head.weight, labels, seg, 3)
    want = torch.autograd.grad((ref2 * g).sum(), list(model.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert torch.equal(segment_stats(model, batch)[0], logps)


def test_gradient_checkpointing_same_grads():
    model = make_model()
    ids, pos, cu, ms = packed_batch([7, 5])
    labels = _shifted_labels(ids, cu)
    model.train()
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        if ckpt:
            model.gradient_checkpointing_enable()
        loss, _ = model.lm_loss(PackedBatch.from_tensors(ids, cu, labels, position_ids=pos))
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert model.is_gradient_checkpointing
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_meta_init_is_lazy_and_deterministic():
    cfg = tiny_config()
    meta = Bumblebee.from_config(cfg, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    # a 7B-shaped model builds on meta without memory
    big = Bumblebee.from_config(
        tiny_config(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
            tie_word_embeddings=False,
        ),
        device="meta",
    )
    assert big.num_parameters() > 7e9
    states = []
    for _ in range(2):
        torch.manual_seed(123)
        m = Bumblebee.from_config(cfg, device="meta").to_empty(device="cpu").init_weights()
        assert m.lm_head.weight is m.model.embed_tokens.weight
        states.append(m.state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    sd = states[0]
    assert torch.all(sd["model.norm.weight"] == 1) and torch.all(sd["model.layers.0.self_attn.q_proj.bias"] == 0)
    assert abs(sd["model.layers.1.mlp.up_proj.weight"].std().item() - cfg.initializer_range) < 0.005


@pytest.mark.parametrize("tied", [True, False])
def test_training_and_tests_share_one_init(tied):
    """Training's init (a seeded generator; ZeRO-3 gathers each parameter) and
    `init_weights()` under torch.manual_seed are one function: same seed, same weights,
    whatever the dtype (seeded after the model is built: building draws torch's default inits);
    the expected values are drawn here independently, in parameter order."""
    from bumblefast.train.build import init_parameters

    cfg = tiny_config(tie_word_embeddings=tied)
    tests_way = Bumblebee(cfg)  # building draws torch's default inits: seed after it
    torch.manual_seed(11)
    tests_way.init_weights()
    training_way = Bumblebee(cfg)
    init_parameters(training_way, cfg.initializer_range, seed=11, zero3=False)
    bf16 = Bumblebee(cfg).to(torch.bfloat16)
    init_parameters(bf16, cfg.initializer_range, seed=11, zero3=False)
    gen = torch.Generator().manual_seed(11)
    for name, p in tests_way.named_parameters():
        if name.endswith("norm.weight") or name.endswith(".bias"):
            want = torch.full(p.shape, 1.0 if name.endswith("norm.weight") else 0.0)
        else:
            want = torch.empty(p.shape).normal_(0.0, cfg.initializer_range, generator=gen)
        assert torch.equal(p, want), name
    train_sd, bf16_sd = training_way.state_dict(), bf16.state_dict()
    for k, v in tests_way.state_dict().items():
        assert torch.equal(train_sd[k], v) and torch.equal(bf16_sd[k], v.bfloat16()), k
    assert (tests_way.lm_head.weight is tests_way.model.embed_tokens.weight) == tied


def test_submodules_hold_no_reference_to_the_model():
    model = make_model()
    for name, m in model.named_modules():
        if m is not model:
            assert not any(v is model for v in vars(m).values()), name
            assert not any(isinstance(v, list) and any(x is model for x in v) for v in vars(m).values()), name


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_hf_round_trip(case, tmp_path):
    """Our save is a plain HF folder of the same model_type and config fields that
    AutoModelForCausalLM loads as the family's own class, and transformers' save loads back."""
    cfg = family_config(case)
    model = make_model(cfg)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(5))
    ours_dir, hf_dir = tmp_path / "ours", tmp_path / "hf"
    model.save_pretrained(ours_dir)
    assert (ours_dir / "model.safetensors").exists() and (ours_dir / "config.json").exists()
    saved = json.loads((ours_dir / "config.json").read_text())
    assert saved["model_type"] == cfg.model_type
    assert saved["architectures"] == [HF_CLASSES[cfg.model_type][1].__name__]
    for key in ("head_dim", "attention_bias", "mlp_bias", "tie_word_embeddings", "rope_scaling", "rope_parameters"):
        if key in cfg.to_dict():
            assert saved.get(key) == cfg.to_dict()[key], key
    hf = AutoModelForCausalLM.from_pretrained(ours_dir, dtype=torch.float32).eval()
    assert type(hf) is HF_CLASSES[cfg.model_type][1]
    want = model(ids)
    assert torch.equal(hf(input_ids=ids, use_cache=False).logits, want) or torch.allclose(
        hf(input_ids=ids, use_cache=False).logits, want, atol=ATOL, rtol=RTOL
    )
    hf.save_pretrained(hf_dir)
    back = Bumblebee.from_pretrained(hf_dir)
    assert (back.lm_head.weight is back.model.embed_tokens.weight) == cfg.tie_word_embeddings
    assert back.arch == model.arch
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    torch.testing.assert_close(back(ids), want, atol=0, rtol=0)


def test_sharded_save_loads_in_transformers(tmp_path):
    model = make_model(tiny_config(tie_word_embeddings=False))
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / s).exists() for s in shards)
    assert not os.path.exists(tmp_path / "model.safetensors")
    ids = torch.randint(0, 96, (1, 6))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    torch.testing.assert_close(hf(input_ids=ids, use_cache=False).logits, model(ids), atol=ATOL, rtol=RTOL)
    back = Bumblebee.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert back.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(back.lm_head.weight.float(), model.lm_head.weight.bfloat16().float())


def test_save_state_dict_of_views_into_one_flat_buffer(tmp_path):
    """ZeRO-1/2 hold the weights as views of one flat buffer; the export writes them all the same."""
    model = make_model()
    sd = {k: v.detach() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    flat = torch.cat([v.reshape(-1) for v in sd.values()])
    views, at = {}, 0
    for k, v in sd.items():
        views[k] = flat[at : at + v.numel()].view(v.shape)
        at += v.numel()
    model.save_pretrained(tmp_path, state_dict=views)
    back = Bumblebee.from_pretrained(tmp_path)
    for k, v in sd.items():
        assert torch.equal(back.state_dict()[k], v), k


def test_generation_config_written_or_failure_visible(tmp_path, monkeypatch):
    """generation_config.json is written with the model's eos; a write error fails the save,
    settings transformers refuses to save give a visible warning (never silence)."""
    from transformers import GenerationConfig

    model = make_model(tiny_config(eos_token_id=7))
    model.save_pretrained(tmp_path / "ok")
    assert GenerationConfig.from_pretrained(tmp_path / "ok").eos_token_id == 7

    def refuse(self, path, *a, **k):
        raise ValueError("GenerationConfig is invalid: something\nmore")

    monkeypatch.setattr(GenerationConfig, "save_pretrained", refuse)
    with pytest.warns(UserWarning, match="generation_config.json not written .*GenerationConfig is invalid"):
        model.save_pretrained(tmp_path / "warn")
    assert (tmp_path / "warn" / "model.safetensors").is_file()

    def disk_full(self, path, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(GenerationConfig, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(tmp_path / "fail")


def test_peft_lora_targets_apply():
    peft = pytest.importorskip("peft")
    model = make_model()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    ids, pos, cu, ms = packed_batch([4, 3])
    batch = PackedBatch.from_tensors(ids, cu, _shifted_labels(ids, cu), position_ids=pos)
    loss, _ = lora.base_model.model.lm_loss(batch)
    loss.backward()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["qwen2", "qwen3", "llama3", "mistral"])
def test_cuda_parity_with_hf_and_backends(case, dtype):
    """On CUDA: auto backends (varlen/flash + Liger, Qwen3's q/k norm through them too) vs HF
    and vs the masked-SDPA reference."""
    tol = dict(atol=2e-4, rtol=1e-3) if dtype == torch.float32 else dict(atol=6e-2, rtol=5e-2)
    model = make_model(family_config(case)).cuda()
    hf = hf_from(model).cuda().to(dtype)
    model = model.to(dtype)
    ids = torch.randint(0, 96, (2, 16), device="cuda")
    torch.testing.assert_close(model(ids).float(), hf(input_ids=ids, use_cache=False).logits.float(), **tol)
    ids, pos, cu, ms = (t.cuda() if torch.is_tensor(t) else t for t in packed_batch([9, 1, 12, 30]))
    ref = Bumblebee(model.config, attn_backend="sdpa_mask", kernels="reference").cuda().to(dtype)
    ref.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(ids, pos, cu, ms).float(), ref(ids, pos, cu, ms).float(), **tol)
    labels = _shifted_labels(ids, cu)
    batch = PackedBatch.from_tensors(ids, cu, labels, position_ids=pos)
    l1, _ = model.lm_loss(batch)
    l2, _ = ref.lm_loss(batch)
    torch.testing.assert_close(l1.float(), l2.float(), **tol)
