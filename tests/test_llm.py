"""The generation API on the built-in SmolLM2-135M: parity with transformers, batching, stopping, seeds."""

import numpy as np
import pytest

from specjax.llm import LLM
from specjax.runner import EngineConfig
from specjax.sampling import SamplingParams

PROMPTS = [
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The three most important inventions of the twentieth century are",
]
GREEDY_TOKENS = 40


@pytest.fixture(scope="session")
def llm(smollm2):
    # A small page size and prefill chunk, so prompts span several pages and chunks.
    return LLM(smollm2, engine=EngineConfig(page_size=8, prefill_chunk=16, kv_cache_bytes=256 << 20), seed=0)


@pytest.fixture(scope="session")
def transformers_greedy(smollm2_transformers, smollm2):
    """transformers' greedy continuations of PROMPTS from the same GGUF, fp32, one prompt at a time."""
    import torch

    model = smollm2_transformers
    outputs = []
    for prompt in PROMPTS:
        ids = torch.tensor([smollm2.tokenizer.encode(prompt)])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=GREEDY_TOKENS, eos_token_id=smollm2.config.eos_token_ids[0],
                                 pad_token_id=smollm2.config.eos_token_ids[0])
        outputs.append(out[0, ids.shape[1]:].tolist())
    return outputs


@pytest.mark.slow
def test_greedy_batch_equals_transformers(llm, transformers_greedy):
    """Three prompts of different lengths in one batch, each token for token equal to transformers."""
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS))
    for out, expected in zip(outs, transformers_greedy):
        assert len(expected) >= 32
        assert out.token_ids == expected
        assert out.text == llm.tokenizer.decode(expected)
        assert out.finish_reason == "length"


def test_batched_equals_one_at_a_time(llm):
    params = SamplingParams(temperature=0, max_tokens=12)
    batched = llm.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, batched):
        assert llm.generate(prompt, params)[0].token_ids == out.token_ids


def test_more_requests_than_slots_queue_and_free_pages(smollm2):
    """Five requests through two slots: all finish alike, and every page comes back."""
    # 7 pages of 8 tokens: room for two of these 19-token sequences at a time, by pages and by max_num_seqs.
    small = LLM(smollm2, engine=EngineConfig(page_size=8, max_num_seqs=2, kv_cache_bytes=7 * 8 * 46080))
    params = SamplingParams(temperature=0, max_tokens=6)
    outs = small.generate([PROMPTS[0]] * 5, params)
    assert all(o.token_ids == outs[0].token_ids and o.finish_reason == "length" for o in outs)
    assert small.runner.pages.num_used == 0


def test_stop_string_truncates_and_finishes(llm):
    params = SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS)
    full = llm.generate(PROMPTS[0], params)[0].text
    stop = full[10:14]
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == full[: full.index(stop)]


def test_stop_token_id_finishes_without_text(llm):
    greedy = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=10))[0]
    stop_id = greedy.token_ids[4]
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_id]))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == greedy.token_ids[:5]
    assert out.text == llm.tokenizer.decode(greedy.token_ids[:4])


def test_streaming_concatenates_to_the_full_text(llm):
    # A stop string that never matches still makes the stream hold back text that might begin one.
    params = SamplingParams(temperature=0, max_tokens=24, stop=[", and the unicorn"])
    pieces = list(llm.stream(PROMPTS[0], params))
    assert "".join(pieces) == llm.last_output.text == llm.generate(PROMPTS[0], params)[0].text
    assert len(pieces) > 1


def test_chat_messages_use_the_template(llm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=24))[0]
    assert out.prompt.startswith("<|im_start|>system")
    assert out.prompt_token_ids == llm.tokenizer.encode(
        llm.tokenizer.apply_chat_template(messages), add_special_tokens=False)
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # the model closes its turn with <|im_end|>


def test_seeded_sampling_is_reproducible(llm):
    params = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=16, seed=1234)
    a = llm.generate([PROMPTS[0], PROMPTS[2]], params)
    b = llm.generate(PROMPTS[2], params)  # alone, in another batch position
    assert a[1].token_ids == b[0].token_ids
    others = [llm.generate(PROMPTS[2], SamplingParams(temperature=0.9, max_tokens=16, seed=s))[0].token_ids
              for s in (1, 2, 3)]
    assert len({tuple(t) for t in others}) > 1


def test_stats_are_filled_in(llm):
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8))[0]
    s = out.stats
    assert s.prompt_tokens == len(out.prompt_token_ids) and s.generated_tokens == 8
    assert s.prefill_time_s > 0 and s.decode_time_s > 0 and s.ttft_s >= s.prefill_time_s
    assert np.isfinite(s.decode_tokens_per_s) and s.decode_tokens_per_s > 0


def test_bfloat16_on_cpu_stores_bf16_and_computes_in_fp32(smollm2_gguf_path):
    fast = LLM(str(smollm2_gguf_path), dtype="bfloat16", engine=EngineConfig(kv_cache_bytes=64 << 20))
    assert fast.weights == "bfloat16 weights, fp32 arithmetic"
    assert fast.runner.params.layers.w_gate_up.bits.dtype == np.uint16  # linear.Bf16Bits
    params = SamplingParams(temperature=0, max_tokens=16)
    out = fast.chat([{"role": "user", "content": "What is the capital of France?"}], params)[0]
    assert "Paris" in out.text


def test_speculative_greedy_equals_plain_greedy(smollm2, llm):
    """The target as its own draft: every proposal is accepted (tau = 1 + k) and the text is unchanged;
    sampled requests speculate too, and accept (nearly) everything when the draft is the target."""
    spec = LLM(smollm2, draft=smollm2, num_speculative_tokens=3,
               engine=EngineConfig(page_size=8, kv_cache_bytes=128 << 20))
    params = SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS)
    outs = spec.generate(PROMPTS, params)
    for out, plain in zip(outs, llm.generate(PROMPTS, params)):
        assert out.token_ids == plain.token_ids and out.text == plain.text
        s = out.stats.speculation
        # The first token comes from the prefill; every later one from a verification step.
        assert s.acceptance_rate == 1.0 and s.tokens == GREEDY_TOKENS - 1
        assert s.tau > 3.5  # 4 tokens per step but for the capped last steps
    sampled = spec.generate(PROMPTS, SamplingParams(temperature=0.8, max_tokens=8, seed=1, ignore_eos=True))
    for out in sampled:
        assert len(out.token_ids) == 8 and out.stats.speculation.acceptance_rate > 0.9
    assert spec.runner.pages.num_used == 0 and spec.engine.proposers["tree"].runners[0].pages.num_used == 0


def test_a_long_prompt_in_large_chunks_equals_transformers(smollm2, smollm2_transformers):
    """Chunks of 128 tokens take the blocked attention (``attention.blocked_paged_attention``), a
    prefix of several blocks behind the last: greedy continuation token for token transformers'."""
    import torch

    paragraph = ("The committee met on Tuesday to review the budget, the schedule and the list of open "
                 "questions from the previous meeting. ")
    ids = smollm2.tokenizer.encode(paragraph * 14)
    assert len(ids) > 300
    llm = LLM(smollm2, engine=EngineConfig(page_size=16, prefill_chunk=128, kv_cache_bytes=64 << 20), seed=0)
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=8, logprobs=5))[0]
    with torch.no_grad():
        expected = smollm2_transformers.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
            max_new_tokens=8, pad_token_id=smollm2.config.eos_token_ids[0])[0, len(ids):].tolist()
        logits = smollm2_transformers(torch.tensor([ids])).logits[0, -1].double()
    assert out.token_ids == expected
    theirs = torch.log_softmax(logits, -1)  # the first token's top five, after the whole prompt
    for token, logprob in out.logprobs[0].top:
        assert abs(logprob - float(theirs[token])) < 2e-3
