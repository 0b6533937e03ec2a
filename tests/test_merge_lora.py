"""`bumblefast merge-lora`: a tiny Qwen2 (and Qwen3, Llama, Mistral) + a non-trivial LoRA, merged, must reload in
transformers and give PeftModel's logits; bad inputs give clear errors."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch
from helpers import ROOT

from bumblefast.config import UserError
from bumblefast.merge_lora import cli_main, merge_lora

TINY = ROOT / "configs" / "models" / "bumblebee-tiny" / "config.json"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """base/ (random tiny Qwen2 + tokenizer + generation_config), lora/ (r=4 on q_proj,v_proj,
    B perturbed), and the reference logits of base and PeftModel on a fixed batch."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from bumblefast.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("merge")
    base, lora = root / "base", root / "lora"
    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(TINY.parent)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.save_pretrained(base, safe_serialization=True)
    GenerationConfig(max_new_tokens=17, temperature=0.3, do_sample=True, eos_token_id=0).save_pretrained(base)
    train_tokenizer([ROOT / "datasets" / "demo" / "sft_alpaca.json"], 512, base)

    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_logits = model(input_ids=ids).logits

    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
        ),
    )
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # B is 0 at init: make the adapter change the model
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    peft_model.eval()
    peft_model.save_pretrained(lora)
    with torch.no_grad():
        peft_logits = peft_model(input_ids=ids).logits
    assert (peft_logits - base_logits).abs().max() > 1e-3  # the adapter is non-trivial
    return {
        "root": root,
        "base": base,
        "lora": lora,
        "ids": ids,
        "base_logits": base_logits,
        "peft_logits": peft_logits,
    }


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_merged_matches_peft_logits(folders):
    from transformers import AutoTokenizer

    out = folders["root"] / "merged_fp32"
    assert merge_lora(folders["base"], folders["lora"], out, dtype="float32") == out
    files = {p.name for p in out.iterdir()}
    assert "model.safetensors" in files and "config.json" in files
    assert not any(f.endswith(".bin") for f in files)
    assert not (out / "adapter_config.json").exists()
    merged = _load(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        logits = merged(input_ids=folders["ids"]).logits
    torch.testing.assert_close(logits, folders["peft_logits"], rtol=1e-5, atol=1e-5)
    assert (logits - folders["base_logits"]).abs().max() > 1e-3
    # tokenizer (the base's: the adapter folder has none) and the base's generation config
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == len(AutoTokenizer.from_pretrained(folders["base"]))
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["max_new_tokens"] == 17 and gen["temperature"] == 0.3


def test_dtype_auto_and_bf16(folders, tmp_path):
    from transformers import AutoModelForCausalLM

    # auto -> the base checkpoint's dtype: float32 as the fixture saved it ...
    out = merge_lora(folders["base"], folders["lora"], folders["root"] / "merged_auto")
    assert next(AutoModelForCausalLM.from_pretrained(out, dtype="auto").parameters()).dtype == torch.float32
    # ... and bfloat16 when the base's config.json says so (the merge itself still runs in fp32)
    base16 = tmp_path / "base_bf16"
    shutil.copytree(folders["base"], base16)
    cfg = json.loads((base16 / "config.json").read_text())
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = "bfloat16"
    (base16 / "config.json").write_text(json.dumps(cfg))
    out_auto16 = merge_lora(base16, folders["lora"], tmp_path / "merged_auto16")
    m_auto16 = AutoModelForCausalLM.from_pretrained(out_auto16, dtype="auto")
    assert next(m_auto16.parameters()).dtype == torch.bfloat16
    # explicit bfloat16: the weights are the fp32 merge rounded once (merge in fp32, then cast)
    out16 = merge_lora(folders["base"], folders["lora"], tmp_path / "merged_bf16", dtype="bfloat16")
    m16 = AutoModelForCausalLM.from_pretrained(out16, dtype="auto")
    assert next(m16.parameters()).dtype == torch.bfloat16
    m32 = _load(out)
    w16 = m16.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(w16, m32.model.layers[0].self_attn.q_proj.weight.to(torch.bfloat16))
    assert torch.equal(w16, m_auto16.model.layers[0].self_attn.q_proj.weight)
    # float16 too
    out_h = merge_lora(folders["base"], folders["lora"], tmp_path / "merged_fp16", dtype="float16")
    assert next(AutoModelForCausalLM.from_pretrained(out_h, dtype="auto").parameters()).dtype == torch.float16


def test_tokenizer_taken_from_adapter_folder_when_present(folders, tmp_path):
    from transformers import AutoTokenizer

    lora2 = tmp_path / "lora_tok"
    shutil.copytree(folders["lora"], lora2)
    tok = AutoTokenizer.from_pretrained(folders["base"])
    tok.add_special_tokens({"additional_special_tokens": ["<|marker|>"]})
    tok.save_pretrained(lora2)
    out = merge_lora(folders["base"], lora2, tmp_path / "merged", dtype="float32")
    assert "<|marker|>" in AutoTokenizer.from_pretrained(out).get_vocab()


def test_cli_main(folders, tmp_path, capsys):
    args = argparse.Namespace(
        base_model_path=str(folders["base"]),
        lora_model_path=str(folders["lora"]),
        save_path=str(tmp_path / "cli_out"),
        dtype="float32",
    )
    assert cli_main(args) == 0
    assert (tmp_path / "cli_out" / "model.safetensors").is_file()
    assert "cli_out" in capsys.readouterr().out


def test_bad_inputs(folders, tmp_path):
    base, lora = folders["base"], folders["lora"]
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        merge_lora(missing, lora, tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="nope"):
        merge_lora(base, missing, tmp_path / "o")
    no_cfg = tmp_path / "empty_adapter"
    no_cfg.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty_adapter.*adapter_config\.json"):
        merge_lora(base, no_cfg, tmp_path / "o")
    empty_base = tmp_path / "empty_base"
    empty_base.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty_base.*config\.json"):
        merge_lora(empty_base, lora, tmp_path / "o")
    with pytest.raises(UserError, match="dtype"):
        merge_lora(base, lora, tmp_path / "o", dtype="int8")
    with pytest.raises(UserError, match="save_path"):
        merge_lora(base, lora, base)
    # adapter targeting modules the base does not have
    bad = tmp_path / "bad_lora"
    shutil.copytree(lora, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "wq_nonexistent"]
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"bad_lora.*wq_nonexistent"):
        merge_lora(base, bad, tmp_path / "o")
    assert not (tmp_path / "o").exists()  # nothing written on a failed merge


@pytest.mark.parametrize("family", ["qwen3", "llama", "mistral"])
def test_merge_matches_peft_merge_and_unload_per_family(family, tmp_path):
    """Other families, LoRA on all seven linears: the merged weights are peft's own
    merge_and_unload() of the same adapter, and the reloaded model gives PeftModel's logits."""
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from bumblefast.model import LINEAR_MODULES

    cls = {"qwen3": "Qwen3", "llama": "Llama", "mistral": "Mistral"}[family]
    extra = {
        "qwen3": dict(head_dim=24, attention_bias=True),
        "llama": dict(mlp_bias=True, rope_scaling=dict(rope_type="linear", factor=2.0)),
        "mistral": dict(head_dim=24, sliding_window=None),
    }[family]
    cfg = getattr(transformers, f"{cls}Config")(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **extra,
    )
    torch.manual_seed(0)
    getattr(transformers, f"{cls}ForCausalLM")(cfg).save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=list(LINEAR_MODULES), lora_dropout=0.0))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    lora.save_pretrained(tmp_path / "lora")
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        peft_logits = lora.eval()(input_ids=ids).logits

    out = merge_lora(tmp_path / "base", tmp_path / "lora", tmp_path / "merged", dtype="float32")
    merged = _load(out)
    assert type(merged).__name__ == f"{cls}ForCausalLM"
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    want = PeftModel.from_pretrained(fresh, tmp_path / "lora").merge_and_unload().state_dict()
    got = merged.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, peft_logits, rtol=1e-5, atol=1e-5)
