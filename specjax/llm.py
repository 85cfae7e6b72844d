"""The offline generation API: ``LLM(model).generate(prompts, SamplingParams)``.

Requests are scheduled onto the ModelRunner with continuous batching: up to ``max_num_seqs`` run
at once, each with pages reserved for its prompt plus ``max_tokens``; a finished request frees its
pages and the next waiting one joins. Steps that have prompt chunks to prefill run before decode
steps. Everything the user can get wrong is checked before the first compilation.
"""

from __future__ import annotations

import os
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from specjax.checkpoints import LoadedModel, load_model
from specjax.config import resolve_dtype
from specjax.params import inference_params
from specjax.runner import EngineConfig, ModelRunner, StepInput
from specjax.sampling import SamplingParams, request_key
from specjax.speculation.speculator import TreeSpeculation, TreeSpeculator
from specjax.speculation.stats import SpeculationStats
from specjax.speculation.suffix import HybridSpeculation, SuffixSpeculation, SuffixSpeculator, draft_trees

Message = dict
Prompt = Union[str, Sequence[int], Sequence[Message]]


@dataclass
class RequestStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_time_s: float = 0.0  # device time of this request's prefill steps
    ttft_s: float = 0.0  # wall time from the start of generate() to its first token
    decode_time_s: float = 0.0  # time of the steps that produced tokens 2..n (drafting included)
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
    finish_reason: str | None = None  # "stop" (EOS, stop token or stop string) or "length"
    stats: RequestStats = field(default_factory=RequestStats)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _Request:
    index: int  # position in its generate() call
    uid: int  # unique within the LLM: the suffix cache and unseeded keys know the request by it
    params: SamplingParams
    output: RequestOutput
    max_total: int  # prompt + output tokens this request may reach
    base_key: np.ndarray | None
    stop_ids: frozenset[int]
    detok: object
    prefilled: int = 0
    pending_text: str = ""  # decoded text held back while it could still become a stop string


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
        self.speculator = None
        if tree is not None:
            self.speculator = TreeSpeculator(self.runner, [_load_draft(d, loaded) for d in tree.drafts],
                                             tree.tree_shapes())
            if not (self._fits(self.speculator.depth + 2) and self.speculator.fits(2)):
                raise ValueError(f"a tree of depth {self.speculator.depth} with {tree.max_nodes} nodes does "
                                 "not fit the KV cache: lower max_nodes or the expansion, or raise kv_cache_bytes")
        self.suffix = SuffixSpeculator(suffix) if suffix is not None else None
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

    def _extra_tokens(self) -> int:
        """Cache positions a sequence needs past its last token: a verified tree writes its depth ahead."""
        return self.speculator.depth if self.speculator else 0

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

    def _make_request(self, index: int, prompt: Prompt, params: SamplingParams) -> _Request:
        text, ids = self._prompt_ids(prompt)
        if not ids:
            raise ValueError(f"prompt {index} is empty after tokenization")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt {index} has {len(ids)} tokens; the context holds {self.max_model_len} "
                             "(prompt plus at least one generated token)")
        max_total = min(len(ids) + params.max_tokens, self.max_model_len)
        if not self._fits(max_total + self._extra_tokens()):
            raise ValueError(f"prompt {index} needs {max_total + self._extra_tokens()} tokens of KV cache; the pool "
                             f"holds {self.runner.pages.num_pages * self.runner.pages.page_size}")
        if self.speculator is not None and not self.speculator.fits(max_total):
            raise ValueError(f"prompt {index} needs {max_total} tokens and the tree's scratch in each draft's KV "
                             "cache, more than a draft's pool holds")
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(self.tokenizer.eos_token_ids)
        base_key = None
        uid = index + self._requests_started
        if not params.greedy:
            key = request_key(params.seed, self._global_key, uid)
            base_key = np.asarray(jax.random.key_data(key), np.uint32)
        output = RequestOutput(prompt=text, prompt_token_ids=ids)
        output.stats.prompt_tokens = len(ids)
        if self.speculator is not None or self.suffix is not None:
            output.stats.speculation = SpeculationStats()
        return _Request(index=index, uid=uid, params=params, output=output, max_total=max_total, base_key=base_key,
                        stop_ids=frozenset(stop_ids), detok=self.tokenizer.incremental_decoder())

    def _requests(self, prompts, sampling_params) -> list[_Request]:
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
        requests = [self._make_request(i, p, sp) for i, (p, sp) in enumerate(zip(prompts, params_list))]
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
    def _run(self, requests: list[_Request]) -> Iterator[tuple[_Request, str]]:
        runner = self.runner
        waiting = deque(requests)
        running: list[_Request] = []
        start = time.perf_counter()

        speculator, suffix = self.speculator, self.suffix

        def admit(req: _Request) -> None:
            runner.add_sequence(req.index, req.max_total + self._extra_tokens())
            try:
                if speculator is not None:
                    speculator.start(req.index, req.max_total)
                if suffix is not None:
                    suffix.start(req.uid, req.output.prompt_token_ids)
            except Exception:
                runner.release(req.index)
                if speculator is not None:
                    speculator.stop(req.index)
                raise
            running.append(req)

        def finish(req: _Request) -> None:
            runner.release(req.index)
            if speculator is not None:
                speculator.stop(req.index)
            running.remove(req)
            if suffix is not None:  # the output joins the global cache for later requests
                suffix.stop(req.uid, req.output.prompt_token_ids + req.output.token_ids)

        def can_admit(req: _Request) -> bool:
            return (runner.can_admit(req.max_total + self._extra_tokens())
                    and (speculator is None or speculator.can_admit(req.max_total)))

        try:
            while waiting or running:
                while waiting and len(running) < runner.engine.max_num_seqs and can_admit(waiting[0]):
                    admit(waiting.popleft())
                prefilling = [r for r in running if r.prefilled < len(r.output.prompt_token_ids)]
                speculating = [] if prefilling or (speculator is None and suffix is None) else list(running)
                plain = prefilling or [r for r in running if r not in speculating]
                if speculating:
                    for req, delta in self._speculative_step(speculating, start):
                        yield req, delta
                    for req in speculating:
                        if req.output.finished:
                            finish(req)
                if plain:
                    inputs = [self._step_input(r) for r in plain]
                    if speculator is not None:  # drafts read every prompt chunk the target reads
                        speculator.prefill(inputs)
                    next_tokens, elapsed = runner.step(inputs)
                    for req, token in zip(plain, next_tokens):
                        delta = self._advance(req, int(token), elapsed, start)
                        if delta is not None:
                            yield req, delta
                        if req.output.finished:
                            finish(req)
        finally:
            for req in list(running):  # an abandoned stream must not leak pages
                finish(req)

    def _speculative_step(self, batch: list[_Request], start: float) -> Iterator[tuple[_Request, str]]:
        """Speculate a tree per request, verify all trees in one target pass per source, emit the
        accepted tokens.

        With a suffix cache each request first asks it for a draft; hybrid speculation sends the
        requests whose draft scores below its bar to the draft models instead. Sampled requests
        are verified by multi-step speculative sampling: their tokens follow the target's
        distribution exactly, as plain sampling's do (not the same tokens for a seed)."""
        inputs = {}
        for req in batch:
            out, p = req.output, req.params
            inputs[req.uid] = StepInput(seq_id=req.index, tokens=out.prompt_token_ids + out.token_ids,
                                        temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                                        base_key=req.base_key, sample_index=len(out.token_ids))
        suffix_rows, draft_rows = [], []
        if self.suffix is None:
            draft_rows = batch
        else:
            bar = self._min_score
            if bar is None:
                accepted, steps = self._draft_record
                bar = accepted / steps if steps else 1.0
            for req in batch:
                sequence = inputs[req.uid].tokens
                # A tree deeper than the tokens still allowed would verify positions past the request's pages.
                draft, seconds = self.suffix.propose(req.uid, sequence, req.max_total - len(sequence) - 1)
                req.output.stats.speculation.host_time_s += seconds
                if self.speculator is None or draft is None or draft.score >= bar:
                    suffix_rows.append((req, draft))
                else:
                    draft_rows.append(req)
        results = []
        if suffix_rows:
            trees = draft_trees([inputs[r.uid].tokens[-1] for r, _ in suffix_rows], [d for _, d in suffix_rows])
            new_tokens, elapsed = self.runner.verify([r.index for r, _ in suffix_rows], trees,
                                                     [inputs[r.uid] for r, _ in suffix_rows])
            for (req, _), tree, tokens in zip(suffix_rows, trees, new_tokens):
                record = (tree.num_nodes - 1, int(tree.depths.max()), len(tokens) - 1)
                results.append((req, "suffix", record, tokens, elapsed))
        if draft_rows:
            new_tokens, records, elapsed = self.speculator.step([inputs[r.uid] for r in draft_rows])
            for req, record, tokens in zip(draft_rows, records, new_tokens):
                self._draft_record[0] += record[2]
                self._draft_record[1] += 1
                results.append((req, "draft", record, tokens, elapsed))
        hybrid = self.suffix is not None and self.speculator is not None
        for req, source, (proposed, depth, accepted), tokens, elapsed in results:
            used = 0
            for token in tokens:
                delta = self._advance(req, token, elapsed if used == 0 else 0.0, start)
                used += 1
                if delta:
                    yield req, delta
                if req.output.finished:
                    break
            # A finishing request may not need every accepted token: tau counts what it received.
            req.output.stats.speculation.record(proposed, depth, accepted, tokens=used,
                                                source=source if hybrid else None)

    def _step_input(self, req: _Request) -> StepInput:
        out = req.output
        prompt = out.prompt_token_ids
        if req.prefilled < len(prompt):
            tokens = prompt[req.prefilled: req.prefilled + self.runner.engine.prefill_chunk]
        else:
            tokens = out.token_ids[-1:]
        p = req.params
        return StepInput(seq_id=req.index, tokens=tokens, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                         base_key=req.base_key, sample_index=len(out.token_ids))

    def _advance(self, req: _Request, token: int, elapsed: float, start: float) -> str | None:
        """Account a step's result to a request; returns its new text, or None mid-prefill."""
        out, stats = req.output, req.output.stats
        prompt_len = len(out.prompt_token_ids)
        if req.prefilled < prompt_len:
            req.prefilled = min(prompt_len, req.prefilled + self.runner.engine.prefill_chunk)
            stats.prefill_time_s += elapsed
            if req.prefilled < prompt_len:
                return None
            stats.ttft_s = time.perf_counter() - start
        else:
            stats.decode_time_s += elapsed
        out.token_ids.append(token)
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
