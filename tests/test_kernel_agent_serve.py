"""The kernel agent against ``specjax serve`` itself: the built-in SmolLM2-135M behind the real
OpenAI-compatible server on 127.0.0.1 proposes kernels it cannot write; whatever comes back (prose,
a code block cut off at max_tokens, the wrong function, broken Python) is a failed attempt with its
reason, and the job ends cleanly on its budget. (In the runs so far it wrote one cut-off block of
imports, which the harness judged, and one reply of prose.)"""

from agent.harness import Limits
from agent.loop import Budget, run_job
from agent.proposers import OpenAIProposer
from agent.store import Store
from specjax.llm import LLM
from specjax.runner import EngineConfig
from tests.test_serving import KEY, serving

MODEL = "smollm2-135m"


def test_the_loop_survives_whatever_the_built_in_model_writes(smollm2, tmp_path):
    llm = LLM(smollm2, engine=EngineConfig(kv_cache_bytes=64 << 20, max_num_seqs=1))
    store = Store(tmp_path / "agent.sqlite")
    try:
        with serving(llm, MODEL) as (url, _):
            proposer = OpenAIProposer(url + "/v1", MODEL, KEY, timeout_s=120, retries=0, temperature=0.0, max_tokens=48)
            result = run_job(store, "serve", "rmsnorm_rope", proposer, Budget(attempts=2, plateau=None),
                             limits=Limits(wall_s=120))
        assert result.status == "budget: 2 attempts" and store.job("serve").status == result.status
        assert [a.round for a in store.attempts("serve")] == [0, 1]
    finally:
        store.close()
    for attempt in result.attempts:
        assert not attempt.correct and attempt.feedback
        assert attempt.params["model"] == MODEL and attempt.tokens > 0  # a real reply, with its usage counted
        if attempt.code is None:
            assert "code block" in attempt.feedback and attempt.params["reply"]
        else:  # judged by the harness: a syntax error, a rule broken, an error or a wrong output
            assert attempt.result and not attempt.result["correct"]
