"""The offline generation API: ``LLM(model).generate(prompts, SamplingParams)``.

Requests are scheduled onto the ModelRunner with continuous batching (``Scheduler``): up to
``max_num_seqs`` run at once; a request joins with KV pages for its prompt and one step, and its
pages grow as it does. When they run out, the most recently admitted requests are preempted: their
pages are freed and they are recomputed later from their prompt and output so far (vLLM's
recompute policy). A finished request frees its pages and the next waiting one joins. Steps that
have prompt chunks to prefill run before decode steps. Everything the user can get wrong is
checked before the first compilation. The server (``serving.engine``) runs the same Scheduler,
one step at a time.
"""

from __future__ import annotations

import os
import secrets
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Literal, Sequence, Union, get_args

import jax
import jax.numpy as jnp
import numpy as np

from specjax.checkpoints import LoadedModel, load_model
from specjax.config import resolve_dtype
from specjax.params import inference_params
from specjax.runner import EngineConfig, ModelRunner, StepInput
from specjax.sampling import SamplingParams, TokenLogprob, request_key
from specjax.speculation.budget import SpeculationBudget, StepCostModel, calibrate, draft_gains
from specjax.speculation.speculator import TreeSpeculation, TreeSpeculator
from specjax.speculation.stats import SpeculationStats
from specjax.speculation.suffix import HybridSpeculation, SuffixSpeculation, SuffixSpeculator, draft_trees
from specjax.speculation.tree import TREE_SIZES, tree_bucket

HYBRID_PRIOR_STEPS = 4  # pseudo draft-model steps of one accepted token each, in hybrid's bar

# How a request is decoded: plain steps, draft-model trees, suffix-cache trees, or either per step.
SpeculationMethod = Literal["none", "tree", "suffix", "hybrid"]
DRAFT_METHODS = ("tree", "hybrid")  # the methods that run the draft models
SUFFIX_METHODS = ("suffix", "hybrid")  # the methods that ask the suffix cache for drafts

Message = dict
Prompt = Union[str, Sequence[int], Sequence[Message]]


@dataclass
class RequestStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_time_s: float = 0.0  # device time of this request's prefill steps
    ttft_s: float = 0.0  # wall time from the start of generate() to its first token
    decode_time_s: float = 0.0  # time of the steps that produced tokens 2..n (drafting included)
    preemptions: int = 0  # times its pages went to older requests and it was recomputed
    speculation_method: SpeculationMethod = "none"  # how it was decoded: its own choice or the LLM's default
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
    finish_reason: str | None = None  # "stop" (EOS, stop token or stop string), "length" or "abort"
    stats: RequestStats = field(default_factory=RequestStats)
    logprobs: list[TokenLogprob] | None = None  # one per token id, when SamplingParams.logprobs asks

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class RequestError(ValueError):
    """A request the LLM cannot serve; ``param`` names the input at fault ("prompt" or "max_tokens")."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def _max_map_count() -> int | None:
    """Linux's limit on a process's memory mappings (None where unknown)."""
    try:
        return int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return None


def _maps_in_use() -> int:
    with open("/proc/self/maps", "rb") as maps:
        return sum(1 for _ in maps)


@dataclass(eq=False)  # the scheduler's lists hold requests by identity
class Request:
    """One request as the Scheduler runs it: settings, output so far and decoding state."""

    uid: int  # unique within the LLM: the runner, drafts, suffix cache and unseeded keys know it by this
    params: SamplingParams
    output: RequestOutput
    max_total: int  # prompt + output tokens this request may reach
    kv_limit: int  # the most KV tokens it may hold: max_total, plus the tree depth a verification writes ahead
    num_prefill: int  # tokens to prefill: the prompt; after a preemption, the prompt and the output so far
    base_key: np.ndarray | None
    stop_ids: frozenset[int]
    detok: object
    arrival: float = field(default_factory=time.perf_counter)  # time to first token counts from here
    prefilled: int = 0
    pending_text: str = ""  # decoded text held back while it could still become a stop string
    # Its verified suffix drafts' summed scores and the tokens they had accepted (the batch-aware budget's calibration).
    draft_scores: float = 0.0
    draft_accepted: int = 0

    @property
    def speculation(self) -> SpeculationMethod:
        return self.output.stats.speculation_method


class LLM:
    """A model loaded for generation.

    >>> llm = LLM("smollm2-135m")
    >>> out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=16))

    Speculative decoding, lossless for greedy and sampled requests alike:

    >>> llm = LLM("smollm2-135m", speculation=TreeSpeculation(
    ...     drafts=["smollm2-135m-draft-a", "smollm2-135m-draft-b"], expansion=(1, 1, 3, 1, 1, 1, 1, 1)))

    Or without a draft model, from a suffix cache of the prompts and of earlier outputs (agentic,
    repetitive work), alone or falling back to draft-model trees where it has nothing to offer:

    >>> llm = LLM("smollm2-135m", speculation=SuffixSpeculation())
    >>> llm = LLM("smollm2-135m", speculation=HybridSpeculation(
    ...     suffix=SuffixSpeculation(), tree=TreeSpeculation(drafts=["smollm2-135m-draft-a"], expansion=(1,) * 4)))
    """

    def __init__(self, model: str | os.PathLike | LoadedModel = "smollm2-135m", *, dtype: str = "auto",
                 engine: EngineConfig | None = None, seed: int | None = None,
                 draft: str | os.PathLike | LoadedModel | None = None, num_speculative_tokens: int = 4,
                 speculation: TreeSpeculation | SuffixSpeculation | HybridSpeculation | None = None):
        """``model``: a built-in name, a GGUF file, an HF or specjax checkpoint directory, or a
        LoadedModel (``dtype`` is then ignored). On a CPU, bf16 weights are stored as bf16 bits and
        computed with in fp32 (``params.inference_params``).

        ``speculation``: token trees from draft models (``TreeSpeculation``), from a suffix cache
        (``SuffixSpeculation``) or from either per request and step (``HybridSpeculation``).
        ``draft`` with ``num_speculative_tokens`` is the short form of a chain from one draft,
        ``TreeSpeculation(drafts=[draft], expansion=(1,) * num_speculative_tokens)``.
        """
        if draft is not None and speculation is not None:
            raise ValueError("give either draft= (a chain) or speculation=TreeSpeculation(...), not both")
        if not isinstance(num_speculative_tokens, int) or not 1 <= num_speculative_tokens < 128:
            raise ValueError(f"num_speculative_tokens must be in [1, 127], got {num_speculative_tokens}")
        if draft is not None:
            speculation = TreeSpeculation(drafts=(draft,), expansion=(1,) * num_speculative_tokens,
                                          max_nodes=num_speculative_tokens + 1)
        if speculation is not None and not isinstance(speculation, (TreeSpeculation, SuffixSpeculation,
                                                                    HybridSpeculation)):
            raise TypeError("speculation must be a TreeSpeculation, SuffixSpeculation or HybridSpeculation, "
                            f"got {type(speculation).__name__}")
        hybrid = speculation if isinstance(speculation, HybridSpeculation) else None
        tree = hybrid.tree if hybrid else speculation if isinstance(speculation, TreeSpeculation) else None
        suffix = hybrid.suffix if hybrid else speculation if isinstance(speculation, SuffixSpeculation) else None
        loaded = model if isinstance(model, LoadedModel) else load_model(model, dtype=resolve_dtype(dtype))
        params = inference_params(loaded.params)
        self.weights = ("bfloat16 weights, fp32 arithmetic" if params.layers.wqkv.dtype == jnp.uint16
                        else jnp.dtype(params.layers.wqkv.dtype).name)
        if loaded.tokenizer is None:
            raise ValueError(f"{loaded.source} has no tokenizer; LLM needs one to turn text into tokens")
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.model_name = loaded.source
        self.runner = ModelRunner(loaded.config, params, engine or EngineConfig())
        self.speculation = speculation
        # What requests may ask for; the configured method is their default.
        self.method: SpeculationMethod = ("hybrid" if hybrid else "tree" if tree else "suffix" if suffix else "none")
        self.methods: tuple[SpeculationMethod, ...] = tuple(
            m for m in get_args(SpeculationMethod) if m in ("none", self.method) or self.method == "hybrid")
        self.speculator = None
        if tree is not None:
            self.speculator = TreeSpeculator(self.runner, [_load_draft(d, loaded) for d in tree.drafts],
                                             tree.tree_shapes())
            if not (self._fits(self.speculator.depth + 2) and self.speculator.fits(2)):
                raise ValueError(f"a tree of depth {self.speculator.depth} with {tree.max_nodes} nodes does "
                                 "not fit the KV cache: lower max_nodes or the expansion, or raise kv_cache_bytes")
        self.suffix = SuffixSpeculator(suffix) if suffix is not None else None
        self.budget = None  # batch-aware suffix speculation's per-step sizes
        if suffix is not None and suffix.batch_aware:
            if hybrid:
                raise ValueError("batch_aware suffix speculation does not combine with draft models yet")
            self.budget = SpeculationBudget(StepCostModel(), tree_bucket(1 + suffix.max_spec_tokens))
            # The corners of the batch x tree grid; steps as they run fill in the rest.
            calibrate(self.runner, self.budget.cost, (1, self.runner.engine.max_num_seqs),
                      (1, self.budget.max_tree), repeats=2)
        self._min_score = hybrid.min_score if hybrid else None
        self._draft_record = [0, 0]  # tokens accepted in draft-model steps, and those steps (hybrid's bar)
        # Unseeded requests draw from this key; seeded ones are reproducible in any batch or run.
        self._global_key = jax.random.key(seed if seed is not None else secrets.randbits(63))
        self._requests_started = 0

    @property
    def max_model_len(self) -> int:
        return self.runner.max_model_len

    @property
    def compile_time_s(self) -> float:
        """Seconds spent compiling steps so far (never counted in any step's time)."""
        return self.runner.compile_time_s + (self.speculator.all_compile_time_s if self.speculator else 0.0)

    def warm_up(self, max_len: int | None = None, progress=None) -> int:
        """Compile every step shape the methods this LLM offers meet for sequences of up to
        ``max_len`` tokens (default ``max_model_len``): plain decoding and prompt chunks, suffix
        trees of every size bucket up to ``max_spec_tokens``, and the draft models' tree steps, at
        every batch and prefix bucket. The target's steps also run once on empty rows (a first
        run is slow); the draft-model tree steps are compiled only. A compilation stalls every request
        in the batch, so a server compiles before it takes traffic, as vLLM captures its CUDA
        graphs at start-up. Returns how many shapes were new; ``progress(done, total)`` is called
        after each. Shapes still left to first use: draft-model steps with logprobs, and those
        after suffix steps (hybrid), whose drafts have more tokens to catch up on.

        On a CPU, XLA maps each kernel of an executable into the process's memory on its own
        (code, data and read-only mappings: about 280 for a SmolLM2-135M step, 800 for a tree step
        with a draft model), and past Linux's per-process ``vm.max_map_count`` compiling aborts the
        process. So there the first shape of each kind is compiled first, and if the rest would
        pass the limit, ValueError says so before they are compiled."""
        jobs = {kind: list(todo) for kind, todo in self.warm_up_jobs(max_len).items() if todo}
        total, done = sum(map(len, jobs.values())), 0

        def run(job) -> None:
            nonlocal done
            job()
            done += 1
            if progress is not None:
                progress(done, total)

        max_maps = _max_map_count() if jax.default_backend() == "cpu" else None
        if max_maps is not None:
            need = 0
            for todo in jobs.values():
                before = _maps_in_use()
                run(todo.pop(0))
                need += (_maps_in_use() - before) * len(todo)
            need += _maps_in_use()
            if need > max_maps:
                raise ValueError(
                    f"compiling the {total} step shapes of sequences up to {self.runner.longest(max_len)} tokens "
                    f"would take about {need} memory mappings, more than this process may hold "
                    f"(vm.max_map_count = {max_maps}): warm up shorter sequences or a smaller max batch, or "
                    "raise vm.max_map_count")
        for todo in jobs.values():
            for job in todo:
                run(job)
        return total

    def warm_up_jobs(self, max_len: int | None = None) -> dict[str, list]:
        """What ``warm_up`` would do, undone, by kind ("step", "verify", "draft prompt", "tree
        step"): a thunk per step shape not yet compiled (and run)."""
        tree_sizes = ()
        if self.suffix is not None:
            largest = tree_bucket(1 + self.suffix.settings.max_spec_tokens)
            tree_sizes = tuple(s for s in TREE_SIZES if s <= largest)
        jobs = self.runner.warm_up_jobs(tree_sizes, max_len)
        if self.speculator is not None:
            jobs.update(self.speculator.warm_up_jobs(max_len))
        return jobs

    def _hybrid_bar(self) -> float:
        """The score a suffix draft needs for hybrid speculation to take it over the draft models."""
        if self._min_score is not None:
            return self._min_score
        # Smoothed towards one token a step, so one unlucky draft step cannot drop the bar to zero
        # (the suffix cache would then win every later step and the record never recover).
        accepted, steps = self._draft_record
        return (accepted + HYBRID_PRIOR_STEPS) / (steps + HYBRID_PRIOR_STEPS)

    @property
    def suffix_cache(self):
        """The global suffix cache (``SuffixCache``) of suffix or hybrid speculation, else None."""
        return self.suffix.cache if self.suffix else None

    def save_suffix_cache(self, path: str | os.PathLike) -> None:
        """Save the suffix cache's earlier responses, to start another LLM from them
        (``SuffixSpeculation(cache_file=path)``)."""
        if self.suffix is None:
            raise ValueError("this LLM does not speculate from a suffix cache")
        self.suffix.cache.save(path)

    def _extra_tokens(self, method: SpeculationMethod) -> int:
        """Cache positions a sequence needs past its last token: a verified draft-model tree writes
        its depth ahead (suffix drafts are cut to the tokens still allowed)."""
        return self.speculator.depth if method in DRAFT_METHODS else 0

    def _method(self, choice: str) -> SpeculationMethod:
        """The method a request's ``speculation`` names ("default": the LLM's own)."""
        if choice == "default":
            return self.method
        if choice not in self.methods:
            offered = ", ".join(f'"{m}"' for m in ("default",) + self.methods)
            default = f'"default" is {self.method}' if self.method != "none" else "no speculation is configured"
            raise RequestError(f"speculation must be one of {offered} ({default}), got {choice!r}", "speculation")
        return choice

    def _fits(self, num_tokens: int) -> bool:
        return self.runner.pages.pages_for(num_tokens) <= self.runner.pages.num_pages

    # -- inputs ---------------------------------------------------------------------------------
    def _prompt_ids(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            text = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True)
            return text, self.tokenizer.encode(text, add_special_tokens=False)
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, (int, np.integer)) for t in prompt):
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.config.vocab_size})")
            return None, ids
        raise TypeError("a prompt is a string, a non-empty list of token ids, or a non-empty list of chat messages "
                        f"({{'role': ..., 'content': ...}}); got {type(prompt).__name__}")

    def _make_request(self, uid: int, label: str, prompt: Prompt, params: SamplingParams,
                      speculation: str = "default") -> Request:
        method = self._method(speculation)
        text, ids = self._prompt_ids(prompt)
        if not ids:
            raise RequestError(f"{label} is empty after tokenization", "prompt")
        if len(ids) >= self.max_model_len:
            raise RequestError(f"{label} has {len(ids)} tokens; the context holds {self.max_model_len} "
                               "(prompt plus at least one generated token)", "prompt")
        max_total = min(len(ids) + params.max_tokens, self.max_model_len)
        kv_limit = max_total + self._extra_tokens(method)
        if not self._fits(kv_limit):  # alone, it must always be able to finish
            raise RequestError(f"{label} needs {kv_limit} tokens of KV cache; the pool "
                               f"holds {self.runner.pages.num_pages * self.runner.pages.page_size}", "max_tokens")
        if method in DRAFT_METHODS and not self.speculator.fits(max_total):
            raise RequestError(f"{label} needs {max_total} tokens and the tree's scratch in each draft's KV "
                               "cache, more than a draft's pool holds", "max_tokens")
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(self.tokenizer.eos_token_ids)
        base_key = None
        if not params.greedy:
            key = request_key(params.seed, self._global_key, uid)
            base_key = np.asarray(jax.random.key_data(key), np.uint32)
        output = RequestOutput(prompt=text, prompt_token_ids=ids, logprobs=None if params.logprobs is None else [])
        output.stats.prompt_tokens = len(ids)
        output.stats.speculation_method = method
        if method != "none":
            output.stats.speculation = SpeculationStats()
        return Request(uid=uid, params=params, output=output, max_total=max_total, kv_limit=kv_limit,
                       num_prefill=len(ids), base_key=base_key, stop_ids=frozenset(stop_ids),
                       detok=self.tokenizer.incremental_decoder())

    def new_request(self, prompt: Prompt, params: SamplingParams, *, speculation: str = "default") -> Request:
        """One validated request for a Scheduler (``RequestError`` names the input at fault).
        ``speculation``: one of ``methods`` ("none": plain steps; "tree": the draft models' trees;
        "suffix": the suffix cache's; "hybrid": either, per step), or "default" (``method``)."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"expected SamplingParams, got {type(params).__name__}")
        request = self._make_request(self._requests_started, "the prompt", prompt, params, speculation)
        self._requests_started += 1
        return request

    def _requests(self, prompts, sampling_params) -> list[Request]:
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
        requests = [self._make_request(self._requests_started + i, f"prompt {i}", p, sp)
                    for i, (p, sp) in enumerate(zip(prompts, params_list))]
        self._requests_started += len(requests)
        return requests

    # -- public API ----------------------------------------------------------------------------
    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Generate for one prompt or a list: strings, token-id lists, or chat message lists."""
        requests = self._requests(prompts, sampling_params)
        for _ in self._run(requests):
            pass
        return [r.output for r in requests]

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

    # -- the loop ------------------------------------------------------------------------------
    def _run(self, requests: list[Request]) -> Iterator[tuple[Request, str]]:
        scheduler = Scheduler(self)
        for req in requests:
            scheduler.add(req)
        try:
            while scheduler.has_work:
                for req, delta, _ in scheduler.step():
                    yield req, delta
        finally:
            for req in scheduler.running + list(scheduler.waiting):  # an abandoned stream must not leak pages
                scheduler.abort(req)


class Scheduler:
    """Continuous batching of one LLM's requests, one step at a time.

    Each ``step`` first gives every decoding request the KV pages its next step writes (its new
    token, or a verified tree's depth ahead), preempting the most recently admitted requests when
    the pool runs dry: their pages are freed and they go back to the front of the waiting queue,
    their output kept, to be recomputed (prefilled again, prompt and output so far) when
    re-admitted; greedy output and streams are the same as without preemption. Then, unless it
    preempted, it admits waiting requests in order while slots and pages allow (a request joins
    with pages for its prefill and one step), runs the prompt chunks still to prefill and, when
    nothing is prefilling or with ``interleave``, one decode step: speculative for the requests
    that speculate, whatever their methods, plain for the others. ``LLM.generate`` runs a
    Scheduler per call; the server runs one for its whole life. Not thread-safe: one thread adds, aborts and steps, so device
    steps never overlap.
    """

    def __init__(self, llm: LLM, *, interleave: bool = False):
        self.llm = llm
        self.interleave = interleave  # decode while others prefill, so long prompts do not stall streams
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the last is preempted first
        self.preemptions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def abort(self, request: Request) -> bool:
        """Drop a waiting or running request, freeing its pages now; False if it is not here."""
        if request in self.waiting:
            self.waiting.remove(request)
            if request.output.stats.preemptions:  # preempted: the suffix cache still follows it
                self._stop_suffix(request)
        elif request in self.running:
            self._finish(request)
        else:
            return False
        request.output.finish_reason = "abort"
        return True

    def _lookahead(self, req: Request) -> int:
        """KV positions past its sequence that one decode step of ``req`` may write: a tree's depth."""
        llm = self.llm
        return max(llm.speculator.depth if req.speculation in DRAFT_METHODS else 0,
                   llm.suffix.settings.max_spec_tokens if req.speculation in SUFFIX_METHODS else 0)

    def _speculator(self, req: Request) -> TreeSpeculator | None:
        """The draft models, if ``req`` runs them: they keep its sequence in their own caches."""
        return self.llm.speculator if req.speculation in DRAFT_METHODS else None

    def _suffix(self, req: Request) -> SuffixSpeculator | None:
        """The suffix cache, if it follows ``req``: every speculating request's output joins it,
        a draft-model-only request's too (as hybrid's draft-model steps do), for later requests."""
        return self.llm.suffix if req.speculation != "none" else None

    def _kv_tokens(self, req: Request, length: int) -> int:
        """KV tokens ``req`` needs for a decode step on a sequence of ``length`` tokens."""
        return min(length + self._lookahead(req), req.kv_limit)

    def _can_admit(self, req: Request) -> bool:
        speculator = self._speculator(req)
        length = req.num_prefill + 1  # the prefill and the token it samples: the first decode step
        return self.llm.runner.can_admit(self._kv_tokens(req, length)) and (
            speculator is None or speculator.can_admit(length))

    def _admit(self, req: Request) -> None:
        runner, speculator = self.llm.runner, self._speculator(req)
        # A preempted request's suffix state lives on (host memory only, and its sequence is unchanged).
        suffix = self._suffix(req) if not req.output.stats.preemptions else None
        length = req.num_prefill + 1
        runner.add_sequence(req.uid, self._kv_tokens(req, length))
        try:
            if speculator is not None:
                speculator.start(req.uid, length)
            if suffix is not None:
                suffix.start(req.uid, req.output.prompt_token_ids)
        except Exception:
            runner.release(req.uid)
            if speculator is not None:
                speculator.stop(req.uid)
            raise
        self.running.append(req)

    def _grow(self, req: Request) -> bool:
        """Give ``req`` the pages of its next decode step, in the target and its drafts alike
        (all or nothing); False if the pool is short."""
        runner, speculator = self.llm.runner, self._speculator(req)
        length = len(req.output.prompt_token_ids) + len(req.output.token_ids)
        tokens = self._kv_tokens(req, length)
        if not (runner.can_grow(req.uid, tokens) and (speculator is None or speculator.can_grow(req.uid, length))):
            return False
        runner.pages.reserve(req.uid, tokens)
        if speculator is not None:
            speculator.grow(req.uid, length)
        return True

    def _release(self, req: Request) -> None:
        self.llm.runner.release(req.uid)
        if (speculator := self._speculator(req)) is not None:
            speculator.stop(req.uid)
        self.running.remove(req)

    def _stop_suffix(self, req: Request) -> None:
        if (suffix := self._suffix(req)) is not None:  # the output joins the global cache for later requests
            suffix.stop(req.uid, req.output.prompt_token_ids + req.output.token_ids)

    def _finish(self, req: Request) -> None:
        self._release(req)
        self._stop_suffix(req)

    def _preempt(self, req: Request) -> None:
        """Free ``req``'s pages and queue it first, to be recomputed from its prompt and output so far."""
        self._release(req)
        req.prefilled = 0
        req.num_prefill = len(req.output.prompt_token_ids) + len(req.output.token_ids)
        req.output.stats.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(req)  # preempted later means admitted earlier: it goes first

    def _grow_running(self) -> bool:
        """Pages for every decoding request's next step, oldest first, preempting from the newest
        while the pool is short; returns whether anything was preempted. A request alone always
        fits (``LLM`` refuses any that would not), so the oldest always makes progress."""
        preempted = False
        for req in list(self.running):
            if req not in self.running or req.prefilled < req.num_prefill:
                continue  # preempted already, or still prefilling into pages it was admitted with
            while not self._grow(req):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
        return preempted

    def step(self) -> list[tuple[Request, str, bool]]:
        """Grow or preempt, admit what fits and run one step; returns (request, new text, finished)
        for each token that gave a request text or finished it. Finished requests have left, their
        pages freed."""
        max_seqs = self.llm.runner.engine.max_num_seqs
        # After a preemption the pool is known to be short: admitting now would only preempt again.
        if not self._grow_running():
            while self.waiting and len(self.running) < max_seqs and self._can_admit(self.waiting[0]):
                self._admit(self.waiting.popleft())
        prefilling = [r for r in self.running if r.prefilled < r.num_prefill]
        decoding = ([r for r in self.running if r not in prefilling]
                    if self.interleave or not prefilling else [])
        events = []
        if prefilling:
            events += self._plain_step(prefilling)
        if speculating := [r for r in decoding if r.speculation != "none"]:
            events += self._speculative_step(speculating)
        if plain := [r for r in decoding if r.speculation == "none"]:
            events += self._plain_step(plain)
        for req, _, finished in events:
            if finished:
                self._finish(req)
        return events

    def _plain_step(self, batch: list[Request]) -> list[tuple[Request, str, bool]]:
        inputs = [self._step_input(r) for r in batch]
        drafted = [x for x, r in zip(inputs, batch) if self._speculator(r) is not None]
        if self.llm.speculator is not None and drafted:  # drafts read every prompt chunk the target reads
            self.llm.speculator.prefill(drafted)
        scored = _wants_logprobs(batch)
        next_tokens, elapsed, *scores = self.llm.runner.step(inputs, logprobs=scored)
        logprobs = scores[0] if scored else [None] * len(batch)
        events = []
        for req, token, logprob in zip(batch, next_tokens, logprobs):
            delta = self._advance(req, int(token), elapsed, logprob)
            if delta or req.output.finished:
                events.append((req, delta or "", req.output.finished))
        return events

    def _speculative_step(self, batch: list[Request]) -> list[tuple[Request, str, bool]]:
        """Speculate a tree per request, verify all trees in one target pass per source, emit the
        accepted tokens.

        "tree" requests go to the draft models; "suffix" and "hybrid" ones first ask the suffix
        cache for a draft, and hybrid sends those whose draft scores below its bar to the draft
        models instead. All suffix drafts are verified in one pass, all draft-model trees in
        another, whatever method each request asked for. Sampled requests
        are verified by multi-step speculative sampling: their tokens follow the target's
        distribution exactly, as plain sampling's do (not the same tokens for a seed)."""
        llm = self.llm
        inputs = {}
        for req in batch:
            out, p = req.output, req.params
            inputs[req.uid] = StepInput(seq_id=req.uid, tokens=out.prompt_token_ids + out.token_ids,
                                        temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                                        base_key=req.base_key, sample_index=len(out.token_ids))
        suffix_rows, draft_rows = [], [r for r in batch if r.speculation == "tree"]
        pages = None  # the prefix-page bucket of the batch-aware budget's rows (all of them suffix rows)
        if proposing := [r for r in batch if r.speculation in SUFFIX_METHODS]:
            bar = llm._hybrid_bar() if llm.speculator is not None else None
            drafts = []
            for req in proposing:
                sequence = inputs[req.uid].tokens
                # A tree deeper than the tokens still allowed, or than its pages hold, would verify positions past them.
                room = min(req.max_total - 1, llm.runner.pages.capacity(req.uid)) - len(sequence)
                draft, seconds = llm.suffix.propose(req.uid, sequence, room)
                req.output.stats.speculation.host_time_s += seconds
                drafts.append(draft)
            if llm.budget is not None:  # cut each draft to the size that pays in this batch
                gains = [draft_gains(d.probs if d else [], r.draft_scores, r.draft_accepted)
                         for r, d in zip(proposing, drafts)]
                pages = llm.runner.prefix_page_bucket([r.uid for r in proposing])
                sizes = llm.budget.plan(gains, pages).sizes
                drafts = [d.truncated(k) if d else d for d, k in zip(drafts, sizes)]
            for req, draft in zip(proposing, drafts):
                if req.speculation == "suffix" or draft is None or draft.score >= bar:
                    suffix_rows.append((req, draft))
                else:
                    draft_rows.append(req)
        results = []
        if suffix_rows:
            trees = draft_trees([inputs[r.uid].tokens[-1] for r, _ in suffix_rows], [d for _, d in suffix_rows])
            scored = _wants_logprobs([r for r, _ in suffix_rows])
            new_tokens, elapsed, *scores = llm.runner.verify([r.uid for r, _ in suffix_rows], trees,
                                                              [inputs[r.uid] for r, _ in suffix_rows], logprobs=scored)
            # Not an executable's first run: it is slow (up to 2x on a CPU), and a bucket that
            # looks dear is never chosen again, so its estimate would never recover.
            if llm.budget is not None and not llm.runner.first_run:
                llm.budget.cost.observe(len(suffix_rows), trees[0].size, pages, elapsed)
            logprobs = scores[0] if scored else [[None] * len(t) for t in new_tokens]
            for (req, draft), tree, tokens, token_logprobs in zip(suffix_rows, trees, new_tokens, logprobs):
                record = (tree.num_nodes - 1, int(tree.depths.max()), len(tokens) - 1)
                if draft:
                    req.draft_scores += draft.score
                    req.draft_accepted += len(tokens) - 1
                results.append((req, "suffix", record, tokens, token_logprobs, elapsed))
        if draft_rows:
            scored = _wants_logprobs(draft_rows)
            new_tokens, records, elapsed, *scores = llm.speculator.step([inputs[r.uid] for r in draft_rows],
                                                                        logprobs=scored)
            logprobs = scores[0] if scored else [[None] * len(t) for t in new_tokens]
            for req, record, tokens, token_logprobs in zip(draft_rows, records, new_tokens, logprobs):
                llm._draft_record[0] += record[2]
                llm._draft_record[1] += 1
                results.append((req, "draft", record, tokens, token_logprobs, elapsed))
        events = []
        for req, source, (proposed, depth, accepted), tokens, token_logprobs, elapsed in results:
            used = 0
            for token, logprob in zip(tokens, token_logprobs):
                delta = self._advance(req, token, elapsed if used == 0 else 0.0, logprob)
                used += 1
                if delta or req.output.finished:
                    events.append((req, delta or "", req.output.finished))
                if req.output.finished:
                    break
            # A finishing request may not need every accepted token: tau counts what it received.
            req.output.stats.speculation.record(proposed, depth, accepted, tokens=used,
                                                source=source if req.speculation == "hybrid" else None)
        return events

    def _step_input(self, req: Request) -> StepInput:
        out = req.output
        prompt = out.prompt_token_ids
        if req.prefilled < req.num_prefill:
            end = min(req.prefilled + self.llm.runner.engine.prefill_chunk, req.num_prefill)
            # A recomputed request prefills its output so far after its prompt.
            tokens = (prompt if end <= len(prompt) else prompt + out.token_ids)[req.prefilled: end]
        else:
            tokens = out.token_ids[-1:]
        p = req.params
        return StepInput(seq_id=req.uid, tokens=tokens, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                         base_key=req.base_key, sample_index=len(out.token_ids))

    def _advance(self, req: Request, token: int, elapsed: float, logprob: TokenLogprob | None = None) -> str | None:
        """Account a step's result to a request; returns its new text, or None mid-prefill.
        ``logprob``: the token's, when the step scored it (kept if the request asked)."""
        out, stats = req.output, req.output.stats
        prompt_len = len(out.prompt_token_ids)
        if req.prefilled < req.num_prefill:
            req.prefilled = min(req.num_prefill, req.prefilled + self.llm.runner.engine.prefill_chunk)
            stats.prefill_time_s += elapsed
            if req.prefilled < req.num_prefill:
                return None
            if not out.token_ids:  # not a recomputation
                stats.ttft_s = time.perf_counter() - req.arrival
        else:
            stats.decode_time_s += elapsed
        out.token_ids.append(token)
        if out.logprobs is not None:
            out.logprobs.append(replace(logprob, top=logprob.top[: req.params.logprobs]))
        stats.generated_tokens += 1
        if token in req.stop_ids:
            out.finish_reason = "stop"
            text = req.pending_text
        else:
            text = req.pending_text + req.detok.add(token)
            if (len(out.token_ids) >= req.params.max_tokens
                    or prompt_len + len(out.token_ids) >= req.max_total):
                out.finish_reason = "length"
                text += req.detok.flush()
        text, hit = _apply_stop_strings(text, req.params.stop)
        if hit:
            out.finish_reason = "stop"
        if out.finished or not req.params.stop:
            emit, req.pending_text = text, ""
        else:  # hold back a tail that may be the start of a stop string
            hold = _stop_prefix_len(text, req.params.stop)
            emit, req.pending_text = text[: len(text) - hold], text[len(text) - hold:]
        out.text += emit
        return emit


def _wants_logprobs(batch: Sequence[Request]) -> bool:
    """Whether a step must score its tokens: only when one of its requests asked (it costs a
    log-softmax and a top-k over the vocabulary, and their transfer)."""
    return any(r.params.logprobs is not None for r in batch)


def _apply_stop_strings(new: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Cut ``new`` before the first stop string in it; returns (text, whether cut).

    Emitted text never ends in the beginning of a stop string (``_stop_prefix_len`` holds that
    back), so a stop string can only appear within the not-yet-emitted text.
    """
    cuts = [i for i in (new.find(s) for s in stops) if i >= 0]
    return (new[: min(cuts)], True) if cuts else (new, False)


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def _load_draft(draft, target: LoadedModel):
    """(config, params, draft_to_target, target_to_draft) of a trained draft (name or directory) or
    of any model sharing the target's tokenizer; the maps are None for the target's own vocabulary."""
    if isinstance(draft, LoadedModel):
        config, params, vocab = draft.config, draft.params, None
        if (draft.tokenizer is not None and target.tokenizer is not None
                and draft.tokenizer.backend.get_vocab() != target.tokenizer.backend.get_vocab()):
            raise ValueError(f"the draft {draft.source} has another tokenizer than the target {target.source}")
    elif isinstance(draft, (str, os.PathLike)):
        from specjax.checkpoints.registry import resolve_draft
        from specjax.draft import load_draft

        config, params, vocab = load_draft(resolve_draft(draft))
    else:
        raise TypeError(f"a draft is a draft name, a draft directory or a LoadedModel, got {type(draft).__name__}")
    target_vocab = target.config.vocab_size
    if vocab is None and config.vocab_size != target_vocab:
        raise ValueError(f"the draft's vocabulary ({config.vocab_size}) differs from the target's "
                         f"({target_vocab}) and it carries no id map")
    if vocab is not None and vocab.target_size != target_vocab:
        raise ValueError(f"the draft's id map is for a vocabulary of {vocab.target_size} tokens; the target has "
                         f"{target_vocab}")
    return (config, inference_params(params), None if vocab is None else vocab.draft_to_target,
            None if vocab is None else vocab.target_to_draft)
