"""Tests for specjax.sampling: parameter validation, key streams, and the batched sampler.

Distribution tests draw tens of thousands of tokens as rows of one batch (one compiled call) and
compare frequencies with a float64 numpy reference, within 5 standard errors per token.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specjax.sampling import (
    SamplingParams,
    SamplingParamsError,
    argmax,
    process_logits,
    request_key,
    row_keys,
    sample,
    sampling_arrays,
)

GLOBAL_KEY = jax.random.key(1234)


def _rows(n, temperature, top_k, top_p):
    return (
        jnp.full((n,), temperature, jnp.float32),
        jnp.full((n,), top_k, jnp.int32),
        jnp.full((n,), top_p, jnp.float32),
    )


def _stream(seed, n):
    """Keys of one seeded request's first n tokens, [n]."""
    base = request_key(seed, GLOBAL_KEY, 0)
    return row_keys(jnp.broadcast_to(base, (n,)), jnp.arange(n))


# ---- reference (float64 numpy, written for clarity, not speed) ----

def reference_probs(logits, temperature, top_k=0, top_p=1.0):
    """[V] probabilities after temperature, top-k, top-p; ties at a cutoff are all kept."""
    z = np.asarray(logits, np.float64) / temperature
    if 0 < top_k < len(z):
        z = np.where(z >= np.sort(z)[::-1][top_k - 1], z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1:
        desc = np.sort(p)[::-1]
        n = int(np.searchsorted(np.cumsum(desc), top_p)) + 1  # smallest prefix reaching top_p
        p = np.where(p >= desc[min(n, len(p)) - 1], p, 0.0)
        p /= p.sum()
    return p


def assert_matches(tokens, expected):
    """Frequencies of tokens [N] within 5 standard errors (per token) of expected [V]."""
    n, v = len(tokens), len(expected)
    freq = np.bincount(np.asarray(tokens), minlength=v) / n
    tol = 5 * np.sqrt(expected * (1 - expected) / n) + 1e-12
    assert np.all(np.abs(freq - expected) <= tol), (freq, expected, tol)


# ---- SamplingParams ----

@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("temperature", "1.0"),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", -0.2),
        ("top_p", float("nan")),
        ("top_k", -1),
        ("top_k", 2.0),
        ("max_tokens", 0),
        ("max_tokens", -5),
        ("max_tokens", 10.0),
        ("seed", 1.5),
        ("seed", "7"),
        ("seed", True),
        ("seed", -1),
        ("seed", 2**32),
        ("stop", ""),
        ("stop", ["ok", ""]),
        ("stop", [3]),
        ("stop", 3),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", [1.0]),
        ("stop_token_ids", 5),
        ("ignore_eos", "yes"),
    ],
)
def test_invalid_params_raise_naming_field_and_value(field, value):
    with pytest.raises(SamplingParamsError) as err:
        SamplingParams(**{field: value})
    assert field in str(err.value) and repr(value) in str(err.value)
    assert isinstance(err.value, ValueError)


def test_valid_params_are_normalised():
    p = SamplingParams(
        temperature=0, top_k=np.int64(5), top_p=0.9, seed=np.uint32(2**32 - 1), max_tokens=1,
        stop="\n", stop_token_ids=[2, 0],
    )
    assert p.greedy and not SamplingParams().greedy
    assert p.temperature == 0.0 and isinstance(p.temperature, float)
    assert p.top_k == 5 and type(p.top_k) is int
    assert p.seed == 2**32 - 1 and type(p.seed) is int
    assert p.stop == ("\n",) and p.stop_token_ids == (2, 0)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop=["a"], top_k=np.int32(3)) == SamplingParams(stop=("a",), top_k=3)
    hash(p)  # frozen and hashable: usable as a cache key


def test_sampling_arrays():
    temperature, top_k, top_p = sampling_arrays(
        [SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_k=3, top_p=0.9)]
    )
    np.testing.assert_array_equal(temperature, np.array([0, 0.7], np.float32))
    np.testing.assert_array_equal(top_k, [0, 3])
    np.testing.assert_array_equal(top_p, np.array([1, 0.9], np.float32))
    assert (temperature.dtype, top_k.dtype, top_p.dtype) == (np.float32, np.int32, np.float32)


# ---- keys ----

def test_row_keys_follow_the_documented_stream():
    base = jnp.stack([request_key(7, GLOBAL_KEY, 0), request_key(None, GLOBAL_KEY, 3)])
    keys = row_keys(base, jnp.array([5, 2]))
    np.testing.assert_array_equal(
        jax.random.key_data(keys[0]), jax.random.key_data(jax.random.fold_in(jax.random.key(7), 5))
    )
    np.testing.assert_array_equal(
        jax.random.key_data(keys[1]),
        jax.random.key_data(jax.random.fold_in(jax.random.fold_in(GLOBAL_KEY, 3), 2)),
    )
    block = row_keys(base, jnp.array([[5, 6, 7], [2, 3, 4]]))  # e.g. a speculative block
    assert block.shape == (2, 3)
    np.testing.assert_array_equal(jax.random.key_data(block[:, 0]), jax.random.key_data(keys))


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    n, vocab = 512, 1000
    logits = jnp.zeros((n, vocab))  # uniform: two independent streams agree w.p. 1/vocab per row
    params = _rows(n, 1.0, 0, 1.0)

    def draw(seeds, step):
        base = jnp.stack([request_key(int(s), GLOBAL_KEY, 0) for s in seeds])
        return np.asarray(sample(logits, row_keys(base, jnp.full((n,), step)), *params))

    seeds = np.arange(n)
    first = draw(seeds, 0)
    np.testing.assert_array_equal(first, draw(seeds, 0))
    assert np.mean(first == draw(seeds + n, 0)) < 0.02  # other seeds
    assert np.mean(first == draw(seeds, 1)) < 0.02  # same seeds, next token
    unseeded = jnp.stack([request_key(None, GLOBAL_KEY, i) for i in range(n)])
    assert np.mean(first == np.asarray(sample(logits, unseeded, *params))) < 0.02
    assert len(np.unique(first)) > 300  # rows of one batch are independent, too


def test_a_row_does_not_depend_on_its_batch():
    """A seeded request samples the same token alone or in any mixed batch (server determinism)."""
    logits = jax.random.normal(jax.random.key(0), (6, 64)) * 3
    keys = row_keys(jnp.stack([request_key(s, GLOBAL_KEY, 0) for s in range(6)]), jnp.arange(6))
    temperature = jnp.array([0.8, 0.0, 1.3, 0.5, 0.0, 1.0])
    top_k = jnp.array([0, 0, 5, 0, 3, 0], jnp.int32)
    top_p = jnp.array([1.0, 1.0, 0.9, 0.7, 1.0, 1.0])
    batch_tokens, batch_logprobs = sample(logits, keys, temperature, top_k, top_p, return_logprobs=True)
    for i in range(6):
        row = slice(i, i + 1)
        tokens, logprobs = sample(
            logits[row], keys[row], temperature[row], top_k[row], top_p[row], return_logprobs=True
        )
        assert tokens[0] == batch_tokens[i]
        np.testing.assert_allclose(logprobs[0], batch_logprobs[i], rtol=1e-6)


# ---- greedy ----

def test_greedy_rows_take_argmax_in_a_mixed_batch():
    b, vocab = 64, 100
    logits = jax.random.normal(jax.random.key(1), (b, vocab))
    logits = logits.at[0, 10].set(99.0).at[0, 20].set(99.0)  # a tie: argmax takes the first
    greedy = np.arange(b) % 2 == 0
    temperature = jnp.where(greedy, 0.0, 1.0)
    top_k = jnp.where(np.arange(b) % 3 == 0, 5, 0).astype(jnp.int32)  # top-k/p don't affect greedy
    top_p = jnp.where(np.arange(b) % 5 == 0, 0.5, 1.0)
    keys = row_keys(jnp.stack([request_key(s, GLOBAL_KEY, 0) for s in range(b)]), jnp.zeros(b))
    tokens, logprobs = sample(logits, keys, temperature, top_k, top_p, return_logprobs=True)
    argmax = np.argmax(np.asarray(logits), axis=-1)
    assert argmax[0] == 10
    np.testing.assert_array_equal(np.asarray(tokens)[greedy], argmax[greedy])
    np.testing.assert_array_equal(np.asarray(logprobs)[greedy], 0.0)
    assert np.mean(np.asarray(tokens)[~greedy] != argmax[~greedy]) > 0.3  # the others do sample
    # An all-greedy batch (which skips the sort and the Gumbel draw) agrees.
    np.testing.assert_array_equal(sample(logits, keys, jnp.zeros(b), top_k, top_p), argmax)


def test_argmax_equals_jnp_argmax_ties_and_masked_rows_included():
    x = jnp.round(jax.random.normal(jax.random.key(2), (3, 5, 4099)), 1)  # rounding makes ties likely
    x = x.at[1, 2].set(-jnp.inf).at[2, 0, :7].set(jnp.inf)  # a fully masked row; several +inf
    np.testing.assert_array_equal(argmax(x), jnp.argmax(x, axis=-1))
    assert argmax(x).dtype == jnp.int32


# ---- filters: support ----

def test_top_k_draws_stay_within_the_k_highest_logits():
    n, vocab = 8192, 32
    logits = jax.random.normal(jax.random.key(2), (vocab,)) * 2
    top_k = jax.random.randint(jax.random.key(3), (n,), 1, vocab + 1)
    tokens = sample(
        jnp.broadcast_to(logits, (n, vocab)), _stream(0, n), jnp.full((n,), 1.5), top_k, jnp.ones(n)
    )
    logits = np.asarray(logits)
    rank = (logits[None, :] > logits[np.asarray(tokens)][:, None]).sum(-1)  # 0 = highest
    assert np.all(rank < np.asarray(top_k))
    assert np.any(rank[np.asarray(top_k) >= 4] == 3)  # not just always the top token


def test_processed_support_matches_the_numpy_nucleus():
    """For many random rows, the tokens left by process_logits are exactly the reference's."""
    b, vocab = 256, 50
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(b, vocab)) * rng.uniform(0.5, 4, size=(b, 1))
    temperature = rng.uniform(0.3, 2.0, size=b)
    top_k = rng.choice([0, 1, 2, 10, 40, vocab, vocab + 5], size=b)
    top_p = rng.choice([0.05, 0.3, 0.6, 0.9, 0.99, 1.0], size=b)
    processed = process_logits(
        jnp.asarray(logits, jnp.float32), jnp.asarray(temperature, jnp.float32),
        jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p, jnp.float32),
    )
    support = np.isfinite(np.asarray(processed))
    for i in range(b):
        expected = reference_probs(logits[i].astype(np.float32), temperature[i].astype(np.float32),
                                   top_k[i], top_p[i]) > 0
        np.testing.assert_array_equal(support[i], expected, err_msg=f"row {i}")
    tokens = sample(jnp.asarray(logits), _stream(1, b), jnp.asarray(temperature, jnp.float32),
                    jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p, jnp.float32))
    assert np.all(support[np.arange(b), np.asarray(tokens)])


def test_ties_at_a_cutoff_are_all_kept():
    logits = jnp.array([[0.0, 3.0, 1.0, 3.0, 3.0, -1.0],  # top_k=2 with a three-way tie for first
                        [2.0, 0.0, 2.0, -1.0, 0.0, 0.0]])  # top_p small: both 2.0s stay
    processed = process_logits(logits, jnp.ones(2), jnp.array([2, 0]), jnp.array([1.0, 0.1]))
    np.testing.assert_array_equal(
        np.isfinite(np.asarray(processed)),
        [[0, 1, 0, 1, 1, 0], [1, 0, 1, 0, 0, 0]],
    )


def test_filters_can_be_off_and_masked_vocab_stays_masked():
    logits = jnp.array([[1.0, -jnp.inf, 0.5, 0.2]])  # e.g. a padded vocabulary entry
    for top_k, top_p in [(0, 1.0), (4, 1.0), (9, 1.0), (3, 1.0), (0, 0.999999)]:
        processed = process_logits(logits, jnp.array([0.9]), jnp.array([top_k]), jnp.array([top_p]))
        np.testing.assert_array_equal(np.isfinite(np.asarray(processed)), [[1, 0, 1, 1]])


# ---- filters: distribution ----

LOGITS = np.array([2.0, 1.6, 1.1, 0.9, 0.3, -0.2, -0.8, -1.5], np.float32)

# (temperature, top_k, top_p) and, for each, distributions a wrong sampler would produce: the test
# asserts these are distinguishable from the right one at the sample size, i.e. that it has power.
DISTRIBUTION_CASES = {
    "temperature": ((0.7, 0, 1.0), [(1.0, 0, 1.0)]),
    "top_k": ((0.7, 3, 1.0), [(0.7, 0, 1.0), (0.7, 4, 1.0)]),
    "top_p": ((0.7, 0, 0.8), [(1.0, 0, 0.8), (0.7, 0, 1.0)]),
    "top_k_then_top_p": ((1.3, 5, 0.75), [(1.0, 5, 0.75), (1.3, 0, 0.75)]),
}


def _top_p_before_top_k(temperature, top_k, top_p):
    """A wrong order: the nucleus of the full distribution, then top-k."""
    p = reference_probs(LOGITS, temperature, 0, top_p)
    p = np.where(np.arange(len(p)) < top_k, p, 0.0)  # LOGITS is sorted, so top-k = a prefix
    return p / p.sum()


@pytest.mark.parametrize("case", DISTRIBUTION_CASES)
def test_draws_match_the_renormalised_distribution(case):
    (temperature, top_k, top_p), wrong = DISTRIBUTION_CASES[case]
    n = 40_000
    expected = reference_probs(LOGITS, temperature, top_k, top_p)
    tokens, logprobs = sample(
        jnp.broadcast_to(jnp.asarray(LOGITS), (n, len(LOGITS))), _stream(42, n),
        *_rows(n, temperature, top_k, top_p), return_logprobs=True,
    )
    assert_matches(tokens, expected)
    np.testing.assert_allclose(np.exp(np.asarray(logprobs)), expected[np.asarray(tokens)], rtol=1e-5)

    tol = 5 * np.sqrt(expected * (1 - expected) / n)
    alternatives = [reference_probs(LOGITS, *w) for w in wrong]
    if top_k and top_p < 1:
        alternatives.append(_top_p_before_top_k(temperature, top_k, top_p))
    for alt in alternatives:
        assert np.max(np.abs(alt - expected) - 2 * tol) > 0, "the test could not tell this bug apart"
