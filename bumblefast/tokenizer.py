"""Tokenizers: load any HF tokenizer folder, or train a byte-level BPE with ChatML specials.

The trained tokenizer follows Qwen2's conventions (NFC, digits split one by one, byte-level
BPE, `<|endoftext|>` / `<|im_start|>` / `<|im_end|>`, a ChatML chat template with a default
system prompt), so the same prep and chat code serves it and the real Qwen2 tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from bumblefast.config import UserError

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2's pre-tokenizer split: words, single digits, punctuation runs, newlines, spaces.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def chatml_template(default_system: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """ChatML as a Jinja template: system turn (default if none given, tools appended), then
    each turn as `<|im_start|>role\\ncontent<|im_end|>\\n`. Rendering a prefix of the messages
    gives a prefix of the full rendering, which prep relies on to mask assistant turns."""
    system = json.dumps(default_system)
    return (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
        "{%- else -%}"
        "{%- set system = " + system + " -%}{%- set turns = messages -%}"
        "{%- endif -%}"
        "{{- '<|im_start|>system\\n' + system -}}"
        "{%- if tools -%}"
        "{{- '\\n\\n# Tools\\nYou may call one or more functions. Available functions:' -}}"
        "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
        "{%- endif -%}"
        "{{- '<|im_end|>\\n' -}}"
        "{%- for message in turns -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )


def template_texts(system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> list[str]:
    """The text chatml_template wraps around every conversation, without the special tokens."""
    return [f"system\n{system_prompt}", "\nuser\n", "\nassistant\n"]


def iter_texts(path: str | Path) -> Iterator[str]:
    """Every string in a .txt (lines), .jsonl or .json (array) file, for tokenizer training."""
    path = Path(path)

    def strings(obj) -> Iterator[str]:
        if isinstance(obj, str):
            if obj:
                yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from strings(v)
        elif isinstance(obj, list):
            for v in obj:
                yield from strings(v)

    if path.suffix == ".txt":
        with path.open(encoding="utf-8") as f:
            yield from (line.rstrip("\n") for line in f if line.strip())
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield from strings(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not valid JSON: {e}") from e
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from e
        yield from strings(data)
    else:
        raise UserError(f"{path}: unsupported file type '{path.suffix}' (use .txt, .json or .jsonl)")


def train_tokenizer(
    files: list[str | Path],
    vocab_size: int,
    output_dir: str | Path,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    min_frequency: int = 2,
):
    """Train a byte-level BPE of `vocab_size` ids (specials included) and save it as a folder
    that `AutoTokenizer.from_pretrained` loads. Deterministic for the same input.

    The chat template's own text (role names, default system prompt) is part of the corpus,
    once per ten input texts: every chat the model reads carries it, and a corpus without it
    left "assistant" as 7 tokens, so an answer sat 11 tokens after its question (docs/LOG.md)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise UserError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + specials)")
    for f in files:
        if not Path(f).is_file():
            raise FileNotFoundError(f"tokenizer input not found: {f}")

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    n_texts = sum(1 for f in files for _ in iter_texts(f))

    def corpus() -> Iterator[str]:
        for f in files:
            yield from iter_texts(f)
        yield from template_texts(system_prompt) * max(min_frequency, n_texts // 10)

    tok.train_from_iterator(corpus(), trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=chatml_template(system_prompt),
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],  # no token_type_ids (Qwen2 has none)
    )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(output_dir)
    return hf


# tokenizer_config.json classes that AutoTokenizer resolves to PreTrainedTokenizerFast itself
# (TokenizersBackend is its transformers 5 name): loaded directly, as AutoTokenizer would, but without
# importing AutoTokenizer's model registry, which imports torch (~1.5 CPU-s of prep's start-up).
GENERIC_FAST_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")


def tokenizer_class_name(path: Path) -> str | None:
    try:
        return json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None  # AutoTokenizer reads (and reports) it


def load_tokenizer(name_or_path: str | Path):
    """AutoTokenizer from a local folder, with an error that says what is missing."""
    path = Path(name_or_path)
    if path.is_dir() and tokenizer_class_name(path) in GENERIC_FAST_CLASSES:
        from transformers import PreTrainedTokenizerFast as tokenizer_class
    else:
        from transformers import AutoTokenizer as tokenizer_class

    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer folder not found: {path} (train one with `bumblefast tokenizer train` "
            "or point --tokenizer_name_or_path at a Hugging Face model folder)"
        )
    try:
        return tokenizer_class.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a loadable tokenizer folder: {e}") from e


def add_arguments(p) -> None:
    """`bumblefast tokenizer ACTION`'s arguments (one action: train)."""
    actions = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    q = actions.add_parser("train", help="train a byte-level BPE with ChatML specials and chat template")
    q.add_argument("--input", nargs="+", required=True, help=".json/.jsonl/.txt files")
    q.add_argument("--vocab_size", type=int, required=True)
    q.add_argument("--output", required=True, help="folder to write (AutoTokenizer loads it)")
    q.add_argument("--system_prompt", default="You are a helpful assistant.")
    q.add_argument("--min_frequency", type=int, default=2)
