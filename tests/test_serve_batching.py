"""Batched generation (chat.Batcher) and the server's faults, deterministic: greedy replies
batched equal transformers' generate alone, each request keeps its own settings; a gate on the
generation thread's steps makes the full queue (429), the deadline (504) and a disconnect
(dropped within one step) happen exactly when the test says."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest
import torch
from helpers import free_port

KEY = "test-key-batching"
MARGIN = 1e-3  # smallest top-1 / top-2 logit gap that float reduction order (~1e-6 here) cannot flip


@pytest.fixture(scope="module")
def model_dir(chatty_model_dir):
    return chatty_model_dir


@pytest.fixture(scope="module")
def chat(model_dir):
    from bumblefast.chat import Chat

    return Chat(model_dir, temperature=0)


CANDIDATES = [
    "What is 2 + 3?",
    "Name a bird.",
    "Write one long sentence about rivers, stones and the sea at night.",
    "hi",
    "Count from one to five, please.",
    "你好",
    "And 4 + 4?",
    "Tell me about stones.",
    "What is 7 + 1?",
    "Say something kind.",
]


def prompt_ids(chat, text: str) -> list[int]:
    return chat._input_ids("", [{"role": "user", "content": text}])[0].tolist()


def hf_greedy(chat, ids: list[int], n: int) -> tuple[str, float]:
    """transformers' own greedy generate, alone: the reply and its smallest top-2 logit gap."""
    x = torch.tensor([ids])
    out = chat.model.generate(
        x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=chat.gen.eos_token_id,
        pad_token_id=chat.gen.pad_token_id,
        output_scores=True,
        return_dict_in_generate=True,
    )
    gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    return chat.tok.decode(out.sequences[0, len(ids) :], skip_special_tokens=True), min(gaps)


def run_jobs(batcher, chat, asks: list[tuple[str, dict]], stagger: float = 0.0) -> list[tuple[str, str, int]]:
    """Submit (prompt, sampling kwargs) jobs; (text, finish_reason, tokens) of each."""
    from bumblefast.chat import Job

    results: list = [None] * len(asks)
    done = [threading.Event() for _ in asks]
    jobs = []
    for i, (text, kw) in enumerate(asks):
        pieces: list[str] = []

        def emit(kind, value, i=i, pieces=pieces):
            if kind == "delta":
                pieces.append(value)
            elif kind == "done":
                results[i] = ("".join(pieces), value, len(jobs[i].tokens))
                done[i].set()

        jobs.append(Job(prompt_ids(chat, text), chat.sampling(**kw), emit))
        batcher.submit(jobs[-1])
        time.sleep(stagger)
    for d in done:
        assert d.wait(120), "a job never finished"
    return results


@pytest.fixture(scope="module")
def clear_prompts(chat):
    """The candidate prompts whose 24 greedy steps have no near-tie (a comparison float order cannot flip)."""
    clear = [p for p in CANDIDATES if hf_greedy(chat, prompt_ids(chat, p), 24)[1] > MARGIN]
    assert len(clear) >= 5, f"only {len(clear)} prompts without a near-tie"
    return clear


def test_greedy_batched_equals_alone_and_transformers(chat, clear_prompts):
    from bumblefast.chat import Batcher

    n, prompts = 24, clear_prompts
    refs = [hf_greedy(chat, prompt_ids(chat, p), n) for p in prompts]
    asks = [(p, dict(max_new_tokens=n, temperature=0)) for p in prompts]
    alone = Batcher(chat, max_batch=1, max_queue=len(prompts))
    batched = Batcher(chat, max_batch=4, max_queue=len(prompts))
    try:
        one = run_jobs(alone, chat, asks)
        together = run_jobs(batched, chat, asks)
        # staggered: later prompts join a batch that is already running (left-padded merge of caches)
        joined = run_jobs(batched, chat, asks, stagger=0.02)
    finally:
        alone.close()
        batched.close()
    for (ref, _), a, b, c in zip(refs, one, together, joined):
        assert a == b == c
        assert a[0] == ref and a[1] == "length" and a[2] == n  # byte-identical, every token kept


def test_each_request_keeps_its_own_settings_in_a_batch(chat):
    from bumblefast.chat import Batcher

    prompt = next(p for p in CANDIDATES if hf_greedy(chat, prompt_ids(chat, p), 32)[1] > MARGIN)
    ref = hf_greedy(chat, prompt_ids(chat, prompt), 32)[0]
    stop = next(
        ref[i : i + 2] for i in range(3, len(ref) - 2) if "\ufffd" not in ref[i : i + 2] and ref[i : i + 2].strip()
    )
    asks = [
        (prompt, dict(max_new_tokens=32, temperature=0)),
        (prompt, dict(max_new_tokens=5, temperature=0)),
        (prompt, dict(max_new_tokens=32, temperature=0, stop=("zzzz", stop))),
        (prompt, dict(max_new_tokens=32, temperature=1.0, top_p=0.9, seed=7)),
        (prompt, dict(max_new_tokens=32, temperature=1.0, top_p=0.9, seed=7)),
    ]
    b = Batcher(chat, max_batch=8, max_queue=8)
    try:
        full, short, stopped, s1, s2 = run_jobs(b, chat, asks)
    finally:
        b.close()
    assert full == (ref, "length", 32)
    assert short[1:] == ("length", 5) and ref.startswith(short[0])
    assert stopped[0] == ref[: ref.find(stop)] and stopped[1] == "stop" and stop not in stopped[0]
    assert s1[2] == 32 and s1[0] != ref  # sampled, not greedy (a 32-token tie with greedy is not plausible)
    assert s2[2] == 32


def test_full_queue_raises_and_cancel_before_admission(chat):
    from bumblefast.chat import Batcher, Job, QueueFull

    gate = threading.Event()
    b = Batcher(chat, max_batch=1, max_queue=1)
    step = b._step
    b._step = lambda state, new: (gate.wait(), step(state, new))[1]
    events: list = []
    try:
        ids = prompt_ids(chat, "hi")
        running = Job(ids, chat.sampling(4, 0), lambda k, v: events.append(("running", k, v)))
        b.submit(running)
        wait_for(lambda: not b.waiting)  # the generation thread took it and is held at the gate
        waiting = Job(ids, chat.sampling(4, 0), lambda k, v: events.append(("waiting", k, v)))
        b.submit(waiting)
        with pytest.raises(QueueFull, match="max_queue 1"):
            b.submit(Job(ids, chat.sampling(4, 0), lambda k, v: None))
        waiting.cancel()
        gate.set()
        wait_for(lambda: b.load() == {"running": 0, "waiting": 0})
    finally:
        gate.set()
        b.close()
    assert [e[1:] for e in events if e[0] == "waiting"] == [("done", "cancelled")]  # never started
    assert ("running", "done", "length") in events


def wait_for(cond, seconds: float = 60.0) -> None:
    end = time.time() + seconds
    while not cond():
        assert time.time() < end, "timed out waiting"
        time.sleep(0.01)


# --- the HTTP server in this process, its generation thread behind a gate ------------------------------------


class Gate:
    """Counts the generation thread's steps; `hold()` stops them, `allow(n)` lets n more run."""

    def __init__(self):
        self.cond = threading.Condition()
        self.permits: int | None = None  # None: open
        self.entered = 0

    def wrap(self, step):
        def gated(state, new):
            with self.cond:
                self.entered += 1
                self.cond.notify_all()
                self.cond.wait_for(lambda: self.permits is None or self.permits > 0)
                if self.permits is not None:
                    self.permits -= 1
            return step(state, new)

        return gated

    def hold(self):
        with self.cond:
            self.permits = 0

    def allow(self, n: int | None):
        with self.cond:
            self.permits = n
            self.cond.notify_all()


@pytest.fixture(scope="module")
def live(model_dir):
    import uvicorn

    from bumblefast.serve import create_app

    app = create_app(model_dir, max_tokens_cap=64, api_key=KEY, max_batch=1, max_queue=1, request_timeout=3.0)
    batcher = app.state.batcher
    gate = Gate()
    batcher._step = gate.wrap(batcher._step)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started)
    yield {"base": f"http://127.0.0.1:{port}", "batcher": batcher, "gate": gate}
    gate.allow(None)
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture
def gate(live):
    live["gate"].allow(None)
    wait_for(lambda: live["batcher"].load() == {"running": 0, "waiting": 0})
    yield live["gate"]
    live["gate"].allow(None)
    wait_for(lambda: live["batcher"].load() == {"running": 0, "waiting": 0})


def client(live, key=KEY):
    from openai import OpenAI

    return OpenAI(base_url=live["base"] + "/v1", api_key=key, max_retries=0, timeout=60)


def ask(live, **kw):
    return client(live).chat.completions.create(
        model="x", messages=[{"role": "user", "content": "hi"}], temperature=0, **kw
    )


def test_full_queue_gets_429_with_retry_after(live, gate):
    import openai

    gate.hold()
    results, n0 = {}, gate.entered
    first = threading.Thread(target=lambda: results.update(first=ask(live, max_tokens=4)))
    first.start()
    wait_for(lambda: gate.entered > n0 and not live["batcher"].waiting)  # running, held at the gate
    second = threading.Thread(target=lambda: results.update(second=ask(live, max_tokens=4)))
    second.start()
    wait_for(lambda: live["batcher"].load()["waiting"] == 1)
    with pytest.raises(openai.RateLimitError) as e:
        ask(live, max_tokens=4)
    assert e.value.status_code == 429 and int(e.value.response.headers["Retry-After"]) >= 1
    assert e.value.body["code"] == "queue_full" and "max_queue 1" in e.value.body["message"]
    gate.allow(None)
    first.join(60)
    second.join(60)
    assert results["first"].choices[0].message.content == results["second"].choices[0].message.content
    assert results["first"].usage.completion_tokens == 4


def test_deadline_gives_504_and_drops_the_generation(live, gate, caplog):
    import openai

    gate.hold()
    with (
        caplog.at_level("INFO", logger="bumblefast.serve"),
        pytest.raises(openai.APIStatusError) as e,
    ):
        ask(live, max_tokens=4)  # request_timeout is 3 s; the gate holds the first step
    assert e.value.status_code == 504 and e.value.body["type"] == "timeout_error"
    assert "request_timeout of 3 s" in e.value.body["message"]
    gate.allow(1)  # one step: the timed-out job is dropped, nothing else runs
    wait_for(lambda: live["batcher"].load() == {"running": 0, "waiting": 0}, 10)
    wait_for(lambda: gate.permits == 0, 10)  # that step has run: it is not left to take the next test's permit
    assert any("status=504 outcome=timeout" in r.getMessage() for r in caplog.records)


def test_stream_disconnect_drops_the_generation_within_one_step(live, gate, caplog):
    n0 = gate.entered
    gate.allow(3)  # three steps (the first with the prefill), then held at the fourth
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 64,
            "stream": True,
            "temperature": 0,
        }
    ).encode()
    req = urllib.request.Request(
        live["base"] + "/v1/chat/completions",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )
    with caplog.at_level("INFO", logger="bumblefast.serve"):
        resp = urllib.request.urlopen(req, timeout=30)
        assert resp.readline().startswith(b"data: ")  # the stream started
        wait_for(lambda: gate.entered >= n0 + 4)
        resp.close()  # the client goes away mid-stream, its job in the running batch
        wait_for(lambda: any("outcome=disconnected" in r.getMessage() for r in caplog.records), 10)
        assert live["batcher"].load()["running"] == 1
        gate.allow(1)  # exactly one more step: it must drop the job, not generate for it
        wait_for(lambda: live["batcher"].load() == {"running": 0, "waiting": 0}, 10)
    (line,) = [r.getMessage() for r in caplog.records if "outcome=disconnected" in r.getMessage()]
    assert "status=200" in line and "completion_tokens=64" not in line
