"""The HTTP server: an OpenAI-compatible API over one LLM and its Engine.

Routes: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (``"stream": true`` sends
server-sent events ending in ``data: [DONE]``), ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus) and FastAPI's ``/openapi.json`` and ``/docs``. With an API key set,
``/v1/*`` wants ``Authorization: Bearer <key>``. A full waiting queue answers 429 with
``Retry-After``; a client that disconnects cancels its request. On SIGTERM (or SIGINT) the server
drains: new requests get 503 while running ones finish, for up to ``drain_timeout`` seconds, after
which they are cancelled; then it exits normally.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from contextlib import asynccontextmanager

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from serving.api import (ApiError, ChatCompletionRequest, CompletionRequest, chat_messages, completion_prompt,
                         error_body, sampling_params, validation_error)
from serving.engine import Engine, EngineError, QueueFull, Stream
from specjax import __version__
from specjax.llm import RequestError

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context


def check_api_key(api_key: str | None, name: str = "api_key") -> None:
    """Refuse a key that is set but blank: ``Authorization: Bearer`` with nothing after it would pass."""
    if api_key is not None and not api_key.strip():
        raise ValueError(f"{name} is set but empty, which would let any client in: give a non-empty key, "
                         "or leave it unset to serve without one")


def create_app(engine: Engine, *, model_name: str, api_key: str | None = None,
               default_max_tokens: int | None = None) -> FastAPI:
    """The FastAPI app serving ``engine``'s LLM as ``model_name``; it starts and stops the engine.

    ``default_max_tokens``: the output limit of requests that set none; None follows OpenAI (16 for
    completions, the rest of the context for chat). A request's KV pages grow with its output rather
    than being reserved for its limit up front; when they run out, the newest requests are
    preempted and recomputed later (``specjax_preemptions_total`` counts them).
    """

    check_api_key(api_key)

    @asynccontextmanager
    async def lifespan(_app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="specjax", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible completions and chat over a specjax LLM with continuous batching "
                              "and speculative decoding.")
    app.state.draining = False
    llm = engine.llm

    async def authorized(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                           type="authentication_error", code="invalid_api_key")

    async def accepting() -> None:
        if app.state.draining:
            raise ApiError(503, "the server is shutting down", type="server_error", headers={"Retry-After": "5"})

    @app.exception_handler(ApiError)
    async def api_error(_request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_request, e: RequestValidationError):
        return await api_error(_request, validation_error(list(e.errors())))

    @app.exception_handler(HTTPException)
    async def http_error(_request, e: HTTPException):
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code,
                            headers=e.headers)

    @app.exception_handler(Exception)
    async def server_error(_request, e: Exception):  # a bug of ours: say so in the API's own format
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)

    @app.get("/health")
    async def health():
        if app.state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized), Depends(accepting)])

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": 0, "owned_by": "specjax",
                "max_model_len": llm.max_model_len}

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{model:path}")
    async def model(model: str):
        check_model(model)
        return model_card()

    def check_model(name: str) -> None:
        if name != model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {model_name!r}", "model",
                           code="model_not_found")

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await generate(request, body, completion_prompt(body.prompt), body.max_tokens, chat=False)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise ApiError(400, "give max_tokens or max_completion_tokens, not both", "max_completion_tokens")
        if body.max_completion_tokens is not None:
            return await generate(request, body, chat_messages(body.messages), body.max_completion_tokens,
                                  chat=True, limit_param="max_completion_tokens")
        return await generate(request, body, chat_messages(body.messages), body.max_tokens, chat=True)

    async def generate(request: Request, body, prompt, max_tokens: int | None, *, chat: bool,
                       limit_param: str = "max_tokens"):
        check_model(body.model)
        prompt_param = "messages" if chat else "prompt"
        # The LLM caps a limit at the context, so a default may exceed it.
        default = default_max_tokens or (llm.max_model_len if chat else COMPLETION_DEFAULT_MAX_TOKENS)
        params = sampling_params(body, max_tokens if max_tokens is not None else default, limit_param)
        try:
            req = llm.new_request(prompt, params, speculation=body.speculation if body.speculation is not None else "default")
        except RequestError as e:
            param = {"prompt": prompt_param, "max_tokens": limit_param}.get(e.param, e.param)
            raise ApiError(400, str(e), param) from None
        except ValueError as e:  # token ids outside the vocabulary, a chat template's complaint
            raise ApiError(400, str(e), prompt_param) from None
        prompt_tokens = len(req.output.prompt_token_ids)
        if max_tokens is not None and prompt_tokens + max_tokens > llm.max_model_len:
            raise ApiError(400, f"{limit_param} is {max_tokens}, but the prompt's {prompt_tokens} tokens leave "
                                f"{llm.max_model_len - prompt_tokens} of the context's {llm.max_model_len}",
                           limit_param)
        try:
            stream = engine.submit(req, asyncio.get_running_loop())
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}; retry later", type="rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
        except EngineError as e:
            raise ApiError(503, str(e), type="server_error") from None
        reply = Reply(chat, model_name, llm.tokenizer, params.logprobs)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(sse(engine, stream, reply, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await complete(engine, request, stream, reply)

    app.include_router(v1)
    return app


class Reply:
    """The response bodies of one request, for completions or chat. ``top_logprobs``: the
    alternatives per token its logprobs list, None when it asked for no logprobs."""

    def __init__(self, chat: bool, model: str, tokenizer, top_logprobs: int | None):
        self.chat, self.model = chat, model
        self.tokenizer, self.top_logprobs = tokenizer, top_logprobs
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._text_offset = 0  # completions' logprobs: where the next scored token's text starts

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def logprobs(self, entries) -> dict | None:
        """OpenAI's logprobs object of ``TokenLogprob`` entries (chat's ``content`` list, or the
        completions' parallel lists, ``top_logprobs`` there holding the chosen token as well)."""
        if self.top_logprobs is None:
            return None
        if self.chat:
            def item(token_id, logprob):
                text = self._token(token_id)
                return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

            return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(*t) for t in e.top]}
                                for e in entries], "refusal": None}
        tokens = [self._token(e.token_id) for e in entries]
        offsets = []
        for text in tokens:
            offsets.append(self._text_offset)
            self._text_offset += len(text)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{**{self._token(i): lp for i, lp in e.top}, text: e.logprob}
                                 for e, text in zip(entries, tokens)],
                "text_offset": offsets}

    def _body(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def usage(self, output) -> dict:
        prompt, completion = len(output.prompt_token_ids), len(output.token_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def speculation(self, output) -> dict | None:
        spec = output.stats.speculation
        if spec is None:
            return None
        return {"method": output.stats.speculation_method, "steps": spec.steps, "tau": spec.tau,
                "acceptance_rate": spec.acceptance_rate}

    def full(self, output) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": output.text}}
        else:
            choice = {"index": 0, "text": output.text}
        choice.update(logprobs=self.logprobs(output.logprobs), finish_reason=output.finish_reason)
        return self._body("chat.completion" if self.chat else "text_completion", [choice], usage=self.usage(output),
                          speculation=self.speculation(output))

    def chunk(self, text: str | None, finish_reason: str | None = None, logprobs: list | None = None,
              **extra) -> dict:
        """A stream chunk: ``text`` (None: none, for the final chunk), chat's first one with the role;
        ``logprobs``: the ``TokenLogprob`` of the tokens behind it, when the request asked."""
        if self.chat:
            delta = {"role": "assistant", "content": ""} if text is None and finish_reason is None else (
                {} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or ""}
        choice.update(logprobs=None if logprobs is None else self.logprobs(logprobs), finish_reason=finish_reason)
        return self._body("chat.completion.chunk" if self.chat else "text_completion", [choice], **extra)

    def usage_chunk(self, output) -> dict:
        return self._body("chat.completion.chunk" if self.chat else "text_completion", [], usage=self.usage(output))


def _event(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def sse(engine: Engine, stream: Stream, reply: Reply, include_usage: bool):
    """The server-sent events of a streamed request; leaving early (a client gone) aborts it. Each
    chunk carries the logprobs of the tokens read since the one before, the last chunk those of
    tokens that gave no text (an end-of-sequence token, a stop string's), so together they are
    the non-streamed response's."""
    sent = 0

    def new_logprobs() -> list | None:
        nonlocal sent
        scored = stream.output.logprobs
        if scored is None:
            return None
        new, sent = scored[sent:stream.tokens_read], stream.tokens_read
        return new

    try:
        if reply.chat:
            yield _event(reply.chunk(None))
        async for text in stream:
            yield _event(reply.chunk(text, logprobs=new_logprobs()))
        output = stream.output
        yield _event(reply.chunk(None, output.finish_reason, logprobs=new_logprobs(),
                                 speculation=reply.speculation(output)))
        if include_usage:
            yield _event(reply.usage_chunk(output))
    except EngineError as e:
        yield _event(error_body(str(e), "server_error"))
    finally:
        if not stream.finished:
            engine.abort(stream)
    yield _event("[DONE]")


async def complete(engine: Engine, request: Request, stream: Stream, reply: Reply) -> Response:
    """A non-streamed request's response, once it finishes; a client that leaves first aborts it."""

    async def read() -> None:
        async for _ in stream:
            pass

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    reader, watcher = asyncio.ensure_future(read()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({reader, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not reader.done():
            return Response(status_code=499)  # nobody is listening
        reader.result()
    except EngineError as e:
        return JSONResponse(error_body(str(e), "server_error"), status_code=500)
    finally:
        watcher.cancel()
        reader.cancel()
        if not stream.finished:
            engine.abort(stream)
    if stream.output.finish_reason == "abort":
        raise ApiError(503, "the request was cancelled: the server is shutting down", type="server_error")
    return JSONResponse(reply.full(stream.output))


class Server(uvicorn.Server):
    """uvicorn's server with a draining shutdown.

    The first SIGTERM or SIGINT starts draining: ``/v1`` answers 503 while requests in flight
    finish, for up to ``drain_timeout`` seconds; the rest are then cancelled and the server exits
    normally (status 0). A second signal stops at once.
    """

    def __init__(self, app: FastAPI, engine: Engine, *, host: str = "127.0.0.1", port: int = 8000,
                 drain_timeout: float = 30.0, log_level: str = "info"):
        # The grace uvicorn gives open connections once draining is over: the last chunks go out.
        super().__init__(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                        timeout_graceful_shutdown=5))
        self.app, self.engine, self.drain_timeout = app, engine, drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig, frame) -> None:
        if self.app.state.draining or self._loop is None:
            super().handle_exit(sig, frame)
            return
        self.app.state.draining = True
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.drain_timeout
        while self.engine.num_unfinished and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.engine.abort_all()
        self.should_exit = True
