"""`bumblefast model info`: which family a model config is (model.py FAMILIES) and what it costs,
from the formulas in flops.py."""

from __future__ import annotations

import json
from pathlib import Path

from bumblefast import flops
from bumblefast.config import UserError


def read_model_config(path: str | Path) -> dict:
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no config.json in {path}")
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{file}:{e.lineno}: not valid JSON: {e.msg}") from e
    missing = [
        k
        for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
        if k not in cfg
    ]
    if missing:
        raise UserError(f"{file}: missing keys {missing}")
    return cfg


def model_info(
    path: str | Path, seq_len: int = 2048, tokenizer: str | None = None, vocab_size: int | None = None
) -> str:
    """The numbers of `path`'s config; with `tokenizer` (or `vocab_size`) the vocabulary a
    fresh model gets when pretrained from this preset with it (bumblefast/vocab.py)."""
    from bumblefast.vocab import fresh_vocab_size

    cfg = read_model_config(path)
    vocab_note = []
    if tokenizer is not None or vocab_size is not None:
        preset = cfg["vocab_size"]
        n_tok = None
        if tokenizer is not None:
            from bumblefast.tokenizer import load_tokenizer

            n_tok = len(load_tokenizer(tokenizer))
        cfg = dict(cfg, vocab_size=fresh_vocab_size(n_tok or 0, vocab_size))
        source = f"tokenizer {tokenizer}: {n_tok:,} tokens" if n_tok is not None else "--vocab_size"
        how = "rounded up to a multiple of 128" if vocab_size is None else "as given"
        unused = preset - cfg["vocab_size"]
        note = f"{cfg['vocab_size']:,} rows ({source}, {how}); the preset's config says {preset:,}"
        if unused > 0:
            note += f", whose {unused:,} extra rows ({unused * cfg['hidden_size']:,} parameters) no token would use"
        vocab_note.append(("vocab", note))
    from bumblefast.model import arch_of

    arch = arch_of(cfg)  # an unsupported model_type fails here, naming the supported ones
    n = flops.param_count(cfg)
    n_mm = flops.matmul_params(cfg)
    per_tok = flops.train_flops_per_token(cfg, seq_len)
    attn = flops.attention_flops(cfg, [seq_len]) / seq_len
    rows = [
        ("model", str(path)),
        (
            "architecture",
            f"{cfg.get('model_type', '?')}: {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
            f"{cfg['num_attention_heads']} heads / {cfg.get('num_key_value_heads', cfg['num_attention_heads'])} kv, "
            f"intermediate {cfg['intermediate_size']}, vocab {cfg['vocab_size']}",
        ),
        ("family", family_line(arch)),
        *vocab_note,
        ("parameters", f"{n:,} ({n / 1e9:.2f}B)"),
        ("matmul parameters", f"{n_mm:,} (non-embedding + LM head)"),
        (f"train FLOPs/token @ {seq_len}", f"{per_tok:.4g} (6N {6 * n_mm:.4g} + causal attention {attn:.4g})"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def family_line(arch) -> str:
    """What `bumblefast train` builds for this config: the family's switches (model.py FAMILIES)."""
    yes = {True: "yes", False: "no"}
    rope = arch.rope["rope_type"]
    if rope != "default":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        rope += " (" + ", ".join(f"{k} {arch.rope[k]}" for k in keys if arch.rope.get(k) is not None) + ")"
    return (
        f"{arch.model_type} -> {arch.architecture}; head_dim {arch.head_dim}, q/k/v bias {yes[arch.qkv_bias]}, "
        f"o_proj bias {yes[arch.o_bias]}, MLP bias {yes[arch.mlp_bias]}, q/k norm {yes[arch.qk_norm]}, "
        f"rope {rope} theta {arch.rope['rope_theta']:g}, tied embeddings {yes[arch.tied]}, sliding window "
        f"{arch.sliding_window or 'none'}"
    )


def add_arguments(p) -> None:
    """`bumblefast model ACTION`'s arguments (one action: info)."""
    actions = p.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    q = actions.add_parser("info", help="parameter count and training FLOPs per token of a config folder")
    q.add_argument("path", help="model folder with config.json, e.g. configs/models/bumblebee-1.5b")
    q.add_argument("--seq_len", type=int, default=2048, help="document length for the attention FLOPs")
    q.add_argument(
        "--tokenizer",
        default=None,
        help="size the vocabulary as pretraining from this preset would: the tokenizer's size "
        "rounded up to a multiple of 128",
    )
    q.add_argument("--vocab_size", type=int, default=None, help="embedding rows, as train's --vocab_size")
