"""What a request is, as the engine runs it, and what it gives back."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from specjax.sampling import SamplingParams, TokenLogprob
from specjax.speculation.proposer import Proposer
from specjax.speculation.stats import SpeculationStats

# What a request asks of the engine. Finetuning joins generation in the co-serving engine.
RequestKind = Literal["generate"]


@dataclass
class RequestStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_time_s: float = 0.0  # device time of this request's prefill steps
    ttft_s: float = 0.0  # wall time from the start of generate() to its first token
    decode_time_s: float = 0.0  # time of the steps that produced tokens 2..n (drafting included)
    preemptions: int = 0  # times its pages went to older requests and it was recomputed
    speculation_method: str = "none"  # how it was decoded: its own choice or the LLM's default
    speculation: SpeculationStats | None = None  # set when the request was decoded speculatively

    @property
    def decode_tokens_per_s(self) -> float:
        decoded = self.generated_tokens - 1
        return decoded / self.decode_time_s if decoded > 0 and self.decode_time_s > 0 else 0.0


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS, stop token or stop string), "length", "abort" or "error"
    stats: RequestStats = field(default_factory=RequestStats)
    logprobs: list[TokenLogprob] | None = None  # one per token id, when SamplingParams.logprobs asks
    error: str | None = None  # with finish_reason "error": what failed (the exception; the server logs it)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class RequestError(ValueError):
    """A request the LLM cannot serve; ``param`` names the input at fault ("prompt" or "max_tokens")."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class GenerationError(RuntimeError):
    """Generation failed for some requests (``finish_reason`` "error", ``error`` saying why); the
    others finished normally. ``outputs`` holds every request's output, in order."""

    def __init__(self, outputs: list[RequestOutput]):
        failed = [(i, o) for i, o in enumerate(outputs) if o.finish_reason == "error"]
        super().__init__(f"{len(failed)} of {len(outputs)} requests failed: "
                         + "; ".join(f"request {i}: {o.error}" for i, o in failed))
        self.outputs = outputs


@dataclass(eq=False)  # the scheduler's lists hold requests by identity
class Request:
    """One request as the Scheduler runs it: settings, output so far and decoding state."""

    uid: int  # unique within the LLM: the runner, proposers and unseeded keys know it by this
    params: SamplingParams
    output: RequestOutput
    max_total: int  # prompt + output tokens this request may reach
    kv_limit: int  # the most KV tokens it may hold: max_total, plus what a verification may write past it
    num_prefill: int  # tokens to prefill: the prompt; after a preemption, the prompt and the output so far
    base_key: np.ndarray | None
    stop_ids: frozenset[int]
    detok: object
    proposer: Proposer | None = None  # how it speculates; None: plain decoding
    # Whose earlier outputs its speculation may draft from, and which later requests its own
    # output may serve: requests share caches of outputs (the suffix cache) within a scope only.
    cache_scope: str = ""
    kind: RequestKind = "generate"
    adapter: str | None = None  # the LoRA adapter it runs with (``EngineCore.adapters``); None: the base model
    lora_slot: int = 0  # the adapter's device slot while it runs (0: none)
    arrival: float = field(default_factory=time.perf_counter)  # time to first token counts from here
    prefilled: int = 0
    pending_text: str = ""  # decoded text held back while it could still become a stop string
    # Its verified host drafts' summed scores and the tokens they had accepted (the batch-aware budget's calibration).
    draft_scores: float = 0.0
    draft_accepted: int = 0
    # The kind of step ("prefill" or "decode") it was in when a step of several requests failed: it
    # runs such steps alone until one succeeds, so a failure alone names the request that caused it.
    suspect: str | None = None

    @property
    def speculation(self) -> str:
        return self.output.stats.speculation_method

    @property
    def sequence(self) -> list[int]:
        return self.output.prompt_token_ids + self.output.token_ids
