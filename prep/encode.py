"""Records -> token arrays (the CPU-bound part of prep; runs inside each worker process).

Chat records are rendered with the tokenizer's own chat template and tokenized once with
character offsets. The trained span of assistant turn k is located in the text by rendering
prefixes: it starts after `render(messages[:k], add_generation_prompt=True)` and ends at the
end of `render(messages[:k+1])` minus trailing whitespace (so the end-of-turn token, e.g.
`<|im_end|>`, is trained and the newline after it is not). A token is trained when its first
character lies in such a span. The template must be prefix-stable (rendering a prefix of the
messages gives a prefix of the full text); prep checks that per record and stops otherwise.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from bumblefast.config import UserError
from bumblefast.prep import share
from bumblefast.prep.cutoff import cut_pair, truncation_window
from bumblefast.prep.dataset_info import DatasetSpec, canonical_record
from bumblefast.prep.records import (
    TRAINED_ROLES,
    RecordError,
    dpo_pair,
    pretrain_text,
    sft_messages,
)
from bumblefast.prep.share import Segment
from bumblefast.prep.sources import BadRecord, RawJSON, TextLine, file_runs


@dataclass
class EncodeSettings:
    stage: str
    tokenizer_path: str
    seq_len: int  # tokens per row (pretrain, sft); dpo: per sequence, the rows hold 2x (schema.row_len)
    text_key: str = "text"
    overlong: str = "truncate"  # truncate | drop
    share_prompt: bool = False  # dpo: one group [prompt+chosen][prompt[-1]+rejected] per pair
    tokenizer_backend: str = "hf"  # auto | hf | fastokens; workers get the one the main process verified
    datasets: dict[str, DatasetSpec] = field(default_factory=dict)  # file -> its dataset_info entry


def tokenizer_fingerprint(path: str) -> str:
    """sha256 over the tokenizer folder's files (names + contents), first 16 hex digits."""
    h = hashlib.sha256()
    root = Path(path)
    for p in sorted(root.iterdir()):
        if p.is_file() and (p.suffix in (".json", ".txt", ".model", ".jinja", ".tiktoken")):
            h.update(p.name.encode())
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]


def text_hash(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode()).hexdigest()[:16]


class Encoder:
    """Per-process state: the tokenizer, its bulk backend, the compiled chat template, the settings.
    `first_records` (main process only) join the backend's verification sample."""

    def __init__(self, settings: EncodeSettings, first_records: list[tuple[str, Any]] = ()):
        from transformers.utils.chat_template_utils import _compile_jinja_template

        from bumblefast.tokenizer import load_tokenizer
        from bumblefast.tokenizer_backend import FastokensLoad

        self.s = settings
        loading = FastokensLoad.start(settings.tokenizer_path, settings.tokenizer_backend)  # beside the HF load
        self.hf = load_tokenizer(settings.tokenizer_path)
        self.eos_id = self.hf.eos_token_id
        if self.eos_id is None:
            raise UserError(f"{settings.tokenizer_path}: tokenizer has no eos_token")
        self.template = None
        if settings.stage in ("sft", "dpo"):
            if not self.hf.chat_template:
                raise UserError(
                    f"{settings.tokenizer_path}: tokenizer has no chat_template; sft/dpo prep "
                    "renders records with it (train one with `bumblefast tokenizer train`)"
                )
            self.template = _compile_jinja_template(self.hf.chat_template)
        self.special = dict(self.hf.special_tokens_map)
        self.special.pop("additional_special_tokens", None)
        self.bulk, self.backend = self._open_backend(first_records, loading)

    def _open_backend(self, first_records, loading=None):
        """The bulk tokenizer; `auto` verifies fastokens against HF on a fixed sample plus the
        input's first records (rendered as prep will tokenize them) and falls back to HF."""
        from bumblefast.tokenizer_backend import open_encoder

        sample = []
        for where, rec in first_records if self.s.tokenizer_backend != "hf" else ():
            try:
                sample += [(f"input record {where}", t) for t in self.texts_of(rec)]
            except (RecordError, UserError):
                continue
        return open_encoder(
            self.hf,
            self.s.tokenizer_path,
            self.s.tokenizer_backend,
            offsets=self.s.stage != "pretrain",
            extra_sample=sample,
            loaded=loading,
        )

    def texts_of(self, rec) -> list[str]:
        """The texts a record is tokenized as (pretrain: its text; sft: the rendered chat;
        dpo: the chosen and rejected renderings)."""
        if isinstance(rec, RawJSON):
            rec = rec.parse()
        if isinstance(rec, BadRecord):
            return []
        if self.s.stage == "pretrain":
            return [pretrain_text(rec, self.s.text_key)]
        if self.s.stage == "sft":
            return [self.render_with_spans(*sft_messages(rec))[0]]
        prompt, chosen, rejected, tools = dpo_pair(rec)
        return [self.render_with_spans(prompt + [r], tools)[0] for r in (chosen, rejected)]

    # ---- chat rendering -------------------------------------------------------------------
    def render(self, messages, tools, add_generation_prompt=False) -> str:
        return self.template.render(
            messages=messages, tools=tools, add_generation_prompt=add_generation_prompt, **self.special
        )

    def render_with_spans(self, messages, tools) -> tuple[str, list[tuple[int, int]]]:
        """Full text and the [start, end) character spans of every assistant turn."""
        full = self.render(messages, tools)
        spans = []
        for k, m in enumerate(messages):
            if m["role"] not in TRAINED_ROLES:
                continue
            head = self.render(messages[:k], tools, add_generation_prompt=True)
            turn = self.render(messages[: k + 1], tools) if k + 1 < len(messages) else full
            if not (full.startswith(head) and full.startswith(turn) and turn.startswith(head)):
                raise UserError(
                    "the chat template is not prefix-stable (rendering a prefix of the messages "
                    "does not give a prefix of the full text), so assistant turns cannot be "
                    "masked; use a ChatML-style template"
                )
            spans.append((len(head), len(turn.rstrip())))
        return full, spans

    @staticmethod
    def _mask(starts: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
        """1 for the tokens whose first character lies in a trained span."""
        mask = np.zeros(len(starts), dtype=np.uint8)
        for s, e in spans:
            lo, hi = np.searchsorted(starts, [s, e], side="left")
            mask[lo:hi] = 1
        return mask

    def _canonical(self, rec: Any, where: str) -> Any:
        """A record of a --dataset file in the canonical shape (its dataset_info mapping)."""
        spec = self.s.datasets.get(where.rsplit(":", 1)[0])
        return rec if spec is None else canonical_record(rec, spec, self.s.stage)

    # ---- per stage ------------------------------------------------------------------------
    def encode_chunk(self, chunk: list[tuple[str, Any]]) -> list[Result] | PretrainChunk:
        """[(where, record)] -> one Encoded or Skipped per record, in input order (pretrain: a
        compact PretrainChunk instead, see _pretrain_results)."""
        out: list[Result | None] = [None] * len(chunk)
        if self.s.stage == "pretrain":
            return self._encode_pretrain(chunk, out)
        texts, owners = self._render_chunk(chunk, out)
        encs = self.bulk.encode_with_starts(texts)
        per_record, result = (1, self._sft_result) if self.s.stage == "sft" else (2, self._dpo_result)
        for j in range(0, len(owners), per_record):
            i = owners[j][0]
            segs = [(encs[k][0], self._mask(encs[k][1], owners[k][1])) for k in range(j, j + per_record)]
            out[i] = result(chunk[i][0], segs)
        return out  # type: ignore[return-value]

    def _render_chunk(self, chunk, out) -> tuple[list[str], list[tuple[int, list[tuple[int, int]]]]]:
        """The texts to tokenize (sft: one per record; dpo: chosen then rejected) and, for each,
        (index in chunk, trained character spans); bad records go to `out` as Skipped."""
        texts: list[str] = []
        owners: list[tuple[int, list[tuple[int, int]]]] = []
        for i, (where, rec) in enumerate(chunk):
            if isinstance(rec, RawJSON):
                rec = rec.parse()
            if isinstance(rec, BadRecord):
                out[i] = Skipped(where, rec.reason, rec.message)
                continue
            try:
                if self.s.datasets:
                    rec = self._canonical(rec, where)
                if self.s.stage == "sft":
                    conversations = [sft_messages(rec)]
                else:
                    prompt, chosen, rejected, tools = dpo_pair(rec)
                    conversations = [(prompt + [reply], tools) for reply in (chosen, rejected)]
                rendered = [self.render_with_spans(msgs, tools) for msgs, tools in conversations]
                if self.s.stage == "dpo":  # only the final reply is scored: a multi-turn history,
                    # its assistant turns included, is prompt (as TRL and LLaMA-Factory score it)
                    rendered = [(text, spans[-1:]) for text, spans in rendered]
            except RecordError as e:
                out[i] = Skipped(where, e.reason, e.message)
                continue
            for text, spans in rendered:
                texts.append(text)
                owners.append((i, spans))
        return texts, owners

    def _sft_result(self, where: str, segs: list[Segment]) -> Result:
        """An over-long conversation is cut to its first trained token's window, or dropped."""
        ((ids, mask),) = segs
        L = self.s.seq_len
        if len(ids) <= L:
            return Encoded(where, [(ids, mask)], False)
        first = int(mask.argmax()) if mask.any() else -1
        if self.s.overlong == "drop" or first < 0:
            return Skipped(where, "overlong", f"{len(ids)} tokens > seq_len {L}")
        lo, hi = truncation_window(first, len(ids) - first, L)
        return Encoded(where, [(ids[first - lo : first + hi], mask[first - lo : first + hi])], True)

    def _dpo_result(self, where: str, segs: list[Segment]) -> Result:
        """A pair as [prompt+chosen][prompt+rejected], or one shared-prompt group of the same two
        sequences: a sequence over the cutoff (seq_len, per sequence) cuts the pair by one rule
        whatever the layout (prep/cutoff.py cut_pair), or drops it."""
        C = self.s.seq_len
        longest = max(len(ids) for ids, _ in segs)
        truncated = longest > C
        if truncated:
            if self.s.overlong == "drop":
                return Skipped(where, "overlong", f"a sequence of {longest} tokens > cutoff_len {C} (per sequence)")
            segs = cut_pair(*segs, C)
            if not all(mask.any() for _, mask in segs):
                return Skipped(where, "overlong", f"cutoff_len {C} leaves no reply token of a {longest}-token sequence")
        p = share.prompt_len(*segs)
        pair_tokens = len(segs[0][0]) + len(segs[1][0])
        if self.s.share_prompt:
            return Encoded(where, share.share(*segs, p), truncated, p, pair_tokens, p)
        return Encoded(where, segs, truncated, None, pair_tokens, p)

    def _encode_pretrain(self, chunk, out) -> PretrainChunk:
        """Pretrain: a fast path for the common well-formed record (a dict whose text is a
        non-blank str); anything else goes through the full checks, which name the problem.
        A 1B-token corpus is hundreds of millions of records: per-record Python is the cost
        prep adds on top of the tokenizer."""
        key = self.s.text_key
        texts: list[str] = []
        owners: list[int] = []  # index in chunk of each text
        for i, (where, rec) in enumerate(chunk):
            if type(rec) is RawJSON:
                rec = rec.parse()
            if self.s.datasets:
                try:
                    rec = self._canonical(rec, where)
                except RecordError as e:
                    out[i] = Skipped(where, e.reason, e.message)
                    continue
            if type(rec) is dict:
                text = rec.get(key)
                if type(text) is str and text and not text.isspace():
                    texts.append(text)
                    owners.append(i)
                    continue
            elif type(rec) is TextLine:  # a .txt line or dataset_info text (never blank: checked there)
                texts.append(rec)
                owners.append(i)
                continue
            if isinstance(rec, BadRecord):
                out[i] = Skipped(where, rec.reason, rec.message)
                continue
            try:
                texts.append(pretrain_text(rec, key))
                owners.append(i)
            except RecordError as e:
                out[i] = Skipped(where, e.reason, e.message)
        flat, lens = self.bulk.encode_flat(texts)
        return self._pretrain_results(chunk, out, owners, flat, lens)

    def _pretrain_results(self, chunk, out, owners, flat: np.ndarray, lens: np.ndarray) -> PretrainChunk:
        """Pretrain: the chunk's accepted documents as one flat uint32 array (EOS appended to
        each) and their lengths, plus the bad records. No per-record tuples travel back to
        the writer: a 1B-token corpus has hundreds of millions of short documents."""
        L, eos = self.s.seq_len, self.eos_id
        n = lens + 1  # with EOS
        if self.s.overlong == "drop" and (n > L).any():
            keep = n <= L
            for k in np.flatnonzero(~keep).tolist():
                i = owners[k]
                out[i] = Skipped(chunk[i][0], "overlong", f"{int(n[k])} tokens > seq_len {L}")
            flat = flat[np.repeat(keep, lens)]
            lens, n = lens[keep], n[keep]
        docs = np.insert(flat.astype(np.uint32, copy=False), np.cumsum(lens), eos)
        errors = [r for r in out if r is not None]  # in input order
        return PretrainChunk(len(chunk), errors, n.astype(np.int64), docs, int((n > L).sum()), file_runs(chunk))


class Encoded(NamedTuple):
    """A record that becomes training tokens (sft, dpo)."""

    where: str  # file:line
    segments: list[Segment]  # what the packer places whole: sft one, dpo two (or one shared group's two)
    truncated: bool
    prompt_len: int | None = None  # dpo shared_prompt layout: the pair's prompt_lens value
    pair_tokens: int = 0  # dpo: tokens of the pair as [prompt+chosen][prompt+rejected]
    prompt_tokens: int = 0  # dpo: of which prompt tokens, once


class Skipped(NamedTuple):
    """A record left out, and why (written to errors.jsonl and counted by reason)."""

    where: str
    reason: str
    message: str


Result = Encoded | Skipped


@dataclass
class PretrainChunk:
    """One chunk's pretrain result: `lens[k]` tokens of `flat` per accepted document (over-long
    ones are split across rows, counted in `truncated`), and the bad records; `files` counts
    the chunk's records per input file."""

    read: int
    errors: list[Skipped]
    lens: np.ndarray
    flat: np.ndarray
    truncated: int
    files: list[tuple[str, int]]


# ---- multiprocessing plumbing (one Encoder per worker process) ---------------------------
_ENCODER: Encoder | None = None


def init_worker(settings: EncodeSettings, inherited: bool = False) -> None:
    """Pool initializer. With fork the parent's Encoder is inherited (set_inherited_encoder
    before the pool starts), so workers do not load the tokenizer again."""
    global _ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker; scale with processes
    if not (inherited and _ENCODER is not None):
        _ENCODER = Encoder(settings)


def set_inherited_encoder(encoder: Encoder | None) -> None:
    global _ENCODER
    _ENCODER = encoder


def current_encoder() -> Encoder:
    """This process's Encoder (inherited, or loaded by init_worker)."""
    assert _ENCODER is not None, "no Encoder in this process (init_worker or set_inherited_encoder first)"
    return _ENCODER


def encode_in_worker(chunk):
    assert _ENCODER is not None
    return _ENCODER.encode_chunk(chunk)
