"""Sampling parameters, per-row PRNG key streams, and a batched sampler.

Host side: ``SamplingParams`` (one request's settings, validated on construction),
``sampling_arrays`` (a batch of them as per-row arrays), ``request_key`` (a request's base key) and
``TokenLogprob`` (a generated token's log-probability and the likeliest alternatives).
Device side: ``row_keys``, ``process_logits``, ``sample`` and ``token_logprobs``, which take every per-request setting
as a per-row array rather than a static argument, so one compiled function serves any mix of
greedy and sampled requests.

The processed distribution of a row is: logits / temperature, then top-k, then top-p (nucleus),
renormalised. A greedy row (temperature == 0) is a point mass on the argmax. Tokens tied with the
last one kept by top-k or top-p are all kept, so the result never depends on token order.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


class SamplingParamsError(ValueError):
    """Sampling settings that specjax cannot honour."""


# JAX (with x64 off) keeps only the low 32 bits of a seed, so larger or negative seeds would
# silently share another seed's stream; we reject them instead.
_SEED_LIMIT = 2**32
MAX_LOGPROBS = 5  # the most alternatives a token's logprobs may list (OpenAI's limit); static under jit


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _integer(name: str, value, minimum: int, limit: int | None = None) -> int:
    if not _is_int(value):
        raise SamplingParamsError(f"{name} must be an integer, got {value!r}")
    if value < minimum or (limit is not None and value >= limit):
        bound = f">= {minimum}" if limit is None else f"in [{minimum}, {limit})"
        raise SamplingParamsError(f"{name} must be {bound}, got {value!r}")
    return int(value)


def _real(name: str, value) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        raise SamplingParamsError(f"{name} must be a real number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick one request's tokens.

    temperature: 0 means greedy (argmax); otherwise logits are divided by it.
    top_k: keep the k highest-logit tokens; 0 = off.
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p; 1 = off.
    seed: a reproducible stream (see ``request_key``); None draws from the engine's global key.
    max_tokens: the most tokens to generate.
    stop: strings that end generation (a single str or a list is accepted).
    stop_token_ids: token ids that end generation, in addition to EOS.
    ignore_eos: keep generating past EOS.
    logprobs: None, or report each generated token's log-probability and this many (0 to
        ``MAX_LOGPROBS``) likeliest alternatives (``RequestOutput.logprobs``; see ``token_logprobs``).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 128
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self):
        # Normalise as we validate (numpy scalars to Python numbers, lists to tuples) so that
        # equal settings compare and hash equal.
        set_ = partial(object.__setattr__, self)
        temperature = _real("temperature", self.temperature)
        if not math.isfinite(temperature) or temperature < 0:
            raise SamplingParamsError(f"temperature must be finite and >= 0, got {self.temperature!r}")
        set_("temperature", temperature)
        top_p = _real("top_p", self.top_p)
        if not 0 < top_p <= 1:  # also rejects NaN
            raise SamplingParamsError(f"top_p must be in (0, 1], got {self.top_p!r}")
        set_("top_p", top_p)
        set_("top_k", _integer("top_k", self.top_k, 0))
        set_("max_tokens", _integer("max_tokens", self.max_tokens, 1))
        if self.seed is not None:
            set_("seed", _integer("seed", self.seed, 0, _SEED_LIMIT))

        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)):
            raise SamplingParamsError(f"stop must be a str or a sequence of str, got {self.stop!r}")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise SamplingParamsError(
                    f"stop strings must be non-empty str, got {s!r} in stop={self.stop!r}"
                )
        set_("stop", tuple(stop))

        ids = self.stop_token_ids
        if not isinstance(ids, (list, tuple)) or not all(_is_int(t) and t >= 0 for t in ids):
            raise SamplingParamsError(f"stop_token_ids must be a sequence of ints >= 0, got {ids!r}")
        set_("stop_token_ids", tuple(int(t) for t in ids))
        if not isinstance(self.ignore_eos, (bool, np.bool_)):
            raise SamplingParamsError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        set_("ignore_eos", bool(self.ignore_eos))
        if self.logprobs is not None:
            set_("logprobs", _integer("logprobs", self.logprobs, 0, MAX_LOGPROBS + 1))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability and the likeliest tokens there, ``top``: ((id, logprob), ...)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def logprob_entries(tokens: Sequence[int], logprobs: np.ndarray, top_ids: np.ndarray, top_logprobs: np.ndarray
                    ) -> list[TokenLogprob]:
    """``token_logprobs``' arrays for one row's ``tokens`` ([T], [T, K], [T, K]; rows past T ignored)."""
    return [TokenLogprob(int(t), float(lp), tuple(zip(ids.tolist(), lps.tolist())))
            for t, lp, ids, lps in zip(tokens, logprobs, top_ids, top_logprobs)]


def sampling_arrays(params: Sequence[SamplingParams]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The per-row arrays ``sample`` takes: temperature [B] f32, top_k [B] int32, top_p [B] f32."""
    return (
        np.array([p.temperature for p in params], np.float32),
        np.array([p.top_k for p in params], np.int32),
        np.array([p.top_p for p in params], np.float32),
    )


def request_key(seed: int | None, global_key: jax.Array, request_index: int) -> jax.Array:
    """A request's base key (a scalar typed key): every token it samples derives from it.

    Seeded requests get ``jax.random.key(seed)``, so the same seed gives the same tokens in any
    engine, batch or run. Unseeded ones get ``fold_in(global_key, request_index)``: distinct per
    request (request_index < 2**32) and reproducible given the engine's global key.
    """
    if seed is not None:
        return jax.random.key(_integer("seed", seed, 0, _SEED_LIMIT))
    return jax.random.fold_in(global_key, request_index)


@jax.jit
def row_keys(base_keys: jax.Array, steps: jax.Array) -> jax.Array:
    """Per-token keys: ``fold_in(base_keys[b], steps[b, ...])``, the key of a request's n-th token.

    base_keys: [B] typed keys (from ``request_key``); steps: [B] or [B, T] int (T: e.g. the positions
    of a speculative block). Returns typed keys shaped like steps.
    """
    steps = jnp.asarray(steps).astype(jnp.uint32)
    fold = jax.random.fold_in
    for _ in range(steps.ndim - 1):
        fold = jax.vmap(fold, in_axes=(None, 0))
    return jax.vmap(fold)(base_keys, steps)


def argmax(x: jax.Array) -> jax.Array:
    """``jnp.argmax`` over the last axis (the first maximum, int32) of NaN-free ``x``, as two plain
    reductions: XLA's CPU argmax, one reduce over (value, index) pairs, is not vectorised and was
    7x slower (benchmarks/RESULTS.md, "Measurements behind code defaults")."""
    top = jnp.max(x, axis=-1, keepdims=True)
    return jnp.min(jnp.where(x == top, jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape[-1]), axis=-1)


def _cutoffs(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """[B] lowest scaled logit kept by top-k then top-p, from one descending sort per row.

    scaled: [B, V] f32 tempered logits; top_k: [B] int32 in [1, V]; top_p: [B] f32.
    """
    desc = jnp.sort(scaled, axis=-1, descending=True)
    rank = jnp.arange(scaled.shape[-1])
    in_top_k = rank < top_k[:, None]
    # Nucleus of the top-k-renormalised distribution: rank r stays while the mass of the ranks
    # before it is short of top_p, which keeps the smallest prefix that reaches top_p.
    probs = jax.nn.softmax(jnp.where(in_top_k, desc, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # top_p == 1 must keep the whole tail, which fp32 rounding of the cumsum could cut.
    in_nucleus = (mass_before < top_p[:, None]) | (top_p[:, None] >= 1)
    n_keep = jnp.maximum(jnp.sum(in_top_k & in_nucleus, axis=-1), 1)  # both masks are prefixes
    return jnp.take_along_axis(desc, (n_keep - 1)[:, None], axis=-1)[:, 0]


@jax.jit
def process_logits(
    logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array
) -> jax.Array:
    """The logits of the distribution each row samples from: [B, V] f32, -inf where excluded.

    logits: [B, V] any float; temperature: [B] f32 (0 = greedy); top_k: [B] int32 (0 or >= V = off);
    top_p: [B] f32 in (0, 1]. Sampling rows return tempered logits with filtered tokens at -inf
    (unnormalised); greedy rows return 0 at the argmax and -inf elsewhere. Speculative verification
    can use this directly as the target or draft distribution.
    """
    logits = logits.astype(jnp.float32)
    batch, vocab = logits.shape
    greedy = temperature == 0
    scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]
    top_k = jnp.where((top_k <= 0) | (top_k > vocab), vocab, top_k).astype(jnp.int32)
    filtered = ~greedy & ((top_k < vocab) | (top_p < 1))
    # The sort is the costly part; skip it when no row filters (e.g. an all-greedy batch).
    cutoff = jax.lax.cond(
        jnp.any(filtered),
        _cutoffs,
        lambda *_: jnp.full((batch,), -jnp.inf, jnp.float32),
        scaled, top_k, top_p,
    )
    cutoff = jnp.where(filtered, cutoff, -jnp.inf)
    sampled = jnp.where(scaled >= cutoff[:, None], scaled, -jnp.inf)
    point_mass = jnp.where(
        jnp.arange(vocab) == argmax(logits)[:, None], 0.0, -jnp.inf
    )
    return jnp.where(greedy[:, None], point_mass, sampled)


def process_node_logits(
    logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array
) -> jax.Array:
    """``process_logits`` for N positions per row (tree nodes, a draft's frontier): logits [B, N, V]
    with each row's settings [B] applied to all of its positions -> [B, N, V]."""
    b, n, vocab = logits.shape
    rows = lambda x: jnp.repeat(x, n, axis=0)  # noqa: E731
    return process_logits(logits.reshape(b * n, vocab), rows(temperature), rows(top_k), rows(top_p)).reshape(
        b, n, vocab)


@partial(jax.jit, static_argnames="return_logprobs")
def sample(
    logits: jax.Array,
    keys: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    *,
    return_logprobs: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """One token per row, each row with its own key and settings.

    logits: [B, V] any float; keys: [B] typed PRNG keys (``jax.random.key``, e.g. from ``row_keys``);
    temperature: [B] f32 (0 = greedy); top_k: [B] int32 (0 = off); top_p: [B] f32 (1 = off).
    Returns tokens [B] int32, and with return_logprobs also logprobs [B] f32: the chosen token's
    log-probability under the processed distribution (0 for greedy rows).
    """
    processed = process_logits(logits, temperature, top_k, top_p)
    # A greedy row's point mass leaves categorical only the argmax to pick, so greedy is exact in
    # a mixed batch; an all-greedy batch skips drawing [B, V] Gumbel noise altogether.
    tokens = jax.lax.cond(
        jnp.all(temperature == 0),
        lambda: argmax(processed),
        lambda: jax.vmap(jax.random.categorical)(keys, processed).astype(jnp.int32),
    )
    if not return_logprobs:
        return tokens
    chosen = jnp.take_along_axis(processed, tokens[:, None], axis=-1)[:, 0]
    return tokens, chosen - jax.nn.logsumexp(processed, axis=-1)


def token_logprobs(logits: jax.Array, tokens: jax.Array, num_top: int = MAX_LOGPROBS
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Log-probabilities of ``tokens`` and the ``num_top`` likeliest tokens under the model's own
    distribution: the log-softmax of the raw logits, before temperature, top-k and top-p (what
    vLLM returns by default, and the only choice that means something for greedy requests, whose
    processed distribution is a point mass).

    logits: [..., V]; tokens: [...] int. Returns (logprobs [...] f32, top ids [..., num_top] int32,
    top logprobs [..., num_top] f32, most likely first).
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(log_probs, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    top_values, top_ids = jax.lax.top_k(log_probs, num_top)
    return chosen, top_ids.astype(jnp.int32), top_values


def no_logprobs(shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Zeros shaped as ``token_logprobs``' outputs for tokens of ``shape``: a step whose rows asked
    for no logprobs skips the vocabulary-wide log-softmax and top-k."""
    top = shape + (MAX_LOGPROBS,)
    return jnp.zeros(shape, jnp.float32), jnp.zeros(top, jnp.int32), jnp.zeros(top, jnp.float32)
