"""Bulk tokenization backends: HF `tokenizers` or `fastokens`, verified to give the same ids.

`fastokens` (Rust, reads the same `tokenizer.json`) encodes 5-15x faster than `tokenizers` on
one core, which moves prep's ceiling from the tokenizer to prep's own per-record work. A
faster tokenizer is only worth having if it is the *same* tokenizer, so `auto` verifies it
at start-up: a fixed sample of hard strings (Chinese, English, code, emoji, combining
characters, whitespace runs, every special token, the chat template's output, a
100k-character line) plus the first records of the input must encode to identical ids, and,
for chat stages, identical token start offsets (the loss mask is cut at them). On any
mismatch prep says which string differed and falls back to HF, loudly. `fastokens` (forced)
fails instead of falling back.

Token start offsets under fastokens (which has no offsets): for a byte-level BPE every
vocabulary entry's string has one character per byte, so a token's byte length is known from
its id; a cumulative sum gives byte starts, and the UTF-8 lead bytes of the text map them to
character starts (a token that starts inside a character starts at that character, as in
`tokenizers`). Texts whose token bytes do not add up to the text's bytes (a normalizer
changed the text) are re-encoded with HF, so offsets never silently drift.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from importlib import metadata

import numpy as np

from bumblefast.config import UserError

BACKENDS = ("auto", "hf", "fastokens")

# The fixed part of the verification sample: (label, text). Labels name the string in errors.
HARD_STRINGS: list[tuple[str, str]] = [
    (
        "english",
        "The quick brown fox jumps over the lazy dog. It's 3.14, isn't it? I'd say they've won.",
    ),
    ("chinese", "这是一个苹果。你是一个会做加法的助手！请把“数据优先”的训练框架介绍一下，谢谢。"),
    ("japanese+korean", "東京タワーは333メートルです。서울은 한국의 수도입니다."),
    (
        "code",
        'def f(x: int) -> int:\n    return {"a": [x ** 2, x // 3]}["a"][0]  # ok\n\tif x != 0: pass\n',
    ),
    ("emoji", "bees 🐝🐝 and flags 🇨🇳🇺🇸, family 👨‍👩‍👧‍👦, skin 👍🏽 — done ✅"),
    (
        "combining",
        "e\u0301 vs \u00e9, a\u0308o\u0308, Z\u0351\u0354a\u0358l\u035cg\u0361o, \u1100\u1161\u11a8 hangul jamo",
    ),
    ("whitespace runs", "a  b   c\t\t d\n\n\n e \r\n f" + " " * 40 + "g" + "\n" * 7 + "\t \t h   "),
    ("digits+punct", "1234567890 -12.5e+3 ((!!)) ... ??? ,,, ;;; 100%|#### 0x1F"),
    (
        "mixed scripts",
        "Mixed 中文 and English, Zürich, naïve, ﬁ ligature, Ελληνικά, العربية, עברית, हिन्दी",
    ),
    (
        "control chars",
        "tab\tnul-free \x0b\x0c vertical, \u200b zero-width, \ufeff bom, \u00a0 nbsp",
    ),
]
LONG_LINE_CHARS = 100_000
FIRST_RECORDS = 64  # of the input, added to the sample by prep


def long_line() -> str:
    """A 100k-character line without newlines: mixed scripts, long words, runs of spaces."""
    unit = "lorem ipsum 数据优先 🐝 dolor_sit_amet(42) " + "x" * 300 + "   " + "汉" * 50 + " "
    return (unit * (LONG_LINE_CHARS // len(unit) + 1))[:LONG_LINE_CHARS]


def fastokens_version() -> str | None:
    try:
        return metadata.version("fastokens")
    except metadata.PackageNotFoundError:
        return None


def verification_sample(
    hf, extra: list[tuple[str, str]] = (), unverified: list[str] | None = None
) -> list[tuple[str, str]]:
    """The hard strings, every special token alone and inside text, the chat template's output
    (with and without a generation prompt, with tools), a 100k-char line, and `extra`.
    A template rendering that raises is left out and named, with its cause, in `unverified`
    (the manifest records it): those strings are where token offsets feed the loss masks."""
    sample = list(HARD_STRINGS)
    specials = sorted({str(t) for t in hf.all_special_tokens} | set(hf.get_added_vocab()))
    for t in specials:
        sample.append((f"special {t}", t))
        sample.append((f"special {t} in text", f"before{t}after {t} \n{t}{t}x"))
    if hf.chat_template:
        msgs = [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "你好！What is 2+2?\n\n```py\nprint(2+2)\n```"},
            {"role": "assistant", "content": " 4 🐝\n"},
            {"role": "user", "content": "  and  again\t"},
        ]
        tools = [{"type": "function", "function": {"name": "add", "parameters": {"a": "int"}}}]
        for label, kw in [
            ("chat template", {}),
            ("chat template + generation prompt", {"add_generation_prompt": True}),
            ("chat template + tools", {"tools": tools}),
        ]:
            try:
                sample.append((label, hf.apply_chat_template(msgs, tokenize=False, **kw)))
            except Exception as e:  # noqa: BLE001 - a template that rejects tools or roles: the rest still verify
                if unverified is not None:
                    unverified.append(f"{label}: {type(e).__name__}: {str(e).strip()[:200]}")
    sample.append(("100k-character line", long_line()))
    sample.extend(extra)
    return sample


@dataclass
class BackendInfo:
    """What the manifest records: the backend that encoded, its version, and why if it is
    not the one asked for."""

    requested: str
    name: str
    version: str
    verified_strings: int = 0
    fallback_reason: str | None = None
    offsets: str = "tokenizers"  # where token start offsets come from (chat stages)
    unverified: list[str] = field(default_factory=list)  # sample strings that could not be built, and why

    def as_dict(self) -> dict:
        d = {
            "requested": self.requested,
            "name": self.name,
            "version": self.version,
            "verified_strings": self.verified_strings,
            "offsets": self.offsets,
        }
        if self.fallback_reason:
            d["fallback_reason"] = self.fallback_reason
        if self.unverified:
            d["unverified"] = list(self.unverified)
        return d


def _single_thread_env() -> None:
    """One core per prep worker: scale with processes, not with a tokenizer's own threads."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    os.environ.setdefault("FASTOKENS_BPE_THREADS", "1")


class HFEncoder:
    """HF `tokenizers` (the reference)."""

    name = "hf"

    def __init__(self, hf):
        import tokenizers

        _single_thread_env()
        self.tok = hf.backend_tokenizer
        self.version = tokenizers.__version__

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids as one uint32 array and each text's length (no special tokens added)."""
        encs = self.tok.encode_batch_fast(texts, add_special_tokens=False)
        lens = np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=len(encs))
        flat = np.fromiter((i for e in encs for i in e.ids), dtype=np.uint32, count=int(lens.sum()))
        return flat, lens

    def encode_with_starts(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per text: (ids uint32, the character where each token starts)."""
        out = []
        for e in self.tok.encode_batch(texts, add_special_tokens=False):
            n = len(e.ids)
            out.append(
                (
                    np.asarray(e.ids, dtype=np.uint32),
                    np.fromiter((o[0] for o in e.offsets), dtype=np.int64, count=n),
                )
            )
        return out


class FastokensLoad:
    """fastokens reading tokenizer.json on a thread (the Rust load releases the GIL) while the
    caller loads the HF tokenizer: ~1 s of prep's start-up at a 151k vocabulary. `result()`
    returns the tokenizer or raises the load's error."""

    def __init__(self, tokenizer_json: str):
        import threading

        self.path, self._out = tokenizer_json, None
        _single_thread_env()
        self._thread = threading.Thread(target=self._run, name="fastokens-load", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            import fastokens

            self._out = fastokens.Tokenizer.from_file(self.path)
        except BaseException as e:  # noqa: BLE001 - handed to result()'s caller
            self._out = e

    def result(self):
        self._thread.join()
        if isinstance(self._out, BaseException):
            raise self._out
        return self._out

    @classmethod
    def start(cls, tokenizer_dir: str, backend: str) -> FastokensLoad | None:
        """A load begun where open_encoder will want one (backend not hf, fastokens installed)."""
        path = os.path.join(tokenizer_dir, "tokenizer.json")
        if backend == "hf" or fastokens_version() is None or not os.path.isfile(path):
            return None
        return cls(path)


class FastokensEncoder:
    """`fastokens` on the same tokenizer.json; offsets from per-id byte lengths (see above)."""

    name = "fastokens"

    def __init__(self, hf, tokenizer_json: str, loaded: FastokensLoad | None = None):
        _single_thread_env()
        if loaded is not None and loaded.path == tokenizer_json:
            self.ft = loaded.result()
        else:
            import fastokens

            self.ft = fastokens.Tokenizer.from_file(tokenizer_json)
        self.version = fastokens_version() or "?"
        self.hf = HFEncoder(hf)
        self._hf_tok = hf
        self._byte_lens: np.ndarray | None = None
        self._byte_lens_done = False
        self.hf_reencoded = 0  # texts whose offsets had to come from HF

    @property
    def byte_lens(self) -> np.ndarray | None:
        """Bytes per id (None: not a byte-level BPE, offsets come from HF). Built on first use:
        only chat stages need offsets, and parsing a 151k vocabulary costs ~2 s of start-up."""
        if not self._byte_lens_done:
            self._byte_lens = _byte_lengths(self._hf_tok)
            self._byte_lens_done = True
        return self._byte_lens

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids, offs = self.ft.encode_batch_flat(texts, add_special_tokens=False)
        return np.frombuffer(ids, dtype="<u4"), np.diff(np.frombuffer(offs, dtype="<u8").astype(np.int64))

    def encode_with_starts(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        if self.byte_lens is None:
            return self.hf.encode_with_starts(texts)
        flat, lens = self.encode_flat(texts)
        if len(flat) and int(flat.max()) >= len(self.byte_lens):
            return self.hf.encode_with_starts(texts)
        raw = [t.encode("utf-8") for t in texts]
        nbytes = np.fromiter((len(b) for b in raw), dtype=np.int64, count=len(raw))
        tok_bytes = self.byte_lens[flat]
        cum = np.concatenate([[0], np.cumsum(tok_bytes)])
        tok_ends = np.cumsum(lens)
        # each text's token bytes must add up to its bytes, else the text was normalized: HF
        ok = (cum[tok_ends] - cum[tok_ends - lens]) == nbytes
        allb = np.frombuffer(b"".join(raw), dtype=np.uint8)
        char_of_byte = np.cumsum((allb & 0xC0) != 0x80) - 1  # the character holding each byte
        char_base = np.concatenate([[0], np.cumsum(np.fromiter((len(t) for t in texts), np.int64, len(texts)))])
        byte_base = np.concatenate([[0], np.cumsum(nbytes)])
        tok_text = np.repeat(np.arange(len(texts)), lens)
        # a token's byte start in the joined texts: its text's base + its offset inside the text
        tok_byte = byte_base[tok_text] + cum[:-1] - cum[tok_ends - lens][tok_text]
        if len(allb):
            starts = char_of_byte[np.clip(tok_byte, 0, len(allb) - 1)] - char_base[tok_text]
        else:
            starts = np.zeros(len(flat), np.int64)
        out: list = []
        bad = [i for i in range(len(texts)) if not ok[i]]
        fixed = dict(zip(bad, self.hf.encode_with_starts([texts[i] for i in bad]), strict=True)) if bad else {}
        self.hf_reencoded += len(bad)
        lo = 0
        for i, n in enumerate(lens.tolist()):
            out.append(fixed[i] if i in fixed else (flat[lo : lo + n], starts[lo : lo + n]))
            lo += n
        return out


def _byte_lengths(hf) -> np.ndarray | None:
    """Bytes each id stands for, for a byte-level BPE (one character per byte in the vocab's
    strings; added tokens are their UTF-8 content); None for other tokenizer kinds."""
    import json

    spec = json.loads(hf.backend_tokenizer.to_str())
    kinds = json.dumps(spec.get("pre_tokenizer")) + json.dumps(spec.get("decoder"))
    if spec.get("model", {}).get("type") != "BPE" or '"ByteLevel"' not in kinds:
        return None
    vocab = hf.backend_tokenizer.get_vocab(with_added_tokens=False)
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    size = max([*vocab.values(), *added.keys()], default=-1) + 1
    lens = np.zeros(size, dtype=np.int64)
    for s, i in vocab.items():
        lens[i] = len(s)
    for i, a in added.items():
        if a.get("lstrip") or a.get("rstrip"):
            return None  # absorbs neighbouring whitespace: bytes no longer add up per id
        lens[i] = len(a["content"].encode("utf-8"))
    return lens


def _first_difference(a, b) -> str:
    a, b = list(a), list(b)
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"first difference at token {k} of {len(a)} (hf) / {len(b)} (fastokens)"


def verify(encoder: FastokensEncoder, sample: list[tuple[str, str]], offsets: bool) -> str | None:
    """None if fastokens matches HF on every sample string (ids, and token starts if `offsets`);
    else a sentence naming the first string that differed and where."""
    texts = [t for _, t in sample]
    if offsets:
        ref = encoder.hf.encode_with_starts(texts)
    else:
        hflat, hlens = encoder.hf.encode_flat(texts)
        ref = [(a, None) for a in np.split(hflat, np.cumsum(hlens)[:-1])]
    flat, lens = encoder.encode_flat(texts)
    got_all = np.split(flat, np.cumsum(lens)[:-1])
    for (label, text), (ids, _), got in zip(sample, ref, got_all, strict=True):
        if not np.array_equal(ids, got):
            return f"ids differ on '{label}' ({text[:40]!r}...): {_first_difference(ids, got)}"
    if offsets:
        for (label, _), (_, starts), (_, got) in zip(sample, ref, encoder.encode_with_starts(texts), strict=True):
            if not np.array_equal(starts, got):
                return f"token offsets differ on '{label}': {_first_difference(starts, got)}"
    return None


def open_encoder(
    hf,
    tokenizer_dir: str,
    backend: str = "auto",
    offsets: bool = False,
    extra_sample: list[tuple[str, str]] = (),
    log=None,
    loaded: FastokensLoad | None = None,
) -> tuple[HFEncoder | FastokensEncoder, BackendInfo]:
    """The bulk encoder for `backend`; `auto` verifies fastokens on the sample and falls back to
    HF (with a warning on stderr) on any difference or load error or when fastokens is not
    installed; `fastokens` raises instead.
    `offsets`: the caller needs token start offsets (sft/dpo loss masks); `loaded`: a
    FastokensLoad begun before the HF tokenizer was loaded."""
    if backend not in BACKENDS:
        raise UserError(f"tokenizer_backend: must be one of {'|'.join(BACKENDS)}, got '{backend}'")
    log = log or (lambda msg: print(msg, file=sys.stderr))
    hf_enc = HFEncoder(hf)
    hf_info = BackendInfo(backend, "hf", hf_enc.version)
    if backend == "hf":
        return hf_enc, hf_info
    if fastokens_version() is None:
        if backend == "fastokens":
            raise UserError(
                "tokenizer_backend fastokens: the fastokens package is not installed (pip install fastokens)"
            )
        hf_info.fallback_reason = "fastokens is not installed"
        log(
            "WARNING: tokenizer_backend auto: fastokens is not installed (pip install fastokens); "
            "falling back to HF tokenizers (slower, same output)"
        )
        return hf_enc, hf_info
    path = os.path.join(tokenizer_dir, "tokenizer.json")
    unverified: list[str] = []
    try:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found (fastokens reads tokenizer.json)")
        enc = FastokensEncoder(hf, path, loaded)
        sample = verification_sample(hf, list(extra_sample), unverified)
        problem = verify(enc, sample, offsets)
    except Exception as e:  # noqa: BLE001 - any load/encode failure means: not verified
        problem = f"fastokens could not load or encode this tokenizer: {type(e).__name__}: {e}"
        sample = []
    if problem is None:
        info = BackendInfo(
            backend,
            "fastokens",
            enc.version,
            verified_strings=len(sample),
            offsets="byte lengths" if (offsets and enc.byte_lens is not None) else "tokenizers",
            unverified=unverified,
        )
        for note in unverified:
            log(
                f"WARNING: tokenizer_backend {backend}: fastokens not verified on {note} "
                "(the chat template raised rendering it; the manifest records it under unverified)"
            )
        return enc, info
    if backend == "fastokens":
        raise UserError(f"tokenizer_backend fastokens: does not match HF tokenizers on {tokenizer_dir}: {problem}")
    log(
        f"WARNING: tokenizer_backend auto: fastokens does not match HF tokenizers on {tokenizer_dir}: "
        f"{problem}; falling back to HF tokenizers (slower, same output)"
    )
    hf_info.fallback_reason = problem
    return hf_enc, hf_info
