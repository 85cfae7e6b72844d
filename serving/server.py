"""The HTTP server: an OpenAI-compatible API over one LLM and its Engine.

Routes: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (``"stream": true`` sends
server-sent events ending in ``data: [DONE]``), ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus) and FastAPI's ``/openapi.json`` and ``/docs``. With an API key set,
``/v1/*`` wants ``Authorization: Bearer <key>`` (and every route with ``protect_all``). A full
waiting queue answers 429 with ``Retry-After``; a client that disconnects cancels its request. On
SIGTERM (or SIGINT) the server drains: new requests get 503 while running ones finish, for up to
``drain_timeout`` seconds, after which they are cancelled; then it exits normally.

Limits that keep one client from hurting the others: a request's key is checked, and its declared
size, before its body is read (401, 413); a body is read only up to ``max_body_bytes``; prompts
are tokenised off the event loop; a connection must send its request line and headers within
``header_timeout`` seconds; at most ``max_connections`` are served at once (503 past them).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import time
import uuid
from collections.abc import Sequence
from contextlib import asynccontextmanager

import h11
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from serving.api import (ApiError, ChatCompletionRequest, CompletionRequest, LoadLoraAdapterRequest,
                         UnloadLoraAdapterRequest, chat_messages, completion_prompt,
                         error_body, sampling_params, validation_error)
from serving.engine import Engine, EngineError, QueueFull, Stream
from serving.finetuning import FineTuning
from serving.finetuning import router as fine_tuning_router
from specjax import __version__
from specjax.engine.adapters import AdapterInUse
from specjax.llm import RequestError
from specjax.lora import AdapterError

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
MAX_BODY_BYTES = 16 << 20  # a 128K-token prompt is well under 1 MiB of text, or of token ids in JSON


SUFFIX_CACHE_SCOPES = ("global", "per-key")


def api_keys(api_key: str | Sequence[str] | None, name: str = "api_key") -> tuple[str, ...] | None:
    """One key or several as a tuple (None: serve without one). A key that is set but blank is
    refused: ``Authorization: Bearer`` with nothing after it would pass."""
    if api_key is None:
        return None
    keys = (api_key,) if isinstance(api_key, str) else tuple(api_key)
    if not keys or any(not isinstance(k, str) or not k.strip() for k in keys):
        raise ValueError(f"{name} is set but empty, which would let any client in: give a non-empty key, "
                         "or leave it unset to serve without one")
    return keys


def key_scope(api_key: str) -> str:
    """The suffix-cache scope of a key's requests: a digest, so neither logs nor a saved cache hold the key."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


def _matching_key(authorization: bytes | None, keys: tuple[str, ...]) -> str | None:
    scheme, _, token = (authorization or b"").decode("latin-1").partition(" ")
    token = token.strip().encode()
    # Every key is compared (in constant time each), so the time taken does not say which one matched.
    found = [key for key in keys if secrets.compare_digest(token, key.encode())]
    return found[0] if found and scheme.lower() == "bearer" else None


def host_name(host_header: bytes) -> str:
    """The name in a Host header, without its port ("[::1]:8000" -> "::1")."""
    host = host_header.decode("latin-1").strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class Gate:
    """ASGI middleware that turns a request away before its body is read: a Host header not in
    ``allowed_hosts`` (400; None allows any), a missing or wrong API key (401), a body declared
    larger than ``max_body_bytes`` (413), a body to ``/v1`` that is not declared JSON (400); and
    stops reading a body that grows past the limit (413). A request with a key carries the key's
    ``key_scope`` in ``request.state.key_scope``."""

    def __init__(self, app, *, api_keys: tuple[str, ...] | None, max_body_bytes: int, protect_all: bool,
                 allowed_hosts: tuple[str, ...] | None):
        self.app, self.api_keys, self.max_body_bytes, self.protect_all = app, api_keys, max_body_bytes, protect_all
        self.allowed_hosts = None if allowed_hosts is None else {h.lower().strip("[]") for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_keys is not None and (key := _matching_key(headers.get(b"authorization"), self.api_keys)):
            scope.setdefault("state", {})["key_scope"] = key_scope(key)
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            return await JSONResponse(refusal.body(), status_code=refusal.status, headers=refusal.headers)(
                scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:  # FastAPI answers an HTTPException raised while it reads the body
                raise HTTPException(413, f"the request body is larger than {self.max_body_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)

    def _refusal(self, scope, headers: dict) -> ApiError | None:
        path, method = scope["path"], scope["method"]
        # A web page's script can reach a loopback server under another name (DNS rebinding): only ours answer.
        if self.allowed_hosts is not None and (host := host_name(headers.get(b"host", b""))) not in self.allowed_hosts:
            return ApiError(400, f"this server does not answer to the host {host!r} (see --allowed-hosts)",
                            code="host_not_allowed")
        if self.api_keys is not None and (path.startswith("/v1/") or self.protect_all) and path != "/health":
            if "key_scope" not in scope.get("state", {}):
                return ApiError(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                                type="authentication_error", code="invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return ApiError(400, f"Content-Length is not a number: {length[:20]!r}")
            if int(length) > self.max_body_bytes:
                return ApiError(413, f"the request body ({int(length)} bytes) is larger than {self.max_body_bytes} "
                                     "bytes (the server's --max-body-mb)")
        if method == "POST" and path.startswith("/v1/"):
            if path.startswith("/v1/fine_tuning/jobs/") and path.endswith("/cancel"):
                return None  # takes no body
            kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            upload = path == "/v1/files"
            wanted = b"multipart/form-data" if upload else b"application/json"
            if kind != wanted:
                return ApiError(400, f"send the body as {'a multipart form' if upload else 'JSON'}, with "
                                     f"Content-Type: {wanted.decode()}"
                                     + (f" (got {kind.decode('latin-1')!r})" if kind else " (none was given)"))
            if length == b"0":
                return ApiError(400, "the body is empty: send a JSON object with the request's fields")
        return None


def create_app(engine: Engine, *, model_name: str, api_key: str | Sequence[str] | None = None,
               default_max_tokens: int | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               protect_all: bool = False, allowed_hosts: tuple[str, ...] | None = None,
               expose_speculation_stats: bool = False, suffix_cache_scope: str = "global",
               allow_runtime_lora: bool = False, fine_tuning_dir: str | os.PathLike | None = None,
               checkpoint_every: int = 10) -> FastAPI:
    """The FastAPI app serving ``engine``'s LLM as ``model_name``; it starts and stops the engine.

    ``api_key``: a key, or several, wanted on ``/v1`` (and, with ``protect_all``, on ``/metrics``,
    ``/docs`` and ``/openapi.json`` too; ``/health`` stays open for load balancers).
    ``max_body_bytes``: the largest request body read. ``allowed_hosts``: the names the Host header
    may give (None: any). ``expose_speculation_stats``: add each request's ``speculation``
    statistics to its response (off by default: with a shared suffix cache they reveal what other
    clients generated). ``suffix_cache_scope``: "global", every request drafts from every earlier
    output; "per-key", from the outputs of requests with the same API key only.
    ``allow_runtime_lora``: offer ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``
    (off by default: loading reads a directory a client names on the server's machine). The LLM's
    LoRA adapters are models of their own in ``/v1/models``; a request's ``model`` picks one.
    ``fine_tuning_dir``: offer OpenAI's fine-tuning API (``serving.finetuning``), its files, jobs
    and checkpoints kept there (the LLM must co-serve: ``max_finetune_jobs``); a job checkpoints
    every ``checkpoint_every`` optimizer steps.

    ``default_max_tokens``: the output limit of requests that set none; None follows OpenAI (16 for
    completions, the rest of the context for chat). A request's KV pages grow with its output rather
    than being reserved for its limit up front; when they run out, the newest requests are
    preempted and recomputed later (``specjax_preemptions_total`` counts them).
    """

    keys = api_keys(api_key)
    if suffix_cache_scope not in SUFFIX_CACHE_SCOPES:
        raise ValueError(f"suffix_cache_scope must be one of {', '.join(SUFFIX_CACHE_SCOPES)}, "
                         f"got {suffix_cache_scope!r}")
    if suffix_cache_scope == "per-key" and keys is None:
        raise ValueError("a per-key suffix cache needs API keys to tell clients apart: give one key or more")
    if not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be a positive integer, got {max_body_bytes!r}")

    fine_tuning = (FineTuning(engine, fine_tuning_dir, model_name=model_name, checkpoint_every=checkpoint_every)
                   if fine_tuning_dir is not None else None)

    @asynccontextmanager
    async def lifespan(_app):
        engine.start()
        try:
            if fine_tuning is not None:  # jobs a stopped server left unfinished go on
                await asyncio.wrap_future(engine.call(fine_tuning.resume_unfinished))
            yield
        finally:
            engine.stop()

    app = FastAPI(title="specjax", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible completions and chat over a specjax LLM with continuous batching "
                              "and speculative decoding.")
    app.state.draining = False
    app.add_middleware(Gate, api_keys=keys, max_body_bytes=max_body_bytes, protect_all=protect_all,
                       allowed_hosts=allowed_hosts)
    llm = engine.llm

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

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(accepting)])

    def model_card(adapter: str | None = None) -> dict:
        card = {"id": adapter or model_name, "object": "model", "created": 0, "owned_by": "specjax",
                "max_model_len": llm.max_model_len}
        if adapter is not None:  # as vLLM lists its LoRA adapters
            card.update(parent=model_name, root=adapter)
        return card

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [model_card()] + [model_card(name) for name in llm.adapters]}

    @v1.get("/models/{model:path}")
    async def model(model: str):
        return model_card(check_model(model))

    def check_model(name: str) -> str | None:
        """The LoRA adapter a request's ``model`` names (None: the base model)."""
        if name == model_name:
            return None
        if name in llm.adapters:
            return name
        served = ", ".join(repr(m) for m in [model_name, *llm.adapters])
        raise ApiError(404, f"the model {name!r} does not exist; this server serves {served}", "model",
                       code="model_not_found")

    def runtime_lora() -> None:
        if not allow_runtime_lora:
            raise ApiError(403, "loading and unloading LoRA adapters at run time is off on this server "
                                "(start it with --allow-runtime-lora)", type="permission_error")
        if llm.engine.adapters is None:
            raise ApiError(400, "this server has no adapter slots (start it with --max-loras N)")

    @v1.post("/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraAdapterRequest):
        runtime_lora()
        name = body.lora_name
        if not name.strip() or name != name.strip() or name == model_name or name in llm.adapters:
            why = "is the base model's name" if name == model_name else (
                "is already loaded" if name in llm.adapters else "must be non-empty, without surrounding spaces")
            raise ApiError(400, f"lora_name {name!r} {why}", "lora_name")
        try:  # reading and checking the files takes a while: not on the event loop
            await asyncio.to_thread(llm.add_adapter, name, body.lora_path)
        except AdapterError as e:
            raise ApiError(400, str(e), "lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter {body.lora_name!r} added successfully.")

    @v1.post("/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraAdapterRequest):
        runtime_lora()
        try:
            await asyncio.wrap_future(engine.unload_adapter(body.lora_name))
        except AdapterInUse as e:
            raise ApiError(409, str(e), "lora_name", code="adapter_in_use") from None
        except AdapterError as e:
            raise ApiError(404, str(e), "lora_name", code="model_not_found") from None
        except EngineError as e:
            raise ApiError(503, str(e), type="server_error") from None
        return PlainTextResponse(f"Success: LoRA adapter {body.lora_name!r} removed successfully.")

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
        adapter = check_model(body.model)
        prompt_param = "messages" if chat else "prompt"
        # The LLM caps a limit at the context, so a default may exceed it.
        default = default_max_tokens or (llm.max_model_len if chat else COMPLETION_DEFAULT_MAX_TOKENS)
        params = sampling_params(body, max_tokens if max_tokens is not None else default, limit_param)
        try:  # tokenising a long prompt takes a while: not on the event loop, which serves every stream
            req = await asyncio.to_thread(llm.new_request, prompt, params,
                                          speculation=body.speculation if body.speculation is not None else "default",
                                          cache_scope=request.state.key_scope if suffix_cache_scope == "per-key" else "",
                                          adapter=adapter)
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
        reply = Reply(chat, body.model, llm.tokenizer, params.logprobs, expose_speculation_stats)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(sse(engine, stream, reply, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await complete(engine, request, stream, reply)

    if fine_tuning is not None:
        v1.include_router(fine_tuning_router(fine_tuning))
    app.include_router(v1)
    return app


class Reply:
    """The response bodies of one request, for completions or chat. ``top_logprobs``: the
    alternatives per token its logprobs list, None when it asked for no logprobs."""

    def __init__(self, chat: bool, model: str, tokenizer, top_logprobs: int | None, speculation_stats: bool = False):
        self.chat, self.model, self.speculation_stats = chat, model, speculation_stats
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
        """The request's own speculation statistics, when the server shows them: they tell how much
        a shared suffix cache knew of its text, which other clients' requests may have taught it."""
        spec = output.stats.speculation
        if spec is None or not self.speculation_stats:
            return None
        return {"method": output.stats.speculation_method, "steps": spec.steps, "tau": spec.tau,
                "acceptance_rate": spec.acceptance_rate}

    @staticmethod
    def finish(reason: str | None) -> dict:
        """OpenAI's ``finish_reason`` for ours; a request cancelled by the server ("abort", which
        OpenAI clients do not know) finishes as "stop", with ``finish_detail`` saying so."""
        if reason == "abort":
            return {"finish_reason": "stop", "finish_detail": "abort"}
        return {"finish_reason": reason}

    def full(self, output) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": output.text}}
        else:
            choice = {"index": 0, "text": output.text}
        choice.update(logprobs=self.logprobs(output.logprobs), **self.finish(output.finish_reason))
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
        choice.update(logprobs=None if logprobs is None else self.logprobs(logprobs), **self.finish(finish_reason))
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


class HeaderTimeoutH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection whose request line and headers are not all
    in ``header_timeout`` seconds after it opened or went quiet between requests (uvicorn itself
    waits forever for unfinished headers, so a slow client could hold connections without end)."""

    header_timeout = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._headers_due = self.loop.call_later(self.header_timeout, self._headers_late)

    def data_received(self, data: bytes) -> None:
        if self._headers_due is None and self.conn.their_state is h11.IDLE:  # a next request begins
            self._headers_due = self.loop.call_later(self.header_timeout, self._headers_late)
        super().data_received(data)
        if self._headers_due is not None and self.conn.their_state is not h11.IDLE:  # its headers are in
            self._headers_due.cancel()
            self._headers_due = None

    def connection_lost(self, exc) -> None:
        if self._headers_due is not None:
            self._headers_due.cancel()
        super().connection_lost(exc)

    def _headers_late(self) -> None:
        self._headers_due = None
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self.transport.close()


class Server(uvicorn.Server):
    """uvicorn's server with a draining shutdown.

    The first SIGTERM or SIGINT starts draining: ``/v1`` answers 503 while requests in flight
    finish, for up to ``drain_timeout`` seconds; the rest are then cancelled and the server exits
    normally (status 0). A second signal stops at once.
    """

    def __init__(self, app: FastAPI, engine: Engine, *, host: str = "127.0.0.1", port: int = 8000,
                 drain_timeout: float = 30.0, log_level: str = "info", header_timeout: float = 10.0,
                 max_connections: int = 1024):
        if not header_timeout > 0 or not isinstance(max_connections, int) or max_connections < 1:
            raise ValueError(f"header_timeout must be positive and max_connections a positive integer, got "
                             f"{header_timeout!r} and {max_connections!r}")
        protocol = type("HeaderTimeoutH11", (HeaderTimeoutH11,), {"header_timeout": header_timeout})
        # The grace uvicorn gives open connections once draining is over: the last chunks go out.
        super().__init__(uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol,
                                        limit_concurrency=max_connections, timeout_graceful_shutdown=5))
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
