"""Speculation metrics, the same everywhere they are reported.

tau: mean tokens produced per target verification step (accepted draft tokens + the target's own
token; a request's last step counts only the tokens it still needed); acceptance rate: accepted / proposed draft tokens; acceptance at depth d: of the steps
whose path reached depth d - 1, the share that accepted a token at depth d; wasted share: proposed
tokens that were not accepted. host_time_s: seconds the host spent proposing (suffix cache lookups
and updates), apart from device steps; sources: verification steps per proposal source ("suffix",
"draft") where a request can use several.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpeculationStats:
    steps: int = 0
    tokens: int = 0  # tokens produced by verification steps (accepted + one bonus per step)
    proposed: int = 0  # draft tokens sent to verification (every node of a tree)
    accepted: int = 0
    reached: list[int] = field(default_factory=list)  # reached[d]: steps with a proposal at depth d + 1
    accepted_at: list[int] = field(default_factory=list)  # accepted_at[d]: steps that accepted depth d + 1
    host_time_s: float = 0.0
    sources: dict[str, int] = field(default_factory=dict)

    def record(self, proposed: int, depth: int, accepted: int, tokens: int | None = None,
               source: str | None = None) -> None:
        """One verification step: ``proposed`` draft tokens over a tree (or chain) of ``depth``
        levels, of which the first ``accepted`` levels of one path were accepted. ``tokens``: what
        the step delivered, when a finishing request needed fewer than its ``accepted + 1``;
        ``source``: where the proposal came from, counted in ``sources``."""
        tokens = accepted + 1 if tokens is None else tokens
        if not (0 <= accepted <= depth <= proposed and 1 <= tokens <= accepted + 1):
            raise ValueError(f"inconsistent step: proposed={proposed} depth={depth} accepted={accepted} "
                             f"tokens={tokens}")
        grow = depth - len(self.reached)
        if grow > 0:
            self.reached.extend([0] * grow)
            self.accepted_at.extend([0] * grow)
        for d in range(min(accepted + 1, depth)):  # depths tried: every accepted one and the first rejection
            self.reached[d] += 1
        for d in range(accepted):
            self.accepted_at[d] += 1
        self.steps += 1
        self.tokens += tokens
        self.proposed += proposed
        self.accepted += accepted
        if source is not None:
            self.sources[source] = self.sources.get(source, 0) + 1

    def merge(self, other: "SpeculationStats") -> "SpeculationStats":
        out = SpeculationStats()
        for s in (self, other):
            for d, (r, a) in enumerate(zip(s.reached, s.accepted_at)):
                if d >= len(out.reached):
                    out.reached.append(0)
                    out.accepted_at.append(0)
                out.reached[d] += r
                out.accepted_at[d] += a
            out.steps += s.steps
            out.tokens += s.tokens
            out.proposed += s.proposed
            out.accepted += s.accepted
            out.host_time_s += s.host_time_s
            for source, steps in s.sources.items():
                out.sources[source] = out.sources.get(source, 0) + steps
        return out

    @property
    def tau(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def wasted_share(self) -> float:
        return 1.0 - self.acceptance_rate if self.proposed else 0.0

    @property
    def acceptance_by_depth(self) -> list[float]:
        return [a / r if r else 0.0 for r, a in zip(self.reached, self.accepted_at)]

    def as_dict(self) -> dict:
        return {"steps": self.steps, "tokens": self.tokens, "proposed": self.proposed, "accepted": self.accepted,
                "tau": self.tau, "acceptance_rate": self.acceptance_rate, "wasted_share": self.wasted_share,
                "acceptance_by_depth": self.acceptance_by_depth,
                "host_us_per_step": 1e6 * self.host_time_s / self.steps if self.steps else 0.0,
                "sources": dict(self.sources)}
