"""The offline generation API: ``LLM(model).generate(prompts, SamplingParams)``.

A thin facade over the engine the server steps too: ``engine.core.EngineCore`` (the model, its
speculation methods, request validation and steps) and ``engine.scheduler.Scheduler``
(continuous batching with preemption). Everything the user can get wrong is checked before the
first compilation.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator, Mapping, Sequence, Union

import numpy as np

from specjax.checkpoints import LoadedModel, load_model
from specjax.config import resolve_dtype
from specjax.engine.coserving import SLO
from specjax.engine.core import EngineCore
from specjax.engine.request import GenerationError, Request, RequestError, RequestOutput, RequestStats
from specjax.engine.scheduler import Scheduler
from specjax.engine.warmup import run_warm_up
from specjax.lora import AdapterError, LoraAdapter
from specjax.runner import EngineConfig
from specjax.sampling import SamplingParams
from specjax.speculation.speculator import TreeSpeculation

__all__ = ["GenerationError", "LLM", "Prompt", "Request", "RequestError", "RequestOutput", "RequestStats",
           "SamplingParams"]

Message = dict
Prompt = Union[str, Sequence[int], Sequence[Message]]


class LLM:
    """A model loaded for generation.

    >>> llm = LLM("smollm2-135m")
    >>> out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=16))

    Speculative decoding, lossless for greedy and sampled requests alike:

    >>> llm = LLM("smollm2-135m", speculation=TreeSpeculation(
    ...     drafts=["smollm2-135m-draft-a", "smollm2-135m-draft-b"], expansion=(1, 1, 3, 1, 1, 1, 1, 1)))

    Or without a draft model, from a suffix cache of the prompts and of earlier outputs (agentic,
    repetitive work), alone or falling back to draft-model trees where it has nothing to offer,
    or from n-grams of the request's own tokens:

    >>> llm = LLM("smollm2-135m", speculation=SuffixSpeculation())
    >>> llm = LLM("smollm2-135m", speculation=HybridSpeculation(
    ...     suffix=SuffixSpeculation(), tree=TreeSpeculation(drafts=["smollm2-135m-draft-a"], expansion=(1,) * 4)))
    >>> llm = LLM("smollm2-135m", speculation=NgramSpeculation(num_speculative_tokens=8))
    """

    def __init__(self, model: str | os.PathLike | LoadedModel = "smollm2-135m", *, dtype: str = "auto",
                 engine: EngineConfig | None = None, seed: int | None = None,
                 draft: str | os.PathLike | LoadedModel | None = None, num_speculative_tokens: int = 4,
                 speculation=None, adapters: Mapping[str, str | os.PathLike | LoraAdapter] | None = None,
                 slo: SLO | None = None):
        """``model``: a built-in name, a GGUF file, an HF or specjax checkpoint directory, or a
        LoadedModel (``dtype`` is then ignored). On a CPU, bf16 weights are stored as bf16 bits and
        computed with in fp32 (``params.inference_params``).

        ``speculation``: the settings of a registered speculation method: token trees from draft
        models (``TreeSpeculation``), from a suffix cache (``SuffixSpeculation``), from either per
        request and step (``HybridSpeculation``), from n-gram lookup (``NgramSpeculation``).
        ``draft`` with ``num_speculative_tokens`` is the short form of a chain from one draft,
        ``TreeSpeculation(drafts=[draft], expansion=(1,) * num_speculative_tokens)``.

        ``adapters``: LoRA adapters by name (PEFT directories, or ``lora.LoraAdapter``s) that
        requests may run with (``generate(..., adapter=name)``), any mix in one batch. Without
        ``engine.max_loras``, the engine gets a slot per adapter, up to 4.

        ``slo``: the latency targets inference keeps while finetuning jobs share its steps
        (``engine.max_finetune_jobs``; ``engine.coserving``).
        """
        if draft is not None and speculation is not None:
            raise ValueError("give either draft= (a chain) or speculation=TreeSpeculation(...), not both")
        if not isinstance(num_speculative_tokens, int) or not 1 <= num_speculative_tokens < 128:
            raise ValueError(f"num_speculative_tokens must be in [1, 127], got {num_speculative_tokens}")
        if draft is not None:
            speculation = TreeSpeculation(drafts=(draft,), expansion=(1,) * num_speculative_tokens,
                                          max_nodes=num_speculative_tokens + 1)
        adapters = dict(adapters or {})
        if adapters and not (engine or EngineConfig()).max_loras:
            engine = dataclasses.replace(engine or EngineConfig(), max_loras=min(len(adapters), 4))
        loaded = model if isinstance(model, LoadedModel) else load_model(model, dtype=resolve_dtype(dtype))
        self.engine = EngineCore(loaded, engine=engine, speculation=speculation, seed=seed, slo=slo)
        self.runner = self.engine.runner
        self.config, self.tokenizer = self.engine.config, self.engine.tokenizer
        self.model_name, self.weights = self.engine.model_name, self.engine.weights
        self.speculation = speculation
        for name, source in adapters.items():
            self.add_adapter(name, source)

    # -- LoRA adapters ---------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        """The names of the LoRA adapters requests may use."""
        return self.engine.adapters.names() if self.engine.adapters is not None else []

    def add_adapter(self, name: str, source: str | os.PathLike | LoraAdapter) -> None:
        """Serve a LoRA adapter (a PEFT directory or a ``LoraAdapter``) as ``name``; the engine
        needs adapter slots (``EngineConfig.max_loras``, or ``adapters=`` when built)."""
        if self.engine.adapters is None:
            raise AdapterError("this LLM has no adapter slots: build it with adapters= or EngineConfig(max_loras=N)")
        self.engine.adapters.add(name, source)

    def remove_adapter(self, name: str) -> None:
        """Stop serving ``name`` (``AdapterInUse`` while a request runs with it)."""
        if self.engine.adapters is None:
            raise AdapterError(f"no adapter named {name!r} is loaded")
        self.engine.adapters.remove(name)

    @property
    def method(self) -> str:
        """The speculation method requests get by default ("none": plain decoding)."""
        return self.engine.method

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods requests may ask for."""
        return self.engine.methods

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def compile_time_s(self) -> float:
        """Seconds spent compiling steps so far (never counted in any step's time)."""
        return self.engine.compile_time_s

    def warm_up(self, max_len: int | None = None, progress=None, finetune_lora=None) -> int:
        """Compile every step shape the methods this LLM offers meet for sequences of up to
        ``max_len`` tokens (default ``max_model_len``): plain decoding and prompt chunks, host
        trees of every size bucket its proposers draft, and the draft models' tree steps, at every
        batch and prefix bucket. The target's steps also run once on empty rows (a first run is
        slow); the draft-model tree steps are compiled only. A compilation stalls every request
        in the batch, so a server compiles before it takes traffic, as vLLM captures its CUDA
        graphs at start-up. Returns how many shapes were new; ``progress(done, total)`` is called
        after each. Shapes still left to first use: draft-model steps with logprobs, those after
        suffix steps (hybrid), whose drafts have more tokens to catch up on, and the methods
        offered with default settings (n-gram lookup). On a CPU the warm-up refuses, before
        compiling most of it, one that would pass the process's memory-map limit
        (``engine.warmup.run_warm_up``). ``finetune_lora`` (a ``LoraConfig``; co-serving engines):
        also compile the steps that slices of finetuning jobs with those adapter settings run in."""
        return run_warm_up(self.warm_up_jobs(max_len, finetune_lora), self.runner.longest(max_len), progress)

    def warm_up_jobs(self, max_len: int | None = None, finetune_lora=None) -> dict[str, list]:
        """What ``warm_up`` would do, undone, by kind ("step", "verify", "draft prompt", "tree
        step", "finetune"): a thunk per step shape not yet compiled (and run)."""
        return self.engine.warm_up_jobs(max_len, finetune_lora)

    @property
    def suffix_cache(self):
        """The global suffix cache (``SuffixCache``) of suffix or hybrid speculation, else None."""
        suffix = self.engine.proposers.get("suffix")
        return suffix.cache if suffix is not None else None

    def save_suffix_cache(self, path: str | os.PathLike) -> None:
        """Save the suffix cache's earlier responses, to start another LLM from them
        (``SuffixSpeculation(cache_file=path)``)."""
        if self.suffix_cache is None:
            raise ValueError("this LLM does not speculate from a suffix cache")
        self.suffix_cache.save(path)

    # -- requests ---------------------------------------------------------------------------
    def new_request(self, prompt: Prompt, params: SamplingParams, *, speculation: str = "default",
                    cache_scope: str = "", adapter: str | None = None) -> Request:
        """One validated request for a Scheduler (``RequestError`` names the input at fault).
        ``speculation``: one of ``methods`` ("none": plain steps), or "default" (``method``).
        ``cache_scope``: requests share the suffix cache's outputs only within one scope (a
        server gives each API key its own with ``--suffix-cache-scope per-key``); "" is shared.
        ``adapter``: a LoRA adapter's name (None: the base model)."""
        return self.engine.make_request(prompt, params, speculation, cache_scope=cache_scope, adapter=adapter)

    def _requests(self, prompts, sampling_params, adapter=None) -> list[Request]:
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and (isinstance(prompts[0], dict) or isinstance(prompts[0], (int, np.integer)))):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise TypeError("prompts must be a prompt or a non-empty list of prompts")
        if sampling_params is None:
            sampling_params = SamplingParams()
        params_list = (list(sampling_params) if isinstance(sampling_params, (list, tuple))
                       else [sampling_params] * len(prompts))
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} SamplingParams")
        for p in params_list:
            if not isinstance(p, SamplingParams):
                raise TypeError(f"expected SamplingParams, got {type(p).__name__}")
        adapters = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * len(prompts)
        if len(adapters) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(adapters)} adapters")
        return [self.engine.make_request(p, sp, label=f"prompt {i}", adapter=a)
                for i, (p, sp, a) in enumerate(zip(prompts, params_list, adapters))]

    # -- public API ----------------------------------------------------------------------------
    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 adapter: str | None | Sequence[str | None] = None) -> list[RequestOutput]:
        """Generate for one prompt or a list: strings, token-id lists, or chat message lists;
        ``adapter``: the LoRA adapter every prompt runs with, or one per prompt (None: the base model).

        A request whose generation fails does not stop the others: once they finish, this raises
        ``GenerationError``, whose ``outputs`` hold every request's output."""
        requests = self._requests(prompts, sampling_params, adapter)
        for _ in self._run(requests):
            pass
        outputs = [r.output for r in requests]
        if any(o.finish_reason == "error" for o in outputs):
            raise GenerationError(outputs)
        return outputs

    def chat(self, messages, sampling_params: SamplingParams | None = None) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of messages) or a list of conversations."""
        if isinstance(messages, (list, tuple)) and messages and isinstance(messages[0], dict):
            messages = [messages]
        return self.generate(list(messages), sampling_params)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the text of one request as it is generated; the final RequestOutput is ``.last_output``."""
        (request,) = self._requests([prompt], sampling_params)
        self.last_output = request.output
        for req, delta in self._run([request]):
            if delta:
                yield delta
        if request.output.finish_reason == "error":
            raise GenerationError([request.output])

    def scheduler(self, *, interleave: bool = False) -> Scheduler:
        """A Scheduler of this LLM's engine (the server steps one for its whole life)."""
        return Scheduler(self.engine, interleave=interleave)

    def _run(self, requests: list[Request]) -> Iterator[tuple[Request, str]]:
        scheduler = self.scheduler()
        for req in requests:
            scheduler.add(req)
        try:
            while scheduler.has_work:
                for req, delta, _ in scheduler.step():
                    yield req, delta
        finally:
            for req in scheduler.running + list(scheduler.waiting):  # an abandoned stream must not leak pages
                scheduler.abort(req)
