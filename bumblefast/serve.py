"""`bumblefast serve`: an OpenAI-compatible HTTP API and a small web chat page.

  GET  /                      the chat page (streams replies)
  GET  /health                {"status": "ok"}
  GET  /v1/models             the one model served
  POST /v1/chat/completions   OpenAI chat completions, `stream: true` as server-sent events

Binds 127.0.0.1 unless told otherwise. One model, one generation at a time: concurrent
requests wait their turn (a lock), they are not refused. Bad requests get a 4xx JSON error
in OpenAI's shape: malformed JSON (400), wrong types or values (400), empty messages (400),
max_tokens above the cap (400), a body over the size limit (413).

No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at
definition time, and `Request` is imported inside create_app.
"""

import asyncio
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

PAGE = Path(__file__).with_name("chat_page.html")


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
    stream: bool = False


def error(status: int, message: str, kind: str = "invalid_request_error"):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "code": status}})


def create_app(model_path: str | Path, max_tokens_cap: int = 1024, max_body_bytes: int = 1 << 20,
               model_name: str | None = None):
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, StreamingResponse

    from bumblefast.chat import Chat

    chat = Chat(model_path)
    name = model_name or Path(model_path).resolve().name
    turn = threading.Lock()  # one generation at a time; others queue here
    app = FastAPI(title="bumblefast serve")

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > max_body_bytes:
            return error(413, f"request body of {size} bytes is over the limit of {max_body_bytes}")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "bumblefast"}]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE.read_text(encoding="utf-8").replace("{{MODEL}}", name)

    def pieces(req: ChatRequest):
        """Hold the model for one request; yield its reply's text pieces."""
        max_new = req.max_completion_tokens or req.max_tokens or min(256, max_tokens_cap)
        ids = chat._input_ids("", [m.model_dump() for m in req.messages])
        with turn:
            yield from chat.stream(ids, max_new_tokens=max_new, temperature=req.temperature, top_p=req.top_p)

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        body = await request.body()
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
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        if not req.stream:
            text = await asyncio.to_thread(lambda: "".join(pieces(req)))
            return {"id": rid, "object": "chat.completion", "created": created, "model": name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text.strip()},
                                 "finish_reason": "stop"}],
                    "usage": None}

        def chunk(delta: dict, finish: str | None = None) -> str:
            data = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        def events():
            yield chunk({"role": "assistant", "content": ""})
            for piece in pieces(req):
                if piece:
                    yield chunk({"content": piece})
            yield chunk({}, "stop")
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def run(args) -> int:
    import uvicorn

    app = create_app(args.model_path, max_tokens_cap=args.max_tokens_cap, max_body_bytes=args.max_body_bytes)
    print(f"bumblefast serve: http://{args.host}:{args.port}/ (OpenAI API at /v1)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def add_arguments(p) -> None:
    p.add_argument("--model_path", required=True, help="a Hugging Face model folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max_tokens_cap", type=int, default=1024, help="largest max_tokens a request may ask")
    p.add_argument("--max_body_bytes", type=int, default=1 << 20, help="largest request body accepted")
