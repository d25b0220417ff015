"""The OpenAI-compatible HTTP API on rank 0 (FastAPI): ``POST /v1/completions``,
``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``, ``GET /metrics``.

Handlers only check requests, turn them into `Sequence`s for the scheduler and relay
their tokens (JSON, or server-sent events in OpenAI's chunk format ending in ``[DONE]``);
the pipeline runs in rank 0's main thread (`scheduler`). A bad request is HTTP 400 with
OpenAI's error JSON naming the field; a full queue 429, a server still loading or
stopping 503, both with ``Retry-After``. A client that goes away cancels its sequence.

Example::

    state = ServerState(model_name="demo")
    app = make_app(state)            # serve it with uvicorn; /health is 503 until
    state.ready(scheduler, limits, text, eos_ids)
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from .metrics import Metrics
from .params import BadRequest, Limits, chat_params, check_length, completion_params, error_body
from .sequence import Delta, Done, Sequence
from .text import ModelText, TemplateError

__all__ = ["ServerState", "make_app"]

_RETRY_AFTER_S = "1"


class ServerState:
    """What the handlers see: ``loading`` → ``ready`` → ``stopping``."""

    def __init__(self, *, model_name: str, metrics: Metrics | None = None) -> None:
        self.model_name, self.metrics = model_name, metrics or Metrics()
        self.status = "loading"
        self.scheduler = self.limits = self.text = None
        self.eos_ids: tuple[int, ...] = ()
        self.created = int(time.time())
        self.port: int | None = None

    def ready(self, scheduler, limits: Limits, text: ModelText, eos_ids) -> None:
        self.scheduler, self.limits, self.text = scheduler, limits, text
        self.eos_ids = tuple(eos_ids)
        self.status = "ready"

    def stopping(self) -> None:
        self.status = "stopping"


def _error(e: BadRequest) -> JSONResponse:
    headers = {"Retry-After": _RETRY_AFTER_S} if e.status in (429, 503) else None
    return JSONResponse(error_body(str(e), type=e.type, param=e.param, code=e.code),
                        status_code=e.status, headers=headers)


def _unavailable(state: ServerState) -> BadRequest:
    what = "is still loading" if state.status == "loading" else "is stopping"
    return BadRequest(f"the server {what}; retry later", status=503, type="server_error",
                      code="unavailable")


def make_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="distload", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = state.metrics

    @app.get("/health")
    async def health():
        code = 200 if state.status == "ready" else 503
        metrics.request("/health", code)
        return JSONResponse({"status": state.status}, status_code=code,
                            headers=None if code == 200 else {"Retry-After": _RETRY_AFTER_S})

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        metrics.request("/v1/models", 200)
        card = {"id": state.model_name, "object": "model", "created": state.created,
                "owned_by": "distload"}
        if state.limits is not None:
            card["max_model_len"] = state.limits.max_seq_len
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _generate(request, chat=True)

    async def _generate(request: Request, *, chat: bool):
        endpoint = request.url.path
        try:
            seq, params, queue = await _admit(request, chat)
        except BadRequest as e:
            metrics.request(endpoint, e.status)
            return _error(e)
        metrics.request(endpoint, 200)
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if params.stream:
            return StreamingResponse(_stream(seq, queue, params, ident, chat),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _whole(request, seq, queue, ident, chat)

    async def _admit(request: Request, chat: bool):
        if state.status != "ready":
            raise _unavailable(state)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(f"the request body is not valid JSON: {exc}") from None
        limits, text = state.limits, state.text
        params = (chat_params if chat else completion_params)(body, limits)
        prompt_key = "messages" if chat else "prompt"
        try:
            if chat:
                ids = text.chat_ids(params.prompt)
            elif isinstance(params.prompt, str):
                ids = text.encode(params.prompt)
            else:
                ids = list(params.prompt)
        except (TemplateError, ValueError) as exc:
            raise BadRequest(str(exc), prompt_key) from None
        if not ids:
            raise BadRequest(f"'{prompt_key}' gives no tokens", prompt_key)
        if any(not 0 <= t < limits.vocab_size for t in ids):
            raise BadRequest(f"the tokenizer gives ids outside the model's vocabulary "
                             f"[0, {limits.vocab_size})", prompt_key)
        max_tokens = check_length(ids, params.max_tokens, limits, prompt_key=prompt_key,
                                  key=params.max_tokens_key)
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event) -> None:  # the scheduler's thread
            loop.call_soon_threadsafe(queue.put_nowait, event)

        seq = Sequence(prompt=ids, max_tokens=max_tokens, sampling=params.sampling,
                       stop_ids=frozenset(state.eos_ids) | frozenset(params.stop_ids),
                       stop_strings=params.stop_strings, text=text, emit=emit)
        scheduler = state.scheduler
        if not scheduler.submit(seq):
            if scheduler.draining:
                raise _unavailable(state)
            raise BadRequest(f"the server's queue is full ({scheduler.max_queue} requests "
                             f"waiting); retry later", status=429, type="rate_limit_error",
                             code="rate_limit_exceeded")
        return seq, params, queue

    def _usage(done: Done) -> dict:
        return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                "total_tokens": done.prompt_tokens + done.completion_tokens}

    async def _whole(request: Request, seq: Sequence, queue: asyncio.Queue, ident: str,
                     chat: bool):
        ids: list[int] = []
        try:
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), 0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return Response(status_code=499)
                    continue
                if isinstance(event, Delta):
                    ids += event.token_ids
                    continue
                if event.error is not None:
                    return _error(BadRequest(f"the request was not finished: {event.error}",
                                             status=503, type="server_error", code="aborted"))
                choice = {"index": 0, "finish_reason": event.finish_reason, "logprobs": None,
                          "token_ids": ids}
                if chat:
                    choice["message"] = {"role": "assistant", "content": seq.generated_text}
                else:
                    choice["text"] = seq.generated_text
                return {"id": ident, "object": "chat.completion" if chat else "text_completion",
                        "created": int(time.time()), "model": state.model_name,
                        "choices": [choice], "usage": _usage(event)}
        finally:
            seq.cancel()  # a no-op for the scheduler once finished; frees it otherwise

    async def _stream(seq: Sequence, queue: asyncio.Queue, params, ident: str, chat: bool):
        created, kind = int(time.time()), "chat.completion.chunk" if chat else "text_completion"

        def chunk(choice: dict | None, usage: dict | None = None) -> str:
            body = {"id": ident, "object": kind, "created": created, "model": state.model_name,
                    "choices": [] if choice is None else [{"index": 0, "logprobs": None, **choice}]}
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        try:
            if chat:
                yield chunk({"delta": {"role": "assistant", "content": ""}, "finish_reason": None})
            while True:
                event = await queue.get()
                if isinstance(event, Delta):
                    content = {"delta": {"content": event.text}} if chat else {"text": event.text}
                    yield chunk({**content, "finish_reason": None, "token_ids": event.token_ids})
                    continue
                if event.error is not None:
                    body = error_body(f"the request was not finished: {event.error}",
                                      type="server_error", code="aborted")
                    yield f"data: {json.dumps(body)}\n\n"
                else:
                    empty = {"delta": {}} if chat else {"text": ""}
                    yield chunk({**empty, "finish_reason": event.finish_reason})
                    if params.include_usage:
                        yield chunk(None, _usage(event))
                yield "data: [DONE]\n\n"
                return
        finally:
            seq.cancel()

    return app
