"""The engine core: one model on one runner, its speculation methods, and the steps it can run.

``EngineCore`` turns prompts into validated requests, and runs the steps a scheduler asks for:
a plain step (prompt chunks, or one token for requests that do not speculate) and a speculative
step (every speculating request, whatever its method). A speculative step asks each request's
proposer for drafts, sizes host trees for the batch when a budget is set, verifies every host
tree in one target pass and each device drafter's rows in its own fused step, and tells each
proposer what was accepted. It never branches on a method's name.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from specjax.checkpoints import LoadedModel
from specjax.engine.adapters import AdapterManager
from specjax.engine.coserving import SLO, Finetuner
from specjax.engine.finetuning import FinetuneSlice
from specjax.engine.request import Request, RequestError, RequestOutput
from specjax.engine.step import StepInput
from specjax.linear import Bf16Bits
from specjax.params import inference_params
from specjax.runner import EngineConfig, ModelRunner
from specjax.sampling import SamplingParams, TokenLogprob, request_key
from specjax.speculation import methods  # noqa: F401  (registers the built-in methods)
from specjax.speculation import proposer as proposers
from specjax.speculation.budget import SpeculationBudget, StepCostModel, calibrate, draft_gains
from specjax.speculation.proposer import BuildContext, DraftTree, ProposalRow, Proposer, Verified, host_token_trees
from specjax.speculation.stats import SpeculationStats
from specjax.speculation.tree import TREE_SIZES


@dataclass
class StepOutcome:
    """One request's share of a step: its new tokens (one for a plain step; accepted then bonus for
    a verification), their logprobs (None each unless scored), the step's seconds, and for a
    verification what it verified and where the proposal came from; for a prefill step, the
    prompt tokens it ran."""

    request: Request
    tokens: list[int]
    logprobs: list[TokenLogprob | None]
    elapsed: float
    verified: Verified | None = None
    source: str = ""
    prefilled: int = 0


def wants_logprobs(batch: Sequence[Request]) -> bool:
    """Whether a step must score its tokens: only when one of its requests asked (it costs a
    log-softmax and a top-k over the vocabulary, and their transfer)."""
    return any(r.params.logprobs is not None for r in batch)


class EngineCore:
    """A loaded model, its runner and its speculation methods (built from ``speculation``, any
    registered settings: ``TreeSpeculation``, ``SuffixSpeculation``, ``HybridSpeculation``,
    ``NgramSpeculation``, ...)."""

    def __init__(self, loaded: LoadedModel, *, engine: EngineConfig | None = None, speculation=None,
                 seed: int | None = None, slo: SLO | None = None):
        if loaded.tokenizer is None:
            raise ValueError(f"{loaded.source} has no tokenizer; LLM needs one to turn text into tokens")
        params = inference_params(loaded.params)
        self.weights = ("bfloat16 weights, fp32 arithmetic" if isinstance(params.layers.wqkv, Bf16Bits)
                        else jnp.dtype(params.layers.wqkv.dtype).name)
        self.loaded = loaded
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.model_name = loaded.source
        self.runner = ModelRunner(loaded.config, params, engine or EngineConfig())
        # LoRA adapters requests may name, in the runner's adapter slots (none without max_loras).
        self.adapters = AdapterManager(self.runner, loaded.config) if self.runner.engine.max_loras else None
        # LoRA finetuning jobs co-served with inference (none without max_finetune_jobs).
        self.finetuner = Finetuner(self.runner, slo or SLO()) if self.runner.engine.max_finetune_jobs else None
        self.speculation = speculation
        self.proposers: dict[str, Proposer] = {}  # by method name: the configured one and its parts
        self.method = "none"
        if speculation is not None:
            self.method = self._build(speculation).name
        # Methods that need nothing (n-gram lookup) are offered too, built when first asked for.
        self.methods: tuple[str, ...] = ("none",) + tuple(
            m for m in proposers.registered() if m in self.proposers or m in proposers.always_offered())
        self.followers = [p for p in self.proposers.values() if p.follows_every_request]
        self.budget = None  # batch-aware sizes of host trees
        if aware := [p for p in self.proposers.values() if p.batch_aware]:
            self.budget = SpeculationBudget(StepCostModel(), max(s for p in aware for s in p.tree_sizes()))
            # The corners of the batch x tree grid; steps as they run fill in the rest.
            calibrate(self.runner, self.budget.cost, (1, self.runner.engine.max_num_seqs),
                      (1, self.budget.max_tree), repeats=2)
        # Unseeded requests draw from this key; seeded ones are reproducible in any batch or run.
        self._global_key = jax.random.key(seed if seed is not None else secrets.randbits(63))
        self._requests_started = 0
        self._requests_lock = threading.Lock()  # requests are made on any thread (the server tokenises off its loop)

    def _build(self, settings) -> Proposer:
        built = proposers.build(settings, BuildContext(self.runner, self.loaded, self._build))
        self.proposers.setdefault(built.name, built)
        return built

    def proposer(self, method: str) -> Proposer | None:
        """The proposer of an offered method (None for "none")."""
        if method == "none":
            return None
        if method not in self.proposers:  # an always-offered method, with its default settings
            self._build(proposers.registered()[method]())
        return self.proposers[method]

    @property
    def max_model_len(self) -> int:
        return self.runner.max_model_len

    @property
    def compile_time_s(self) -> float:
        """Seconds spent compiling steps so far (never counted in any step's time)."""
        return self.runner.compile_time_s + sum(p.compile_time_s for p in self.proposers.values())

    # -- requests ---------------------------------------------------------------------------
    def _method(self, choice: str) -> str:
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

    def _check_length(self, text: str, label: str) -> None:
        """Refuse text too long for the context from a bounded prefix of it: tokenising megabytes
        only to refuse them would cost seconds. Past the characters the context's tokens could
        cover at the longest token's length, a prefix that long is tokenised; more tokens than the
        context there (one spare for a word the cut splits) and the whole can only have more."""
        most = self.max_model_len * self.tokenizer.max_token_chars
        if len(text) > most and len(self.tokenizer.encode(text[:most], add_special_tokens=False)) > self.max_model_len + 1:
            raise RequestError(f"{label} is longer than the context: its first {most} of {len(text)} characters "
                               f"alone are more than the {self.max_model_len} tokens it holds", "prompt")

    def _prompt_ids(self, prompt, label: str) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            self._check_length(prompt, label)
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            return self.tokenizer.encode_chat(list(prompt), add_generation_prompt=True,
                                              before_encoding=lambda text: self._check_length(text, label))
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, (int, np.integer)) for t in prompt):
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.config.vocab_size})")
            return None, ids
        raise TypeError("a prompt is a string, a non-empty list of token ids, or a non-empty list of chat messages "
                        f"({{'role': ..., 'content': ...}}); got {type(prompt).__name__}")

    def make_request(self, prompt, params: SamplingParams, speculation: str = "default", label: str = "the prompt",
                     cache_scope: str = "", adapter: str | None = None) -> Request:
        """One validated request (``RequestError`` names the input at fault). ``speculation``: one
        of ``methods`` ("none": plain steps), or "default" (``method``). ``cache_scope``: the
        requests whose outputs it may draft from and serve (``Request.cache_scope``). ``adapter``:
        the name of a LoRA adapter of ``adapters`` to run with (None: the base model)."""
        if not isinstance(cache_scope, str):
            raise TypeError(f"cache_scope must be a str, got {type(cache_scope).__name__}")
        if adapter is not None:
            if self.adapters is None:
                raise RequestError(f"adapter {adapter!r}: this engine serves no LoRA adapters (max_loras is 0)", "model")
            if adapter not in self.adapters:
                raise RequestError(f"no adapter named {adapter!r} is loaded", "model")
            # An adapter's outputs are its own: they draft for requests of the same adapter only.
            cache_scope = f"{cache_scope}\x00adapter:{adapter}"
        if not isinstance(params, SamplingParams):
            raise TypeError(f"expected SamplingParams, got {type(params).__name__}")
        method = self._method(speculation)
        with self._requests_lock:  # a method's first request builds its proposer
            proposer = self.proposer(method)
        text, ids = self._prompt_ids(prompt, label)
        if not ids:
            raise RequestError(f"{label} is empty after tokenization", "prompt")
        if len(ids) >= self.max_model_len:
            raise RequestError(f"{label} has {len(ids)} tokens; the context holds {self.max_model_len} "
                               "(prompt plus at least one generated token)", "prompt")
        max_total = min(len(ids) + params.max_tokens, self.max_model_len)
        kv_limit = max_total + (proposer.overrun if proposer else 0)
        if not self._fits(kv_limit):  # alone, it must always be able to finish
            raise RequestError(f"{label} needs {kv_limit} tokens of KV cache; the pool "
                               f"holds {self.runner.pages.num_pages * self.runner.pages.page_size}", "max_tokens")
        for part in proposer.parts() if proposer else ():
            if not part.fits(max_total):
                raise RequestError(f"{label} needs {max_total} tokens and the speculation's scratch in the "
                                   f"{part.name} proposer's KV cache, more than its pool holds", "max_tokens")
        with self._requests_lock:
            uid = self._requests_started
            self._requests_started += 1
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(self.tokenizer.eos_token_ids)
        base_key = None
        if not params.greedy:
            base_key = np.asarray(jax.random.key_data(request_key(params.seed, self._global_key, uid)), np.uint32)
        output = RequestOutput(prompt=text, prompt_token_ids=ids, logprobs=None if params.logprobs is None else [])
        output.stats.prompt_tokens = len(ids)
        output.stats.speculation_method = method
        if proposer is not None:
            output.stats.speculation = SpeculationStats()
        return Request(uid=uid, params=params, output=output, max_total=max_total, kv_limit=kv_limit,
                       num_prefill=len(ids), base_key=base_key, stop_ids=frozenset(stop_ids),
                       detok=self.tokenizer.incremental_decoder(), proposer=proposer, cache_scope=cache_scope,
                       adapter=adapter)

    # -- what a request's speculation involves ---------------------------------------------------
    @staticmethod
    def parts(req: Request) -> tuple[Proposer, ...]:
        """The proposers that hold state for ``req`` while it runs (a composite's parts)."""
        return req.proposer.parts() if req.proposer is not None else ()

    def followers_of(self, req: Request) -> list[Proposer]:
        """Every proposer that follows ``req`` from start to stop: its own parts and, for any
        speculating request, the proposers that learn from every output (the suffix cache)."""
        if req.proposer is None:
            return []
        return list({id(p): p for p in (*req.proposer.parts(), *self.followers)}.values())

    # -- recovery ---------------------------------------------------------------------------
    def device_state_lost(self) -> bool:
        """Whether a failed step took KV caches with it: donated to a call that never returned them."""
        return any(x.is_deleted() for x in jax.tree.leaves(self.runner.cell.state.caches()))

    def reset_device_state(self) -> None:
        """Empty KV caches of the same shapes and placement in place of lost ones (every running
        sequence must then be recomputed); the compiled steps still fit them."""
        cell = self.runner.cell
        fresh = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype, device=x.sharding), cell.state.caches())
        cell.state = cell.state.with_caches(fresh)

    # -- steps ------------------------------------------------------------------------------
    def _sampling(self, req: Request, tokens: Sequence[int]) -> StepInput:
        p = req.params
        return StepInput(seq_id=req.uid, tokens=tokens, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                         base_key=req.base_key, sample_index=len(req.output.token_ids), lora_slot=req.lora_slot)

    def next_chunk(self, req: Request, chunk: int) -> int:
        """Tokens of ``req``'s next prefill step, at most ``chunk`` (0: it is not prefilling)."""
        return min(chunk, req.num_prefill - req.prefilled)

    def step_input(self, req: Request, chunk: int | None = None) -> StepInput:
        """``req``'s share of a plain step: its next prompt chunk (at most ``chunk`` tokens,
        default ``prefill_chunk``), or its last token."""
        out = req.output
        if req.prefilled < req.num_prefill:
            end = req.prefilled + self.next_chunk(req, chunk or self.runner.engine.prefill_chunk)
            # A recomputed request prefills its output so far after its prompt.
            prompt = out.prompt_token_ids
            tokens = (prompt if end <= len(prompt) else prompt + out.token_ids)[req.prefilled: end]
        else:
            tokens = out.token_ids[-1:]
        return self._sampling(req, tokens)

    def plain_step(self, batch: list[Request], chunk: int | None = None, finetune: FinetuneSlice | None = None
                   ) -> list[StepOutcome]:
        """One token for each request, or its next prompt chunk of at most ``chunk`` tokens
        (default ``prefill_chunk``), which its proposers read too; ``finetune``: a finetuning
        slice fused into the step."""
        inputs = [self.step_input(r, chunk) for r in batch]
        readers: dict[int, tuple[Proposer, list[StepInput]]] = {}
        for req, x in zip(batch, inputs):
            for part in self.parts(req):
                readers.setdefault(id(part), (part, []))[1].append(x)
        for part, chunks in readers.values():
            part.prefill(chunks)
        scored = wants_logprobs(batch)
        next_tokens, elapsed, *scores = self.runner.step(inputs, logprobs=scored, finetune=finetune)
        logprobs = scores[0] if scored else [None] * len(batch)
        return [StepOutcome(req, [int(token)], [logprob], elapsed,
                            prefilled=len(x.tokens) if req.prefilled < req.num_prefill else 0)
                for req, x, token, logprob in zip(batch, inputs, next_tokens, logprobs)]

    def speculative_step(self, batch: list[Request], finetune: FinetuneSlice | None = None) -> list[StepOutcome]:
        """Ask each request's proposer for a tree, verify every host tree in one target pass and each
        device drafter's rows in its own fused step, and tell the proposers what was accepted.
        ``finetune``: a finetuning slice fused into the host trees' pass, if there is one.

        Sampled host trees are verified by sampling and matching: the tokens are plain sampling's
        own for the request's key. Draft-model trees are verified by multi-step speculative
        sampling (the target's distribution exactly, not plain sampling's tokens for a seed),
        except rows a proposer marks ``plain_draws`` (seeded hybrid requests)."""
        by_uid = {req.uid: req for req in batch}
        groups: dict[int, tuple[Proposer, list[ProposalRow]]] = {}
        pages = self.runner.pages
        for req in batch:
            sequence = req.sequence
            # A tree deeper than the tokens still allowed, or than its pages hold, would verify positions past them.
            room = min(req.max_total - 1, pages.capacity(req.uid)) - len(sequence)
            row = ProposalRow(req.uid, sequence, room, self._sampling(req, sequence), seeded=req.params.seed is not None)
            groups.setdefault(id(req.proposer), (req.proposer, []))[1].append(row)
        host: list[tuple[Proposer, ProposalRow, DraftTree | None, str]] = []
        device: dict[int, tuple[object, list[tuple[Proposer, ProposalRow, str]]]] = {}
        for proposer, rows in groups.values():
            for drafts in proposer.propose(rows):
                for i, (row, tree) in enumerate(zip(drafts.rows, drafts.trees)):
                    if drafts.host_time_s is not None:
                        by_uid[row.uid].output.stats.speculation.host_time_s += drafts.host_time_s[i]
                    source = tree.source if tree is not None else drafts.source
                    if drafts.drafter is None:
                        host.append((proposer, row, tree, source))
                    else:
                        device.setdefault(id(drafts.drafter), (drafts.drafter, []))[1].append((proposer, row, source))
        outcomes = []
        if host:
            outcomes += self._verify_host(host, by_uid, finetune)
        for drafter, rows in device.values():
            reqs = [by_uid[row.uid] for _, row, _ in rows]
            verified, elapsed = drafter.step([row.sampling for _, row, _ in rows], logprobs=wants_logprobs(reqs))
            for (proposer, row, source), req, v in zip(rows, reqs, verified):
                proposer.learn(row, None, source, v)
                outcomes.append(StepOutcome(req, v.tokens, v.logprobs or [None] * len(v.tokens), elapsed, v, source))
        return outcomes

    def _verify_host(self, host: list, by_uid: dict[int, Request], finetune: FinetuneSlice | None = None
                     ) -> list[StepOutcome]:
        """Verify host trees, all in one target pass, cut to the batch's budget when there is one."""
        reqs = [by_uid[row.uid] for _, row, _, _ in host]
        pages = None
        if self.budget is not None:  # cut each draft to the size that pays in this batch
            gains = [draft_gains(tree.probs if tree else [], r.draft_scores, r.draft_accepted)
                     for r, (_, _, tree, _) in zip(reqs, host)]
            pages = self.runner.prefix_page_bucket([r.uid for r in reqs])
            sizes = self.budget.plan(gains, pages).sizes
            host = [(p, row, tree.truncated(k) if tree else tree, source)
                    for (p, row, tree, source), k in zip(host, sizes)]
        trees = host_token_trees([row.sequence[-1] for _, row, _, _ in host], [tree for _, _, tree, _ in host])
        scored = wants_logprobs(reqs)
        new_tokens, elapsed, *scores = self.runner.verify([r.uid for r in reqs], trees, [row.sampling for _, row, _, _ in host],
                                                          logprobs=scored, finetune=finetune)
        # Not an executable's first run: it is slow (up to 2x on a CPU), and a bucket that looks
        # dear is never chosen again, so its estimate would never recover.
        if self.budget is not None and not self.runner.first_run and finetune is None:
            self.budget.cost.observe(len(reqs), trees[0].size, pages, elapsed)
        logprobs = scores[0] if scored else [[None] * len(t) for t in new_tokens]
        outcomes = []
        for (proposer, row, tree, source), req, token_tree, tokens, token_logprobs in zip(
                host, reqs, trees, new_tokens, logprobs):
            verified = Verified(tokens=tokens, logprobs=token_logprobs, proposed=token_tree.num_nodes - 1,
                                depth=int(token_tree.depths.max()), accepted=len(tokens) - 1)
            if tree is not None:
                req.draft_scores += tree.score
                req.draft_accepted += verified.accepted
            proposer.learn(row, tree, source, verified)
            outcomes.append(StepOutcome(req, tokens, token_logprobs, elapsed, verified, source))
        return outcomes

    # -- compiling ahead ----------------------------------------------------------------------
    def warm_up_jobs(self, max_len: int | None = None, finetune_lora=None) -> dict[str, list]:
        """A thunk per step shape not yet compiled (and run), by kind: "step" and "verify" (the
        target's plain steps and host trees of every size its proposers draft), each proposer's
        own (draft models: "draft prompt", "tree step"), and with ``finetune_lora`` (a
        ``LoraConfig``, on a co-serving engine) "finetune": the steps that slices of jobs with
        those adapter settings run in (compiled only)."""
        sizes = tuple(s for s in TREE_SIZES if s in {s for p in self.proposers.values() for s in p.tree_sizes()})
        jobs = self.runner.warm_up_jobs(sizes, max_len)
        for p in self.proposers.values():
            jobs.update(p.warm_up_jobs(max_len))
        if finetune_lora is not None:
            if self.finetuner is None:
                raise ValueError("finetune_lora warms up co-serving, and this engine has none (max_finetune_jobs 0)")
            jobs["finetune"] = self.finetuner.warm_up_jobs(finetune_lora, sizes, max_len)
        return jobs
