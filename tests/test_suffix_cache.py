"""SuffixDecoding's suffix cache against a brute-force reference that counts substrings directly."""

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specjax.speculation.suffix_cache import SuffixCache, SuffixCacheError, SuffixDraft, _digest, _Trie

ALPHABET = st.integers(0, 4)  # few symbols, so substrings repeat
STREAM = st.lists(ALPHABET, max_size=14)
MIN_PROBS = (0.0, 0.07, 0.26, 0.43)  # no small-count ratio equals one, so float rounding decides nothing
PROPERTY = settings(max_examples=300, deadline=None)


# ---------------------------------------------------------------------------- the reference
def substring_counts(streams, max_depth):
    """Occurrences of every substring of at most ``max_depth`` tokens, each stream counted apart."""
    counts = Counter()
    for s in streams:
        for i in range(len(s)):
            for j in range(i + 1, min(len(s), i + max_depth) + 1):
                counts[tuple(s[i:j])] += 1
    return counts


def trie_counts(trie: _Trie):
    """The trie's strings and counts, checking depths and suffix links on the way."""
    counts, strings, stack = {}, {0: ()}, [0]
    while stack:
        node = stack.pop()
        for token, child in trie.children(node):
            s = strings[node] + (token,)
            strings[child] = s
            counts[s] = trie.count[child]
            assert trie.depth[child] == len(s) and trie.token[child] == token
            stack.append(child)
    for node, s in strings.items():
        if node:
            assert strings[trie.link[node]] == s[1:], f"the suffix link of {s} is wrong"
    assert trie.num_nodes == len(counts)
    # Memory: only branching nodes hold a dict, and freed ids hold nothing.
    assert all(len(kids) >= 2 for kids in trie.branches.values())
    assert not set(trie.free) & set(trie.branches)
    return counts


def budget(m, spec):
    return min(spec["max_spec_tokens"], int(np.floor(spec["max_spec_factor"] * m + spec["max_spec_offset"] + 1e-9)))


def reference_draft(counts, max_depth, match, spec):
    """(score, probabilities or chain tokens) of the best draft after the string ``match``."""
    n = budget(len(match), spec)
    if n <= 0:
        return 0.0, []
    m = len(match)
    if spec["tree"]:  # the most probable continuations; a node's probability is count(match + path) / count(match)
        probs = sorted((c / counts[match] for s, c in counts.items() if len(s) > m and s[:m] == match), reverse=True)
        probs = [p for p in probs if p >= spec["min_token_prob"]][:n]
        return sum(probs), probs
    chain, s, score = [], match, 0.0
    while len(chain) < n and len(s) < max_depth:
        options = [(counts[s + (t,)], -t) for t in range(5) if counts[s + (t,)]]
        if not options:
            break
        c, neg_t = max(options)
        if c / counts[match] < spec["min_token_prob"]:
            break
        chain.append(-neg_t)
        s += (-neg_t,)
        score += c / counts[match]
    return score, chain


def check_draft(draft: SuffixDraft, context, sources, max_depth, spec):
    """The draft is valid for the source and match it names, and the best over all of them."""
    candidates = []  # (score, drafted, match length, source) in the order that wins ties
    for m in range(min(len(context), max_depth), 0, -1):
        for name in ("prompt", "global"):
            match = tuple(context[-m:])
            if sources[name][match]:
                candidates.append((*reference_draft(sources[name], max_depth, match, spec), m, name))
    best = max((c[0] for c in candidates), default=0.0)
    assert draft.score == pytest.approx(best, abs=1e-9)
    if best < 1e-9:
        assert draft == SuffixDraft([], [], [], 0.0, 0, "")
        return
    winner = next(c for c in candidates if c[0] >= best - 1e-9)
    assert (draft.match_len, draft.source) == winner[2:]
    assert len(draft.tokens) == len(draft.parents) == len(draft.probs) <= budget(draft.match_len, spec)
    assert draft.score == pytest.approx(sum(draft.probs))
    counts, match = sources[draft.source], tuple(context[-draft.match_len:])
    paths = []
    for i, (token, parent) in enumerate(zip(draft.tokens, draft.parents)):
        assert 0 <= parent <= i  # topological: the parent comes first
        path = (paths[parent - 1] if parent else ()) + (token,)
        paths.append(path)
        assert len(match) + len(path) <= max_depth
        assert counts[match + path] > 0, "the drafted path never followed the match"
        assert draft.probs[i] == pytest.approx(counts[match + path] / counts[match])
        assert draft.probs[i] >= spec["min_token_prob"]
    assert len(set(paths)) == len(paths)
    if spec["tree"]:
        assert draft.probs == pytest.approx(winner[1])
    else:
        assert draft.parents == list(range(len(draft.tokens))) and draft.tokens == winner[1]


def chunked(tokens, cuts):
    """``tokens`` split at the given cut points."""
    points = sorted({c % (len(tokens) + 1) for c in cuts})
    return [tokens[a:b] for a, b in zip([0, *points], [*points, len(tokens)])]


# ---------------------------------------------------------------------------- properties
scenario = st.fixed_dictionaries({
    "max_depth": st.integers(1, 6),
    "cached": st.lists(STREAM, max_size=4),
    "prompt": STREAM,
    "response": STREAM,
    "other": STREAM,  # a concurrent active request's response
})
spec_strategy = st.fixed_dictionaries({
    "max_spec_tokens": st.integers(1, 8),
    "max_spec_factor": st.sampled_from([0.5, 1.0, 2.5]),
    "max_spec_offset": st.sampled_from([-1.0, 0.0, 1.0]),
    "min_token_prob": st.sampled_from(MIN_PROBS),
    "tree": st.booleans(),
})


def build(sc, cuts=()):
    cache = SuffixCache(max_depth=sc["max_depth"])
    for i, response in enumerate(sc["cached"]):
        cache.start_request(i, [0])
        for chunk in chunked(response, cuts):
            cache.add_active_response(i, chunk)
        cache.stop_request(i)
    cache.start_request("other", [1, 2])
    cache.add_active_response("other", sc["other"])
    cache.start_request("me", sc["prompt"])
    for chunk in chunked(sc["response"], cuts):
        cache.add_active_response("me", chunk)
    return cache


@PROPERTY
@given(sc=scenario, spec=spec_strategy, tail=st.lists(ALPHABET, max_size=4), whole=st.booleans())
def test_drafts_are_the_best_supported_by_the_indexed_text(sc, spec, tail, whole):
    cache = build(sc)
    own = sc["prompt"] + sc["response"]
    # The request's whole sequence as indexed, or other tokens (a context the caller has not indexed).
    context = (own if whole else []) + tail or [0]
    sources = {"prompt": substring_counts([own], sc["max_depth"]),
               "global": substring_counts([*sc["cached"], sc["other"], sc["response"]], sc["max_depth"])}
    draft = cache.speculate("me", context, **spec)
    check_draft(draft, context, sources, sc["max_depth"], spec)


@PROPERTY
@given(sc=scenario, cuts=st.lists(st.integers(0, 20), max_size=5))
def test_counts_match_brute_force_whatever_the_chunking(sc, cuts):
    cache = build(sc, cuts)
    d = sc["max_depth"]
    assert trie_counts(cache._global("")) == substring_counts([*sc["cached"], sc["other"], sc["response"]], d)
    assert trie_counts(cache._active["me"].trie) == substring_counts([sc["prompt"] + sc["response"]], d)
    one_shot = build(sc)
    assert trie_counts(cache._global("")) == trie_counts(one_shot._global(""))
    assert cache.num_cached_tokens == sum(map(len, sc["cached"]))


@PROPERTY
@given(sc=scenario, victims=st.lists(st.integers(0, 5), max_size=3, unique=True), more=st.lists(STREAM, max_size=2))
def test_eviction_removes_exactly_the_evicted_response(sc, victims, more):
    cache = build(sc)
    ids = [*range(len(sc["cached"])), "other", "me"]
    victims = {ids[v % len(ids)] for v in victims}
    for victim in victims:
        cache.evict(victim)
    responses = dict(zip(ids, [*sc["cached"], sc["other"], sc["response"]]))
    kept = [r for i, r in responses.items() if i not in victims]
    assert trie_counts(cache._global("")) == substring_counts(kept, sc["max_depth"])
    # Freed nodes are reused; an evicted active request goes on in its own tree only.
    for i, response in enumerate(more):
        cache.start_request(f"new{i}", [])
        cache.add_active_response(f"new{i}", response)
    cache.add_active_response("me", [3, 4])
    kept += more
    if "me" not in victims:
        kept.remove(sc["response"])
        kept.append(sc["response"] + [3, 4])
    assert trie_counts(cache._global("")) == substring_counts(kept, sc["max_depth"])
    assert trie_counts(cache._active["me"].trie) == substring_counts([sc["prompt"] + sc["response"] + [3, 4]],
                                                                     sc["max_depth"])
    cache.stop_request("me")
    assert ("me" in cache.cached_requests) == ("me" not in victims)


# ---------------------------------------------------------------------------- examples
def test_a_worked_example():
    cache = SuffixCache(max_depth=8)
    cache.start_request("a", [1, 2, 3, 4, 1, 2, 3, 5, 1, 2, 3])
    # "1 2 3" occurs three times: once before 4, once before 5, once at the end.
    draft = cache.speculate("a", [1, 2, 3, 4, 1, 2, 3, 5, 1, 2, 3], max_spec_tokens=4)
    assert draft.match_len == 3 and draft.source == "prompt"
    assert draft.tokens == [4, 5, 1] and draft.parents == [0, 0, 1]  # three tokens: the budget of a 3-token match
    assert draft.probs == pytest.approx([1 / 3] * 3) and draft.score == pytest.approx(1.0)
    chain = cache.speculate("a", [1, 2, 3, 4, 1, 2, 3, 5, 1, 2, 3], max_spec_tokens=4, tree=False)
    assert chain.tokens == [4, 1, 2] and chain.parents == [0, 1, 2]  # 4 before 5: equal counts, smaller token
    assert cache.speculate("a", [1, 2, 3], max_spec_tokens=4, min_token_prob=0.5) == SuffixDraft([], [], [], 0.0, 0, "")
    cache.add_active_response("a", [4, 1, 2])
    cache.stop_request("a")
    cache.start_request("b", [9])
    draft = cache.speculate("b", [9, 4, 1], max_spec_tokens=4)
    assert (draft.tokens, draft.source, draft.match_len) == ([2], "global", 2)


def test_long_contexts_are_windowed_to_max_depth():
    cache = SuffixCache(max_depth=4)
    cache.start_request("a", [7, 7, 1, 2, 3, 4, 5])
    long_context = [9] * 50 + [1, 2, 3]
    assert cache.speculate("a", long_context, 8) == cache.speculate("a", long_context[-4:], 8)
    draft = cache.speculate("a", long_context, 8)
    # The depth cap lets the 3-token match "1 2 3" add one token, "2 3" two: the shorter match wins.
    assert (draft.match_len, draft.tokens) == (2, [4, 5])


@pytest.mark.parametrize("tree", [True, False])
def test_a_shorter_match_can_draft_past_the_depth_cap(tree):
    cache = SuffixCache(max_depth=3)
    cache.start_request("a", [1, 2, 3, 4])
    # "1 2" and "2" occur at the same places, but after "1 2" the cap leaves room for one token only.
    draft = cache.speculate("a", [1, 2], 2, max_spec_factor=2.5, tree=tree)
    assert (draft.match_len, draft.tokens, draft.score) == (1, [3, 4], 2.0)
    # After "1 2 3" (at the cap) it leaves none: "2 3" has the same occurrences and drafts 4.
    draft = cache.speculate("a", [1, 2, 3], 1, tree=tree)
    assert (draft.match_len, draft.tokens) == (2, [4])


def test_evicted_nodes_are_reused():
    cache = SuffixCache(max_depth=4)
    cache.start_request("a", [])
    cache.add_active_response("a", [1, 2, 3, 4, 5, 1, 2])
    cache.stop_request("a")
    size = len(cache._global("").count)
    cache.evict("a")
    assert cache.num_nodes == 0 and cache.cached_requests == ()
    cache.start_request("b", [])
    cache.add_active_response("b", [2, 1, 5, 4, 3, 2, 1])  # reversed: as many distinct substrings
    assert len(cache._global("").count) == size and cache.num_nodes == size - 1


def test_fifo_eviction_keeps_the_newest_responses():
    cache = SuffixCache(max_depth=3, max_cached_requests=2)
    for i, response in enumerate([[1, 2, 3], [2, 3, 4], [3, 4, 0]]):
        cache.start_request(i, [])
        cache.add_active_response(i, response)
        cache.stop_request(i)
    assert cache.cached_requests == (1, 2) and cache.num_cached_tokens == 6
    assert trie_counts(cache._global("")) == substring_counts([[2, 3, 4], [3, 4, 0]], 3)
    cache.start_request(1, [5])  # restarting a cached id evicts its cached response
    assert cache.cached_requests == (2,) and cache.active_requests == (1,)
    none_kept = SuffixCache(max_cached_requests=0)
    none_kept.start_request("x", [])
    none_kept.add_active_response("x", [1, 2])
    none_kept.stop_request("x")
    assert none_kept.cached_requests == () and none_kept.num_nodes == 0


def test_counters():
    cache = SuffixCache(max_depth=2)
    cache.start_request("a", [1, 1, 1])
    cache.add_active_response("a", [2, 3])
    assert cache.num_local_nodes == len(substring_counts([[1, 1, 1, 2, 3]], 2))
    assert cache.num_nodes == 3  # 2, 3 and 2 3: the root is not counted
    cache.stop_request("a")
    assert cache.num_local_nodes == 0 and cache.num_cached_tokens == 2


# ---------------------------------------------------------------------------- persistence
def test_save_and_load_round_trip(tmp_path):
    cache = SuffixCache(max_depth=5, max_cached_requests=3)
    for request_id, response in [(7, [1, 2, 3, 1, 2]), ("s7", [2, 3, 4]), ("x", [])]:
        cache.start_request(request_id, [0])
        cache.add_active_response(request_id, response)
        cache.stop_request(request_id)
    cache.start_request("active", [4, 4])  # active requests are not saved
    path = tmp_path / "cache.suffix"
    cache.save(path)
    loaded = SuffixCache.load(path)
    assert loaded.cached_requests == (7, "s7", "x") and loaded.active_requests == ()
    assert (loaded.max_depth, loaded.max_cached_requests, loaded.num_cached_tokens) == (5, 3, 8)
    assert trie_counts(loaded._global("")) == trie_counts(cache._global(""))
    loaded.start_request("active", [4, 4])
    assert loaded.speculate("active", [4, 1, 2], 4) == cache.speculate("active", [4, 1, 2], 4)
    unbounded = SuffixCache(max_cached_requests=None)
    unbounded.save(path)
    assert SuffixCache.load(path).max_cached_requests is None


def test_version_1_files_load_into_the_shared_scope(saved, tmp_path):
    """Files written before scopes existed: every response in the shared scope ("")."""
    path, cache = saved
    with np.load(path) as f:
        payload = {name: f[name] for name in f.files if name not in ("scopes", "sha256")}
    payload["version"] = np.array(1)
    payload["sha256"] = np.array(_digest(payload))
    np.savez(tmp_path / "v1.npz", **payload)
    loaded = SuffixCache.load(tmp_path / "v1.npz")
    assert loaded.cached_requests == cache.cached_requests
    assert trie_counts(loaded._global("")) == trie_counts(cache._global(""))


SCOPES = ["", "key-a", "key-b"]


@PROPERTY
@given(sc=scenario, spec=spec_strategy, scope_of=st.lists(st.sampled_from(SCOPES), min_size=6, max_size=6),
       mine=st.sampled_from(SCOPES))
def test_a_scope_drafts_from_its_own_responses_alone(sc, spec, scope_of, mine):
    """Responses in other scopes are invisible: each scope's tree counts its own responses, and a
    request's drafts are the best its prompt and its scope's responses support."""
    cache = SuffixCache(max_depth=sc["max_depth"])
    responses = {}
    for i, response in enumerate(sc["cached"]):
        cache.start_request(i, [0], scope=scope_of[i])
        cache.add_active_response(i, response)
        cache.stop_request(i)
        responses[i] = (scope_of[i], response)
    cache.start_request("other", [1, 2], scope=scope_of[4])
    cache.add_active_response("other", sc["other"])
    responses["other"] = (scope_of[4], sc["other"])
    cache.start_request("me", sc["prompt"], scope=mine)
    cache.add_active_response("me", sc["response"])
    responses["me"] = (mine, sc["response"])
    for scope in SCOPES:
        assert trie_counts(cache._global(scope)) == substring_counts(
            [r for s, r in responses.values() if s == scope], sc["max_depth"])
    own = sc["prompt"] + sc["response"]
    sources = {"prompt": substring_counts([own], sc["max_depth"]),
               "global": substring_counts([r for s, r in responses.values() if s == mine], sc["max_depth"])}
    context = own or [0]
    check_draft(cache.speculate("me", context, **spec), context, sources, sc["max_depth"], spec)


def test_eviction_is_oldest_first_across_scopes_and_scopes_survive_saving(tmp_path):
    cache = SuffixCache(max_depth=3, max_cached_requests=2)
    for request_id, scope, response in [(0, "a", [1, 2, 3]), (1, "b", [4, 5]), (2, "a", [6, 7])]:
        cache.start_request(request_id, [], scope=scope)
        cache.add_active_response(request_id, response)
        cache.stop_request(request_id)
    assert cache.cached_requests == (1, 2)
    assert trie_counts(cache._global("a")) == substring_counts([[6, 7]], 3)
    assert trie_counts(cache._global("b")) == substring_counts([[4, 5]], 3)
    cache.save(tmp_path / "scoped")
    loaded = SuffixCache.load(tmp_path / "scoped")
    for scope in ("a", "b", ""):
        assert trie_counts(loaded._global(scope)) == trie_counts(cache._global(scope))
    loaded.start_request("q", [6], scope="b")
    assert loaded.speculate("q", [6], 4).tokens == []  # [6, 7] is a's
    with pytest.raises(TypeError, match="scope must be a str"):
        loaded.start_request("r", [], scope=None)


def test_only_str_and_int_ids_can_be_saved(tmp_path):
    cache = SuffixCache()
    cache.start_request(("a", 1), [])
    cache.stop_request(("a", 1))
    with pytest.raises(TypeError, match=r"only str and int request ids can be saved, got \('a', 1\)"):
        cache.save(tmp_path / "cache")


@pytest.fixture
def saved(tmp_path):
    cache = SuffixCache(max_depth=4)
    for i in range(3):
        cache.start_request(i, [])
        cache.add_active_response(i, [1, 2, 3, i])
        cache.stop_request(i)
    path = tmp_path / "cache"
    cache.save(path)
    return path, cache


def test_corrupted_files_fail_clearly(saved, tmp_path):
    path, cache = saved
    data = path.read_bytes()
    bad = tmp_path / "bad"
    for i in range(0, len(data), 7):  # every 7th byte flipped: an error, or a byte that held nothing
        bad.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:])
        try:
            loaded = SuffixCache.load(bad)
        except SuffixCacheError:
            continue
        assert loaded.cached_requests == cache.cached_requests
        assert trie_counts(loaded._global("")) == trie_counts(cache._global(""))
    for size in (0, 10, len(data) // 2, len(data) - 1):
        bad.write_bytes(data[:size])
        with pytest.raises(SuffixCacheError, match="not a readable suffix cache file"):
            SuffixCache.load(bad)


def test_a_flipped_payload_byte_fails_the_checksum(saved, tmp_path):
    path, _ = saved
    with np.load(path) as f:
        payload = {name: f[name] for name in f.files}
    payload["tokens"] = payload["tokens"].copy()
    payload["tokens"][0] ^= 1
    np.savez(tmp_path / "tampered.npz", **payload)
    with pytest.raises(SuffixCacheError, match="checksum does not match"):
        SuffixCache.load(tmp_path / "tampered.npz")


def test_other_format_versions_are_refused(saved, tmp_path):
    path, _ = saved
    with np.load(path) as f:
        payload = {name: f[name] for name in f.files}
    payload["version"] = np.array(3)
    np.savez(tmp_path / "v3.npz", **payload)
    with pytest.raises(SuffixCacheError, match="format version 3; this specjax reads versions 1 to 2"):
        SuffixCache.load(tmp_path / "v3.npz")
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(SuffixCacheError, match="is not a suffix cache file"):
        SuffixCache.load(tmp_path / "other.npz")


# ---------------------------------------------------------------------------- bad input
@pytest.fixture
def cache():
    cache = SuffixCache()
    cache.start_request("a", [1, 2, 3])
    return cache


def test_unknown_and_duplicate_requests(cache):
    with pytest.raises(ValueError, match="request 'a' is already active"):
        cache.start_request("a", [])
    for call in (lambda: cache.add_active_response("b", [1]), lambda: cache.stop_request("b"),
                 lambda: cache.speculate("b", [1], 4)):
        with pytest.raises(KeyError, match="request 'b' is not active"):
            call()
    with pytest.raises(KeyError, match="request 'b' has no response in the suffix cache"):
        cache.evict("b")
    cache.evict("a")
    with pytest.raises(KeyError, match="request 'a' has no response"):
        cache.evict("a")
    with pytest.raises(TypeError, match="unhashable"):
        cache.start_request(["a"], [])


@pytest.mark.parametrize("kwargs, message", [
    ({"max_spec_tokens": 0}, "max_spec_tokens must be a positive integer, got 0"),
    ({"max_spec_tokens": -3}, "max_spec_tokens must be a positive integer"),
    ({"max_spec_tokens": 2.0}, "max_spec_tokens must be a positive integer"),
    ({"max_spec_tokens": True}, "max_spec_tokens must be a positive integer"),
    ({"max_spec_factor": 0}, "max_spec_factor must be a positive finite number"),
    ({"max_spec_factor": -1.0}, "max_spec_factor must be a positive finite number"),
    ({"max_spec_factor": float("inf")}, "max_spec_factor must be a positive finite number"),
    ({"max_spec_offset": float("nan")}, "max_spec_offset must be a finite number"),
    ({"min_token_prob": -0.1}, r"min_token_prob must be in \[0, 1\]"),
    ({"min_token_prob": 1.5}, r"min_token_prob must be in \[0, 1\]"),
    ({"min_token_prob": float("nan")}, r"min_token_prob must be in \[0, 1\]"),
])
def test_bad_speculation_settings(cache, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cache.speculate("a", [1, 2], **{"max_spec_tokens": 4, **kwargs})


def test_bad_tokens_and_settings(cache):
    with pytest.raises(ValueError, match="context is empty"):
        cache.speculate("a", [], 4)
    with pytest.raises(ValueError, match=r"tokens must hold token ids in \[0, 2147483647\], got -1..2"):
        cache.add_active_response("a", [2, -1])
    with pytest.raises(ValueError, match="prompt_tokens must hold token ids"):
        cache.start_request("b", [2**31])
    with pytest.raises(TypeError, match="context must be a sequence of integer token ids"):
        cache.speculate("a", [1.0, 2.0], 4)
    with pytest.raises(TypeError, match="tokens must be a sequence of integer token ids"):
        cache.add_active_response("a", "abc")
    cache.add_active_response("a", np.array([4, 5], np.int32))  # numpy integers are fine
    with pytest.raises(ValueError, match="max_depth must be a positive integer, got 0"):
        SuffixCache(max_depth=0)
    with pytest.raises(ValueError, match="max_cached_requests must be None or an integer >= 0, got -1"):
        SuffixCache(max_cached_requests=-1)


def test_the_benchmark_runs(tmp_path, capsys):
    from benchmarks import suffix_cache

    out = tmp_path / "bench.json"
    suffix_cache.main(["--responses", "10", "--response-len", "40", "--prompt-len", "40", "--requests", "1",
                       "--out", str(out)])
    assert "speculate µs" in capsys.readouterr().out and out.exists()
