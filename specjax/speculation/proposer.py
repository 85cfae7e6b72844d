"""The one interface every speculation method implements, and the registry that names them.

A ``Proposer`` proposes token trees for the rows of a step; the engine verifies them all the same
way (``verify.verify_and_commit``) and tells the proposer what was accepted. The scheduler never
asks which method a request uses: a request's ``speculation`` name resolves once, through the
registry, to a proposer, and from then on the scheduler only calls the methods below.

Two kinds of proposals share one ``DraftBatch``:

* host trees (``DraftTree``: suffix cache, n-gram lookup), proposed before the step as token ids
  with a probability per node, point masses for multi-step speculative sampling; every host tree
  of a step is verified in one target pass, whichever proposer sent it;
* device-drafted trees (draft models): the proposer supplies a ``DeviceDrafter`` whose drafting
  runs inside the same compiled step as verification, with the draft distributions multi-step
  speculative sampling needs.

Proposers register a settings class under a method name (``register``, usually at the bottom of
their own module; ``speculation.methods`` imports the built-in ones); ``LLM`` builds a proposer
from the settings it is given, and requests name it in ``speculation``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from typing import Callable, Protocol, Sequence

from specjax.engine.step import StepInput
from specjax.runner import ModelRunner
from specjax.speculation.tree import TokenTree, tree_bucket


@dataclass(frozen=True)
class DraftTree:
    """A token tree proposed on the host for one row.

    tokens: speculated tokens in topological order (parents before children), most probable first,
        so any prefix is the best subtree of its size (``truncated``).
    parents: each token's parent in ``TokenTree.build``'s convention: 0 = the root (the sequence's
        last token), i + 1 = the i-th speculated token.
    probs: each token's estimated probability of being accepted (the batch-aware budget's gains).
    source: what proposed it, for ``SpeculationStats.sources``.
    """

    tokens: Sequence[int]
    parents: Sequence[int]
    probs: Sequence[float]
    source: str

    @property
    def score(self) -> float:
        """Expected accepted tokens: the sum of the nodes' probabilities."""
        return float(sum(self.probs))

    def truncated(self, num_tokens: int) -> "DraftTree":
        if num_tokens >= len(self.tokens):
            return self
        return replace(self, tokens=self.tokens[:num_tokens], parents=self.parents[:num_tokens],
                       probs=self.probs[:num_tokens])


@dataclass
class ProposalRow:
    """What a proposer sees of one request in a step.

    uid: the request's id; sequence: its prompt and output so far (the last token is the tree's
    root, not yet in the target's cache); room: the most tokens a host tree may speculate (the
    tokens still allowed, and what its pages hold); sampling: the row's sampling settings and key;
    seeded: the request gave a seed, so its tokens must depend on nothing else.
    """

    uid: int
    sequence: list[int]
    room: int
    sampling: StepInput
    seeded: bool = False


@dataclass
class DraftBatch:
    """Proposals for some rows of a step: a host ``DraftTree`` per row (None: nothing worth
    speculating, a root-only tree), or, with ``drafter``, trees the drafter builds on the device
    inside the verification step (``trees`` is then all None)."""

    rows: list[ProposalRow]
    trees: list[DraftTree | None]
    drafter: "DeviceDrafter | None" = None
    source: str = ""  # what rows without a DraftTree report as their source
    host_time_s: list[float] | None = None  # per row, the host seconds proposing took

    def __post_init__(self):
        if len(self.rows) != len(self.trees):
            raise ValueError(f"{len(self.rows)} rows but {len(self.trees)} trees")


def host_token_trees(roots: Sequence[int], drafts: Sequence[DraftTree | None]) -> list[TokenTree]:
    """One TokenTree per row (root only where there is no draft), all of the batch's largest bucket."""
    size = tree_bucket(1 + max(len(d.tokens) if d else 0 for d in drafts))
    return [TokenTree.build(root, d.tokens if d else [], d.parents if d else [], size)
            for root, d in zip(roots, drafts)]


@dataclass
class Verified:
    """What verification gave one row: its new tokens (accepted, then the target's bonus token),
    their logprobs when asked, and (proposed, depth, accepted) for ``SpeculationStats.record``."""

    tokens: list[int]
    logprobs: list | None
    proposed: int
    depth: int
    accepted: int


class DeviceDrafter(Protocol):
    """Drafts trees on the device in the same compiled step that verifies them (draft models).
    It keeps every sequence it follows in its own caches, so it takes part in the KV lifecycle."""

    def step(self, inputs: Sequence[StepInput], *, logprobs: bool) -> tuple[list[Verified], float]: ...


class Proposer:
    """A speculation method. The defaults are those of a host-side proposer that needs nothing
    but the tokens: subclasses override what they use.

    Lifecycle, called by the scheduler for every proposer a request involves (``parts``):
    ``start``/``stop`` span the whole request (first admission to finish or abort); ``attach``/
    ``detach`` span each stretch it holds KV pages (admission to preemption or finish), with
    ``grow`` as it gets longer. ``prefill`` sees every prompt chunk the target runs.
    """

    name: str = ""
    #: KV positions past a sequence one verification may write (a tree's depth at most).
    lookahead: int = 0
    #: KV positions past the request's last allowed token a verification may write: host trees
    #: are cut to the tokens still allowed, device-drafted ones cannot be.
    overrun: int = 0
    #: whether its steps are counted by source (composites of several proposers).
    reports_sources: bool = False
    #: whether it follows every speculating request, whatever proposer serves it (a cache of outputs).
    follows_every_request: bool = False
    #: whether its settings ask the engine to size each step's host trees for the whole batch.
    batch_aware: bool = False

    def parts(self) -> tuple["Proposer", ...]:
        """The proposers whose lifecycle this one's requests go through (itself, or a composite's parts)."""
        return (self,)

    # -- resources: only proposers with their own caches hold any
    def fits(self, max_total: int) -> bool:
        """Whether a sequence of ``max_total`` tokens could ever be followed (alone)."""
        return True

    def can_admit(self, length: int) -> bool:
        return True

    def can_grow(self, uid: int, length: int) -> bool:
        return True

    def attach(self, uid: int, length: int) -> None:
        pass

    def grow(self, uid: int, length: int) -> None:
        pass

    def detach(self, uid: int) -> None:
        pass

    def prefill(self, inputs: Sequence[StepInput]) -> None:
        pass

    # -- the request's whole life
    def start(self, uid: int, prompt: Sequence[int], scope: str = "") -> None:
        """``scope``: whose earlier outputs the request may draft from and feed (``Request.cache_scope``)."""

    def stop(self, uid: int, sequence: Sequence[int]) -> None:
        pass

    # -- each step
    def propose(self, rows: list[ProposalRow]) -> list[DraftBatch]:
        raise NotImplementedError

    def learn(self, row: ProposalRow, draft: DraftTree | None, source: str, verified: Verified) -> None:
        """What became of a row's proposal (``draft`` None for a device-drafted or empty one)."""

    # -- compile ahead
    def tree_sizes(self) -> tuple[int, ...]:
        """Tree buckets its host trees can take (the verification shapes a warm-up compiles)."""
        return ()

    def warm_up_jobs(self, max_len: int | None) -> dict[str, list]:
        return {}

    @property
    def compile_time_s(self) -> float:
        return 0.0


@dataclass(frozen=True)
class BuildContext:
    """What a proposer may be built from: the target's runner and its loaded model."""

    runner: ModelRunner
    target: object  # checkpoints.LoadedModel
    build: Callable  # build(settings) -> Proposer, for composites


_REGISTRY: dict[str, tuple[type, Callable[[object, BuildContext], Proposer], bool]] = {}


def register(method: str, settings: type, build: Callable[[object, BuildContext], Proposer], *,
             always_offered: bool = False) -> None:
    """Register ``settings`` (a frozen dataclass with a ``method`` class attribute) under ``method``,
    built into a proposer by ``build(settings, context)``. ``always_offered``: any LLM offers the
    method to requests with its default settings (it needs no model, cache or file)."""
    if method in ("none", "default"):
        raise ValueError(f"{method!r} is reserved")
    if not dataclasses.is_dataclass(settings) or getattr(settings, "method", None) != method:
        raise TypeError(f"{settings.__name__} must be a dataclass whose method is {method!r}")
    _REGISTRY[method] = (settings, build, always_offered)


def unregister(method: str) -> None:
    """Forget a registered method (engines built with it keep their proposers)."""
    if method not in _REGISTRY:
        raise KeyError(f"no speculation method {method!r} is registered")
    del _REGISTRY[method]


def registered() -> dict[str, type]:
    """Method name -> settings class, in registration order."""
    return {name: entry[0] for name, entry in _REGISTRY.items()}


def always_offered() -> tuple[str, ...]:
    return tuple(name for name, (_, _, always) in _REGISTRY.items() if always)


def build(settings, context: BuildContext) -> Proposer:
    """The proposer of ``settings`` (an instance of a registered settings class)."""
    for name, (cls, builder, _) in _REGISTRY.items():
        if type(settings) is cls:
            proposer = builder(settings, context)
            proposer.name = name
            return proposer
    known = ", ".join(cls.__name__ for cls, _, _ in _REGISTRY.values())
    raise TypeError(f"speculation must be one of {known}, got {type(settings).__name__}")

