"""Checkpoint families beyond Qwen2 through the whole pipeline: a tokenizer with its own
(Llama-3-style) chat template gets the loss masks of the ChatML path in prep, and a tiny
random Llama and Qwen3 (made with transformers' own classes and save_pretrained) go through
SFT and DPO with LoRA, merge-lora, and load back in transformers with our model's logits.

The model-level parity per family (logits, gradients, packed vs separate) is in test_model.py."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import DEMO, ROOT
from test_prep import prep, read_rows, segments, trained_runs

# Llama 3's chat format, hand-written (no hub download): the bos, then each turn as
# <|start_header_id|>role<|end_header_id|>\n\n content <|eot_id|>, the reply's header as the
# generation prompt. Like Llama 3's own template it trims the content.
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)


@pytest.fixture(scope="module")
def llama3_tok_dir(tmp_path_factory, demo_tokenizer_dir) -> Path:
    """The demo BPE with Llama 3's special tokens, bos/eos and the template above."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": LLAMA3_SPECIALS})
    tok.bos_token, tok.eos_token, tok.pad_token = "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"
    tok.chat_template = LLAMA3_TEMPLATE
    out = tmp_path_factory.mktemp("llama3_tok")
    tok.save_pretrained(out)
    return out


RECORD = {"system": "Be brief.", "instruction": "Add", "input": "2 and 3", "output": "5", "history": [["hi", "hello"]]}
PAIR = {
    "conversations": [
        {"from": "human", "value": "hi"},
        {"from": "gpt", "value": "hello"},
        {"from": "human", "value": "3 + 1 = "},
    ],
    "chosen": {"from": "gpt", "value": "4"},
    "rejected": {"from": "gpt", "value": "31"},
}
# template -> (full SFT text, trained runs, end-of-turn token)
EXPECTED = {
    "chatml": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\nAdd\n2 and 3<|im_end|>\n"
        "<|im_start|>assistant\n5<|im_end|>\n",
        "<|im_end|>",
    ),
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nhello<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAdd\n2 and 3<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n5<|eot_id|>",
        "<|eot_id|>",
    ),
}


@pytest.mark.parametrize("template", EXPECTED)
def test_own_chat_template_masks_like_chatml(template, demo_tokenizer_dir, llama3_tok_dir, tmp_path):
    """The rule is the template's, not ChatML's: every assistant reply and its end-of-turn
    token are trained, nothing else (SFT: each reply; DPO: the final reply of each segment)."""
    from transformers import AutoTokenizer

    from bumblefast.train.export import stop_tokens

    tok_dir = llama3_tok_dir if template == "llama3" else demo_tokenizer_dir
    tok = AutoTokenizer.from_pretrained(tok_dir)
    text, eot = EXPECTED[template]
    assert stop_tokens(tok)[0] == eot  # what the exported generation_config stops on
    (tmp_path / "sft.jsonl").write_text(json.dumps(RECORD) + "\n")
    prep(str(tok_dir), tmp_path / "sft", "sft", [tmp_path / "sft.jsonl"], seq_len=128)
    (row,) = read_rows(tmp_path / "sft")
    assert tok.decode(row["input_ids"].tolist()) == text
    assert trained_runs(tok, row["input_ids"], row["loss_mask"]) == [f"hello{eot}", f"5{eot}"]

    (tmp_path / "dpo.jsonl").write_text(json.dumps(PAIR) + "\n")
    prep(str(tok_dir), tmp_path / "dpo", "dpo", [tmp_path / "dpo.jsonl"], seq_len=128)
    (row,) = read_rows(tmp_path / "dpo")
    (chosen_ids, chosen_mask), (rejected_ids, rejected_mask) = segments(row, "seq_lens")
    assert trained_runs(tok, chosen_ids, chosen_mask) == [f"4{eot}"]  # the earlier "hello" is prompt
    assert trained_runs(tok, rejected_ids, rejected_mask) == [f"31{eot}"]
    assert tok.decode(chosen_ids.tolist()).rstrip().endswith(f"4{eot}")  # ChatML: then an untrained newline


def test_train_refuses_what_the_model_cannot_train(tmp_path):
    """Before any weight is loaded: an unsupported model_type names the supported ones, rows
    longer than a sliding window name cutoff_len, LoRA on a q/k norm names the linears."""
    from transformers import AutoConfig, MistralConfig, Qwen3Config

    from bumblefast.config import SFTConfig, UserError
    from bumblefast.train.build import check_family

    def folder(name, cfg):
        cfg.save_pretrained(tmp_path / name)
        return AutoConfig.from_pretrained(tmp_path / name)

    small = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4)
    run = SFTConfig(model_name_or_path=str(tmp_path / "m"), cutoff_len=512)
    mistral = folder("m", MistralConfig(sliding_window=256, **small))
    with pytest.raises(UserError, match="cutoff_len: 512 is longer than .*sliding_window 256.*cutoff_len <= 256"):
        check_family(run, mistral)
    check_family(SFTConfig(model_name_or_path=str(tmp_path / "m"), cutoff_len=256), mistral)
    qwen3 = folder("m", Qwen3Config(**small))
    check_family(run, qwen3)
    lora = SFTConfig(
        model_name_or_path=str(tmp_path / "m"), finetuning_type="lora", lora_target_modules=["q_proj", "q_norm"]
    )
    with pytest.raises(UserError, match=r"lora_target_modules: \['q_norm'\] are not linear layers of qwen3"):
        check_family(lora, qwen3)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    with pytest.raises(UserError, match="model_name_or_path: .*model_type 'phi3' is not supported; supported: qwen2"):
        check_family(run, SimpleNamespace(**dict(cfg, model_type="phi3")))


# ---------------------------------------------------------------------------- end to end
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.05,
    tie_word_embeddings=False,
)
FAMILIES = {
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            rope_theta=5e5,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24, rope_theta=1e6, tie_word_embeddings=True)),
}
LORA = dict(
    finetuning_type="lora",
    lora_rank=4,
    lora_alpha=8,
    lora_dropout=0.0,
    lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
)


def train(stage: str, model: Path, tok: Path, shards: Path, out: Path) -> Path:
    from bumblefast.config import DPOConfig, SFTConfig
    from bumblefast.train.loop import train as run

    cls = SFTConfig if stage == "sft" else DPOConfig
    cfg = cls(
        model_name_or_path=str(model),
        tokenizer_name_or_path=str(tok),
        dataset_path=str(shards),
        output_dir=str(out),
        cutoff_len=128,
        train_micro_batch_size_per_gpu=2,
        gradient_accumulation_steps=1,
        learning_rate=2e-2,
        warmup_ratio=0.0,
        max_steps=2,
        logging_steps=1,
        save_steps=1000,
        save_last=False,
        gradient_checkpointing=False,
        kernels="reference",
        attn_backend="sdpa",
        seed=0,
        shuffle=False,
        use_tensorboard=False,
        deepspeed_config_path=str(ROOT / "configs/deepspeed/ds_z0.json"),
        **LORA,
    )
    return run(cfg)


def merged_by_hand(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """W + (alpha / r) B A for every adapted weight, from the files (no peft)."""
    from safetensors.torch import load_file

    from bumblefast.model_io import checkpoint_files

    weights = {}
    for f in checkpoint_files(base):
        weights.update(load_file(str(f)))
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    out = {}
    for key, a in lora.items():
        if ".lora_A." in key:
            name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            b = lora[key.replace(".lora_A.", ".lora_B.")]
            out[name] = weights[name] + scale * (b @ a)
    return out


def check_merged(base: Path, adapter: Path, merged: Path, ours_with_adapter, ids, cu, model_cls: str) -> None:
    """The merged folder is a plain HF model of the base's model_type whose weights are the
    hand-computed merge and whose logits (transformers' own class, each document alone) equal
    our model's with the adapter on the packed batch."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base_cfg, merged_cfg = (json.loads((p / "config.json").read_text()) for p in (base, merged))
    assert merged_cfg["model_type"] == base_cfg["model_type"] and merged_cfg["architectures"] == [model_cls]
    for key in ("head_dim", "rope_scaling", "rope_parameters", "tie_word_embeddings", "attention_bias"):
        assert merged_cfg.get(key) == base_cfg.get(key), key
    want = merged_by_hand(base, adapter)
    assert len(want) == 2 * 7  # 2 layers x 7 linears
    got = load_file(str(merged / "model.safetensors"))
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, atol=1e-6, rtol=1e-6, msg=name)
    assert any((want[n] - load_file(str(base / "model.safetensors"))[n]).abs().max() > 1e-4 for n in want)
    hf = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    assert type(hf).__name__ == model_cls
    bounds = cu.tolist()
    with torch.no_grad():
        theirs = torch.cat(
            [hf(input_ids=ids[a:b][None], use_cache=False).logits[0] for a, b in zip(bounds, bounds[1:])]
        )
        ours = ours_with_adapter(ids, None, cu, max(b - a for a, b in zip(bounds, bounds[1:])))
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_sft_dpo_lora_merge_round_trip(family, one_rank, demo_tokenizer_dir, llama3_tok_dir, tmp_path):
    """base (transformers' class, random) -> SFT LoRA -> merge -> DPO LoRA -> merge, each
    merged model checked by check_merged; the Llama run uses the Llama-3-style template."""
    import transformers
    from peft import PeftModel
    from transformers import AutoTokenizer

    from bumblefast.config import PrepConfig
    from bumblefast.merge_lora import merge_lora
    from bumblefast.model import Bumblebee
    from bumblefast.prep.run import run_prep

    cfg_cls, model_cls, extra = FAMILIES[family]
    tok_dir = llama3_tok_dir if family == "llama" else demo_tokenizer_dir
    tok = AutoTokenizer.from_pretrained(tok_dir)
    base = tmp_path / "base"
    config = getattr(transformers, cfg_cls)(
        vocab_size=128 * -(-len(tok) // 128),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **{**TINY, **extra},
    )
    torch.manual_seed(0)
    getattr(transformers, model_cls)(config).save_pretrained(base)
    tok.save_pretrained(base)

    sft = json.loads((DEMO / "sft_alpaca.json").read_text())[:24]
    pairs = json.loads((DEMO / "dpo.json").read_text())[:16]
    for name, records, stage in (("sft", sft, "sft"), ("dpo", pairs, "dpo")):
        (tmp_path / f"{name}.json").write_text(json.dumps(records, ensure_ascii=False))
        run_prep(
            PrepConfig(
                stage=stage,
                input=[str(tmp_path / f"{name}.json")],
                tokenizer_name_or_path=str(tok_dir),
                seq_len=128,
                output_dir=str(tmp_path / f"{name}_shards"),
            ),
            progress=False,
        )

    ids = torch.randint(0, len(tok), (21,), generator=torch.Generator().manual_seed(1))
    cu = torch.tensor([0, 6, 7, 21], dtype=torch.int32)
    start = base
    for stage in ("sft", "dpo"):
        adapter = train(stage, start, tok_dir, tmp_path / f"{stage}_shards", tmp_path / f"{stage}_lora")
        assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(start)
        metrics = json.loads((adapter / "training_metrics.json").read_text())
        assert len(metrics) == 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
        merged = merge_lora(start, adapter, tmp_path / f"{stage}_merged", dtype="float32")
        ours = PeftModel.from_pretrained(Bumblebee.from_pretrained(start, kernels="reference"), adapter).eval()
        check_merged(start, adapter, merged, ours, ids, cu, model_cls)
        back = Bumblebee.from_pretrained(merged, kernels="reference")  # and our own loader reads it
        with torch.no_grad():
            torch.testing.assert_close(back(ids, None, cu, 14), ours(ids, None, cu, 14), atol=2e-5, rtol=1e-4)
        start = merged
    gen = json.loads((tmp_path / "sft_lora" / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids("<|eot_id|>" if family == "llama" else "<|im_end|>") in gen["eos_token_id"]
