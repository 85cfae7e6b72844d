"""The server's Prometheus metrics, in a registry of its own (several servers may share a process).

Gauges read the engine's state when scraped; counters and histograms are fed by the engine thread
as requests produce tokens and finish. Speculation metrics are labelled by each request's method
("tree", "suffix", "hybrid", "ngram", ...: the server's default or the one the request asked for) and cover
the requests that speculated.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from specjax.speculation.stats import SpeculationStats

# Seconds: from a few milliseconds (a warm small model) to a long queue wait.
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    """``speculates``: whether the LLM offers any speculation (else no speculation metrics)."""

    def __init__(self, speculates: bool, *, waiting: Callable[[], int], running: Callable[[], int],
                 pages_used: Callable[[], int], pages_total: int, compile_seconds: Callable[[], float]):
        self.registry = r = CollectorRegistry()
        self.speculates = speculates
        Gauge("specjax_requests_waiting", "Requests waiting for a slot or KV pages", registry=r).set_function(waiting)
        Gauge("specjax_requests_running", "Requests being prefilled or decoded", registry=r).set_function(running)
        Gauge("specjax_kv_pages_used", "KV cache pages held by running requests", registry=r).set_function(pages_used)
        Gauge("specjax_kv_pages_total", "KV cache pages in the pool", registry=r).set(pages_total)
        # A step of a shape not seen before compiles first, and the whole batch waits for it.
        Gauge("specjax_compile_seconds", "Seconds the engine's steps have spent compiling new step shapes",
              registry=r).set_function(compile_seconds)
        self.generated_tokens = Counter("specjax_generation_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("specjax_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.requests = Counter("specjax_requests", "Finished requests by finish reason", ["finish_reason"],
                                registry=r)
        self.preemptions = Counter("specjax_preemptions", "Requests preempted (their KV pages freed, to be "
                                   "recomputed) because the page pool ran out", registry=r)
        self.rejected = Counter("specjax_requests_rejected", "Requests refused because the queue was full",
                                registry=r)
        self.time_to_first_token = Histogram("specjax_time_to_first_token_seconds",
                                             "From a request's arrival to its first token", buckets=_TTFT_BUCKETS,
                                             registry=r)
        self.time_per_output_token = Histogram("specjax_time_per_output_token_seconds",
                                               "Mean time between a request's tokens after the first",
                                               buckets=_TPOT_BUCKETS, registry=r)
        # Co-served fine-tuning jobs (serving.finetuning), by job id.
        self._job_step = Gauge("specjax_finetune_step", "Optimizer steps a fine-tuning job has taken", ["job"],
                               registry=r)
        self._job_steps = Gauge("specjax_finetune_total_steps", "Optimizer steps a fine-tuning job takes in all",
                                ["job"], registry=r)
        self._job_loss = Gauge("specjax_finetune_loss", "Training loss of a fine-tuning job's last step", ["job"],
                               registry=r)
        self._job_valid_loss = Gauge("specjax_finetune_validation_loss", "Validation loss of a fine-tuning job at "
                                     "its last evaluation (its validation file's mean loss per learnt token)",
                                     ["job"], registry=r)
        self._job_tokens = Gauge("specjax_finetune_tokens", "Sequence tokens a fine-tuning job has trained on "
                                 "(forward and backward) since the server started it", ["job"], registry=r)
        if speculates:
            label = ["method"]
            self._spec_counters = {
                name: Counter(f"specjax_speculation_{name}", doc, label, registry=r)
                for name, doc in (("steps", "Verification steps"),
                                  ("tokens", "Tokens from verification steps (accepted and bonus)"),
                                  ("proposed_tokens", "Speculated tokens sent to verification"),
                                  ("accepted_tokens", "Speculated tokens accepted"))}
            self._tau = Gauge("specjax_speculation_tau", "Tokens per verification step, all requests so far",
                              label, registry=r)
            self._acceptance = Gauge("specjax_speculation_acceptance_rate",
                                     "Accepted / proposed speculated tokens, all requests so far", label, registry=r)
            self._sources = Counter("specjax_speculation_source_steps", "Verification steps by proposal source",
                                    ["source"], registry=r)
            self._totals: dict[str, SpeculationStats] = {}  # per method

    def finished(self, output, first_token_at: float | None, now: float) -> None:
        """Account a finished (or aborted) request; ``first_token_at``/``now`` are perf_counter times."""
        self.requests.labels(output.finish_reason or "abort").inc()
        self.prompt_tokens.inc(len(output.prompt_token_ids))
        if first_token_at is not None and len(output.token_ids) > 1:
            self.time_per_output_token.observe((now - first_token_at) / (len(output.token_ids) - 1))
        spec = output.stats.speculation
        if not self.speculates or spec is None or not spec.steps:
            return
        method = output.stats.speculation_method
        for name, value in (("steps", spec.steps), ("tokens", spec.tokens), ("proposed_tokens", spec.proposed),
                            ("accepted_tokens", spec.accepted)):
            self._spec_counters[name].labels(method).inc(value)
        for source, steps in spec.sources.items():
            self._sources.labels(source).inc(steps)
        total = self._totals[method] = self._totals.get(method, SpeculationStats()).merge(spec)
        self._tau.labels(method).set(total.tau)
        self._acceptance.labels(method).set(total.acceptance_rate)

    def finetune_progress(self, job: str, step: int, total: int, loss: float, tokens: int,
                          valid_loss: float | None = None) -> None:
        self._job_step.labels(job).set(step)
        self._job_steps.labels(job).set(total)
        self._job_loss.labels(job).set(loss)
        self._job_tokens.labels(job).set(tokens)
        if valid_loss is not None:
            self._job_valid_loss.labels(job).set(valid_loss)

    def render(self) -> bytes:
        return generate_latest(self.registry)
