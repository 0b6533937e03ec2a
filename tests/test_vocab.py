"""Vocabulary from the tokenizer: a fresh model is sized to its tokenizer (a multiple of 128),
trained weights refuse a larger tokenizer unless --resize_vocab grows them with mean rows,
checked against transformers' Qwen2 (parameter counts, `resize_token_embeddings`)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TINY, prep, save_tiny_model, subprocess_env, train_command
from train_hooks import run_here

from bumblefast.config import PretrainConfig, SFTConfig, UserError, build_config
from bumblefast.shards.collate import PackedBatch
from bumblefast.vocab import padded_vocab_size

PRESET_15B = ROOT / "configs" / "models" / "bumblebee-1.5b"


@pytest.fixture(scope="module")
def bpe2000(tmp_path_factory) -> Path:
    """A 2,000-token byte-level BPE (the issue's case: more ids than the tiny preset's 1,024
    rows), trained on seeded random words so that 2,000 merges exist."""
    from bumblefast.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("bpe2000")
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(3000)]
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(40)) for _ in range(400)))
    tok = train_tokenizer([corpus], 2000, root / "tok")
    assert len(tok) == 2000
    return root


def word_level_tokenizer(out: Path, n: int) -> Path:
    """A tokenizer folder of exactly `n` ids (only its size matters to vocabulary sizing)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(n)}, unk_token="w0"))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w1").save_pretrained(out)
    return out


def hf_param_count(config_dict: dict) -> int:
    """Unique parameters of transformers' own Qwen2ForCausalLM for this config (meta device)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**config_dict))
    return sum(p.numel() for p in model.parameters())  # parameters() de-duplicates tied weights


def test_padded_vocab_size():
    assert [padded_vocab_size(n) for n in (1, 128, 129, 2000, 32000, 151643)] == [
        128,
        128,
        256,
        2048,
        32000,
        151680,
    ]


def test_fresh_model_takes_the_tokenizers_vocab(bpe2000):
    from transformers import AutoTokenizer

    from bumblefast import flops
    from bumblefast.train.build import load_model_config

    tok = AutoTokenizer.from_pretrained(bpe2000 / "tok")
    cfg = build_config(
        PretrainConfig,
        {},
        {"model_name_or_path": str(TINY), "tokenizer_name_or_path": str(bpe2000 / "tok")},
    )
    config = load_model_config(cfg, tok)
    assert config.vocab_size == 2048 and config.eos_token_id == tok.eos_token_id
    assert flops.param_count(config) == hf_param_count(config.to_dict())
    cfg.vocab_size = 4096
    assert load_model_config(cfg, tok).vocab_size == 4096
    cfg.vocab_size = 1999
    with pytest.raises(UserError, match="vocab_size: 1999 is smaller than the tokenizer's 2000"):
        load_model_config(cfg, tok)


def test_trained_weights_refuse_a_larger_tokenizer_naming_resize_vocab(bpe2000, tmp_path, demo_tokenizer_dir):
    from transformers import AutoTokenizer

    from bumblefast.train.build import load_model_config

    model_dir = save_tiny_model(tmp_path / "m", demo_tokenizer_dir)
    tok = AutoTokenizer.from_pretrained(bpe2000 / "tok")
    cfg = build_config(SFTConfig, {}, {"model_name_or_path": str(model_dir)})
    with pytest.raises(UserError, match=r"2000 tokens, more than the 1024 embedding rows.*--resize_vocab"):
        load_model_config(cfg, tok)
    cfg.vocab_size = 4096
    with pytest.raises(UserError, match="vocab_size: only sizes a fresh model"):
        load_model_config(cfg, tok)
    with pytest.raises(UserError, match="resize_vocab: needs finetuning_type full"):
        build_config(
            SFTConfig,
            {},
            {
                "model_name_or_path": str(model_dir),
                "resize_vocab": "true",
                "finetuning_type": "lora",
            },
        )


@pytest.mark.parametrize("tied", [True, False])
def test_resize_vocab_matches_transformers_mean_resizing(bpe2000, tmp_path, tied):
    from transformers import AutoConfig, AutoTokenizer, Qwen2ForCausalLM

    from bumblefast.model import Bumblebee
    from bumblefast.train.build import load_model_config, load_trained

    torch.manual_seed(0)
    base = AutoConfig.from_pretrained(TINY)
    base.tie_word_embeddings = tied
    Bumblebee(base, attn_backend="sdpa", kernels="reference").init_weights().save_pretrained(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(bpe2000 / "tok")
    cfg = build_config(
        SFTConfig,
        {},
        {
            "model_name_or_path": str(tmp_path / "m"),
            "resize_vocab": "true",
            "attn_backend": "sdpa",
            "kernels": "reference",
        },
    )
    config = load_model_config(cfg, tok)
    assert config.vocab_size == 2048
    ours = load_trained(cfg, config, dict(attn_backend="sdpa", kernels="reference")).eval()
    assert ours.config.vocab_size == 2048 and (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied

    hf = Qwen2ForCausalLM.from_pretrained(tmp_path / "m", torch_dtype=torch.float32).eval()
    old = hf.get_input_embeddings().weight.detach().clone()
    old_head = hf.get_output_embeddings().weight.detach().clone()
    hf.resize_token_embeddings(len(tok), pad_to_multiple_of=128, mean_resizing=True)
    for mine, theirs, before in (
        (ours.model.embed_tokens.weight, hf.get_input_embeddings().weight, old),
        (ours.lm_head.weight, hf.get_output_embeddings().weight, old_head),
    ):
        assert mine.shape == theirs.shape == (2048, base.hidden_size)
        assert torch.equal(mine[:1024], before)  # trained rows untouched
        assert torch.allclose(mine[1024:], before.mean(0).expand(1024, -1), rtol=0, atol=1e-7)  # the formula
        # transformers samples around the same mean with 1e-9 x the rows' covariance
        assert torch.allclose(mine[1024:], theirs[1024:].detach(), rtol=0, atol=1e-5)
    with torch.no_grad():  # transformers' model with the formula's rows: the same function as ours
        hf.get_input_embeddings().weight[1024:] = old.mean(0)
        hf.get_output_embeddings().weight[1024:] = old_head.mean(0)
    ids = torch.tensor([5, 1500, 2040, 17, 1999, 3])  # old, new and padding ids
    cu = torch.tensor([0, len(ids)], dtype=torch.int32)
    with torch.no_grad():
        mine = ours(ids, Bumblebee.positions_from_cu_seqlens(cu, len(ids)), cu, len(ids))
        theirs = hf(ids[None], use_cache=False).logits[0]
    assert torch.allclose(mine, theirs, rtol=0, atol=1e-5)


def test_model_info_shows_the_tokenizers_vocab(tmp_path):
    """The README recipe: a 32k tokenizer on the 1.5B preset carries no unused rows."""
    tok = word_level_tokenizer(tmp_path / "tok32k", 32000)
    cmd = [
        sys.executable,
        "-m",
        "bumblefast",
        "model",
        "info",
        str(PRESET_15B),
        "--tokenizer",
        str(tok),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT, env=subprocess_env()).stdout
    preset = json.loads((PRESET_15B / "config.json").read_text())
    n = hf_param_count(dict(preset, vocab_size=32000))
    assert "vocab 32000" in out and "32,000 rows (tokenizer" in out and f"{n:,} ({n / 1e9:.2f}B)" in out
    assert n < hf_param_count(preset) - 180_000_000  # ~185M parameters of unused rows gone


def test_tiny_preset_builds_and_steps_with_a_2000_token_bpe(bpe2000):
    """The model build path of `train --stage pretrain` (no DeepSpeed): ids past the preset's
    1,024 rows embed, train and move the weights."""
    from transformers import AutoTokenizer

    from bumblefast.model import Bumblebee
    from bumblefast.train.build import build_model, load_model_config

    tok = AutoTokenizer.from_pretrained(bpe2000 / "tok")
    cfg = build_config(
        PretrainConfig,
        {},
        {
            "model_name_or_path": str(TINY),
            "tokenizer_name_or_path": str(bpe2000 / "tok"),
            "gradient_checkpointing": "false",
            "kernels": "reference",
            "attn_backend": "sdpa",
        },
    )
    config = load_model_config(cfg, tok)
    model, _ = build_model(cfg, config)
    assert model.model.embed_tokens.weight.shape == (2048, 256)
    text = (bpe2000 / "corpus.txt").read_text().splitlines()[0]
    ids = torch.tensor(tok(text)["input_ids"][:48])
    assert int(ids.max()) >= 1024  # the ids the preset's 1,024 rows could not hold
    cu = torch.tensor([0, len(ids)], dtype=torch.int32)
    pos = Bumblebee.positions_from_cu_seqlens(cu, len(ids))
    labels = torch.cat([ids[1:], torch.tensor([-100])])
    before = model.model.embed_tokens.weight[ids].detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(2):
        loss_sum, n = model.lm_loss(PackedBatch.from_tensors(ids, cu, labels, position_ids=pos))
        loss = loss_sum / n
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[1] < losses[0] and losses[0] == pytest.approx(torch.log(torch.tensor(2048.0)).item(), rel=0.05)
    assert not torch.equal(model.model.embed_tokens.weight[ids], before)


@pytest.mark.slow
def test_tiny_preset_pretrains_with_a_2000_token_bpe(bpe2000, tmp_path, one_rank):
    """The issue's failing case end to end: prep + `bumblefast train` + the exported HF model."""
    from transformers import AutoModelForCausalLM

    tok = bpe2000 / "tok"
    prep(tok, tmp_path / "shards", "pretrain", [bpe2000 / "corpus.txt"], seq_len=64)
    cmd = train_command(
        "pretrain",
        model_name_or_path=TINY,
        tokenizer_name_or_path=tok,
        dataset_path=tmp_path / "shards",
        output_dir=tmp_path / "run",
        cutoff_len=64,
        max_steps=2,
        train_micro_batch_size_per_gpu=2,
        gradient_accumulation_steps=1,
        use_tensorboard="false",
    )
    res = run_here(cmd)
    assert "vocab: 1024 -> 2048 embedding rows" in res.stdout
    assert json.loads((tmp_path / "run" / "config.json").read_text())["vocab_size"] == 2048
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "run", torch_dtype=torch.float32)
    assert hf.get_input_embeddings().weight.shape == (2048, 256)
    assert all(torch.isfinite(p).all() for p in hf.parameters())
