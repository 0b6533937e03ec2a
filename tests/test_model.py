"""Bumblebee vs transformers' Qwen2ForCausalLM, packing isolation, attention backends,
HF checkpoint round trips, losses, checkpointing and deferred init. fp32, tiny shapes."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from bumblefast.attention import ATTENTION, PackedPlan
from bumblefast.kernels import reference as R
from bumblefast.model import Bumblebee

# Same math, different op order: fp32 noise only.
ATOL, RTOL = 2e-5, 1e-4
CUDA = torch.cuda.is_available()


def tiny_config(**kw) -> Qwen2Config:
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
    cfg = Qwen2Config(**base)
    cfg._attn_implementation = "sdpa"  # HF side: plain SDPA (no cache in our comparisons)
    return cfg


def make_model(cfg=None, seed=0, **kw) -> Bumblebee:
    torch.manual_seed(seed)
    model = Bumblebee(cfg or tiny_config(), **kw)
    model.init_weights()
    # non-trivial biases and norms so a wrong mapping cannot hide
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_from(model: Bumblebee) -> Qwen2ForCausalLM:
    hf = Qwen2ForCausalLM(model.config).eval()
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
def test_state_dict_keys_equal_hf(tied):
    cfg = tiny_config(tie_word_embeddings=tied)
    ours = Bumblebee(cfg)
    assert set(ours.state_dict()) == set(Qwen2ForCausalLM(cfg).state_dict())
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert isinstance(getattr(ours.model.layers[0].self_attn, name), torch.nn.Linear)


@pytest.mark.parametrize("tied", [True, False])
def test_logits_and_grads_match_hf(tied):
    model = make_model(tiny_config(tie_word_embeddings=tied))
    hf = hf_from(model)
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(3))
    ours = model(ids)
    theirs = hf(input_ids=ids, use_cache=False).logits
    assert ours.shape == theirs.shape == (2, 11, 96)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)
    probe = torch.randn_like(ours)
    (ours * probe).sum().backward()
    (theirs * probe).sum().backward()
    hf_params = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, hf_params[name].grad, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("backend", ["sdpa", "sdpa_mask"])
def test_packed_equals_separate_documents(backend):
    model = make_model(attn_backend=backend)
    lens = [5, 1, 9, 3]
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


def test_packed_matches_hf_packed_position_ids():
    """transformers isolates packed docs from position_ids when use_cache=False (4.57 SDPA
    path); our packed logits agree. Skipped if this transformers version does not."""
    model = make_model()
    hf = hf_from(model)
    ids, pos, cu, ms = packed_batch([4, 7, 2])
    theirs = hf(input_ids=ids[None], position_ids=pos[None], use_cache=False).logits[0]
    ours = model(ids, pos, cu, ms)
    starts = cu.tolist()
    sep = torch.cat([hf(input_ids=ids[a:b][None], use_cache=False).logits[0] for a, b in zip(starts, starts[1:])])
    if not torch.allclose(theirs, sep, atol=1e-4):
        pytest.skip("this transformers version does not isolate packed docs via position_ids")
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)


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
    loss, n = model.lm_loss(ids, pos, cu, ms, labels)
    assert n.item() == 12
    loss.backward()
    got = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    ref = torch.nn.functional.cross_entropy(model(ids, pos, cu, ms), labels, reduction="sum")
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-5)
    for k, p in model.named_parameters():
        torch.testing.assert_close(got[k], p.grad, atol=1e-4, rtol=1e-4, msg=k)


def test_segment_logps_matches_reference():
    model = make_model()
    ids, pos, cu, ms = packed_batch([5, 4, 6])
    labels = _shifted_labels(ids, cu)
    labels[0] = -100  # e.g. a prompt token
    seg = torch.repeat_interleave(torch.arange(3), (cu[1:] - cu[:-1]).long())
    logps, counts = model.segment_logps(ids, pos, cu, ms, labels, seg, 3, return_counts=True)
    ref = R.fused_linear_logprob(model.hidden_states(ids, pos, cu, ms), model.lm_head.weight, labels, seg, 3)
    torch.testing.assert_close(logps, ref, atol=1e-4, rtol=1e-5)
    assert counts.tolist() == [3, 3, 5]
    # gradient path: d(sum logps)/d params equals the materialised reference's
    g = torch.tensor([1.0, -1.0, 0.5])
    got = torch.autograd.grad((logps * g).sum(), list(model.parameters()))
    ref2 = R.fused_linear_logprob(model.hidden_states(ids, pos, cu, ms), model.lm_head.weight, labels, seg, 3)
    want = torch.autograd.grad((ref2 * g).sum(), list(model.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert torch.equal(model.segment_logps(ids, pos, cu, ms, labels, seg, 3), logps)


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
        loss, _ = model.lm_loss(ids, pos, cu, ms, labels)
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


def test_hf_round_trip(tmp_path):
    model = make_model()
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(5))
    ours_dir, hf_dir = tmp_path / "ours", tmp_path / "hf"
    model.save_pretrained(ours_dir)
    assert (ours_dir / "model.safetensors").exists() and (ours_dir / "config.json").exists()
    assert json.loads((ours_dir / "config.json").read_text())["model_type"] == "qwen2"
    hf = AutoModelForCausalLM.from_pretrained(ours_dir, dtype=torch.float32).eval()
    want = model(ids)
    assert torch.equal(hf(input_ids=ids, use_cache=False).logits, want) or torch.allclose(
        hf(input_ids=ids, use_cache=False).logits, want, atol=ATOL, rtol=RTOL
    )
    hf.save_pretrained(hf_dir)
    back = Bumblebee.from_pretrained(hf_dir)
    assert back.lm_head.weight is back.model.embed_tokens.weight
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
    loss, _ = lora.base_model.model.lm_loss(ids, pos, cu, ms, _shifted_labels(ids, cu))
    loss.backward()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_parity_with_hf_and_backends(dtype):
    """On CUDA: auto backends (varlen/flash + Liger) vs HF and vs the masked-SDPA reference."""
    tol = dict(atol=2e-4, rtol=1e-3) if dtype == torch.float32 else dict(atol=6e-2, rtol=5e-2)
    model = make_model().cuda()
    hf = hf_from(model).cuda().to(dtype)
    model = model.to(dtype)
    ids = torch.randint(0, 96, (2, 16), device="cuda")
    torch.testing.assert_close(model(ids).float(), hf(input_ids=ids, use_cache=False).logits.float(), **tol)
    ids, pos, cu, ms = (t.cuda() if torch.is_tensor(t) else t for t in packed_batch([9, 1, 12, 30]))
    ref = Bumblebee(model.config, attn_backend="sdpa_mask", kernels="reference").cuda().to(dtype)
    ref.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(ids, pos, cu, ms).float(), ref(ids, pos, cu, ms).float(), **tol)
    labels = _shifted_labels(ids, cu)
    l1, _ = model.lm_loss(ids, pos, cu, ms, labels)
    l2, _ = ref.lm_loss(ids, pos, cu, ms, labels)
    torch.testing.assert_close(l1.float(), l2.float(), **tol)
