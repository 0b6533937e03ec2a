"""`bumblefast merge-lora`: fold a PEFT LoRA adapter into its base model and save a plain HF model.

    bumblefast merge-lora --base_model_path out/sft --lora_model_path out/dpo_lora \\
        --save_path out/dpo_merged [--dtype auto|float32|bfloat16|float16]

The base is loaded with ``AutoModelForCausalLM`` in float32 whatever ``--dtype`` says, the
adapter applied with ``peft.PeftModel.from_pretrained``, ``merge_and_unload()`` folds
``W + scale * B @ A`` into the base weights in fp32, and only then is the result cast to the
saved dtype (``auto``: the base checkpoint's ``torch_dtype``/``dtype`` in its config.json,
float32 when it names none). Saved as safetensors with the tokenizer (the adapter folder's when
it has tokenizer files, else the base's) and the base's generation_config.json when present.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from bumblefast.config import UserError

DTYPES = ("auto", "float32", "bfloat16", "float16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _check_folder(path: str | Path, what: str, required: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {p}")
    if not p.is_dir():
        raise UserError(f"{what} must be a folder, got a file: {p}")
    if not (p / required).is_file():
        raise FileNotFoundError(f"{what} {p} has no {required}")
    return p


def _saved_dtype(base: Path, dtype: str):
    import torch

    if dtype not in DTYPES:
        raise UserError(f"dtype: must be one of {'|'.join(DTYPES)}, got '{dtype}'")
    if dtype == "auto":
        cfg = json.loads((base / "config.json").read_text())
        dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
        if dtype not in DTYPES[1:]:
            dtype = "float32"
    return getattr(torch, dtype)


def _check_target_modules(model, adapter_cfg: dict, lora: Path) -> None:
    """Every target module the adapter names must exist in the base (PEFT's own matching rules:
    exact name or ``.name`` suffix for a list, full-match regex for a string)."""
    targets = adapter_cfg.get("target_modules")
    if not targets or targets == "all-linear":
        return
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, n) for n in names):
            raise UserError(
                f"LoRA adapter {lora}: target_modules regex '{targets}' matches no module of the base model"
            )
        return
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names if not n.rsplit(".", 1)[-1].isdigit()})
        raise UserError(
            f"LoRA adapter {lora}: target modules {missing} do not exist in the base model "
            f"(its module names end in: {', '.join(leaves)})"
        )


def merge_lora(
    base_model_path: str | Path,
    lora_model_path: str | Path,
    save_path: str | Path,
    dtype: str = "auto",
) -> Path:
    """Merge the LoRA adapter at ``lora_model_path`` into the HF model at ``base_model_path`` and
    save the merged model (safetensors), tokenizer and generation config to ``save_path``.

    Raises ``FileNotFoundError`` when a folder, the base's config.json or the adapter's
    adapter_config.json is missing, and ``UserError`` for a bad dtype, a save_path equal to an
    input, or target modules the base lacks. Returns ``Path(save_path)``.
    """
    base = _check_folder(base_model_path, "base model folder", "config.json")
    lora = _check_folder(lora_model_path, "LoRA adapter folder", "adapter_config.json")
    out = Path(save_path)
    if out.resolve() in (base.resolve(), lora.resolve()):
        raise UserError(f"save_path {out} must differ from the base and adapter folders")
    if out.exists() and not out.is_dir():
        raise UserError(f"save_path exists and is not a folder: {out}")
    target_dtype = _saved_dtype(base, dtype)
    try:
        adapter_cfg = json.loads((lora / "adapter_config.json").read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{lora / 'adapter_config.json'}: not valid JSON ({e})") from None
    if adapter_cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{lora}: adapter peft_type is {adapter_cfg.get('peft_type')}, merge-lora needs LORA")

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    _check_target_modules(model, adapter_cfg, lora)
    try:
        model = PeftModel.from_pretrained(model, lora)
    except ValueError as e:  # PEFT's own "target modules not found" and similar
        raise UserError(f"LoRA adapter {lora} does not fit base model {base}: {e}") from None
    model = model.merge_and_unload()
    model = model.to(target_dtype)

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok_src = lora if any((lora / f).is_file() for f in TOKENIZER_FILES) else base
    if any((tok_src / f).is_file() for f in TOKENIZER_FILES):
        AutoTokenizer.from_pretrained(tok_src).save_pretrained(out)
    if (base / "generation_config.json").is_file():
        shutil.copyfile(base / "generation_config.json", out / "generation_config.json")
    return out


def cli_main(args) -> int:
    """Entry of `bumblefast merge-lora` (argparse Namespace with base_model_path,
    lora_model_path, save_path and optional dtype)."""
    out = merge_lora(args.base_model_path, args.lora_model_path, args.save_path, getattr(args, "dtype", "auto"))
    print(f"merged {args.lora_model_path} into {args.base_model_path} -> {out}")
    return 0


def add_arguments(p) -> None:
    """`bumblefast merge-lora`'s arguments."""
    p.add_argument("--base_model_path", required=True, help="HF model folder the adapter was trained on")
    p.add_argument("--lora_model_path", required=True, help="PEFT adapter folder (adapter_config.json)")
    p.add_argument("--save_path", required=True, help="folder to write the merged model to")
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="dtype of the saved weights (auto: the base's; the merge itself runs in fp32)",
    )
