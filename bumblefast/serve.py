"""`bumblefast serve`: an OpenAI-compatible HTTP API and a small web chat page.

  GET  /                      the chat page (streams replies; asks for the API key once per tab)
  GET  /health                {"status": "ok", "model", "running", "waiting"} (open: no key needed)
  GET  /v1/models             the one model served
  POST /v1/chat/completions   OpenAI chat completions, `stream: true` as server-sent events

Safe to expose: binds 127.0.0.1 unless told otherwise and refuses any other address without
an API key (`--api_key` or BUMBLEFAST_API_KEY; `--allow_unauthenticated` to mean it). With a
key every /v1/* request needs `Authorization: Bearer KEY` (compared in constant time), else 401.

Steady under load: requests are generated together by chat.Batcher (continuous batching, up to
--max_batch sequences); at most --max_queue wait for a slot, beyond that 429 with Retry-After;
a request not finished within --request_timeout seconds gets 504 (its generation is dropped);
a client that disconnects has its generation dropped at the next token step. One log line per
request: id, status, outcome, prompt and completion tokens, seconds.

Errors are JSON in OpenAI's shape {"error": {"message", "type", "code"}}: malformed JSON,
wrong types or values, empty messages, max_tokens above the cap (400), a body over the size
limit (413), a missing or wrong key (401), a full queue (429), the deadline (504).

No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at
definition time, and `Request` is imported inside create_app.
"""

import asyncio
import hmac
import ipaddress
import json
import logging
import math
import os
import time
import uuid
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from bumblefast.config import UserError

PAGE = Path(__file__).with_name("chat_page.html")
KEY_ENV = "BUMBLEFAST_API_KEY"
log = logging.getLogger("bumblefast.serve")


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in stops if s)


def error(status: int, message: str, kind: str = "invalid_request_error", code=None, headers=None):
    from fastapi.responses import JSONResponse

    return JSONResponse(
        status_code=status,
        headers=headers,
        content={
            "error": {"message": message, "type": kind, "param": None, "code": code if code is not None else status}
        },
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def parse_request(body: bytes, max_body_bytes: int, max_tokens_cap: int):
    """The request, or the 4xx error response for it."""
    if len(body) > max_body_bytes:
        return error(413, f"request body of {len(body)} bytes is over the limit of {max_body_bytes}")
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return error(400, f"malformed JSON: {e}")
    if not isinstance(payload, dict):
        return error(400, "the body must be a JSON object")
    try:
        req = ChatRequest.model_validate(payload)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        return error(400, problems)
    asked = req.max_completion_tokens or req.max_tokens
    if asked is not None and asked > max_tokens_cap:
        return error(400, f"max_tokens {asked} is above this server's cap of {max_tokens_cap}")
    if len(req.stops()) > 4:
        return error(400, "stop: at most 4 sequences")
    return req


class Generation:
    """One chat completion in flight: its batcher Job, the events the generation thread sends
    it (start, delta, done) and its deadline; answers as one JSON body or as SSE chunks.
    `on_done(rid, status, outcome, t0, prompt, completion)` logs the request's end."""

    def __init__(self, *, ids, sampling, request, rid: str, model: str, t0: float, timeout: float, on_done):
        from bumblefast.chat import Job

        self.loop, self.events = asyncio.get_running_loop(), asyncio.Queue()
        self.job = Job(ids, sampling, self._emit)
        self.request, self.rid, self.model, self.t0 = request, rid, model, t0
        self.created, self.timeout, self.deadline = int(time.time()), timeout, t0 + timeout
        self.on_done = on_done
        self.getter = None  # one pending get at a time: asyncio.wait never drops an event it timed out on

    def _emit(self, kind: str, value: str) -> None:  # from the generation thread
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (shutdown)
            pass

    async def next_event(self, watch: bool = True):
        """The job's next event; ("timeout", "") past the deadline, ("gone", "") when the client
        left (checked while `watch`; in a streamed body Starlette watches and cancels us)."""
        while True:
            left = self.deadline - time.perf_counter()
            if left <= 0:
                return "timeout", ""
            self.getter = self.getter or asyncio.ensure_future(self.events.get())
            ready, _ = await asyncio.wait({self.getter}, timeout=min(left, 0.25))
            if ready:
                event, self.getter = self.getter.result(), None
                return event
            if watch and await self.request.is_disconnected():
                return "gone", ""

    def cancel(self) -> None:
        self.job.cancel()  # a no-op once done; else the next step drops it
        if self.getter is not None:
            self.getter.cancel()

    def finish(self, status: int, outcome: str) -> None:
        self.on_done(self.rid, status, outcome, self.t0, len(self.job.ids), len(self.job.tokens))

    def usage(self) -> dict:
        prompt, completion = len(self.job.ids), len(self.job.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def fail(self, kind: str):
        """The error response for a request that timed out or whose client left."""
        self.cancel()
        if kind == "timeout":
            self.finish(504, "timeout")
            return error(
                504,
                f"the request did not finish within the server's request_timeout of {self.timeout:g} s",
                kind="timeout_error",
                code="timeout",
            )
        self.finish(499, "disconnected")
        return error(499, "client disconnected")

    async def reply(self):
        """`stream: false`: the whole completion as one chat.completion object."""
        pieces = []
        while True:
            kind, value = await self.next_event()
            if kind in ("start", "delta"):
                pieces.append(value)
                continue
            if kind in ("timeout", "gone"):
                return self.fail(kind)
            self.cancel()
            if value.startswith("error"):
                self.finish(500, value)
                return error(500, value, kind="server_error")
            self.finish(200, value)
            message = {"role": "assistant", "content": "".join(pieces).strip()}
            return {
                "id": self.rid,
                "object": "chat.completion",
                "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "message": message, "finish_reason": value}],
                "usage": self.usage(),
            }

    def chunk(self, delta: dict, finish: str | None = None) -> str:
        data = {
            "id": self.rid,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def stream(self):
        """`stream: true`: server-sent events, after the first event has arrived."""
        outcome = "disconnected"
        try:
            yield self.chunk({"role": "assistant", "content": ""})
            while True:
                kind, value = await self.next_event(watch=False)
                if kind == "delta":
                    yield self.chunk({"content": value})
                    continue
                if kind == "timeout":
                    outcome = "timeout"
                    err = {
                        "message": f"the request did not finish within {self.timeout:g} s",
                        "type": "timeout_error",
                        "code": "timeout",
                    }
                elif value.startswith("error"):
                    outcome, err = value, {"message": value, "type": "server_error"}
                else:
                    outcome, err = value, None
                if err is not None:
                    yield f"data: {json.dumps({'error': err})}\n\n"
                else:
                    yield self.chunk({}, value)
                    yield "data: [DONE]\n\n"
                break
        finally:  # also when the client disconnected (the response task is cancelled)
            self.cancel()
            self.finish(200, outcome)


class Server:
    """What the routes share: the model (Chat) and its Batcher, the limits, the API key, and the
    recent request times behind Retry-After. create_app wires its methods to FastAPI."""

    def __init__(
        self, *, model_path, max_tokens_cap, max_body_bytes, model_name, api_key, max_batch, max_queue, timeout
    ):
        from bumblefast.chat import Batcher, Chat

        self.chat = Chat(model_path)
        self.batcher = Batcher(self.chat, max_batch=max_batch, max_queue=max_queue)
        self.name = model_name or Path(model_path).resolve().name
        self.key = api_key.encode() if api_key else None
        self.max_tokens_cap, self.max_body_bytes, self.timeout = max_tokens_cap, max_body_bytes, timeout
        self.recent: list[float] = []  # seconds of the last completed requests, for Retry-After

    def done(self, rid: str, status: int, outcome: str, t0: float, prompt: int = 0, completion: int = 0) -> None:
        seconds = time.perf_counter() - t0
        if status == 200 and outcome in ("stop", "length"):
            self.recent.append(seconds)
            del self.recent[:-32]
        log.info(
            "%s status=%d outcome=%s prompt_tokens=%d completion_tokens=%d seconds=%.3f",
            rid,
            status,
            outcome,
            prompt,
            completion,
            seconds,
        )

    def refuse(self, request):
        """The error response for a request the API key or the body limit refuses, else None."""
        if request.url.path.startswith("/v1/") and self.key is not None:
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key):
                self.done(f"req-{uuid.uuid4().hex[:12]}", 401, "unauthorized", time.perf_counter())
                message = (
                    "Incorrect API key provided."
                    if given
                    else "You didn't provide an API key: send the header 'Authorization: Bearer KEY'."
                )
                return error(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.max_body_bytes:
            return error(413, f"request body of {size} bytes is over the limit of {self.max_body_bytes}")
        return None

    async def completions(self, request):
        from fastapi.responses import StreamingResponse

        from bumblefast.chat import QueueFull

        t0 = time.perf_counter()
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        req = parse_request(await request.body(), self.max_body_bytes, self.max_tokens_cap)
        if not isinstance(req, ChatRequest):
            self.done(rid, req.status_code, "bad_request", t0)
            return req
        ids = self.chat._input_ids("", [m.model_dump() for m in req.messages])[0].tolist()
        sampling = self.chat.sampling(
            min(req.max_completion_tokens or req.max_tokens or 256, self.max_tokens_cap),
            req.temperature,
            req.top_p,
            req.stops(),
            req.seed,
        )
        gen = Generation(
            ids=ids,
            sampling=sampling,
            request=request,
            rid=rid,
            model=self.name,
            t0=t0,
            timeout=self.timeout,
            on_done=self.done,
        )
        try:
            self.batcher.submit(gen.job)
        except QueueFull as e:
            wait = max(1, math.ceil(sum(self.recent) / len(self.recent))) if self.recent else 1
            self.done(rid, 429, "queue_full", t0, len(ids))
            return error(
                429,
                f"server busy: {e}; retry after {wait} s",
                kind="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(wait)},
            )
        if not req.stream:
            return await gen.reply()
        # wait for a slot before the 200: a request that times out while queued still gets a 504
        kind, value = await gen.next_event()
        if kind in ("timeout", "gone"):
            return gen.fail(kind)
        if kind == "done":  # failed or shut down before it started
            gen.cancel()
            gen.finish(503, value)
            return error(503, f"the request could not be served: {value}", kind="server_error")
        return StreamingResponse(gen.stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def create_app(
    model_path: str | Path,
    max_tokens_cap: int = 1024,
    max_body_bytes: int = 1 << 20,
    model_name: str | None = None,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 16,
    request_timeout: float = 300.0,
):
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse

    srv = Server(
        model_path=model_path,
        max_tokens_cap=max_tokens_cap,
        max_body_bytes=max_body_bytes,
        model_name=model_name,
        api_key=api_key,
        max_batch=max_batch,
        max_queue=max_queue,
        timeout=request_timeout,
    )

    @asynccontextmanager
    async def lifespan(app):
        yield
        srv.batcher.close()

    app = FastAPI(title="bumblefast serve", lifespan=lifespan)
    app.state.batcher = srv.batcher

    @app.middleware("http")
    async def guard(request: Request, call_next):
        refused = srv.refuse(request)
        return refused if refused is not None else await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": srv.name, **srv.batcher.load()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": srv.name, "object": "model", "created": 0, "owned_by": "bumblefast"}]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE.read_text(encoding="utf-8").replace("{{MODEL}}", srv.name)

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        return await srv.completions(request)

    return app


def check(args) -> str | None:
    """The API key to require (None: none), after refusing unsafe or impossible settings."""
    key = args.api_key if args.api_key is not None else os.environ.get(KEY_ENV)
    if key is not None and not key.strip():
        raise UserError(f"--api_key / {KEY_ENV} is empty; give a real key or leave both unset")
    if key is None and not is_loopback(args.host) and not args.allow_unauthenticated:
        raise UserError(
            f"--host {args.host} would expose the model to the network without authentication: "
            f"set --api_key KEY (or the {KEY_ENV} environment variable), or pass "
            "--allow_unauthenticated if you really mean an open server"
        )
    for flag in ("max_batch", "max_queue", "max_tokens_cap", "max_body_bytes"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if not args.request_timeout > 0:
        raise UserError(f"--request_timeout must be > 0 seconds, got {args.request_timeout}")
    return key


def run(args) -> int:
    import uvicorn

    key = check(args)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s bumblefast.serve %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    app = create_app(
        args.model_path,
        max_tokens_cap=args.max_tokens_cap,
        max_body_bytes=args.max_body_bytes,
        api_key=key,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        request_timeout=args.request_timeout,
    )
    auth = "API key required" if key else "no API key"
    print(
        f"bumblefast serve: http://{args.host}:{args.port}/ (OpenAI API at /v1; {auth}; "
        f"max_batch {args.max_batch}, max_queue {args.max_queue})",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def add_arguments(p) -> None:
    p.add_argument("--model_path", required=True, help="a Hugging Face model folder")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: loopback only; any other needs --api_key or --allow_unauthenticated)",
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api_key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on /v1/* (default: the {KEY_ENV} environment variable)",
    )
    p.add_argument(
        "--allow_unauthenticated", action="store_true", help="allow a non-loopback --host without an API key"
    )
    p.add_argument("--max_batch", type=int, default=8, help="sequences generated together (1 = one at a time)")
    p.add_argument("--max_queue", type=int, default=16, help="requests that may wait for a slot; more get 429")
    p.add_argument(
        "--request_timeout", type=float, default=300.0, help="seconds a request may take, queue included; past it 504"
    )
    p.add_argument("--max_tokens_cap", type=int, default=1024, help="largest max_tokens a request may ask")
    p.add_argument("--max_body_bytes", type=int, default=1 << 20, help="largest request body accepted")
