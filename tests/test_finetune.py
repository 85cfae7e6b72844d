"""LoRA finetuning: the step against jax.grad of the whole batch's loss, the assistant-token mask
against the conversation's own text, a run killed with SIGKILL and resumed against an
uninterrupted one, bad data lines named by number."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specjax.checkpoints import LoadedModel, save_checkpoint
from specjax.lora import LoraConfig, init_adapter
from specjax.tokenizer import Tokenizer
from tests.test_serving import tiny_target
from tests.test_tree_speculation import word_tokenizer
from specjax import finetune as sft
from training import finetune
from specjax.finetune import DataError, FinetuneSettings

REPO = Path(__file__).resolve().parent.parent


# Turn markers as ChatML has them (t98 opens a user turn, t99 an assistant's, t97 ends it): a
# conversation renders as its own beginning followed by the rest, as real templates do.
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}t99 {{ m['content'] }} t97 "
                 "{% else %}t98 {{ m['content'] }} {% endif %}{% endfor %}{% if add_generation_prompt %}t99 {% endif %}")


@pytest.fixture(scope="module")
def target():
    tiny = tiny_target()
    return LoadedModel(tiny.config, tiny.params, Tokenizer(word_tokenizer().backend, chat_template=CHAT_TEMPLATE),
                       "tiny target")


def tiny_conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """Conversations in the tiny tokenizer's words (t0 .. t99), with a rule to learn: the reply
    repeats the question's last word three times."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        words = [f"t{w}" for w in rng.integers(0, 100, rng.integers(2, 6))]
        out.append([{"role": "user", "content": " ".join(words)},
                    {"role": "assistant", "content": " ".join([words[-1]] * 3)}])
    return out


def test_a_step_applies_the_gradient_of_the_whole_batch_loss(target):
    config, base = target.config, target.params
    settings = FinetuneSettings(lora=LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj", "down_proj")),
                                learning_rate=1e-2, warmup_steps=0, total_steps=10, batch_size=2, grad_accum=2,
                                max_len=16)
    examples, _ = sft.tokenize(target.tokenizer, tiny_conversations(4), settings.max_len)
    adapter = init_adapter(settings.lora, config, jax.random.key(1))
    # A nonzero B, so the gradients of A are not zero either.
    adapter = type(adapter)(a=adapter.a, b=jax.tree.map(lambda b: b + 0.05, adapter.b), config=adapter.config)
    optimizer = sft.make_optimizer(settings)
    tokens, learn = jnp.asarray(examples.tokens), jnp.asarray(examples.learn)

    def whole_batch_mean(ad):
        total, count = finetune.loss_sum(ad, base, config, tokens, learn)
        return total / count

    grads = jax.grad(whole_batch_mean)(adapter)
    updates, _ = optimizer.update(grads, optimizer.init(adapter), adapter)
    want = jax.tree.map(lambda p, u: p + u, adapter, updates)
    step = finetune.make_train_step(config, optimizer)
    copy = jax.tree.map(jnp.copy, adapter)  # the step donates its inputs
    got, _, loss = step(copy, optimizer.init(copy), base, tokens.reshape(2, 2, -1), learn.reshape(2, 2, -1))
    assert float(loss) == pytest.approx(float(whole_batch_mean(adapter)), rel=1e-5)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("steps", [1, 2, 10, 40])
def test_the_learning_rate_warms_up_linearly_then_decays_by_the_cosine(steps):
    """Against the schedule's formula (a run no longer than its 10 warmup steps still trains)."""
    settings = FinetuneSettings(lora=LoraConfig(), learning_rate=1e-3, warmup_steps=10, total_steps=steps)
    schedule = sft.learning_rate_schedule(settings)
    warmup = min(10, steps - 1)
    for t in range(steps):
        if t < warmup:
            want = 1e-3 * t / warmup
        else:
            progress = (t - warmup) / (steps - warmup)
            want = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + np.cos(np.pi * progress))
        assert float(schedule(t)) == pytest.approx(want, rel=1e-5, abs=1e-9), t
    assert float(schedule(steps - 1)) > 0  # the last step still learns


def test_the_loss_covers_exactly_the_assistant_turns(smollm2):
    tokenizer = smollm2.tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue, like <|im_end|> the sea."}]
    ids, learn = sft.assistant_tokens(tokenizer, messages)
    _, whole = tokenizer.encode_chat(messages, add_generation_prompt=False)
    assert ids == whole
    learnt = tokenizer.decode([t for t, keep in zip(ids, learn) if keep], skip_special_tokens=False)
    # Each reply and the end of its turn, nothing of the user's or the system's; special-token text
    # in a reply stays text.
    assert learnt == "Hello!<|im_end|>\nBlue, like <|im_end|> the sea.<|im_end|>\n"


def test_bad_lines_are_named_by_number_and_refused_or_skipped(tmp_path):
    path = tmp_path / "data.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    path.write_text("\n".join([good, "{oops", json.dumps({"messages": [{"role": "user", "content": "only"}]}), "",
                               json.dumps({"messages": [{"role": "robot", "content": "x"}]}), good]) + "\n")
    with pytest.raises(DataError, match=r"data.jsonl:2: not valid JSON"):
        sft.read_jsonl(path)
    conversations, skipped = sft.read_jsonl(path, "skip")
    assert len(conversations) == 2
    assert [s.split(": ", 1)[0].rsplit(":", 1)[1] for s in skipped] == ["2", "3", "5"]
    assert "no assistant message" in skipped[1] and "role" in skipped[2]
    (tmp_path / "empty.jsonl").write_text("{oops}\n")
    with pytest.raises(DataError, match="no usable conversation"):
        sft.read_jsonl(tmp_path / "empty.jsonl", "skip")
    with pytest.raises(DataError, match="does not exist"):
        sft.read_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="grad_accum"):
        FinetuneSettings(lora=LoraConfig(), grad_accum=0)


def _args(model_dir, data, output, **extra) -> list[str]:
    argv = ["--model", str(model_dir), "--data", str(data), "--output", str(output), "--steps", "8", "--save-every",
            "2", "--batch-size", "2", "--grad-accum", "2", "--max-len", "24", "--rank", "4", "--lr", "5e-3",
            "--warmup-steps", "2", "--eval-every", "4", "--eval-fraction", "0.2", "--no-progress"]
    for k, v in extra.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv


def _parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    sft.add_arguments(p)
    return p.parse_args(argv)


def test_a_run_killed_mid_way_resumes_to_the_uninterrupted_losses(target, tmp_path):
    model_dir = tmp_path / "model"
    save_checkpoint(model_dir, target.config, target.params, target.tokenizer)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"messages": m}) for m in tiny_conversations(40)) + "\n")

    finetune.run(_parse(_args(model_dir, data, tmp_path / "whole")))
    whole = finetune.read_log(tmp_path / "whole")

    output = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-m", "training.finetune", *_args(model_dir, data, output)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (output / "checkpoints" / "4").is_dir():  # orbax renames a checkpoint into place when complete
        assert child.poll() is None, child.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint of step 4 in time"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    with pytest.raises(ValueError, match="--resume"):
        finetune.run(_parse(_args(model_dir, data, output)))
    with pytest.raises(ValueError, match="other settings"):
        finetune.run(_parse(_args(model_dir, data, output, lr=1e-3) + ["--resume"]))
    finetune.run(_parse(_args(model_dir, data, output) + ["--resume"]))
    resumed = finetune.read_log(output)
    assert sorted(resumed) == sorted(whole) == list(range(8))
    for step in range(8):
        assert resumed[step]["loss"] == pytest.approx(whole[step]["loss"], rel=1e-5, abs=1e-6), step
    assert resumed[3]["eval_loss"] == pytest.approx(whole[3]["eval_loss"], rel=1e-5)
    config = json.loads((output / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"]


PIRATE = REPO / "training" / "examples"


def test_the_example_adapter_learnt_the_datas_style(smollm2):
    """training/examples/pirate-adapter was trained by ``specjax finetune`` on pirate.jsonl (README,
    "Finetuning"): on the held-out conversations its loss is far below the base model's, and its
    replies to the held-out questions open the way every reply in the data does."""
    from specjax.lora import load_peft
    from specjax.llm import LLM
    from specjax.sampling import SamplingParams

    conversations, _ = sft.read_jsonl(PIRATE / "pirate.jsonl")
    _, held_out = sft.split(conversations, 0.1)  # the split the run used (its default fraction)
    examples, _ = sft.tokenize(smollm2.tokenizer, held_out, 80)
    adapter = load_peft(PIRATE / "pirate-adapter", smollm2.config)
    base = init_adapter(adapter.config, smollm2.config, jax.random.key(0))  # B = 0: the base model
    trained_loss = finetune.evaluate(smollm2.config, smollm2.params, adapter, examples, 8)
    base_loss = finetune.evaluate(smollm2.config, smollm2.params, base, examples, 8)
    assert trained_loss < 0.5 * base_loss

    llm = LLM(smollm2, adapters={"pirate": PIRATE / "pirate-adapter"})
    prompts = [c[:-1] for c in held_out]  # up to the assistant's reply
    params = SamplingParams(temperature=0, max_tokens=6)
    adapted = [o.text for o in llm.generate(prompts, params, adapter="pirate")]
    plain = [o.text for o in llm.generate(prompts, params)]
    assert sum(t.startswith("Arr, matey!") for t in adapted) >= 0.8 * len(prompts)
    assert not any(t.startswith("Arr") for t in plain)
