"""The kernel agent end to end: the offline search finds correct kernels in interpret mode; the chat
proposer talks to a scripted OpenAI-compatible server on 127.0.0.1, each failure's feedback reaches the
next prompt, an interrupted job resumes, and a dead endpoint or an unknown task ends cleanly."""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agent import agent_cli, tasks
from agent.loop import Budget, run_job
from agent.proposers import Context, OpenAIProposer, SearchProposer, extract_code
from agent.store import Attempt, Store

EXAMPLES = Path(__file__).resolve().parent.parent / "agent" / "examples"
GOOD = (EXAMPLES / "rmsnorm_rope" / "kernel.py").read_text()
USAGE = {"prompt_tokens": 90, "completion_tokens": 10, "total_tokens": 100}

# The fixed conversation: no code, a syntax error, a kernel that calls the reference, a correct kernel.
CONVERSATION = [
    "I would fuse the norm into the rotation and tile over rows.",
    "```python\ndef kernel(x, weight, cos, sin, *, eps:\n    return x\n```",
    "```python\nfrom agent.tasks.specjax_ops import rmsnorm_rope\n\n\ndef kernel(x, weight, cos, sin, *, eps):\n"
    "    return rmsnorm_rope(x, weight, cos, sin, eps=eps)\n```",
    f"Here it is:\n```python\n{GOOD}```\nIt tiles 8 rows per program.",
]
# What each of the first three attempts' feedback says, which the next prompt must carry.
FAILURES = ["no ```python code block", "syntax error", "anti-cheat"]


class ScriptedServer:
    """An OpenAI-compatible /chat/completions that replays ``script`` in order and keeps every request.

    An entry is the assistant's text (200, with usage) or (status, raw body) for transport-level replies."""

    def __init__(self, script):
        self.script, self.requests = list(script), []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                server.requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                entry = server.script.pop(0)
                if isinstance(entry, str):
                    status, body = 200, json.dumps({"choices": [{"message": {"role": "assistant", "content": entry}}],
                                                    "usage": USAGE}).encode()
                else:
                    status, body = entry
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def prompts(self):
        return [r["messages"][-1]["content"] for r in self.requests]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "agent.sqlite")
    yield s
    s.close()


def _chat(url, **kwargs):
    return OpenAIProposer(url, "scripted", timeout_s=30, retries=kwargs.pop("retries", 1), backoff_s=0.01, **kwargs)


def test_chat_loop_feeds_each_failure_back_until_a_kernel_passes(store):
    server = ScriptedServer(CONVERSATION)
    try:
        result = run_job(store, "chat", "rmsnorm_rope", _chat(server.url), Budget(attempts=4, plateau=None))
    finally:
        server.close()
    assert [a.correct for a in result.attempts] == [False, False, False, True]
    assert result.status == "budget: 4 attempts"
    assert result.best.id == result.attempts[-1].id and result.best.code == GOOD
    for attempt, said in zip(result.attempts, FAILURES):
        assert said in attempt.feedback
    prompts = server.prompts()
    assert "def rmsnorm_rope" in prompts[0] and "Failed attempt" not in prompts[0]
    for i, said in enumerate(FAILURES, 1):
        assert all(s in prompts[i] for s in FAILURES[:i])  # every earlier failure, with its feedback
    assert "from agent.tasks.specjax_ops import rmsnorm_rope" in prompts[3]  # and the latest failure's code
    assert sum(a.tokens for a in result.attempts) == 4 * USAGE["total_tokens"]
    assert store.job("chat").status == result.status


def test_stops_on_the_token_budget(store):
    server = ScriptedServer(CONVERSATION)
    try:
        result = run_job(store, "tokens", "rmsnorm_rope", _chat(server.url), Budget(attempts=10, tokens=200))
    finally:
        server.close()
    assert len(result.attempts) == 2 and result.status == "budget: 200 tokens" and result.best is None


def test_stops_on_a_plateau(store):
    server = ScriptedServer(CONVERSATION[:1] * 3)
    try:
        result = run_job(store, "flat", "rmsnorm_rope", _chat(server.url), Budget(attempts=10, plateau=2))
    finally:
        server.close()
    assert len(result.attempts) == 3 and result.status == "plateau: no better kernel in 2 rounds"


class Interrupting:
    """The chat proposer, interrupted (as by Ctrl-C) on its ``at``-th round."""

    def __init__(self, inner, at):
        self.inner, self.at, self.calls = inner, at, 0
        self.name = inner.name

    def config(self):
        return self.inner.config()

    def propose(self, context):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.inner.propose(context)


def test_an_interrupted_job_resumes_from_its_stored_attempts(store):
    server = ScriptedServer(CONVERSATION)
    budget = Budget(attempts=4, plateau=None)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_job(store, "resume", "rmsnorm_rope", Interrupting(_chat(server.url), at=3), budget)
        assert store.job("resume").status == "interrupted" and len(store.attempts("resume")) == 2
        result = run_job(store, "resume", "rmsnorm_rope", _chat(server.url), budget)
    finally:
        server.close()
    assert len(server.requests) == 4  # nothing asked twice
    assert [a.round for a in result.attempts] == [0, 1, 2, 3]
    assert [a.correct for a in result.attempts] == [False, False, False, True]
    assert all(s in server.prompts()[2] for s in FAILURES[:2])  # the resumed prompt knows the stored failures
    assert result.status == "budget: 4 attempts"
    with pytest.raises(ValueError, match="pick another --job"):
        run_job(store, "resume", "int8_weight_only_matmul", _chat(server.url), budget)


def test_a_dead_endpoint_or_bad_replies_are_failed_attempts(store):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    result = run_job(store, "dead", "rmsnorm_rope", _chat(dead, retries=2), Budget(attempts=2, plateau=None))
    assert result.status == "budget: 2 attempts" and result.best is None
    assert all("unreachable after 3 tries" in a.feedback and a.code is None for a in result.attempts)

    server = ScriptedServer([(503, b"busy"), (200, b"not json"), (200, b'{"choices": []}'), (401, b"bad key")])
    try:
        result = run_job(store, "bad", "rmsnorm_rope", _chat(server.url), Budget(attempts=3, plateau=None))
    finally:
        server.close()
    feedback = [a.feedback for a in result.attempts]
    assert "malformed reply" in feedback[0] and len(server.requests) == 4  # the 503 was retried
    assert "malformed reply" in feedback[1] and "refused the request: HTTP 401" in feedback[2]


def test_unknown_task_is_a_clear_error(store, tmp_path, capsys):
    with pytest.raises(KeyError, match="no task 'no_such_op'"):
        run_job(store, "x", "no_such_op", _chat("http://127.0.0.1:9/v1"))
    assert store.jobs() == []
    assert agent_cli.main(["run", "--task", "no_such_op", "--provider", "search", "--db", str(tmp_path / "d")]) == 2
    assert "no task 'no_such_op'" in capsys.readouterr().err


def test_extract_code_prefers_the_block_defining_kernel():
    reply = "```python\nimport jax\n```\ntext\n```py\ndef kernel(x):\n    return x\n```"
    assert extract_code(reply) == "def kernel(x):\n    return x\n"
    assert extract_code("```python\nx = 1\n```") == "x = 1\n"
    assert extract_code("no code") is None
    assert extract_code("Sure:\n```python\nimport jax\ndef kernel(x):\n    return") == "import jax\ndef kernel(x):\n    return"


def test_search_finds_a_correct_rmsnorm_rope_kernel(store):
    space = {"block_rows": (2, 4), "block_h": (1,), "num_warps": (4,), "num_stages": (1,)}
    result = run_job(store, "s", "rmsnorm_rope", SearchProposer("rmsnorm_rope", space=space), Budget(attempts=10), k=2)
    assert result.status == "done: the proposer has nothing left to try"
    assert [a.params["rung"] for a in result.attempts] == [0, 0, 1]  # both configs, then the survivor again
    assert result.best is not None and "timing needs a GPU" in result.best.feedback
    rung1 = result.attempts[2]
    assert rung1.correct and len({c["seed"] for c in rung1.result["checks"]}) == 3  # a harder look


def test_search_cli_on_int8_matmul_and_report_exports_the_best_kernel(tmp_path, capsys):
    db = tmp_path / "agent.sqlite"
    assert agent_cli.main(["run", "--task", "int8_weight_only_matmul", "--provider", "search", "--configs", "2",
                           "--budget", "2", "-k", "2", "--workers", "2", "--job", "q", "--db", str(db)]) == 0
    judged = Store(db)
    failed = [f"attempt {a.id}: {a.feedback}" for a in judged.attempts("q") if not a.correct]
    judged.close()
    assert not failed, failed  # the harness's own words say why, which a count alone would hide
    assert "job q: budget: 2 attempts; 2 attempts, 2 correct" in capsys.readouterr().out
    assert agent_cli.main(["report", "--job", "q", "--db", str(db), "--export", str(tmp_path / "best")]) == 0
    report = capsys.readouterr().out
    assert "## Job `q`: int8_weight_only_matmul with search" in report and report.count("| yes |") == 2
    exported = (tmp_path / "best" / "kernel.py").read_text()
    stored = Store(db)
    assert exported in [a.code for a in stored.attempts("q")]
    stored.close()


def test_ranking_follows_measured_speed_when_timed():
    def timed(id_, config, speedup):
        return Attempt(id_, "j", 0, "src", {"config": config, "rung": 0}, True, "", {
            "max_ratio": 0.1, "timing": {"speedup": speedup}}, 0, 1.0)

    space = {"block_rows": (1, 8), "block_h": (1,), "num_warps": (4,), "num_stages": (1,)}
    proposer = SearchProposer("rmsnorm_rope", space=space)
    slow, fast = ({"block_rows": 1, "block_h": 1, "num_warps": 4, "num_stages": 1},
                  {"block_rows": 8, "block_h": 1, "num_warps": 4, "num_stages": 1})
    context = Context(tasks.get("rmsnorm_rope"), "", [timed(1, slow, 0.8), timed(2, fast, 1.7)], k=4)
    (promoted,) = proposer.propose(context)
    assert promoted.params == {"config": fast, "rung": 1} and promoted.fidelity["repeats"] == 20
