"""Bad input gets a clear error naming the problem, before anything is compiled."""

import subprocess
import sys

import pytest

from specjax.checkpoints import ModelNotFoundError
from specjax.config import ConfigError, ModelConfig
from specjax.llm import LLM
from specjax.runner import EngineConfig
from specjax.sampling import SamplingParams, SamplingParamsError


@pytest.fixture(scope="module")
def small_context_llm(smollm2):
    return LLM(smollm2, engine=EngineConfig(max_model_len=64, kv_cache_bytes=64 << 20))


def _nothing_compiled(llm):
    return llm.runner.compile_time_s == 0 and not llm.runner._compiled


def test_unknown_model_name():
    with pytest.raises(ModelNotFoundError, match="unknown model 'no-such-model'.*smollm2-135m"):
        LLM("no-such-model")


def test_prompt_longer_than_the_context(small_context_llm):
    with pytest.raises(ValueError, match=r"prompt 0 has \d+ tokens; the context holds 64"):
        small_context_llm.generate("word " * 100, SamplingParams(max_tokens=4))
    assert _nothing_compiled(small_context_llm)


@pytest.mark.parametrize("field, value, message", [
    ("temperature", -0.5, "temperature"),
    ("top_p", 0.0, "top_p"),
    ("top_p", 1.5, "top_p"),
    ("max_tokens", 0, "max_tokens"),
    ("top_k", -1, "top_k"),
])
def test_invalid_sampling_parameters(field, value, message):
    with pytest.raises(SamplingParamsError, match=message):
        SamplingParams(**{field: value})


def test_bad_prompts_and_arguments(small_context_llm):
    llm = small_context_llm
    with pytest.raises(TypeError, match="prompt is a string"):
        llm.generate([3.5], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[1, 2, 10**6]], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="2 prompts but 1 SamplingParams"):
        llm.generate(["a", "b"], [SamplingParams()])
    with pytest.raises(TypeError, match="expected SamplingParams"):
        llm.generate("a", {"temperature": 0})
    with pytest.raises(ValueError, match="role"):
        llm.chat([{"content": "hi"}])
    assert _nothing_compiled(llm)


def test_bad_engine_and_model_configs():
    with pytest.raises(ConfigError, match="page_size"):
        EngineConfig(page_size=0)
    with pytest.raises(ConfigError, match="num_kv_heads"):
        ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=3, num_kv_heads=2,
                    head_dim=4)
    with pytest.raises(ConfigError, match="unsupported architecture 'gpt2'"):
        ModelConfig.from_hf_dict({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})


def _cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "specjax.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=600)


def test_cli_help_reads_like_a_tool():
    out = _cli("--help")
    assert out.returncode == 0
    assert "generate" in out.stdout and "examples:" in out.stdout
    assert "--chat" in _cli("generate", "--help").stdout


def test_cli_errors_are_one_line_without_traceback():
    out = _cli("generate", "--model", "no-such-model", "--prompt", "hi")
    assert out.returncode == 2
    assert "specjax: error: unknown model 'no-such-model'" in out.stderr
    assert "Traceback" not in out.stderr
    out = _cli("generate", "--prompt", "hi", "--top-p", "2")
    assert out.returncode == 2 and "top_p" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_cli_generates_with_stats(smollm2_gguf_path):
    out = _cli("generate", "--model", str(smollm2_gguf_path), "--chat", "--max-tokens", "12",
               stdin="What is the capital of France?")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "decode" in out.stderr and "tokens/s" in out.stderr and "time to first token" in out.stderr
