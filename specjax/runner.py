"""ModelRunner: runs one model's bucketed, jit-compiled steps over its part of an engine's device state.

A step appends T new tokens to each of B sequences (a prefill chunk, or one decode token), writes
their K/V into the cache, and samples each sequence's next token. Shapes are bucketed to powers of
two in B, T and the number of prefix pages read, so a long generation compiles a handful of times;
``ModelRunner.warm_up`` compiles every bucket a server can meet before it takes traffic. Whether a
step samples and whether it scores logprobs are run-time switches, not shapes: one executable per
bucket serves greedy and sampled rows, with and without logprobs. Host-side bookkeeping (which
pages each sequence owns) lives in ``kv_cache.PageTable``; the steps themselves are the pure
functions of ``engine.step``, and the weights and KV cache they run over live in the engine's
``engine.state.DeviceStateCell`` (a draft model's runner is a view onto its slot there).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Sequence

import jax
import numpy as np

from specjax import sampling
from specjax.config import ConfigError, ModelConfig
from specjax.engine.finetuning import (CoservingState, FinetuneSlice, FinetuneWork, JobState, SequenceState,
                                       finetune_step, make_chunk, with_finetuning)
from specjax.engine.state import TARGET, DeviceState, DeviceStateCell, ModelState
from specjax.engine.step import (StepInput, TokenBatch, TreeBatch, donating_jit, row_meta, step_args, token_step,
                                 verify_step)
from specjax.kv_cache import KVCache, PageTable, init_kv_cache, kv_bytes_per_token
from specjax.linear import Bf16Bits
from specjax.lora import GROUPED_LORA, init_slots
from specjax.params import Params
from specjax.speculation.tree import TokenTree, stack_trees

__all__ = ["CompiledBuckets", "EngineConfig", "ModelRunner", "StepInput", "backend_defaults", "next_power_of_two"]


def next_power_of_two(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def powers_of_two(low: int, high: int) -> list[int]:
    """Powers of two from ``low`` up to ``high`` (both powers of two)."""
    return [1 << e for e in range(low.bit_length() - 1, high.bit_length())]


log = logging.getLogger("specjax.runner")

# Multi-token steps (prompt chunks) pad to at least this many tokens: short prompts share a shape.
MIN_PREFILL_BUCKET = 16
# EngineConfig.interleaved_prefill_chunk's default on CPU (benchmarks/long_prompt.py).
CPU_INTERLEAVED_PREFILL_CHUNK = 64


@dataclass(frozen=True)
class EngineConfig:
    """Runtime knobs of the runner (not of the model).

    kv_cache_bytes: size of the page pool; None picks 1 GiB on CPU and 85% of free device memory
    elsewhere. max_model_len: longest sequence (prompt + output); None: the model's context length,
    capped by the pool. prefill_chunk: longest prompt slice per step, so long prompts do not need
    one huge compiled step. interleaved_prefill_chunk: longest prompt slice per step while other
    requests decode, each of whose tokens waits for the step's chunks; None: 64 on CPU, where a
    512-token chunk costs about 25 decode steps of the built-in model, and ``prefill_chunk``
    elsewhere. Larger prefills long prompts sooner, smaller keeps streams flowing.
    max_loras: LoRA adapters one batch may use at once (device slots; 0: no LoRA), each of rank
    up to max_lora_rank (smaller ranks are padded to it, so shapes never change); max_cpu_loras:
    adapters kept loaded in host memory (least recently used ones are read again from their
    files when asked for); None: no limit.
    """

    page_size: int = 16
    kv_cache_bytes: int | None = None
    max_model_len: int | None = None
    max_num_seqs: int = 32
    prefill_chunk: int = 512
    interleaved_prefill_chunk: int | None = None
    min_batch_bucket: int | None = None  # None: the backend's default (see backend_defaults)
    # Steps read at least this many prefix pages (masked past each sequence's length): short
    # contexts share one shape instead of four, at no measurable cost (benchmarks/RESULTS.md,
    # "Measurements behind code defaults").
    min_page_bucket: int = 8
    compiler_options: tuple[tuple[str, str | bool | int], ...] | None = None  # XLA options; None: backend default
    # Attention: "auto" (the Pallas kernel on NVIDIA GPUs within its limits, XLA elsewhere), "pallas"
    # or "xla"; None: $SPECJAX_ATTENTION, else "auto".
    attention_backend: str | None = None
    max_loras: int = 0
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    lora_kernel: str = "auto"  # how a step batches its rows' adapters (``lora.GROUPED_LORA``)
    # Co-serving (``engine.coserving``): LoRA finetuning jobs run at once, each holding one
    # sequence of up to max_finetune_len tokens, fed to steps in chunks of finetune_chunks tokens.
    # finetune_fusion False: slices run in steps of their own between inference steps, under the
    # same SLO budget (time-sharing: the baseline co-serving is measured against).
    max_finetune_jobs: int = 0
    max_finetune_len: int = 512
    finetune_chunks: tuple[int, ...] = (8, 32, 128)
    finetune_fusion: bool = True

    def __post_init__(self):
        for name in ("page_size", "max_num_seqs", "prefill_chunk", "min_page_bucket", "max_lora_rank") + tuple(
                name for name in ("min_batch_bucket", "interleaved_prefill_chunk", "max_cpu_loras")
                if getattr(self, name) is not None):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.max_finetune_jobs, int) or self.max_finetune_jobs < 0:
            raise ConfigError(f"max_finetune_jobs must be a non-negative integer, got {self.max_finetune_jobs!r}")
        if not isinstance(self.finetune_fusion, bool):
            raise ConfigError(f"finetune_fusion must be True or False, got {self.finetune_fusion!r}")
        if not isinstance(self.max_finetune_len, int) or self.max_finetune_len < 2:
            raise ConfigError(f"max_finetune_len must be an integer of at least 2, got {self.max_finetune_len!r}")
        if (not isinstance(self.finetune_chunks, tuple) or not self.finetune_chunks
                or any(not isinstance(c, int) or c < 1 for c in self.finetune_chunks)):
            raise ConfigError(f"finetune_chunks must be a non-empty tuple of positive integers, got {self.finetune_chunks!r}")
        if not isinstance(self.max_loras, int) or self.max_loras < 0:
            raise ConfigError(f"max_loras must be a non-negative integer, got {self.max_loras!r}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes < 1:
            raise ConfigError(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if self.lora_kernel not in GROUPED_LORA:
            raise ConfigError(f"lora_kernel must be one of {', '.join(GROUPED_LORA)}, got {self.lora_kernel!r}")
        if self.attention_backend not in (None, "auto", "pallas", "xla"):
            raise ConfigError(f'attention_backend must be "auto", "pallas", "xla" or None, got {self.attention_backend!r}')


def default_cache_bytes() -> int:
    """The page pool's size when EngineConfig leaves it open: 1 GiB on CPU, 85% of free device memory else."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return 1 << 30
    stats = device.memory_stats() or {}
    free = stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0)
    return int(0.85 * free) if free > 0 else 4 << 30


def backend_defaults(platform: str) -> tuple[int, dict]:
    """(minimum batch bucket, XLA compiler options) that measured fastest on each backend.

    NVIDIA GPUs: XLA's Triton GEMMs copy each layer's weights out of the scan's stacked arrays
    first; cuBLAS GEMMs read them in place but pick a slow GEMV for one row, so batches are padded
    to at least 8 rows and Triton GEMMs are off (benchmarks/RESULTS.md, "decode.py --shape
    llama3-8b", H100).
    """
    if platform == "gpu":
        return 8, {"xla_gpu_enable_triton_gemm": False}
    return 1, {}


class CompiledBuckets:
    """Executables of jitted functions, one per shape bucket, compiled on first use with the
    backend's compiler options; compilation is timed in ``compile_time_s``, apart from any run."""

    def __init__(self, compiler_options: dict):
        self.compiler_options = compiler_options
        self._executables: dict[tuple, jax.stages.Compiled] = {}
        self.compile_time_s = 0.0

    def __len__(self) -> int:
        return len(self._executables)

    def __contains__(self, key: tuple) -> bool:
        return key in self._executables

    def __getitem__(self, key: tuple) -> jax.stages.Compiled:
        return self._executables[key]

    def __iter__(self):
        return iter(list(self._executables))

    def get(self, key: tuple, fn, *args, **kwargs) -> jax.stages.Compiled:
        """The executable of jitted ``fn`` for bucket ``key``, lowered for ``args``/``kwargs`` if new."""
        compiled = self._executables.get(key)
        if compiled is None:
            start = time.perf_counter()
            compiled = fn.lower(*args, **kwargs).compile(compiler_options=self.compiler_options or None)
            self._executables[key] = compiled
            self.compile_time_s += time.perf_counter() - start
        return compiled


class ModelRunner:
    """One model's steps and page table.

    state: the engine's state cell this model joins as a draft (with ``vocab_maps``, its id maps
    to the target's vocabulary); None: a new engine's cell, this model its target.
    """

    def __init__(self, config: ModelConfig, params: Params, engine: EngineConfig = EngineConfig(), *,
                 state: DeviceStateCell | None = None, vocab_maps: tuple | None = None):
        self.config = config
        self.engine = engine
        self.dtype = params.embed.dtype
        # Adapter slots are the target's (drafts propose without them; verification stays
        # lossless), allocated before the page pool sizes itself to the memory left.
        adapters = (init_slots(config, engine.max_loras, engine.max_lora_rank, self.dtype, kernel=engine.lora_kernel,
                               bf16_bits=isinstance(params.layers.wqkv, Bf16Bits))
                    if engine.max_loras and state is None else None)
        per_page = engine.page_size * kv_bytes_per_token(config, self.dtype)
        # Each finetuning job's K/V cotangents (a sequence's worth) come out of the pool's memory.
        self.finetune_pages = next_power_of_two(-(-engine.max_finetune_len // engine.page_size))
        gradients = engine.max_finetune_jobs * self.finetune_pages * per_page if state is None else 0
        pool_bytes = (engine.kv_cache_bytes or default_cache_bytes()) - gradients
        if pool_bytes < per_page:
            raise ConfigError(f"{engine.max_finetune_jobs} finetuning job(s) of {engine.max_finetune_len} tokens "
                              f"need {gradients} bytes of K/V gradients, more than the KV cache's "
                              f"{engine.kv_cache_bytes or default_cache_bytes()}")
        num_pages = max(1, pool_bytes // per_page)
        capacity = num_pages * engine.page_size
        self.max_model_len = min(engine.max_model_len or config.max_position_embeddings,
                                 config.max_position_embeddings, capacity)
        model = ModelState(params=params, cache=init_kv_cache(config, num_pages, engine.page_size, self.dtype),
                           vocab_maps=vocab_maps, adapters=adapters)
        if state is None:
            self.cell, self.slot = DeviceStateCell(DeviceState(target=model)), TARGET
        else:
            self.cell, self.slot = state, state.add_draft(model)
        self.pages = PageTable(num_pages, engine.page_size)
        min_bucket, options = backend_defaults(jax.devices()[0].platform)
        self.min_batch_bucket = next_power_of_two(engine.min_batch_bucket or min_bucket)
        self.max_page_bucket = next_power_of_two(self.pages.pages_for(self.max_model_len))
        self._min_page_bucket = min(next_power_of_two(engine.min_page_bucket), self.max_page_bucket)
        self._chunk_bucket = self.token_bucket(min(engine.prefill_chunk, self.max_model_len))
        on_cpu = jax.devices()[0].platform == "cpu"
        self.interleaved_prefill_chunk = min(engine.interleaved_prefill_chunk or (
            CPU_INTERLEAVED_PREFILL_CHUNK if on_cpu else engine.prefill_chunk), engine.prefill_chunk)
        self._interleaved_bucket = self.token_bucket(min(self.interleaved_prefill_chunk, self.max_model_len))
        self.compiler_options = dict(engine.compiler_options) if engine.compiler_options is not None else options
        self._compiled = CompiledBuckets(self.compiler_options)  # by (kind, B, T, pages) bucket
        self._ran: set[tuple] = set()  # buckets whose executable has run at least once
        self.first_run = False  # whether the last step was its executable's first run
        static = dict(config=config, attention_backend=engine.attention_backend)
        self._step = donating_jit(token_step, **static)
        self._verify = donating_jit(verify_step, **static)
        self._coserved = {"step": donating_jit(with_finetuning(token_step), **static),
                          "verify": donating_jit(with_finetuning(verify_step), **static),
                          "finetune": donating_jit(finetune_step, **static)}

    @property
    def params(self) -> Params:
        return self.cell.model(self.slot).params

    @property
    def cache(self) -> KVCache:
        return self.cell.model(self.slot).cache

    @property
    def compile_time_s(self) -> float:
        """Seconds spent compiling this runner's steps (never counted in a step's time)."""
        return self._compiled.compile_time_s

    @property
    def num_compiled(self) -> int:
        """Executables compiled so far (one per step kind and shape bucket)."""
        return len(self._compiled)

    # -- shape buckets --------------------------------------------------------------------------
    def batch_bucket(self, rows: int) -> int:
        return next_power_of_two(rows, self.min_batch_bucket)

    def page_bucket(self, num_pages: int) -> int:
        """Prefix pages a step reads for sequences of up to ``num_pages`` pages: a power of two, at
        least ``min_page_bucket`` unless the longest sequence needs fewer."""
        return next_power_of_two(num_pages, self._min_page_bucket)

    def prefix_page_bucket(self, seq_ids: Sequence) -> int:
        """The prefix-page bucket a step over these sequences, as committed now, reads."""
        return self._check_batch(seq_ids)[1]

    def token_bucket(self, num_tokens: int) -> int:
        """New tokens per row of a step: 1 for decoding, a padded chunk for prefill."""
        return 1 if num_tokens == 1 else next_power_of_two(num_tokens, MIN_PREFILL_BUCKET)

    def step_tokens(self, num_tokens: int, after_prefix: bool) -> int:
        """New tokens per row of a plain step whose longest row brings ``num_tokens``, padded.

        A prompt chunk after a prefix (a long prompt's later chunks, a recomputation) pads to a
        full chunk, or to a full interleaved chunk when it fits one: two shapes per prefix size, not
        one per chunk size too (each executable costs ~270 memory maps on a CPU, of the 65,530
        Linux allows a process by default). Only a prompt's last chunk is ever short, so that is
        the only padding; reading the widest prefix instead cost every chunk attention over it.
        """
        t = self.token_bucket(num_tokens)
        if t > 1 and after_prefix:
            return self._interleaved_bucket if t <= self._interleaved_bucket else self._chunk_bucket
        return t

    def longest(self, max_len: int | None = None) -> int:
        """The longest sequence a warm-up covers: ``max_len``, capped by and defaulting to ``max_model_len``."""
        return min(max_len or self.max_model_len, self.max_model_len)

    def buckets(self, max_len: int | None = None) -> dict[str, list[int]]:
        """Every bucket a step can take, for sequences of up to ``max_len`` tokens (default
        ``max_model_len``): "batch" rows, "pages" of prefix, "prefill" chunk tokens."""
        max_len = self.longest(max_len)
        return {"batch": powers_of_two(self.batch_bucket(1), self.batch_bucket(self.engine.max_num_seqs)),
                "pages": powers_of_two(self.page_bucket(1), self.page_bucket(self.pages.pages_for(max_len))),
                "prefill": powers_of_two(self.token_bucket(2), self.token_bucket(min(self.engine.prefill_chunk, max_len)))}

    def step_keys(self, max_len: int | None = None) -> list[tuple]:
        """The (kind, B, T, pages) buckets of plain steps over sequences of up to ``max_len``
        tokens, at every batch size: decoding at every prefix size, prompt chunks of every size
        over no prefix, and full-size chunks (and interleaved ones) over every prefix size (``step``)."""
        buckets = self.buckets(max_len)
        pages = buckets["pages"]
        keys = ([("step", b, 1, p) for b in buckets["batch"] for p in pages]
                + [("step", b, t, pages[0]) for b in buckets["batch"] for t in buckets["prefill"]])
        if self.longest(max_len) > self.engine.prefill_chunk:  # prompts of 2+ chunks
            keys += [("step", b, self._chunk_bucket, p) for b in buckets["batch"] for p in pages[1:]]
        if self._interleaved_bucket < self._chunk_bucket and self.longest(max_len) > self.interleaved_prefill_chunk:
            keys += [("step", b, self._interleaved_bucket, p) for b in buckets["batch"] for p in pages[1:]]
        return keys

    def verify_keys(self, tree_sizes: Sequence[int], max_len: int | None = None) -> list[tuple]:
        """The ("verify", B, N, pages) buckets of verification steps of ``tree_sizes``-node trees."""
        buckets = self.buckets(max_len)
        return [("verify", b, n, p) for b in buckets["batch"] for n in tree_sizes for p in buckets["pages"]]

    def has_executable(self, key: tuple) -> bool:
        return key in self._compiled

    def compiled_keys(self) -> list[tuple]:
        return list(self._compiled)

    def memory(self, key: tuple) -> dict[str, int] | None:
        """Bytes the compiled executable of bucket ``key`` holds while it runs (None if it is not
        compiled): its arguments, outputs (less those written in place of a donated argument),
        scratch ("temp") and their sum, "peak" (XLA's ``memory_analysis``)."""
        if key not in self._compiled:
            return None
        stats = self._compiled[key].memory_analysis()
        sizes = {"arguments": stats.argument_size_in_bytes,
                 "outputs": stats.output_size_in_bytes - stats.alias_size_in_bytes, "temp": stats.temp_size_in_bytes}
        return {**sizes, "peak": sum(sizes.values())}

    def compile(self, key: tuple) -> None:
        """Compile the executable of a ("step", B, T, pages) or ("verify", B, N, pages) bucket, if
        new, and run it once on empty rows (they write nothing): an executable's first run is
        slow (up to 2x a step on a CPU), and that should land neither on a request nor in the
        step timings the batch-aware budget learns from."""
        kind, b, t, p = key
        if kind not in ("step", "verify"):
            raise ValueError(f"unknown step kind {kind!r} in bucket {key!r}")
        if key not in self._ran:
            self._run(self._step if kind == "step" else self._verify, key, self._empty_batch(key))

    @staticmethod
    def _empty_batch(key: tuple):
        """Rows that write nothing, shaped as a ("step", B, T, pages) or ("verify", B, N, pages) bucket."""
        kind, b, t, p = key[:4]
        return TokenBatch.empty(row_meta(b, p), t) if kind == "step" else TreeBatch.empty(row_meta(b, p), t)

    def warm_up_jobs(self, tree_sizes: Sequence[int] = (), max_len: int | None = None) -> dict[str, list]:
        """One thunk per bucket not yet run, by kind: "step", the plain-step buckets
        (``step_keys``), and "verify", the verification buckets of ``tree_sizes``-node trees; each
        compiles it and runs it once on empty rows (``compile``)."""
        return {kind: [functools.partial(self.compile, k) for k in keys if k not in self._ran]
                for kind, keys in (("step", self.step_keys(max_len)), ("verify", self.verify_keys(tree_sizes, max_len)))}

    def coserved_keys(self, chunks: Sequence[int], signature: tuple, tree_sizes: Sequence[int] = (),
                      max_len: int | None = None) -> list[tuple]:
        """The buckets of finetuning slices of ``chunks`` tokens for a job of ``signature``: fused
        into every decode and verification bucket, and alone."""
        inference = [k for k in self.step_keys(max_len) if k[2] == 1] + self.verify_keys(tree_sizes, max_len)
        slices = [(c, self.finetune_pages, signature, backward) for c in chunks for backward in (False, True)]
        return [k + ("finetune",) + s for k in inference for s in slices] + [("finetune",) + s for s in slices]

    def compile_coserved(self, key: tuple, job: JobState, sequence: SequenceState) -> None:
        """Compile (not run: a run would train) the executable of a ``coserved_keys`` bucket over
        a job's state shaped as ``job`` (its optimizer state left out) and ``sequence``."""
        if key in self._compiled:
            return
        chunk, pages, _, backward = key[-4:]
        work = FinetuneWork(chunk=make_chunk(np.zeros(1, np.int32), np.zeros(1, bool), 0, chunk),
                            pages=np.zeros(pages, np.int32), backward=backward)
        batch = work if key[0] == "finetune" else (self._empty_batch(key), work)
        state = CoservingState(model=self.cell.model(self.slot), job=job.replace(opt_state=None), sequence=sequence)
        self._compiled.get(key, self._coserved[key[0]], *step_args(state, batch))

    def warm_up(self, tree_sizes: Sequence[int] = (), max_len: int | None = None) -> int:
        """Compile ahead every bucket of ``warm_up_jobs``, so no step waits for a compilation;
        returns how many were new."""
        jobs = [job for kind in self.warm_up_jobs(tree_sizes, max_len).values() for job in kind]
        for job in jobs:
            job()
        return len(jobs)

    # -- sequence lifecycle ------------------------------------------------------------------
    def add_sequence(self, seq_id, max_tokens: int) -> None:
        """Register a sequence and reserve pages for ``max_tokens`` tokens (prompt + output)."""
        self.pages.add(seq_id)
        try:
            self.pages.reserve(seq_id, max_tokens)
        except Exception:
            self.pages.release(seq_id)
            raise

    def reserve(self, seq_id, num_tokens: int) -> None:
        """Pages for ``num_tokens`` tokens of a sequence in all (check ``can_grow`` first)."""
        self.pages.reserve(seq_id, num_tokens)

    def release(self, seq_id) -> None:
        self.pages.release(seq_id)

    def can_admit(self, max_tokens: int) -> bool:
        return self.pages.pages_for(max_tokens) <= self.pages.num_free

    def can_grow(self, seq_id, num_tokens: int) -> bool:
        """Whether the free pages let a sequence grow to ``num_tokens`` tokens (``pages.reserve``)."""
        return self.pages.missing(seq_id, num_tokens) <= self.pages.num_free

    def commit(self, seq_ids: Sequence, counts: Sequence[int]) -> None:
        """Record that each sequence's cache holds ``counts`` more tokens: the one place a step's
        result (a prompt chunk, a decoded token, a verified path) becomes part of a sequence."""
        for seq_id, count in zip(seq_ids, counts):
            self.pages.commit(seq_id, int(count))

    # -- one step -------------------------------------------------------------------------------
    def _check_batch(self, seq_ids: Sequence) -> tuple[int, int, list[int]]:
        """(batch bucket, prefix-page bucket, committed lengths) of a step's sequences."""
        if not seq_ids:
            raise ValueError("a step needs at least one sequence")
        if len(seq_ids) > self.engine.max_num_seqs:
            raise ValueError(f"{len(seq_ids)} sequences in one step; max_num_seqs is {self.engine.max_num_seqs}")
        lengths = [self.pages.length(s) for s in seq_ids]
        b = self.batch_bucket(len(seq_ids))
        p = self.page_bucket(max(self.pages.pages_for(length) for length in lengths))
        return b, p, lengths

    def _run(self, fn, key: tuple, batch, finetune: FinetuneSlice | None = None):
        """Run step ``fn`` (``donating_jit``) on this model's state, compiling per shape bucket
        ``key`` (timed apart), and keep the state it returns. With ``finetune``, ``fn`` is the
        step fused with its slice (``engine.finetuning.with_finetuning``), over the job's state as
        well. Sets ``first_run``: whether this was the executable's first run (slower than the rest)."""
        if finetune is not None:
            fused = key[0] != "finetune"
            fn, key = self._coserved[key[0]], key + ("finetune",) * fused + finetune.bucket
            batch = (batch, finetune.work) if fused else finetune.work
        if not self.has_executable(key):
            log.info("compiling step shape %s on first use (LLM.warm_up compiles ahead)", key)
        model = self.cell.model(self.slot)
        state = model
        if finetune is not None:
            job, sequence = self.cell.jobs[finetune.job]
            state = CoservingState(model=model, job=job.replace(opt_state=None), sequence=sequence)
        args = step_args(state, batch)
        compiled = self._compiled.get(key, fn, *args)
        self.first_run = key not in self._ran
        self._ran.add(key)
        start = time.perf_counter()
        caches, outputs = compiled(*args)
        if finetune is not None:
            caches, new_job, sequence = caches
            jax.block_until_ready(new_job)  # a slice alone returns nothing that would wait for it
            self.cell.jobs[finetune.job] = (new_job.replace(opt_state=job.opt_state), sequence)
            finetune.ran = True
        self.cell.set_model(self.slot, model.with_caches(caches))
        outputs = [np.asarray(x) for x in outputs]
        return outputs, time.perf_counter() - start

    def finetune(self, work: FinetuneSlice) -> float:
        """Run a finetuning slice alone (no inference row to fuse it with); returns its seconds."""
        _, elapsed = self._run(None, ("finetune",), None, finetune=work)
        return elapsed

    def step(self, inputs: Sequence[StepInput], *, logprobs: bool = False, finetune: FinetuneSlice | None = None):
        """Run one step; returns (next token per input [len(inputs)] int32, seconds this step took),
        and with ``logprobs`` a third item: each input's ``TokenLogprob`` of its token
        (``sampling.token_logprobs``; a step without it does no such work). ``finetune``: a
        finetuning slice fused into the step.

        Compilation time of a new bucket is counted in ``compile_time_s``, not in the step time.
        """
        seq_ids = [x.seq_id for x in inputs]
        b, p, lengths = self._check_batch(seq_ids)
        n = len(inputs)
        if any(len(x.tokens) == 0 for x in inputs):
            raise ValueError(f"sequence {next(x.seq_id for x in inputs if not x.tokens)!r} has no new tokens "
                             "in this step")
        t = self.step_tokens(max(len(x.tokens) for x in inputs), after_prefix=max(lengths) > 0)
        batch = TokenBatch.empty(row_meta(b, p, self.pages.block_table(seq_ids, p), lengths, inputs), t)
        for row, (x, length) in enumerate(zip(inputs, lengths)):
            k = len(x.tokens)
            if length + k > self.max_model_len:
                raise ValueError(f"sequence {x.seq_id!r} would exceed max_model_len {self.max_model_len}")
            batch.tokens[row, :k] = x.tokens
            batch.positions[row, :] = length + np.arange(t)
            batch.slots[row, :k] = self.pages.slots(x.seq_id, length, k)
            batch.last[row, 0] = k - 1
        batch.logprobs[...] = logprobs
        (next_tokens, *scores), elapsed = self._run(self._step, ("step", b, t, p), batch, finetune)
        self.commit(seq_ids, [len(x.tokens) for x in inputs])
        if logprobs:
            return next_tokens[:n], elapsed, sampling.logprob_entries(next_tokens[:n], *(x[:n] for x in scores))
        return next_tokens[:n], elapsed

    def verify(self, seq_ids: Sequence, trees: Sequence[TokenTree], sampling_inputs: Sequence[StepInput] | None = None,
               *, logprobs: bool = False, finetune: FinetuneSlice | None = None):
        """Score each sequence's token tree in one target pass; keep the accepted path.

        A tree's root is the sequence's last token (chosen, not yet run). The root's and the
        accepted nodes' K/V are committed; rejected nodes leave no trace. Proposals are
        deterministic (a point mass each, e.g. from a suffix cache): greedy rows accept the
        target's argmax path; sampled rows (``sampling_inputs``: each row's temperature, top-k,
        top-p and key, ``tokens`` unused; None = all greedy) run multi-step speculative sampling,
        so their tokens follow the target's distribution exactly. Returns, per sequence, the new
        tokens (accepted speculated tokens, then the target's bonus token) and the step's seconds;
        with ``logprobs`` also, per sequence, the ``TokenLogprob`` of each new token, from the
        target's logits in this pass (``verify.emitted_logprobs``). ``finetune``: a finetuning
        slice fused into the step.
        """
        if len(seq_ids) != len(trees):
            raise ValueError(f"{len(seq_ids)} sequences but {len(trees)} trees")
        if sampling_inputs is not None and len(sampling_inputs) != len(seq_ids):
            raise ValueError(f"{len(seq_ids)} sequences but {len(sampling_inputs)} sampling inputs")
        b, p, lengths = self._check_batch(seq_ids)
        stacked = stack_trees(trees)
        n = stacked["tokens"].shape[1]
        rows = len(seq_ids)
        batch = TreeBatch.empty(row_meta(b, p, self.pages.block_table(list(seq_ids), p), lengths,
                                         sampling_inputs or ()), n)
        for name in ("tokens", "parents", "depths", "mask", "live"):
            getattr(batch, name)[:rows] = stacked[name]
        for row, (seq_id, length, tree) in enumerate(zip(seq_ids, lengths, trees)):
            span = int(tree.depths.max()) + 1  # the root's position and one per level
            if length + span > self.max_model_len:
                raise ValueError(f"sequence {seq_id!r} would exceed max_model_len {self.max_model_len}")
            batch.position_slots[row, :span] = self.pages.slots(seq_id, length, span)
        batch.positions[:] = batch.rows.context_lens[:, None] + batch.depths
        batch.logprobs[...] = logprobs
        (tokens, count, *scores), elapsed = self._run(self._verify, ("verify", b, n, p), batch, finetune)
        new_tokens = [tokens[row, : count[row]].tolist() for row in range(rows)]
        self.commit(seq_ids, count[:rows])
        if logprobs:
            return new_tokens, elapsed, [sampling.logprob_entries(tokens, *(x[row] for x in scores))
                                         for row, tokens in enumerate(new_tokens)]
        return new_tokens, elapsed
