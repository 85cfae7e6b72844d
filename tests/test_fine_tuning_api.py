"""OpenAI's fine-tuning API (``serving.finetuning``) driven by the official ``openai`` client: a
job co-served with chat requests follows ``specjax finetune``'s losses, its model is served once
it succeeds, bad input gets OpenAI-style errors, and a killed server's job resumes from its
checkpoint with the losses of an uninterrupted run.

Each server runs in a child process: a kill is a real SIGKILL, and the servers' compiled steps
(XLA keeps a CPU executable's code mapped for its process's life) do not add to the test run's
memory maps, of which Linux allows a process 65,530 by default."""

import contextlib
import dataclasses
import multiprocessing
import json
import shutil
import time

import jax
import numpy as np
import openai
import pytest

from specjax import LLM, SamplingParams
from specjax.checkpoints import LoadedModel
from specjax.engine.coserving import SLO
from specjax.finetune import FinetuneSettings, parse_jsonl, tokenize
from specjax.lora import load_peft
from specjax.params import random_params
from tests.test_coserving import whole_batch_run
from tests.test_serving import ENGINE, KEY, serving
from tests.test_tree_speculation import TARGET, word_tokenizer
from training.finetune import evaluate

MODEL = "tiny-chat"
# The assistant's turn opens with t100 after the turns before it, as the generation prompt does:
# each assistant turn's tokens are then what the template adds to the conversation before it.
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}t100 {% endif %}{{ m['content'] }} "
            "{% endfor %}{% if add_generation_prompt %}t100{% endif %}")
COSERVING = dataclasses.replace(ENGINE, page_size=8, max_finetune_jobs=2, max_finetune_len=24, finetune_chunks=(16,),
                                max_loras=2, max_lora_rank=8)
CHAT = [{"role": "user", "content": "t3 t1 t4"}]


def tiny_chat_model() -> LoadedModel:
    from specjax.tokenizer import Tokenizer

    return LoadedModel(TARGET, random_params(TARGET, jax.random.key(0), scale=0.3),
                       Tokenizer(word_tokenizer().backend, chat_template=TEMPLATE), "tiny chat")


def training_lines(n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        user = " ".join(f"t{i}" for i in rng.integers(1, 99, 3))
        reply = " ".join(f"t{i}" for i in rng.integers(1, 99, 4))
        lines.append(json.dumps({"messages": [{"role": "user", "content": user},
                                              {"role": "assistant", "content": reply}]}))
    return "\n".join(lines) + "\n"


def new_llm() -> LLM:
    return LLM(tiny_chat_model(), engine=COSERVING, seed=0, slo=SLO(ttft_s=1e3, tpot_s=1e3))


def _serve(data_dir: str, conn) -> None:
    """A child process's server over a new co-serving LLM; sends its URL, serves until told to stop."""
    with serving(new_llm(), MODEL, app_options=dict(fine_tuning_dir=data_dir, checkpoint_every=1)) as (url, _):
        conn.send(url)
        conn.recv()


@contextlib.contextmanager
def server_process(data_dir):
    """A server in a child process; yields (an openai client of it, the process)."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=_serve, args=(str(data_dir), theirs), daemon=True)
    process.start()
    try:
        assert ours.poll(300), "the server did not start"
        url = ours.recv()
        yield openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120), process
    finally:
        if process.is_alive():
            ours.send("stop")
            process.join(60)
        if process.is_alive():
            process.kill()
        process.join()


def wait_for(client, job_id: str, statuses=("succeeded", "failed", "cancelled"), step: int | None = None,
             data_dir=None, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        if step is not None and json.loads((data_dir / "jobs" / job_id / "job.json").read_text())["specjax"][
                "step"] >= step:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not get there in {timeout} s: {job.status}")


def reference_losses(data_dir, job_id: str, model: LoadedModel, text: str) -> list[float]:
    """``specjax finetune``'s whole-batch losses for the job's settings and data."""
    saved = json.loads((data_dir / "jobs" / job_id / "job.json").read_text())
    settings = FinetuneSettings.from_dict(saved["specjax"]["settings"])
    conversations, _ = parse_jsonl(text.splitlines(), "train.jsonl")
    examples, _ = tokenize(model.tokenizer, conversations, settings.max_len)
    losses, _ = whole_batch_run(model, settings, examples)
    return losses


def step_losses(client, job_id: str, metric: str = "train_loss") -> dict[int, float]:
    events = client.fine_tuning.jobs.list_events(job_id, limit=100).data
    losses = {}
    for event in reversed(events):  # oldest first: a step run again after a restart keeps its last loss
        if event.type == "metrics" and metric in event.data:
            losses[event.data["step"]] = event.data[metric]
    return losses


def test_the_openai_client_drives_fine_tuning_end_to_end(tmp_path):
    text, valid_text = training_lines(6, seed=1), training_lines(3, seed=2)
    with server_process(tmp_path) as (client, _):
        training = client.files.create(file=("train.jsonl", text.encode()), purpose="fine-tune")
        assert training.purpose == "fine-tune" and training.bytes == len(text.encode())

        with pytest.raises(openai.BadRequestError, match=r"bad\.jsonl:2: not valid JSON"):
            client.files.create(file=("bad.jsonl", (text.splitlines()[0] + "\n{oops\n").encode()), purpose="fine-tune")
        with pytest.raises(openai.NotFoundError, match="no file with id 'file-missing'"):
            client.fine_tuning.jobs.create(model=MODEL, training_file="file-missing")
        with pytest.raises(openai.NotFoundError, match="cannot be fine-tuned here"):
            client.fine_tuning.jobs.create(model="gpt-4o", training_file=training.id)
        with pytest.raises(openai.BadRequestError, match="rank 1 to 8"):
            client.fine_tuning.jobs.create(model=MODEL, training_file=training.id, hyperparameters={"lora_rank": 16})

        validation = client.files.create(file=("valid.jsonl", valid_text.encode()), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model=MODEL, training_file=training.id, validation_file=validation.id,
                                             suffix="words", seed=7, hyperparameters={"n_epochs": 1, "batch_size": 2})
        assert (job.hyperparameters.n_epochs, job.hyperparameters.batch_size) == (1, 2)
        other = client.fine_tuning.jobs.create(model=MODEL, training_file=training.id, seed=8)
        with pytest.raises(openai.RateLimitError, match="at most 2 at once"):
            client.fine_tuning.jobs.create(model=MODEL, training_file=training.id)
        during = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
        assert client.fine_tuning.jobs.cancel(other.id).status == "cancelled"
        assert client.fine_tuning.jobs.retrieve(other.id).status == "cancelled"

        done = wait_for(client, job.id)
        assert done.status == "succeeded", done.error
        assert done.fine_tuned_model.startswith(f"ft:{MODEL}:words:")
        after = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
        assert during.choices[0].message.content == after.choices[0].message.content

        losses, valid_losses = step_losses(client, job.id), step_losses(client, job.id, "valid_loss")
        checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
        assert [c.step_number for c in checkpoints] == [3, 2, 1]
        assert sorted(valid_losses) == [1, 2, 3]  # evaluated at each checkpoint (every step here)
        assert [c.metrics.valid_loss for c in checkpoints] == [valid_losses[s] for s in (3, 2, 1)]
        assert {j.id for j in client.fine_tuning.jobs.list().data} == {job.id, other.id}
        assert done.fine_tuned_model in [m.id for m in client.models.list().data]
        tuned = client.chat.completions.create(model=done.fine_tuned_model, messages=CHAT, max_tokens=8, temperature=0)
    want = LLM(tiny_chat_model(), engine=dataclasses.replace(ENGINE, max_loras=1, max_lora_rank=8),
               adapters={"tuned": tmp_path / "jobs" / job.id / "adapter"})
    reference = want.generate([CHAT], SamplingParams(max_tokens=8, temperature=0.0), adapter="tuned")[0]
    assert tuned.choices[0].message.content == reference.text
    assert [losses[s] for s in sorted(losses)] == pytest.approx(reference_losses(tmp_path, job.id, want.engine.loaded, text),
                                                                rel=1e-4)
    held_out, _ = tokenize(want.engine.loaded.tokenizer, parse_jsonl(valid_text.splitlines(), "valid.jsonl")[0],
                           COSERVING.max_finetune_len)
    tuned_adapter = load_peft(tmp_path / "jobs" / job.id / "adapter", TARGET)
    assert valid_losses[3] == pytest.approx(evaluate(TARGET, want.engine.loaded.params, tuned_adapter, held_out, 4),
                                            rel=1e-4)


def test_a_killed_servers_job_resumes_from_its_last_checkpoint(tmp_path):
    text = training_lines(6, seed=2)
    with server_process(tmp_path) as (client, process):
        training = client.files.create(file=("train.jsonl", text.encode()), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model=MODEL, training_file=training.id, seed=3,
                                             hyperparameters={"n_epochs": 2, "batch_size": 2})
        wait_for(client, job.id, step=2, data_dir=tmp_path)
        process.kill()  # SIGKILL, mid-job
        process.join()
    with server_process(tmp_path) as (client, _):
        done = wait_for(client, job.id)
        assert done.status == "succeeded", done.error
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
        assert any(m.startswith("Resumed from the checkpoint of step") for m in messages)
        losses = step_losses(client, job.id)
    reference = reference_losses(tmp_path, job.id, tiny_chat_model(), text)
    assert [losses[s] for s in sorted(losses)] == pytest.approx(reference, rel=1e-4)

    # The disk as a kill between the final checkpoint and the export leaves it: the job is
    # "running" at its last step, with no adapter. A restart exports it from the checkpoint.
    job_dir = tmp_path / "jobs" / job.id
    exported = {p.name: p.read_bytes() for p in (job_dir / "adapter").iterdir()}
    saved = json.loads((job_dir / "job.json").read_text())
    saved.update(status="running", fine_tuned_model=None, finished_at=None)
    (job_dir / "job.json").write_text(json.dumps(saved))
    shutil.rmtree(job_dir / "adapter")
    with server_process(tmp_path) as (client, _):
        done = wait_for(client, job.id)
        assert done.status == "succeeded" and done.fine_tuned_model in [m.id for m in client.models.list().data]
    assert {p.name: p.read_bytes() for p in (job_dir / "adapter").iterdir()} == exported
