"""The OpenAI-compatible request bodies, their translation to specjax requests, and error bodies.

Bodies are validated strictly (no "5" for 5, no true for 1) and unknown fields are refused, so a
client learns at once that a setting it relies on (``tools``, ``n`` > 1) is not honoured here.
Every client mistake is an ``ApiError``: an HTTP 4xx with OpenAI's error body
``{"error": {"message", "type", "param", "code"}}``.

Extensions to OpenAI's schema: ``top_k``, ``ignore_eos``, and ``speculation``: "default" (the
server's configured method), "none" (plain decoding), or a method the server's LLM offers
(``LLM.methods``: "tree" with draft models, "suffix" with a suffix cache, both and "hybrid" when
hybrid, and "ngram", prompt lookup, on every server).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from specjax.sampling import MAX_LOGPROBS, SamplingParams, SamplingParamsError


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, *,
                 type: str = "invalid_request_error", code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# -- request bodies ---------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class LoadLoraAdapterRequest(_Body):
    """vLLM's ``POST /v1/load_lora_adapter`` body: the name requests will use as their ``model``,
    and a PEFT adapter directory on the server's machine."""

    lora_name: str
    lora_path: str


class UnloadLoraAdapterRequest(_Body):
    lora_name: str
    lora_int_id: int | None = Field(None, description="Accepted for vLLM's clients, and ignored")


class StreamOptions(_Body):
    include_usage: bool = False


class _Generation(_Body):
    model: str
    max_tokens: int | None = Field(None, description="Tokens to generate at most; the completions default is 16, "
                                                     "chat's the rest of the context")
    temperature: float | None = Field(None, description="0 is greedy; default 1")
    top_p: float | None = None
    top_k: int | None = Field(None, description="Extension: keep the k most likely tokens; 0 keeps all")
    seed: int | None = Field(None, description="Reproducible sampling, in [0, 2**32)")
    stop: str | list[str] | None = None
    n: int | None = Field(None, description="Only 1 is supported")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = Field(None, description="Extension: keep generating past end-of-sequence")
    user: str | None = None
    speculation: str | None = Field(None, description='Extension: "default" (the server\'s speculation), "none" '
                                                      '(plain decoding), "ngram" (prompt lookup), or "tree", '
                                                      '"suffix" or "hybrid" where the server offers it')


class CompletionRequest(_Generation):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description="Each token's log-probability and this many likeliest alternatives")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, description="The same as max_tokens")
    logprobs: bool | None = Field(None, description="Return each token's log-probability")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                     description="With logprobs: this many likeliest alternatives per token")


# -- translation ------------------------------------------------------------------------------
def completion_prompt(prompt) -> str | list[int]:
    """The one prompt of a completions request: text or token ids."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ApiError(400, f"one prompt per request is supported, got {len(prompt)}", "prompt")
        prompt = prompt[0]
    if not prompt:
        raise ApiError(400, "prompt is empty", "prompt")
    return prompt


def chat_messages(messages: list[ChatMessage]) -> list[dict]:
    """Messages as the chat template takes them; text parts are joined into one string."""
    return [{"role": m.role,
             "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
            for m in messages]


def requested_logprobs(body: _Generation) -> int | None:
    """The alternatives per token a request wants with its logprobs, or None for no logprobs."""
    if isinstance(body, ChatCompletionRequest):
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs set to true", "top_logprobs")
        return (body.top_logprobs or 0) if body.logprobs else None
    return body.logprobs


def sampling_params(body: _Generation, max_tokens: int, limit_param: str = "max_tokens") -> SamplingParams:
    """The request's SamplingParams; ``limit_param`` names the field ``max_tokens`` came from."""
    if body.n not in (None, 1):
        raise ApiError(400, f"n must be 1 (one choice per request), got {body.n}", "n")
    settings = dict(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed,
                    stop=body.stop, ignore_eos=body.ignore_eos, logprobs=requested_logprobs(body))
    try:
        return SamplingParams(max_tokens=max_tokens, **{k: v for k, v in settings.items() if v is not None})
    except SamplingParamsError as e:  # its messages start with the setting's name
        name = str(e).split()[0]
        param = limit_param if name == "max_tokens" else name if name in settings else None
        raise ApiError(400, str(e), param) from None


# -- validation errors ------------------------------------------------------------------------
# pydantic names the member of a union it tried (``('stop', 'list[str]', 0)``); a parameter path
# leaves those out.
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|literal\[.*\]|[A-Z]\w*|function-.*)$")


def validation_error(errors: list[dict]) -> ApiError:
    """The 400 for FastAPI's first body validation error, naming the parameter."""
    error = errors[0]
    loc = [part for part in error.get("loc", ()) if part != "body"]
    if error.get("type") == "json_invalid":
        return ApiError(400, f"the body is not valid JSON: {error.get('ctx', {}).get('error', error['msg'])}")
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not _UNION_TAG.match(part):
            path += f".{part}" if path else part
    param = path or None
    if error.get("type") == "extra_forbidden":
        return ApiError(400, f"{param} is not supported by this server", param)
    if error.get("type") == "missing":
        return ApiError(400, f"{param} is required", param)
    return ApiError(400, f"{param}: {error['msg']}" if param else error["msg"], param)
