"""The final model at the root of output_dir, in Hugging Face format, so the next stage's
--model_name_or_path is this run's --output_dir. Full fine-tuning writes config.json +
safetensors (ZeRO-3 gathers the weights onto rank 0); LoRA writes the PEFT adapter
(adapter_config.json + adapter_model.safetensors). Both add the tokenizer and
generation_config.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from bumblefast.config import TrainConfig
from bumblefast.train import distributed as D
from bumblefast.train.build import model_path


def _strip(state: dict, prefix: str = "model.") -> dict:
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}


def _sort_target_modules(path: Path) -> None:
    """peft keeps target_modules as a set and writes it in hash order, which changes with each
    process's string-hash seed: sorted, the same run writes the same bytes."""
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_model(engine, objective, tokenizer, cfg: TrainConfig, *, zero3: bool, out: Path) -> None:
    model = objective.model
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    if cfg.finetuning_type == "lora":
        import deepspeed

        params = [p for n, p in model.named_parameters() if "lora_" in n]
        with deepspeed.zero.GatheredParameters(params, enabled=zero3):
            if D.is_main():
                model.save_pretrained(str(out))  # PeftModel: adapter only
                _sort_target_modules(out / "adapter_config.json")
    else:
        if zero3:
            state = engine._zero3_consolidated_16bit_state_dict()  # None on ranks > 0
        else:
            state = objective.state_dict()
        if D.is_main():
            state = _strip(state)
            if getattr(model.config, "tie_word_embeddings", False):
                state.pop("lm_head.weight", None)
            state = {k: v.to(dtype) for k, v in state.items()}
            model.save_pretrained(str(out), state_dict=state)
    if D.is_main():
        tokenizer.save_pretrained(str(out))
        src = model_path(cfg) / "generation_config.json"
        if src.is_file():
            shutil.copy(src, out / "generation_config.json")
        _fix_generation_ids(out, tokenizer)
    D.barrier()


def stop_tokens(tokenizer) -> list[str]:
    """The tokens generation stops on: the chat template's end of turn (ChatML's <|im_end|>,
    Llama 3's <|eot_id|>: what the template writes after an assistant reply) and eos."""
    from jinja2 import TemplateError

    vocab = tokenizer.get_vocab()
    found = []
    if tokenizer.chat_template:
        mark = "\u2063REPLY\u2063"  # a reply no template would alter
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": mark}], tokenize=False
            )
        except (TemplateError, ValueError, TypeError):  # a template wanting other fields: ChatML's name
            text = ""
        if mark in text:
            found.append(text.split(mark, 1)[1].strip())
    found += ["<|im_end|>", tokenizer.eos_token]
    return list(dict.fromkeys(t for t in found if t and t in vocab))


def _fix_generation_ids(out: Path, tokenizer) -> None:
    """Stop on the end-of-turn token and eos as this tokenizer numbers them (stop_tokens)."""
    import json

    path = out / "generation_config.json"
    gen = json.loads(path.read_text()) if path.is_file() else {}
    ids = [tokenizer.convert_tokens_to_ids(t) for t in stop_tokens(tokenizer)]
    if ids:
        gen["eos_token_id"] = ids
        gen["pad_token_id"] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ids[-1]
        gen.setdefault("bos_token_id", tokenizer.bos_token_id if tokenizer.bos_token_id is not None else ids[-1])
    path.write_text(json.dumps(gen, indent=2) + "\n")
