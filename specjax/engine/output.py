"""Turning a step's tokens into a request's output: accounting, detokenising, stop conditions."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Sequence

from specjax.engine.request import Request
from specjax.sampling import TokenLogprob


class OutputProcessor:
    """Accounts each new token to its request: its text (held back while it could still become a
    stop string), its logprob, its timing, and whether it finishes the request."""

    def advance(self, req: Request, token: int, elapsed: float, logprob: TokenLogprob | None = None,
                prefilled: int = 0) -> str | None:
        """Account a step's result to a request; returns its new text, or None mid-prefill.
        ``logprob``: the token's, when the step scored it (kept if the request asked);
        ``prefilled``: the prompt tokens the step ran for it (a prefill step)."""
        out, stats = req.output, req.output.stats
        if req.prefilled < req.num_prefill:
            req.prefilled = min(req.num_prefill, req.prefilled + prefilled)
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
                    or len(out.prompt_token_ids) + len(out.token_ids) >= req.max_total):
                out.finish_reason = "length"
                text += req.detok.flush()
        text, hit = apply_stop_strings(text, req.params.stop)
        if hit:
            out.finish_reason = "stop"
        if out.finished or not req.params.stop:
            emit, req.pending_text = text, ""
        else:  # hold back a tail that may be the start of a stop string
            hold = stop_prefix_len(text, req.params.stop)
            emit, req.pending_text = text[: len(text) - hold], text[len(text) - hold:]
        out.text += emit
        return emit


def apply_stop_strings(new: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Cut ``new`` before the first stop string in it; returns (text, whether cut).

    Emitted text never ends in the beginning of a stop string (``stop_prefix_len`` holds that
    back), so a stop string can only appear within the not-yet-emitted text.
    """
    cuts = [i for i in (new.find(s) for s in stops) if i >= 0]
    return (new[: min(cuts)], True) if cuts else (new, False)


def stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
