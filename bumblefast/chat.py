"""`bumblefast chat`: talk to a trained model in the terminal (BumbleCore's scripts/chat.sh).

Multi-turn with the chat template and its system prompt; tokens are printed as they are
generated; `/reset` clears the history, `/exit` (or Ctrl-D) quits, Ctrl-C stops the current
reply and keeps the session. `--prompt TEXT` answers once and exits. `--stage pretrain`
completes raw text without the template. Generation settings come from the model's
generation_config.json; flags override them (`--temperature 0` means greedy).
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from bumblefast.config import UserError

SETTINGS = ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens")


class Chat:
    def __init__(self, model_path: str | Path, system: str | None = None, raw: bool = False, **overrides):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
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
        try:
            self.gen = GenerationConfig.from_pretrained(model_path)
        except OSError:
            self.gen = GenerationConfig()
        for key, value in overrides.items():
            if value is not None:
                setattr(self.gen, key, value)
        if self.gen.temperature is not None and self.gen.temperature <= 0:
            self.gen.do_sample, self.gen.temperature, self.gen.top_p, self.gen.top_k = False, None, None, None
        elif self.gen.temperature is not None:
            self.gen.do_sample = True
        stops = [self.tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", self.tok.eos_token) if t in self.tok.get_vocab()]
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
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen,
                      streamer=streamer, stopping_criteria=StoppingCriteriaList([Interrupted()]))
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
    print(f"bumblefast chat ({mode}) with {args.model_path}. /reset clears the history, /exit quits, "
          "Ctrl-C stops a reply.", flush=True)
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
    p.add_argument("--stage", choices=("chat", "pretrain"), default="chat",
                   help="pretrain: complete raw text without the chat template")
    p.add_argument("--system_prompt", default=None, help="replaces the template's default system prompt")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--repetition_penalty", type=float, default=None)
    p.add_argument("--max_new_tokens", type=int, default=None)


def check(args) -> None:
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError("--max_new_tokens must be >= 1")
