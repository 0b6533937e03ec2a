"""Hugging Face checkpoints of Bumblebee: the folder transformers, peft and any HF server load.

A model folder holds `config.json` (the loaded checkpoint's own config: the same `model_type` and
fields, `architectures` set to its family's class, e.g. `[LlamaForCausalLM]`; model.py FAMILIES),
`generation_config.json` and the weights as safetensors: `model.safetensors`, or shards
`model-0000k-of-0000n.safetensors` with `model.safetensors.index.json` beyond `max_shard_size`.
Writing goes through huggingface_hub's `save_torch_state_dict` (the sharding, the index, the
removal of stale shards, shared tensors); a tied `lm_head.weight` is not written (it is
`embed_tokens.weight`, as transformers saves it). Reading takes the files the index names (or
the single file) with safetensors, drops what the model does not hold (rotary `inv_freq`, a
tied `lm_head.weight`), and names what is missing or unexpected.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from bumblefast.model import Bumblebee

SAFE_NAME = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"


def tied(config) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False))


def hf_state_dict(model: Bumblebee) -> dict[str, torch.Tensor]:
    """The state dict as a Hugging Face folder holds it (no tied lm_head)."""
    sd = model.state_dict()
    if tied(model.config):
        sd.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in sd.items()}


def save_pretrained(model: Bumblebee, path, max_shard_size: int | str = "5GB", state_dict: dict | None = None) -> None:
    """Write config.json, generation_config.json and the safetensors weights of `model` (or of
    `state_dict`, e.g. gathered from ZeRO-3) into `path`."""
    from huggingface_hub import save_torch_state_dict

    os.makedirs(path, exist_ok=True)
    sd = state_dict if state_dict is not None else hf_state_dict(model)
    sd = {k: _own_storage(v.detach().cpu().contiguous()) for k, v in sd.items()}
    _save_configs(model.config, model.arch.architecture, path, {v.dtype for v in sd.values()})
    save_torch_state_dict(sd, path, max_shard_size=max_shard_size)


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """`t`, copied when it is a view into a larger buffer (DeepSpeed ZeRO-1/2 flatten the
    parameters into one): save_torch_state_dict refuses tensors that do not cover their storage."""
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def _save_configs(cfg, architecture: str, path, dtypes: set[torch.dtype]) -> None:
    from transformers import GenerationConfig

    cfg.architectures = [architecture]
    if len(dtypes) == 1:
        cfg.dtype = next(iter(dtypes))  # written as "dtype" (4.57+) / read back by 5.x
    cfg.save_pretrained(path)
    try:  # a write error (disk, permissions) propagates: the checkpoint would be incomplete
        GenerationConfig.from_model_config(cfg).save_pretrained(path)
    except ValueError as e:  # settings transformers refuses to save: the weights are still fine
        warnings.warn(
            f"{path}: generation_config.json not written ({str(e).strip().splitlines()[0]}); "
            "generate() will use transformers' defaults",
            stacklevel=3,
        )


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a Hugging Face model folder (the single file, or the index's shards)."""
    path = Path(path)
    if (path / SAFE_INDEX).is_file():
        return [path / f for f in sorted(set(json.loads((path / SAFE_INDEX).read_text())["weight_map"].values()))]
    if (path / SAFE_NAME).is_file():
        return [path / SAFE_NAME]
    raise FileNotFoundError(f"no {SAFE_NAME} or {SAFE_INDEX} in {path}")


def resolve_dtype(torch_dtype, config) -> torch.dtype:
    """A dtype, `"auto"` (the config's), or None (fp32, as transformers)."""
    if torch_dtype == "auto":
        torch_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        if isinstance(torch_dtype, str):
            torch_dtype = getattr(torch, torch_dtype)
    return torch_dtype or torch.float32


def load_pretrained(cls: type[Bumblebee], path, torch_dtype=None, device=None, config=None, **kw) -> Bumblebee:
    """Load a Hugging Face checkpoint folder (ours or transformers', any family in model.py
    FAMILIES) into a new `cls`."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = config or AutoConfig.from_pretrained(path)
    model = cls.from_config(config, device="meta", **kw)
    model.to_empty(device=device or "cpu")
    model.to(resolve_dtype(torch_dtype, config))
    sd = {}
    for file in checkpoint_files(path):
        sd.update(load_file(str(file)))
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    if tied(config):
        sd.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and tied(config))]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the config: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    return model
