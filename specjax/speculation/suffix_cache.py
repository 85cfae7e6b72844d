"""SuffixDecoding's host-side suffix cache: speculation from earlier text, without a draft model.

SuffixDecoding (Oliaro et al., NeurIPS 2025) drafts the tokens that followed the context's
suffix wherever that suffix occurred before. Two tries are searched:

- each active request's own tree, over its prompt followed by its response as it grows
  (source ``"prompt"``): agents and code edits repeat their inputs;
- one global tree over the responses of earlier and concurrent requests (source ``"global"``):
  agent sessions repeat their own earlier outputs. Requests started in different scopes (a
  server's API keys) have a global tree each, so no one's drafts show what another generated.

Both are suffix tries capped at ``max_depth``: every substring of at most ``max_depth`` tokens of
an indexed stream is a node, whose count is its number of occurrences (each stream is indexed
apart: no substring crosses two streams). Suffix links (the node of s -> the node of s[1:]) make
appending a token O(max_depth), touching the nodes of the stream's last ``max_depth`` suffixes,
and finding the longest suffix of a context that is a node O(len(context)) amortised (a
matching-statistics walk). Only the last ``max_depth`` tokens of a longer context can be part of a
match, so ``speculate`` looks at those alone: this windowing loses nothing.

A draft expands the matched node best-first by estimated probability: a child's probability is
its count over its parent's, multiplied along the path. Every match length is tried, from the
longest down, in both trees; the draft of highest score (the sum of its probabilities, the
expected number of accepted tokens) wins, ties going to the longer match, then the prompt tree.
Equally probable candidates are taken in the order they became candidates, siblings by increasing
token id, so a draft depends only on the tries' counts, not on the order text was inserted.

Memory: text that does not repeat adds about ``max_depth`` nodes per token, 20 to 30 bytes each
in flat arrays (a dict per node would cost ten times that): about 1 KB per cached token at depth
64 (``benchmarks/suffix_cache.py`` measures it). ``max_cached_requests`` bounds it: when a
stopped request's response would make more cached responses than that, the oldest is evicted
(FIFO), by decrementing exactly the counts its insertion incremented. FIFO rather than LRU
because agent sessions mostly reuse recent outputs, and because a hit is on a trie node whose
count aggregates many responses, so it cannot be attributed to one response cheaply; the
reference implementation (ArcticInference) evicts FIFO too.

``save`` writes the cached responses, their scopes and the settings to one checksummed file;
``load`` rebuilds the global tries from them. Active requests are not saved.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import math
import operator
import os
from array import array
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Hashable, Iterable, Sequence

import numpy as np

_MAX_TOKEN = 2**31 - 1  # node arrays hold C ints
_TIE = 1e-9  # a draft must beat the best by more than float noise to replace it
_FORMAT_VERSION = 2  # 2 added scopes; version 1 files load with every response in the shared scope


class SuffixCacheError(ValueError):
    """A suffix cache file that cannot be loaded: corrupted, truncated or of another format version."""


@dataclass(frozen=True)
class SuffixDraft:
    """Speculated tokens from a suffix match; an empty draft when nothing useful matched.

    tokens: speculated tokens in topological order (parents before children).
    parents: each token's parent in ``TokenTree.build``'s convention: 0 = the root (the context's
        last token), i + 1 = the i-th speculated token.
    probs: each token's estimated probability, the product of count ratios along its path.
    score: the sum of ``probs``, an estimate of the tokens the target will accept.
    match_len: the length of the matched context suffix (0 for an empty draft).
    source: ``"prompt"`` (the request's own tokens), ``"global"`` (cached responses), or ``""``.
    """

    tokens: list[int]
    parents: list[int]
    probs: list[float]
    score: float
    match_len: int
    source: str

    def truncated(self, num_tokens: int) -> "SuffixDraft":
        """Its first ``num_tokens`` tokens: the most probable ones (drafts are built best first),
        a subtree since parents come before children."""
        if num_tokens >= len(self.tokens):
            return self
        probs = self.probs[:num_tokens]
        return replace(self, tokens=self.tokens[:num_tokens], parents=self.parents[:num_tokens], probs=probs,
                       score=float(sum(probs)))


_EMPTY_DRAFT = SuffixDraft(tokens=[], parents=[], probs=[], score=0.0, match_len=0, source="")


class _Trie:
    """A suffix trie capped at ``max_depth``, in flat arrays indexed by node id (0 = the root).

    Per node: ``count`` (occurrences of its string), ``link`` (its suffix link), ``depth`` (its
    string's length), ``token`` (its string's last token) and ``kid``: 0 = no children, > 0 = the
    id of its only child, -1 = two or more children, in ``branches[node]`` (token -> child). Most
    nodes of a suffix trie are leaves or have one child, so a dict per node would waste memory.
    A stream being indexed is represented by its "active" nodes: the nodes of its last
    ``max_depth`` suffixes, ``active[i]`` of depth i + 1. Freed ids are reused.
    """

    def __init__(self, max_depth: int):
        self.max_depth = max_depth
        self.count = array("i", [0])
        self.link = array("i", [0])
        self.depth = array("i", [0])
        self.token = array("i", [-1])
        self.kid = array("i", [0])
        self.branches: dict[int, dict[int, int]] = {}
        self.free: list[int] = []
        # Slices of these are new chains' fields, copied without converting Python ints.
        self.depths = array("i", range(max_depth + 1))
        self.zeros = array("i", [0]) * (max_depth + 1)
        self.ones = array("i", [1]) * (max_depth + 1)

    @property
    def num_nodes(self) -> int:
        """Nodes besides the root."""
        return len(self.count) - len(self.free) - 1

    def child(self, node: int, token: int) -> int:
        """The child of ``node`` by ``token``, or 0 if it has none."""
        k = self.kid[node]
        if k > 0:
            return k if self.token[k] == token else 0
        return self.branches[node].get(token, 0) if k < 0 else 0

    def children(self, node: int) -> Iterable[tuple[int, int]]:
        """(token, child) pairs of ``node``."""
        k = self.kid[node]
        if k > 0:
            return ((self.token[k], k),)
        return self.branches[node].items() if k < 0 else ()

    def extend(self, active: list[int], tokens: Iterable[int]) -> list[int]:
        """Appends ``tokens`` to the stream whose active nodes are ``active``; returns its new ones."""
        count, kid, token_of, branches = self.count, self.kid, self.token, self.branches
        for t in tokens:
            # Each suffix grows by t (one at max depth cannot), and t alone is a new suffix.
            parents = [0, *(active if len(active) < self.max_depth else active[:-1])]
            grown = []
            for node in parents:
                k = kid[node]
                if k > 0:
                    c = k if token_of[k] == t else 0
                elif k < 0:
                    c = branches[node].get(t, 0)
                else:
                    c = 0
                if not c:  # a string is a node only if its suffixes are: the deeper ones are new too
                    break
                count[c] += 1
                grown.append(c)
            if len(grown) < len(parents):
                grown += self._add_chain(parents[len(grown):], t, grown[-1] if grown else 0)
            active = grown
        return active

    def _add_chain(self, parents: list[int], token: int, link: int) -> list[int]:
        """New children by ``token``, of count 1, for ``parents`` (of consecutive depths, shallowest
        first); each new node's suffix link is the one before it, the first's is ``link``."""
        n = len(parents)
        keep = max(0, len(self.free) - n)
        ids = self.free[keep:]
        del self.free[keep:]
        if len(ids) < n:  # grow the arrays; the new entries are set below
            start, fresh = len(self.count), n - len(ids)
            ids += range(start, start + fresh)
            for values in (self.count, self.link, self.depth, self.token, self.kid):
                values.extend(self.zeros[:fresh])
        # kid stays 0: new entries and freed nodes have no children.
        links = [link, *ids[:-1]]
        first_depth = self.depth[parents[0]] + 1
        run = _as_slice(ids)
        if run:  # consecutive ids (always when all are fresh; mostly when reused): copy slices
            self.count[run] = self.ones[:n]
            self.link[run] = array("i", links)
            self.depth[run] = self.depths[first_depth:first_depth + n]
            self.token[run] = array("i", [token]) * n
        else:
            count, link_of, depth_of, token_of = self.count, self.link, self.depth, self.token
            for c, c_link, c_depth in zip(ids, links, range(first_depth, first_depth + n)):
                count[c] = 1
                link_of[c] = c_link
                depth_of[c] = c_depth
                token_of[c] = token
        kid, branches = self.kid, self.branches
        for parent, c in zip(parents, ids):
            k = kid[parent]
            if k == 0:
                kid[parent] = c
            elif k > 0:
                branches[parent] = {self.token[k]: k, token: c}
                kid[parent] = -1
            else:
                branches[parent][token] = c
        return ids

    def retract(self, tokens: Iterable[int]) -> None:
        """Removes one indexed stream (``tokens``, all of it so far): the walk of ``extend``, decrementing.

        A node reaching count 0 is detached from its parent and its id freed; its descendants reach
        0 later in the same walk, so it is read (never reused) until the walk ends. Links stay
        valid: a node's count is at least that of any node linking to it.
        """
        active: list[int] = []
        for t in tokens:
            shrunk = []
            for node in [0, *(active if len(active) < self.max_depth else active[:-1])]:
                c = self.child(node, t)
                self.count[c] -= 1
                if self.count[c] == 0:
                    self._detach(node, c)
                shrunk.append(c)
            active = shrunk

    def _detach(self, parent: int, c: int) -> None:
        if self.kid[parent] == c:
            self.kid[parent] = 0
        else:
            siblings = self.branches[parent]
            del siblings[self.token[c]]
            if len(siblings) == 1:
                (self.kid[parent],) = siblings.values()
                del self.branches[parent]
        self.free.append(c)

    def suffix_nodes(self, context: Sequence[int]) -> list[int]:
        """``nodes[m]`` = the node of the context's suffix of length m, for every m up to the
        longest suffix that is a node (``nodes[0]`` = the root)."""
        node = 0
        for t in context:  # matching statistics: the longest node that is a suffix so far
            c = self.child(node, t)  # none at max depth: the walk drops to shorter suffixes
            while not c and node:
                node = self.link[node]
                c = self.child(node, t)
            node = c
        nodes = [0] * (self.depth[node] + 1)
        while node:
            nodes[self.depth[node]] = node
            node = self.link[node]
        return nodes

    def draft_tree(self, node: int, budget: int, min_prob: float, to_beat: float):
        """The ``budget`` most probable descendants of ``node`` of probability >= ``min_prob``.

        Returns (tokens, parents, probs, score), or None once the draft provably cannot score above
        ``to_beat``; and whether it took a node at max depth (whose children the trie lacks).
        """
        count, depth, cap = self.count, self.depth, self.max_depth
        order = itertools.count()  # ties: the earlier candidate first
        frontier: list[tuple[float, int, int, int]] = []  # (-prob, order, node, parent index)

        def offer(parent: int, index: int, prob: float) -> None:
            ratio = prob / count[parent]
            kids = sorted((t, c) for t, c in self.children(parent) if ratio * count[c] >= min_prob)
            for _, c in kids:
                heapq.heappush(frontier, (-ratio * count[c], next(order), c, index))

        tokens, parents, probs = [], [], []
        score, capped = 0.0, False
        offer(node, 0, 1.0)
        while frontier and len(tokens) < budget:
            neg_prob, _, c, parent = heapq.heappop(frontier)
            prob = -neg_prob
            if score + prob * (budget - len(tokens)) <= to_beat:  # no later candidate is likelier
                return None, capped
            tokens.append(self.token[c])
            parents.append(parent)
            probs.append(prob)
            score += prob
            capped = capped or depth[c] == cap
            offer(c, len(tokens), prob)
        return (tokens, parents, probs, score), capped

    def draft_chain(self, node: int, budget: int, min_prob: float, to_beat: float):
        """The chain of most probable children from ``node`` while its probability is >= ``min_prob``;
        returns what ``draft_tree`` returns."""
        count, cap = self.count, self.max_depth
        tokens, probs = [], []
        prob, score, capped = 1.0, 0.0, False
        while len(tokens) < budget:
            # The most frequent child, the smallest token among equals.
            best = max(self.children(node), key=lambda pair: (count[pair[1]], -pair[0]), default=None)
            if best is None:
                break
            prob = prob * count[best[1]] / count[node]
            if prob < min_prob:
                break
            if score + prob * (budget - len(tokens)) <= to_beat:
                return None, capped
            node = best[1]
            tokens.append(best[0])
            probs.append(prob)
            score += prob
            capped = capped or self.depth[node] == cap
        return (tokens, list(range(len(tokens))), probs, score), capped


@dataclass
class _Request:
    trie: _Trie  # the request's own tokens: its prompt, then its response
    active: list[int]  # its stream's active nodes in ``trie``
    response: array  # its response so far
    scope: str  # whose global trie it reads and feeds
    global_active: list[int] | None  # its response's active nodes in its scope's global trie; None once evicted


class SuffixCache:
    """The suffix trees of active requests and the global tree of cached responses.

    Lifecycle of a request: ``start_request`` (indexes its prompt in its own tree), then
    ``add_active_response`` as tokens are generated (indexed in its own tree and the global one,
    so concurrent requests match them too) and ``speculate`` before each verification step, then
    ``stop_request`` (its response stays cached globally, subject to ``max_cached_requests``).
    A request's ``scope`` names the global tree it reads and feeds ("" the shared one).

    max_depth: the longest indexed substring; bounds match length plus draft depth.
    max_cached_requests: the most stopped requests' responses kept, all scopes together (oldest
        evicted first); None: no bound. Each cached token costs up to ``max_depth`` nodes of 20 to
        30 bytes.
    Request ids may be any hashable; ``save`` needs them to be str or int.
    """

    def __init__(self, max_depth: int = 64, max_cached_requests: int | None = 10000):
        if not _is_int(max_depth) or max_depth < 1:
            raise ValueError(f"max_depth must be a positive integer, got {max_depth!r}")
        if max_cached_requests is not None and (not _is_int(max_cached_requests) or max_cached_requests < 0):
            raise ValueError(f"max_cached_requests must be None or an integer >= 0, got {max_cached_requests!r}")
        self._max_depth = max_depth
        self._max_cached = max_cached_requests
        self._globals: dict[str, _Trie] = {}  # scope -> its tree of responses
        self._active: dict[Hashable, _Request] = {}
        # stopped requests' scopes and responses, oldest first
        self._cached: OrderedDict[Hashable, tuple[str, array]] = OrderedDict()
        self._cached_tokens = 0

    @property
    def max_depth(self) -> int:
        return self._max_depth

    @property
    def max_cached_requests(self) -> int | None:
        return self._max_cached

    @property
    def active_requests(self) -> tuple:
        """Ids of started, not yet stopped requests."""
        return tuple(self._active)

    @property
    def cached_requests(self) -> tuple:
        """Ids of stopped requests whose responses are cached, oldest first (the eviction order)."""
        return tuple(self._cached)

    @property
    def num_cached_tokens(self) -> int:
        """Tokens of the cached (stopped) responses."""
        return self._cached_tokens

    @property
    def num_nodes(self) -> int:
        """Nodes of the global tries (cached and active responses), every scope's together."""
        return sum(trie.num_nodes for trie in self._globals.values())

    def _global(self, scope: str) -> _Trie:
        if scope not in self._globals:
            self._globals[scope] = _Trie(self._max_depth)
        return self._globals[scope]

    @property
    def num_local_nodes(self) -> int:
        """Nodes of the active requests' own tries together."""
        return sum(request.trie.num_nodes for request in self._active.values())

    def start_request(self, request_id: Hashable, prompt_tokens: Sequence[int], scope: str = "") -> None:
        """Starts a request: indexes its prompt in its own tree. It drafts from, and its response
        joins, ``scope``'s global tree. A cached response of the same id is evicted first (the id
        now names the new request)."""
        if request_id in self._active:
            raise ValueError(f"request {request_id!r} is already active")
        if not isinstance(scope, str):
            raise TypeError(f"scope must be a str, got {type(scope).__name__}")
        prompt = _token_list(prompt_tokens, "prompt_tokens")
        if request_id in self._cached:
            self.evict(request_id)
        trie = _Trie(self._max_depth)
        self._active[request_id] = _Request(trie=trie, active=trie.extend([], prompt), response=array("i"),
                                            scope=scope, global_active=[])

    def add_active_response(self, request_id: Hashable, tokens: Sequence[int]) -> None:
        """Appends generated ``tokens`` to the request's response, in its own tree and the global one."""
        request = self._request(request_id)
        tokens = _token_list(tokens, "tokens")
        request.active = request.trie.extend(request.active, tokens)
        request.response.extend(tokens)
        if request.global_active is not None:
            request.global_active = self._global(request.scope).extend(request.global_active, tokens)

    def stop_request(self, request_id: Hashable) -> None:
        """Ends a request: drops its own tree and caches its response (unless evicted while active),
        evicting the oldest cached responses beyond ``max_cached_requests``."""
        request = self._request(request_id)
        del self._active[request_id]
        if request.global_active is None:
            return
        self._cached[request_id] = (request.scope, request.response)
        self._cached_tokens += len(request.response)
        while self._max_cached is not None and len(self._cached) > self._max_cached:
            self.evict(next(iter(self._cached)))

    def evict(self, request_id: Hashable) -> None:
        """Removes a response from the global tree: a cached one, or an active request's so far
        (its later tokens then go to its own tree only, and it is not cached when stopped)."""
        if request_id in self._cached:
            scope, response = self._cached.pop(request_id)
            self._cached_tokens -= len(response)
        elif request_id in self._active and self._active[request_id].global_active is not None:
            request = self._active[request_id]
            scope, response, request.global_active = request.scope, request.response, None
        else:
            raise KeyError(f"request {request_id!r} has no response in the suffix cache")
        self._global(scope).retract(response)

    def speculate(self, request_id: Hashable, context: Sequence[int], max_spec_tokens: int,
                  max_spec_factor: float = 1.0, max_spec_offset: float = 0.0, min_token_prob: float = 0.1,
                  tree: bool = True) -> SuffixDraft:
        """The best draft to follow ``context``, the active request's tokens so far (prompt and
        response; its last token is the draft's root).

        For a match of length m the draft has at most ``min(max_spec_tokens, floor(max_spec_factor
        * m + max_spec_offset))`` tokens, each of probability >= ``min_token_prob``. ``tree``: the
        most probable nodes, branching; otherwise a chain of the most probable children.
        """
        if not _is_int(max_spec_tokens) or max_spec_tokens < 1:
            raise ValueError(f"max_spec_tokens must be a positive integer, got {max_spec_tokens!r}")
        if not (_is_real(max_spec_factor) and max_spec_factor > 0 and math.isfinite(max_spec_factor)):
            raise ValueError(f"max_spec_factor must be a positive finite number, got {max_spec_factor!r}")
        if not (_is_real(max_spec_offset) and math.isfinite(max_spec_offset)):
            raise ValueError(f"max_spec_offset must be a finite number, got {max_spec_offset!r}")
        if not (_is_real(min_token_prob) and 0 <= min_token_prob <= 1):
            raise ValueError(f"min_token_prob must be in [0, 1], got {min_token_prob!r}")
        request = self._request(request_id)
        window = _token_list(context[-self._max_depth:], "context")
        if not window:
            raise ValueError("context is empty: it must end with the token the draft follows")

        matches = [(source, trie, trie.suffix_nodes(window), trie.draft_tree if tree else trie.draft_chain)
                   for source, trie in (("prompt", request.trie), ("global", self._global(request.scope)))]
        best = _EMPTY_DRAFT
        # Per source, (count, capped) of the last match tried: when a shorter one has the same count,
        # its occurrences are the same and so are its continuations (deeper by the length
        # difference at most, which matters only if the last draft reached max depth): with a
        # budget no larger, its draft would score no more, and lose a tie to the longer match.
        last: dict[str, tuple[int, bool]] = {}
        for m in range(max(len(nodes) for _, _, nodes, _ in matches) - 1, 0, -1):
            budget = min(max_spec_tokens, math.floor(max_spec_factor * m + max_spec_offset + _TIE))
            if best.score + _TIE >= budget:  # a draft scores at most its budget, which shrinks with m
                break
            for source, trie, nodes, expand in matches:
                if m >= len(nodes):
                    continue
                node = nodes[m]
                seen = last.get(source)
                if seen is not None and seen[0] == trie.count[node] and not seen[1]:
                    continue
                if not trie.kid[node]:  # no continuation
                    last[source] = (trie.count[node], m == self._max_depth)
                    continue
                draft, capped = expand(node, budget, min_token_prob, best.score + _TIE)
                last[source] = (trie.count[node], capped)
                if draft is not None and draft[3] > best.score + _TIE:
                    tokens, parents, probs, score = draft
                    best = SuffixDraft(tokens=tokens, parents=parents, probs=probs, score=score, match_len=m,
                                       source=source)
        return best

    def save(self, path: str | os.PathLike) -> None:
        """Writes the cached responses (oldest first), their scopes and the settings to one file at ``path``."""
        ids = list(self._cached)
        bad = [i for i in ids if not isinstance(i, (str, int)) or isinstance(i, bool)]
        if bad:
            raise TypeError(f"only str and int request ids can be saved, got {bad[0]!r} ({type(bad[0]).__name__})")
        lengths = [len(r) for _, r in self._cached.values()]
        payload = {
            "version": np.array(_FORMAT_VERSION),
            "max_depth": np.array(self._max_depth),
            "max_cached_requests": np.array(-1 if self._max_cached is None else self._max_cached),
            "ids": np.array([str(i) for i in ids], dtype=np.str_),
            "id_is_int": np.array([isinstance(i, int) for i in ids], dtype=bool),
            "scopes": np.array([scope for scope, _ in self._cached.values()], dtype=np.str_),
            "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            "tokens": np.concatenate([np.asarray(r, np.int32) for _, r in self._cached.values()] or
                                     [np.zeros(0, np.int32)]),
        }
        payload["sha256"] = np.array(_digest(payload))
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "wb") as f:  # a file object, so numpy does not append ".npz" to the name
            np.savez(f, **payload)
        os.replace(tmp, path)  # a crash mid-write leaves the previous file whole

    @classmethod
    def load(cls, path: str | os.PathLike) -> SuffixCache:
        """A cache with the cached responses and settings ``save`` wrote to ``path``."""
        with open(path, "rb") as file:  # a missing or unreadable file is an OSError, not corruption
            try:
                with np.load(file, allow_pickle=False) as arrays:
                    payload = {name: arrays[name] for name in arrays.files}
            except Exception as e:  # a damaged zip fails in zipfile, zlib, struct or numpy, many ways
                raise SuffixCacheError(f"{path} is not a readable suffix cache file: {e!r}") from e
        expected = {"version", "max_depth", "max_cached_requests", "ids", "id_is_int", "offsets", "tokens", "sha256"}
        if set(payload) - {"scopes"} != expected:
            raise SuffixCacheError(f"{path} is not a suffix cache file: it holds {sorted(payload)}")
        version = int(payload["version"]) if payload["version"].shape == () else None
        if version not in (1, _FORMAT_VERSION) or ("scopes" in payload) != (version == _FORMAT_VERSION):
            raise SuffixCacheError(f"{path} has suffix cache format version {payload['version']}; "
                                   f"this specjax reads versions 1 to {_FORMAT_VERSION}")
        digest = payload.pop("sha256")
        if digest.shape != () or str(digest) != _digest(payload):
            raise SuffixCacheError(f"{path} is corrupted: its checksum does not match its contents")
        ids, is_int, offsets, tokens = payload["ids"], payload["id_is_int"], payload["offsets"], payload["tokens"]
        scopes = payload["scopes"].tolist() if "scopes" in payload else [""] * len(ids)
        max_cached = int(payload["max_cached_requests"])
        cache = cls(max_depth=int(payload["max_depth"]), max_cached_requests=None if max_cached < 0 else max_cached)
        for i, request_id in enumerate(ids.tolist()):
            request_id = int(request_id) if is_int[i] else request_id
            response = array("i", tokens[offsets[i]:offsets[i + 1]].tolist())
            cache._global(scopes[i]).extend([], response)
            cache._cached[request_id] = (scopes[i], response)
            cache._cached_tokens += len(response)
        return cache

    def _request(self, request_id: Hashable) -> _Request:
        try:
            return self._active[request_id]
        except KeyError:
            raise KeyError(f"request {request_id!r} is not active (start_request it first)") from None


def _as_slice(ids: list[int]) -> slice | None:
    """``ids`` as a slice if they are consecutive ascending integers."""
    if ids[-1] - ids[0] == len(ids) - 1 and ids == list(range(ids[0], ids[-1] + 1)):
        return slice(ids[0], ids[-1] + 1)
    return None


def _digest(payload: dict[str, np.ndarray]) -> str:
    """sha256 of the arrays' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(payload):
        a = np.ascontiguousarray(payload[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _token_list(tokens: Sequence[int], what: str) -> list[int]:
    try:
        out = list(map(operator.index, tokens))
    except TypeError:
        raise TypeError(f"{what} must be a sequence of integer token ids") from None
    if out and (min(out) < 0 or max(out) > _MAX_TOKEN):
        raise ValueError(f"{what} must hold token ids in [0, {_MAX_TOKEN}], got {min(out)}..{max(out)}")
    return out


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)
