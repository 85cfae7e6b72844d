"""Where candidate kernels come from: one interface, two proposers.

A proposer turns a ``Context`` (the task, the prompt the loop wrote, every attempt so far) into up to
``k`` ``Proposal``s. It never judges code: the loop runs every proposal through the anti-cheat checks
and the harness. A proposer that cannot produce code returns a Proposal with ``code=None`` and the
reason in ``error``, which the loop records as a failed attempt (it never raises for bad replies).

* ``OpenAIProposer``: any OpenAI-compatible chat endpoint (``specjax serve`` included).
* ``SearchProposer``: offline; renders ``agent.templates`` over their knob grid and narrows the grid
  by successive halving: every configuration is tried at rung 0, the best ``1/eta`` of each rung go on
  to the next with a higher fidelity (more input sets, more timing repeats), until one is left.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import time
import urllib.error
import urllib.request
from typing import Protocol

from agent import templates
from agent.store import Attempt, rank_key
from agent.tasks import Task


@dataclasses.dataclass(frozen=True)
class Proposal:
    code: str | None
    params: dict = dataclasses.field(default_factory=dict)  # what produced it: knob values, model, rung
    tokens: int = 0
    error: str | None = None  # why there is no code
    fidelity: dict = dataclasses.field(default_factory=dict)  # extra run_candidate arguments


@dataclasses.dataclass(frozen=True)
class Context:
    task: Task
    prompt: str
    history: list[Attempt]
    k: int


class Proposer(Protocol):
    name: str

    def config(self) -> dict: ...

    def propose(self, context: Context) -> list[Proposal]: ...


# ---- OpenAI-compatible chat endpoints ----

SYSTEM_PROMPT = ("You write JAX Pallas kernels. Reply with exactly one ```python code block holding a complete "
                 "kernel.py module that defines kernel(*inputs, **static).")
# A block left open at the end counts too: a reply cut off at max_tokens is judged (and its failure
# fed back) like any other code, not dismissed as having none.
_CODE_BLOCK = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)
# Worth another try: rate limits and server-side failures; any other HTTP error will not fix itself.
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


def extract_code(reply: str) -> str | None:
    """The reply's code block that defines ``kernel`` (the last one, if it revised itself), else its only block."""
    blocks = _CODE_BLOCK.findall(reply)
    defining = [b for b in blocks if re.search(r"^def kernel\(", b, re.MULTILINE)]
    if defining:
        return defining[-1]
    return blocks[0] if len(blocks) == 1 else None


class OpenAIProposer:
    name = "openai"

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, timeout_s: float = 300.0,
                 retries: int = 3, backoff_s: float = 2.0, temperature: float = 0.7, max_tokens: int | None = None):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._api_key = api_key
        self.timeout_s, self.retries, self.backoff_s, self.temperature = timeout_s, retries, backoff_s, temperature
        self.max_tokens = max_tokens  # per reply; None leaves it to the endpoint

    @classmethod
    def from_env(cls, base_url: str | None = None, model: str | None = None, **kwargs) -> OpenAIProposer:
        """Endpoint from the arguments, else SPECJAX_AGENT_BASE_URL / OPENAI_BASE_URL, model from
        SPECJAX_AGENT_MODEL / OPENAI_MODEL, key from OPENAI_API_KEY (optional: local servers need none)."""
        env = os.environ
        base_url = base_url or env.get("SPECJAX_AGENT_BASE_URL") or env.get("OPENAI_BASE_URL")
        model = model or env.get("SPECJAX_AGENT_MODEL") or env.get("OPENAI_MODEL")
        if not base_url or not model:
            raise ValueError("the openai provider needs an endpoint and a model: --base-url/--model, or "
                             "SPECJAX_AGENT_BASE_URL and SPECJAX_AGENT_MODEL")
        return cls(base_url, model, env.get("OPENAI_API_KEY"), **kwargs)

    def config(self) -> dict:
        return {"base_url": self.base_url, "model": self.model, "temperature": self.temperature,
                "max_tokens": self.max_tokens}

    def propose(self, context: Context) -> list[Proposal]:
        return [self._ask(context.prompt) for _ in range(context.k)]

    def _ask(self, prompt: str) -> Proposal:
        payload = {"model": self.model, "temperature": self.temperature,
                   "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]}
        if self.max_tokens is not None:
            payload["max_tokens"] = self.max_tokens
        body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        params = {"model": self.model}
        last_error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(f"{self.base_url}/chat/completions", body, headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    raw = response.read()
            except urllib.error.HTTPError as e:
                last_error = f"HTTP {e.code}: {e.read()[:300].decode(errors='replace')}"
                if e.code not in _RETRY_STATUS:
                    return Proposal(None, params, error=f"endpoint refused the request: {last_error}")
                continue
            except (OSError, TimeoutError) as e:  # URLError, refused connections and socket timeouts
                last_error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
                continue
            return self._parse(raw, params)
        return Proposal(None, params, error=f"endpoint unreachable after {self.retries + 1} tries: {last_error}")

    @staticmethod
    def _parse(raw: bytes, params: dict) -> Proposal:
        try:
            reply = json.loads(raw)
            usage = reply.get("usage") or {}
            tokens = int(usage.get("total_tokens") or usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0))
            content = reply["choices"][0]["message"]["content"]
            if not isinstance(content, str):
                raise TypeError(f"message content is {type(content).__name__}, not text")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            return Proposal(None, params, error=f"malformed reply ({type(e).__name__}: {e}): {raw[:300]!r}")
        params = {**params, "reply": content}
        code = extract_code(content)
        if code is None:
            return Proposal(None, params, tokens,
                            error="the reply has no ```python code block defining kernel() (or several blocks "
                                  "and none defines it)")
        return Proposal(code, params, tokens)


# ---- offline search over kernel templates ----

class SearchProposer:
    """Successive halving over a template's knob grid; its state is the job's history, so it resumes."""

    name = "search"

    def __init__(self, task: str, *, space: dict[str, tuple] | None = None, configs: int | None = None,
                 eta: int = 2, seed: int = 0):
        self.template = templates.get(task)
        self.space = space
        self.eta, self.seed = eta, seed
        grid = self.template.grid(space)
        random.Random(seed).shuffle(grid)  # a budget cut short still samples the whole grid, not one corner
        if self.template.default in grid:  # first the configuration meant to work everywhere: --configs 1 is it
            grid.remove(self.template.default)
            grid.insert(0, self.template.default)
        self.configs = grid[:configs] if configs else grid

    def config(self) -> dict:
        return {"space": self.space or self.template.space, "configs": len(self.configs), "eta": self.eta,
                "seed": self.seed}

    def propose(self, context: Context) -> list[Proposal]:
        by_rung: dict[int, list[Attempt]] = {}
        for a in context.history:
            if "rung" in a.params:
                by_rung.setdefault(a.params["rung"], []).append(a)
        entrants, rung = self.configs, 0
        while True:
            tried = [a.params["config"] for a in by_rung.get(rung, [])]
            todo = [c for c in entrants if c not in tried]
            if todo:
                return [self._proposal(c, rung) for c in todo[:context.k]]
            # Correct first; on a GPU the measured speedup orders the correct ones (see store.rank_key).
            ranked = sorted((a for a in by_rung.get(rung, []) if a.correct and a.params["config"] in entrants),
                            key=rank_key, reverse=True)
            keep = math.ceil(len(entrants) / self.eta)
            if len(entrants) <= 1 or not ranked:
                return []
            entrants, rung = [a.params["config"] for a in ranked[:keep]], rung + 1

    def _proposal(self, config: dict, rung: int) -> Proposal:
        # Each rung looks harder: one more fresh input set, eta times the timing repeats.
        fidelity = {"input_sets": 2 + rung, "repeats": 10 * self.eta ** rung}
        return Proposal(self.template.render(config), {"config": config, "rung": rung}, fidelity=fidelity)
