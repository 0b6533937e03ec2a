"""`bumblefast chat`: talk to a trained model in the terminal (BumbleCore's scripts/chat.sh).

Multi-turn with the chat template and its system prompt; tokens are printed as they are
generated; `/reset` clears the history, `/exit` (or Ctrl-D) quits, Ctrl-C stops the current
reply and keeps the session. `--prompt TEXT` answers once and exits. `--stage pretrain`
completes raw text without the template. Generation settings come from the model's
generation_config.json (a malformed one is an error naming it; a missing one, transformers'
defaults and a warning); flags override them (`--temperature 0` means greedy).
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bumblefast.config import UserError

log = logging.getLogger("bumblefast.chat")
SETTINGS = ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens")


def load_generation_config(model_path: Path):
    """The model's generation_config.json (its eos ids and sampling settings). Missing: a
    warning, and transformers' defaults (the stop tokens still come from the tokenizer). Present
    but unreadable or invalid: a UserError naming the file and the cause, since chat and serve
    would otherwise stop and sample differently from what the model was saved with."""
    from transformers import GenerationConfig

    path = Path(model_path) / "generation_config.json"
    if not path.is_file():
        log.warning(f"{path} not found: using transformers' default generation settings")
        return GenerationConfig()
    try:
        return GenerationConfig.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        cause = e.__cause__ or e.__context__ or e
        raise UserError(f"{path}: cannot be loaded ({type(cause).__name__}: {cause})") from e


class Chat:
    def __init__(self, model_path: str | Path, system: str | None = None, raw: bool = False, **overrides):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # keep the terminal for the conversation
        model_path = Path(model_path)
        if not (model_path / "config.json").is_file():
            raise FileNotFoundError(f"model_path: no config.json in {model_path}")
        self.tok = AutoTokenizer.from_pretrained(model_path)
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
        if torch.cuda.is_available():
            self.model.cuda()
        self.gen = load_generation_config(model_path)
        for key, value in overrides.items():
            if value is not None:
                setattr(self.gen, key, value)
        if self.gen.temperature is not None and self.gen.temperature <= 0:
            self.gen.do_sample, self.gen.temperature, self.gen.top_p, self.gen.top_k = False, None, None, None
        elif self.gen.temperature is not None:
            self.gen.do_sample = True
        from bumblefast.train.export import stop_tokens  # the template's end of turn (Llama 3: <|eot_id|>) + eos

        stops = [self.tok.convert_tokens_to_ids(t) for t in stop_tokens(self.tok)]
        self.gen.eos_token_id = stops or self.gen.eos_token_id
        self.gen.pad_token_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else stops[-1]
        self.raw = raw
        self.system = system
        self.history: list[dict] = []
        self._stop = threading.Event()

    def reset(self) -> None:
        self.history = []

    def _input_ids(self, text: str, messages: list[dict] | None = None):
        if self.raw:
            return self.tok(text, return_tensors="pt")["input_ids"]
        if messages is None:
            messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
            messages = messages + [{"role": "user", "content": text}]
        prompt = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]

    def stream(self, ids, **settings):
        """Yield the reply's text pieces as they are generated (generation runs in a thread);
        `stop()` from any thread ends it early. settings override the generation config."""
        import copy

        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        stop = self._stop

        class Interrupted(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):
                return stop.is_set()

        gen = copy.deepcopy(self.gen)
        for key, value in settings.items():
            if value is not None:
                setattr(gen, key, value)
        if gen.temperature is not None and gen.temperature <= 0:
            gen.do_sample, gen.temperature, gen.top_p, gen.top_k = False, None, None, None
        stop.clear()
        ids = ids.to(self.model.device)
        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            generation_config=gen,
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([Interrupted()]),
        )
        worker = threading.Thread(target=self.model.generate, kwargs=kwargs, daemon=True)
        worker.start()
        finished = False
        try:
            yield from streamer
            finished = True
        finally:
            if not finished:  # stopped early: end generation, drain its queue, let it finish
                stop.set()
                for _ in streamer:
                    pass
            worker.join()

    def stop(self) -> None:
        self._stop.set()

    def sampling(
        self,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: tuple[str, ...] = (),
        seed: int | None = None,
    ) -> Sampling:
        """A request's settings for the Batcher: what it asks, else the model's generation config
        (as `stream` does: no temperature asked and do_sample off = greedy)."""
        g = self.gen
        if temperature is None:
            temperature = (g.temperature if g.temperature is not None else 1.0) if g.do_sample else 0.0
        sampled = temperature > 0
        return Sampling(
            max_new_tokens=max_new_tokens or g.max_new_tokens or 256,
            temperature=temperature,
            top_p=(top_p if top_p is not None else g.top_p or 1.0) if sampled else 1.0,
            top_k=(g.top_k or 0) if sampled else 0,
            repetition_penalty=g.repetition_penalty or 1.0,
            stop=tuple(stop),
            seed=seed,
        )

    def reply(self, text: str, out=sys.stdout, keep_history: bool = True) -> str:
        """Generate a reply, writing tokens to `out` as they come; Ctrl-C ends it early."""
        pieces = []
        stream = self.stream(self._input_ids(text))
        try:
            for piece in stream:
                pieces.append(piece)
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            stream.close()
            out.write(" [stopped]")
        out.write("\n")
        out.flush()
        answer = "".join(pieces).strip()
        if keep_history and not self.raw:
            self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        return answer


def run(args) -> int:
    overrides = {k: getattr(args, k) for k in SETTINGS}
    chat = Chat(args.model_path, system=args.system_prompt, raw=args.stage == "pretrain", **overrides)
    if args.prompt is not None:
        chat.reply(args.prompt, keep_history=False)
        return 0
    mode = "raw completion" if chat.raw else ("single-turn" if args.no_history else "multi-turn")
    print(
        f"bumblefast chat ({mode}) with {args.model_path}. /reset clears the history, /exit quits, "
        "Ctrl-C stops a reply.",
        flush=True,
    )
    while True:
        try:
            text = input("user> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        text = text.strip()
        if not text:
            continue
        if text == "/exit":
            return 0
        if text == "/reset":
            chat.reset()
            print("(history cleared)", flush=True)
            continue
        if text.startswith("/"):
            print(f"unknown command {text}; use /reset or /exit", flush=True)
            continue
        sys.stdout.write("assistant> ")
        chat.reply(text, keep_history=not args.no_history)


def add_arguments(p) -> None:
    p.add_argument("--model_path", required=True, help="a Hugging Face model folder (e.g. a merged DPO model)")
    p.add_argument("--prompt", default=None, help="answer this once and exit (for scripts)")
    p.add_argument("--no_history", action="store_true", help="single-turn: every question starts afresh")
    p.add_argument(
        "--stage",
        choices=("chat", "pretrain"),
        default="chat",
        help="pretrain: complete raw text without the chat template",
    )
    p.add_argument("--system_prompt", default=None, help="replaces the template's default system prompt")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--repetition_penalty", type=float, default=None)
    p.add_argument("--max_new_tokens", type=int, default=None)


def check(args) -> None:
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError("--max_new_tokens must be >= 1")


# ---------------------------------------------------------------------------------------------
# Batched generation for `bumblefast serve`: many requests share one forward pass per token.


class QueueFull(Exception):
    """The wait queue is at its bound; the caller should answer 429."""


@dataclass
class Sampling:
    """One request's generation settings. temperature 0 = greedy; stop: strings that end the
    reply (not included in it); seed: a private RNG, so a sampled reply can be reproduced."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Job:
    """One request in the batcher. `emit(kind, value)` is called from the generation thread:
    ("start", "") when it gets a slot, ("delta", text) as the reply grows, then once
    ("done", finish_reason) with finish_reason "stop" (an end token or a stop string), "length"
    (max_new_tokens), "cancelled" or "error"
    (value then "error: <message>"). `cancel()` from any thread drops it at the next step."""

    ids: list[int]
    sampling: Sampling
    emit: Callable[[str, str], None]
    tokens: list[int] = field(default_factory=list)
    sent: str = ""
    cancelled: bool = False
    rng: Any = None

    def cancel(self) -> None:
        self.cancelled = True


class Batcher:
    """Continuous batching over one model: a generation thread keeps up to `max_batch`
    sequences in a left-padded batch with one KV cache, admits waiting jobs at every token
    step (their prompts prefilled together, then left-padded to the running length and
    concatenated) and drops finished or cancelled rows at every step, so a disconnected
    client costs at most one more step. At most `max_queue` jobs wait for a slot; `submit`
    raises QueueFull beyond that. Greedy rows give the same tokens as generating alone:
    padding is masked out and every row has its own positions (up to float reduction order
    of the differently shaped matmuls, which the tests check cannot flip an argmax).

    max_batch=1 is the old one-request-at-a-time server (the benchmark's baseline)."""

    def __init__(self, chat: Chat, max_batch: int = 8, max_queue: int = 16):
        import copy

        self.chat, self.max_batch, self.max_queue = chat, max_batch, max_queue
        self.model = chat.model
        self.tok = copy.deepcopy(chat.tok)  # its own: a Rust tokenizer used from two threads can raise
        eos = chat.gen.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad = chat.gen.pad_token_id if chat.gen.pad_token_id is not None else 0
        self.waiting: list[Job] = []
        self.rows: list[Job] = []  # the running batch, in cache order
        self.cond = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="bumblefast-batcher", daemon=True)
        self.thread.start()

    # -- called from request handlers ---------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self.cond:
            if self.closed:
                raise RuntimeError("the batcher is closed")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting (max_queue {self.max_queue})")
            self.waiting.append(job)
            self.cond.notify()

    def load(self) -> dict:
        with self.cond:
            return {"running": len(self.rows), "waiting": len(self.waiting)}

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join(timeout=30)

    # -- the generation thread ----------------------------------------------------------------
    def _loop(self) -> None:
        import torch

        state = None  # (cache, mask, next tokens) of the running rows
        while True:
            with self.cond:
                while not self.closed and not self.waiting and not self.rows:
                    self.cond.wait()
                if self.closed:
                    for job in self.waiting + self.rows:
                        job.emit("done", "cancelled")
                    self.waiting, self.rows = [], []
                    return
                for job in self.waiting:
                    if job.cancelled:  # gave up (disconnect, deadline) before it got a slot
                        job.emit("done", "cancelled")
                self.waiting = [j for j in self.waiting if not j.cancelled]
                new = self.waiting[: self.max_batch - len(self.rows)]
                self.waiting = self.waiting[len(new) :]
            try:
                with torch.inference_mode():
                    state = self._step(state, new)
            except Exception as e:  # noqa: BLE001 - the jobs in the batch get the error, the server lives on
                failed = {id(j): j for j in self.rows + new}
                for job in failed.values():
                    job.emit("done", f"error: {type(e).__name__}: {e}")
                with self.cond:
                    self.rows = []
                state = None

    def _step(self, state, new: list[Job]):
        """Admit `new`, run one decode step for every row, retire finished rows."""
        import torch

        dev = self.model.device
        if new:
            for job in new:
                job.emit("start", "")
            fresh = self._prefill(new)
            state = fresh if state is None else _merge(state, fresh)
            with self.cond:
                self.rows = self.rows + new
        cache, mask, last = state
        keep = [i for i, job in enumerate(self.rows) if not self._finished(job, int(last[i]))]
        if keep and len(keep) < len(self.rows):
            cache, mask, last = _select(cache, mask, last, keep)
        with self.cond:
            self.rows = [self.rows[i] for i in keep]
        if not keep:
            return None
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        pos = mask.sum(dim=1, keepdim=True) - 1
        out = self.model(
            input_ids=last[:, None].to(dev),
            attention_mask=mask.to(dev),
            position_ids=pos.to(dev),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        last = self._sample(out.logits[:, -1, :].float(), self.rows)
        return out.past_key_values, mask, last

    def _prefill(self, jobs: list[Job]):
        import torch
        from transformers import DynamicCache

        dev = self.model.device
        width = max(len(j.ids) for j in jobs)
        ids = torch.full((len(jobs), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for i, job in enumerate(jobs):
            ids[i, width - len(job.ids) :] = torch.tensor(job.ids)
            mask[i, width - len(job.ids) :] = 1
            if job.sampling.seed is not None:
                job.rng = torch.Generator(device=dev).manual_seed(job.sampling.seed)
        pos = (mask.cumsum(dim=1) - 1).clamp(min=0)
        out = self.model(
            input_ids=ids.to(dev),
            attention_mask=mask.to(dev),
            position_ids=pos.to(dev),
            past_key_values=DynamicCache(),
            use_cache=True,
            logits_to_keep=1,
        )
        return out.past_key_values, mask, self._sample(out.logits[:, -1, :].float(), jobs)

    def _sample(self, logits, jobs: list[Job]):
        """The next token of every row, each with its own settings (HF's order: repetition
        penalty, temperature, top-k, top-p); greedy rows take the argmax."""
        import torch

        nxt = logits.argmax(dim=-1)
        for i, job in enumerate(jobs):
            s = job.sampling
            row = logits[i]
            if s.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(job.ids) | set(job.tokens)), device=row.device)
                score = row[seen]
                row = row.clone()
                row[seen] = torch.where(score < 0, score * s.repetition_penalty, score / s.repetition_penalty)
                nxt[i] = row.argmax()
            if s.temperature <= 0:
                continue
            row = row / s.temperature
            if 0 < s.top_k < row.numel():
                row = row.masked_fill(row < torch.topk(row, s.top_k).values[-1], float("-inf"))
            if s.top_p < 1.0:
                srt, order = torch.sort(row, descending=True)
                probs = torch.softmax(srt, dim=-1)
                drop = probs.cumsum(-1) - probs > s.top_p  # keep the smallest head with mass >= top_p
                row = row.clone()
                row[order[drop]] = float("-inf")
            nxt[i] = torch.multinomial(torch.softmax(row, dim=-1), 1, generator=job.rng)[0]
        return nxt.cpu()

    def _finished(self, job: Job, token: int) -> bool:
        """Take `token` into `job`, send its new text; True when the job is done."""
        if job.cancelled:
            job.emit("done", "cancelled")
            return True
        if token in self.eos:
            return self._flush(job, "stop")
        job.tokens.append(token)
        text = self.tok.decode(job.tokens, skip_special_tokens=True)
        stops = job.sampling.stop
        cut = min((text.find(s) for s in stops if s in text), default=-1)
        if cut >= 0:
            return self._flush(job, "stop", text[:cut])
        if len(job.tokens) >= job.sampling.max_new_tokens:
            return self._flush(job, "length", text)
        hold = 1 if text.endswith("\ufffd") else 0  # an incomplete UTF-8 character: wait for the rest
        hold = max([hold] + [k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])])
        self._send(job, text[: len(text) - hold])
        return False

    def _flush(self, job: Job, reason: str, text: str | None = None) -> bool:
        if text is not None:
            self._send(job, text)
        job.emit("done", reason)
        return True

    @staticmethod
    def _send(job: Job, text: str) -> None:
        if len(text) > len(job.sent) and text.startswith(job.sent):
            job.emit("delta", text[len(job.sent) :])
            job.sent = text


def _layers(cache) -> list:
    """The cache's per-layer objects with .keys/.values [batch, heads, seq, dim] (transformers 4.57)."""
    return cache.layers


def _merge(a, b):
    """Two (cache, mask, last) batches as one: the shorter left-padded to the longer's length."""
    import torch

    (ca, ma, la), (cb, mb, lb) = a, b
    width = max(ma.shape[1], mb.shape[1])
    for x, y in zip(_layers(ca), _layers(cb)):
        x.keys = torch.cat([_pad_left(x.keys, width), _pad_left(y.keys, width)], dim=0)
        x.values = torch.cat([_pad_left(x.values, width), _pad_left(y.values, width)], dim=0)
    mask = torch.cat([_pad_left(ma, width), _pad_left(mb, width)], dim=0)
    return ca, mask, torch.cat([la, lb])


def _pad_left(t, width: int):
    """Zeros on the left of the sequence axis (dim 2 of a cache tensor, 1 of a mask) up to width."""
    import torch.nn.functional as F

    axis = 2 if t.ndim == 4 else 1
    short = width - t.shape[axis]
    if short == 0:
        return t
    return F.pad(t, (0, 0, short, 0) if axis == 2 else (short, 0))


def _select(cache, mask, last, keep: list[int]):
    """Keep only rows `keep`, and cut the columns that are padding in every remaining row."""
    import torch

    idx = torch.tensor(keep)
    mask, last = mask[idx], last[idx]
    start = int(mask.any(dim=0).int().argmax())
    for layer in _layers(cache):
        layer.keys = layer.keys[idx.to(layer.keys.device), :, start:]
        layer.values = layer.values[idx.to(layer.values.device), :, start:]
    return cache, mask[:, start:], last
