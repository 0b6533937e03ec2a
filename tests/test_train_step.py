"""The train step in this process (ZeRO-0, one rank): how often it reads the device, and
gradient checkpointing through the trainer against the same step without it."""

from __future__ import annotations

import collections
import gc
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import DEMO, ROOT, TINY, prep
from torch.overrides import TorchFunctionMode

pytestmark = pytest.mark.slow

# Tensor -> Python conversions: each one waits for the device to finish the queued work.
SYNCS = {"item", "tolist", "__float__", "__bool__", "__int__", "__index__", "numpy"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory, demo_tokenizer_dir):

    root = tmp_path_factory.mktemp("step")
    docs = json.loads((DEMO / "pretrain.json").read_text())[:60]
    (root / "docs.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    prep(demo_tokenizer_dir, root / "shards", "pretrain", [root / "docs.jsonl"], seq_len=64)
    return root / "shards"


def config(out: Path, shards: Path, tok: Path, **kw):
    from bumblefast.config import PretrainConfig

    base = dict(
        model_name_or_path=str(TINY),
        tokenizer_name_or_path=str(tok),
        dataset_path=str(shards),
        output_dir=str(out),
        cutoff_len=64,
        train_micro_batch_size_per_gpu=2,
        gradient_accumulation_steps=2,
        learning_rate=3e-3,
        warmup_ratio=0.0,
        logging_steps=1,
        save_steps=1000,
        gradient_checkpointing=False,
        kernels="reference",
        attn_backend="sdpa",
        seed=0,
        shuffle=False,
        use_tensorboard=False,
        max_steps=3,
        deepspeed_config_path=str(ROOT / "configs/deepspeed/ds_z0.json"),
    )
    return PretrainConfig(**{**base, **kw})


class SyncCounter(TorchFunctionMode):
    """Records where a tensor is turned into a Python value, except the collator's host
    tensors (`host`: their ids), which never were on the device."""

    def __init__(self, host: set[int]):
        super().__init__()
        self.host = host
        self.sites: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if (
            getattr(func, "__name__", "") in SYNCS
            and args
            and torch.is_tensor(args[0])
            and id(args[0]) not in self.host
        ):
            frame = sys._getframe(1)
            if frame.f_code.co_name == "_get_value" and frame.f_code.co_filename.endswith("optimizer.py"):
                return func(*args, **(kwargs or {}))  # AdamW's step count: on the host unless fused (CUDA)
            while frame is not None and f"{os.sep}torch{os.sep}" in frame.f_code.co_filename:
                frame = frame.f_back
            self.sites.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}")
        return func(*args, **(kwargs or {}))


def test_train_step_reads_the_device_once_per_optimizer_step(
    one_rank, shards, demo_tokenizer_dir, tmp_path, monkeypatch
):
    """Every tensor the step moves to the device is a fresh copy here (on a GPU it would live
    there), so any read of it, or of anything computed from it, is counted; the collator's host
    tensors are not. Per optimizer step the loop reads the device once (`read_stats`).
    The CPU attention backend splits rows at cu_seqlens and reads them (`PackedPlan.build`): on
    CPU those are host memory; on CUDA flash/varlen take max_seqlen as an int and never read them."""
    from bumblefast.shards.collate import PackedBatch
    from bumblefast.train import loop

    real = PackedBatch.to
    monkeypatch.setattr(PackedBatch, "to", lambda b, d, non_blocking=False: real(b, d)._map(torch.clone))
    run = loop.setup(config(tmp_path / "run", shards, demo_tokenizer_dir))
    per_step = []
    for micro_batches in loop.epochs(run):
        host = {id(v) for b in micro_batches for v in vars(b).values() if torch.is_tensor(v)}
        with SyncCounter(host) as counter:
            metrics = loop.train_step(run, micro_batches)
        per_step.append(counter.sites)
        assert metrics["loss"] > 0 and metrics["grad_norm"] > 0
    assert len(per_step) == 3
    for sites in per_step:
        ours = [s for s in sites if s != "attention.py:build"]
        assert ours == ["loop.py:read_stats"], collections.Counter(sites)
        assert sites.count("attention.py:build") == 2  # one plan per micro-batch forward
    del run
    gc.collect()


def test_gradient_checkpointing_equals_off_through_the_trainer(one_rank, shards, demo_tokenizer_dir, tmp_path):
    """The shipped configs train with gradient checkpointing: the trainer's first step with it on
    gives the loss and every gradient of the step with it off (fp32 tolerance), and the
    decoder layers really start twice (forward, then recomputed in backward: a pre-hook, since the
    recomputation stops early, before a forward hook would fire)."""
    from bumblefast.train import loop

    results = {}
    for on in (False, True):
        run = loop.setup(config(tmp_path / f"gc-{on}", shards, demo_tokenizer_dir, gradient_checkpointing=on))
        model = run.objective.model
        assert model.is_gradient_checkpointing == on
        calls = []
        hook = model.model.layers[0].register_forward_pre_hook(lambda *_, c=calls: c.append(1))
        micro_batches = next(loop.epochs(run))
        facts, _ = loop.host_facts(run, micro_batches)
        scale = torch.tensor(len(micro_batches) / facts[0], dtype=torch.float64)
        keys, sums, finite = loop.forward_backward(run, micro_batches, scale)
        hook.remove()
        assert bool(finite.all())
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        results[on] = (float(sums[0]) / facts[0], grads, len(calls))
        del run, model
        gc.collect()
    (loss_off, grads_off, calls_off), (loss_on, grads_on, calls_on) = results[False], results[True]
    assert calls_off == 2 and calls_on == 4  # 2 micro-batches; recomputed in backward when on
    assert loss_on == pytest.approx(loss_off, rel=1e-6)
    assert grads_on.keys() == grads_off.keys()
    for name, g in grads_off.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(grads_on[name], g, rtol=1e-5, atol=1e-7)
