"""`bumblefast serve` with the official openai client, bad requests, concurrency, and the web
page in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright)."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers import ROOT, save_tiny_model, subprocess_env

CHROMIUM = "/usr/bin/chromium"

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_tokenizer_dir):
    model_dir = save_tiny_model(tmp_path_factory.mktemp("serve_model"), demo_tokenizer_dir, chatty=True)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bumblefast", "serve", "--model_path", str(model_dir), "--port",
                             str(port), "--max_tokens_cap", "64", "--max_body_bytes", "20000"], cwd=ROOT,
                            env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(base + "/health", timeout=2)
            break
        except OSError:
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.3)
    yield {"base": base, "model_dir": model_dir}
    proc.terminate()
    proc.wait(timeout=30)


def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["base"] + "/v1", api_key="unused", max_retries=0, timeout=120)


def greedy(model_dir, messages, n) -> str:
    from bumblefast.chat import Chat

    chat = Chat(model_dir, temperature=0, max_new_tokens=n)
    return "".join(chat.stream(chat._input_ids("", messages))).strip()


def test_openai_client_plain_and_streamed(server):
    c = client(server)
    assert [m.id for m in c.models.list().data] == [Path(server["model_dir"]).name]
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    # 32 tokens: the streamer flushes at word boundaries, so a reply this long comes in pieces
    plain = c.chat.completions.create(model="x", messages=messages, max_tokens=32, temperature=0)
    text = plain.choices[0].message.content
    assert text and text == greedy(server["model_dir"], messages, 32)
    pieces = [ch.choices[0].delta.content or "" for ch in
              c.chat.completions.create(model="x", messages=messages, max_tokens=32, temperature=0, stream=True)]
    assert len([p for p in pieces if p]) >= 2  # streamed in several chunks
    assert "".join(pieces).strip() == text


def post(server, body: bytes, headers=None):
    req = urllib.request.Request(server["base"] + "/v1/chat/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b'{"messages": [', 400, "malformed JSON"),
        (json.dumps({"messages": "hi"}).encode(), 400, "messages"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}).encode(), 400, "max_tokens"),
        (json.dumps({"messages": []}).encode(), 400, "messages"),
        (json.dumps({"messages": [{"role": "robot", "content": "hi"}]}).encode(), 400, "role"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 65}).encode(), 400, "cap of 64"),
        (json.dumps({"messages": [{"role": "user", "content": "x" * 30000}]}).encode(), 413, "over the limit"),
    ],
    ids=["malformed", "wrong-type-messages", "wrong-type-max-tokens", "empty", "bad-role", "above-cap", "oversized"],
)
def test_bad_requests_get_4xx_json_and_server_keeps_serving(server, body, status, words):
    code, payload = post(server, body)
    assert code == status and words in payload["error"]["message"], payload
    assert urllib.request.urlopen(server["base"] + "/health", timeout=10).status == 200


def test_twenty_concurrent_requests_all_complete(server):
    c = client(server)

    def one(i):
        r = c.chat.completions.create(model="x", messages=[{"role": "user", "content": f"What is {i} + 1?"}],
                                      max_tokens=4, temperature=0, stream=i % 2 == 0)
        if i % 2 == 0:
            return "".join(ch.choices[0].delta.content or "" for ch in r)
        return r.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        replies = list(pool.map(one, range(20)))
    # every request completed with its own reply: queued requests never mix their outputs
    from bumblefast.chat import Chat

    chat = Chat(server["model_dir"], temperature=0, max_new_tokens=4)
    for i, reply in enumerate(replies):
        ids = chat._input_ids("", [{"role": "user", "content": f"What is {i} + 1?"}])
        assert reply.strip() == "".join(chat.stream(ids)).strip(), i


def test_web_page_streams_a_reply_in_headless_chromium(server, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"])
        page = browser.new_page()
        page.goto(server["base"] + "/?temperature=0&max_tokens=16")
        page.fill("#input", "What is 2 + 3?")
        page.click("#send")
        page.wait_for_selector('.assistant[data-done="true"]', timeout=60000)
        reply = page.inner_text(".assistant")
        chunks = int(page.get_attribute(".assistant", "data-chunks") or 0)
        page.screenshot(path=str(tmp_path / "page.png"))
        browser.close()
    expected = greedy(server["model_dir"], [{"role": "user", "content": "What is 2 + 3?"}], 16)
    assert reply.startswith("model: ") and reply.removeprefix("model: ").strip() == expected
    assert chunks >= 2  # the page rendered the reply as it streamed in
