"""OpenAI's fine-tuning API over co-served LoRA jobs (``engine.coserving``).

    POST /v1/files (purpose "fine-tune"), GET /v1/files, /v1/files/{id}
    POST /v1/fine_tuning/jobs, GET /v1/fine_tuning/jobs, /v1/fine_tuning/jobs/{id}
    POST /v1/fine_tuning/jobs/{id}/cancel
    GET /v1/fine_tuning/jobs/{id}/events, /v1/fine_tuning/jobs/{id}/checkpoints

A job trains a LoRA adapter over the served model while the server keeps serving: its tokens
join the engine's steps as the co-serving policy allows. Hyperparameters are OpenAI's
(``n_epochs``, ``batch_size``, ``learning_rate_multiplier`` of a 2e-4 peak, each "auto" or a
value) and three of ours: ``lora_rank`` (at most the server's ``--max-lora-rank``),
``lora_alpha`` and ``lora_target_modules``. A job with a ``validation_file`` evaluates it at
each checkpoint and after its last step (its mean loss per learnt token, forward chunks through
the same engine steps): ``valid_loss`` in the step's event, the checkpoint's metrics and
``/metrics``. A job that succeeds is served at once under its ``fine_tuned_model`` name, through
the multi-LoRA slots.

Everything lives under the server's data directory: ``files/`` (uploads and their records) and
``jobs/ID/`` (``job.json``, ``events.jsonl``, orbax ``checkpoints/``, the PEFT ``adapter/``).
``job.json`` is replaced atomically; a checkpoint is complete or absent (orbax renames it into
place). A server started on the same directory serves the succeeded jobs' models again and
resumes unfinished jobs from their last checkpoint: the data order is a function of the seed and
the step, so a resumed job goes on as if never stopped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, File, Form, UploadFile
from pydantic import BaseModel, ConfigDict, Field

from serving.api import ApiError
from serving.engine import Engine, EngineError
from specjax.engine.coserving import CoservedJob, JobLimit
from specjax.finetune import DataError, FinetuneSettings, parse_jsonl, tokenize

log = logging.getLogger("specjax.finetuning")

BASE_LEARNING_RATE = 2e-4  # what learning_rate_multiplier multiplies (specjax finetune's default)
UNFINISHED = ("validating_files", "queued", "running")


# -- request bodies ---------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class Hyperparameters(_Body):
    n_epochs: int | Literal["auto"] = Field("auto", description="auto: 3")
    batch_size: int | Literal["auto"] = Field("auto", description="conversations per step; auto: up to 4")
    learning_rate_multiplier: float | Literal["auto"] = Field("auto", description="of a 2e-4 peak; auto: 1")
    lora_rank: int | None = Field(None, description="specjax: the adapter's rank (default 8, capped by the server)")
    lora_alpha: float | None = Field(None, description="specjax: default 2 x rank")
    lora_target_modules: list[str] | None = Field(None, description="specjax: default q/k/v/o_proj")


class Supervised(_Body):
    hyperparameters: Hyperparameters | None = None


class Method(_Body):
    type: Literal["supervised"]
    supervised: Supervised | None = None


class CreateJob(_Body):
    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: str | None = Field(None, max_length=64)
    seed: int | None = None
    metadata: dict[str, str] | None = None
    integrations: list | None = None


def default_lora(max_rank: int):
    """The adapter settings of a job that sets none of ours (``specjax serve --warmup`` compiles
    their steps ahead): rank 8 (at most ``max_rank``), alpha 2 x rank, q/k/v/o_proj."""
    from specjax.lora import LoraConfig

    rank = min(8, max_rank)
    return LoraConfig(r=rank, lora_alpha=2.0 * rank, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))


# -- the service --------------------------------------------------------------------------------
def _write_json(path: Path, obj) -> None:
    """Replace ``path`` atomically: a kill leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class FineTuning:
    """Files and jobs of the fine-tuning API for ``engine``'s LLM (served as ``model_name``),
    kept under ``data_dir``. ``checkpoint_every``: optimizer steps between a job's checkpoints."""

    def __init__(self, engine: Engine, data_dir: str | os.PathLike, *, model_name: str, checkpoint_every: int = 10):
        self.engine, self.llm = engine, engine.llm
        self.finetuner = self.llm.engine.finetuner
        if self.finetuner is None:
            raise ValueError("the fine-tuning API needs co-serving: EngineConfig.max_finetune_jobs > 0 "
                             "(--max-finetune-jobs)")
        if self.llm.engine.adapters is None:
            raise ValueError("the fine-tuning API serves its models as LoRA adapters: max_loras > 0 (--max-loras)")
        if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be a positive integer, got {checkpoint_every!r}")
        self.model_name, self.checkpoint_every = model_name, checkpoint_every
        self.root = Path(data_dir)
        self.files_dir, self.jobs_dir = self.root / "files", self.root / "jobs"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.jobs: dict[str, dict] = {}  # job id -> the OpenAI job object
        self._managers: dict[str, object] = {}  # engine thread: orbax managers of running jobs
        self._load()

    # -- files ----------------------------------------------------------------------------------
    def add_file(self, filename: str, data: bytes, purpose: str) -> dict:
        if purpose != "fine-tune":
            raise ApiError(400, f"purpose must be 'fine-tune' on this server, got {purpose!r}", "purpose")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ApiError(400, f"{filename} is not UTF-8 text ({e.reason})", "file") from None
        try:
            parse_jsonl(text.splitlines(), filename)
        except DataError as e:
            raise ApiError(400, str(e), "file") from None
        file_id = "file-" + secrets.token_hex(12)
        record = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                  "filename": filename, "purpose": purpose, "status": "processed", "status_details": None}
        (self.files_dir / f"{file_id}.jsonl").write_bytes(data)
        _write_json(self.files_dir / f"{file_id}.json", record)
        return record

    def file(self, file_id: str, param: str = "file_id") -> dict:
        path = self.files_dir / f"{file_id}.json"
        if not file_id.startswith("file-") or "/" in file_id or not path.is_file():
            raise ApiError(404, f"no file with id {file_id!r}", param, code="file_not_found")
        return json.loads(path.read_text(encoding="utf-8"))

    def files(self) -> list[dict]:
        records = [json.loads(p.read_text(encoding="utf-8")) for p in self.files_dir.glob("file-*.json")]
        return sorted(records, key=lambda r: (r["created_at"], r["id"]), reverse=True)

    def _conversations(self, file_id: str, param: str) -> list:
        record = self.file(file_id, param)
        text = (self.files_dir / f"{file_id}.jsonl").read_text(encoding="utf-8")
        try:
            conversations, _ = parse_jsonl(text.splitlines(), record["filename"])
        except DataError as e:
            raise ApiError(400, str(e), param) from None
        return conversations

    # -- creating jobs (any thread) ---------------------------------------------------------------
    def _settings(self, body: CreateJob, examples: int) -> FinetuneSettings:
        from specjax.lora import LoraConfig

        hp = self._hyperparameters(body)
        n_epochs = self._epochs(body)
        batch_size = min(4, examples) if hp.batch_size == "auto" else hp.batch_size
        multiplier = 1.0 if hp.learning_rate_multiplier == "auto" else hp.learning_rate_multiplier
        for name, value in (("n_epochs", n_epochs), ("batch_size", batch_size)):
            if value < 1:
                raise ApiError(400, f"hyperparameters.{name} must be a positive integer, got {value}",
                               f"hyperparameters.{name}")
        if not (multiplier > 0 and math.isfinite(multiplier)):
            raise ApiError(400, f"hyperparameters.learning_rate_multiplier must be positive, got {multiplier}",
                           "hyperparameters.learning_rate_multiplier")
        default = default_lora(self.llm.engine.adapters.max_rank)
        rank = hp.lora_rank if hp.lora_rank is not None else default.r
        if not 1 <= rank <= self.llm.engine.adapters.max_rank:
            raise ApiError(400, f"hyperparameters.lora_rank {rank}: this server holds adapters of rank 1 to "
                                f"{self.llm.engine.adapters.max_rank} (--max-lora-rank)", "hyperparameters.lora_rank")
        modules = tuple(hp.lora_target_modules or default.target_modules)
        try:
            lora = LoraConfig(r=rank, lora_alpha=hp.lora_alpha if hp.lora_alpha is not None else 2.0 * rank,
                              target_modules=modules)
            total = math.ceil(examples * n_epochs / batch_size)
            return FinetuneSettings(lora=lora, learning_rate=BASE_LEARNING_RATE * multiplier,
                                    warmup_steps=min(10, total // 10), total_steps=total, batch_size=batch_size,
                                    max_len=self.finetuner.max_len, eval_fraction=0.0,
                                    eval_every=self.checkpoint_every,
                                    seed=body.seed if body.seed is not None else secrets.randbits(31))
        except ValueError as e:
            raise ApiError(400, str(e), "hyperparameters") from None

    @staticmethod
    def _hyperparameters(body: CreateJob) -> Hyperparameters:
        if body.method is not None and body.method.supervised is not None and body.method.supervised.hyperparameters:
            if body.hyperparameters is not None:
                raise ApiError(400, "give hyperparameters or method.supervised.hyperparameters, not both",
                               "hyperparameters")
            return body.method.supervised.hyperparameters
        return body.hyperparameters or Hyperparameters()

    def _epochs(self, body: CreateJob) -> int:
        n_epochs = self._hyperparameters(body).n_epochs
        return 3 if n_epochs == "auto" else n_epochs

    def create_job(self, body: CreateJob) -> dict:
        """Validate a job and start it on the engine thread (blocking: call it off the event loop)."""
        if body.model != self.model_name:
            raise ApiError(404, f"the model {body.model!r} cannot be fine-tuned here; this server fine-tunes "
                                f"{self.model_name!r}", "model", code="model_not_found")
        if body.integrations:
            raise ApiError(400, "integrations are not supported by this server", "integrations")
        with self._lock:
            unfinished = sum(j["status"] in UNFINISHED for j in self.jobs.values())
        if unfinished >= self.finetuner.max_jobs:
            raise ApiError(429, f"{unfinished} fine-tuning jobs are already unfinished; this server runs at most "
                                f"{self.finetuner.max_jobs} at once (--max-finetune-jobs): retry once one ends",
                           type="rate_limit_error", code="too_many_jobs")
        conversations = self._conversations(body.training_file, "training_file")
        validation = self._validation(body.validation_file, self.finetuner.max_len)
        examples, dropped = tokenize(self.llm.tokenizer, conversations, self.finetuner.max_len)
        if not len(examples):
            raise ApiError(400, f"no conversation of {body.training_file} has an assistant token within the "
                                f"first {self.finetuner.max_len} tokens (--max-finetune-len)", "training_file")
        settings = self._settings(body, len(examples))
        job_id = "ftjob-" + secrets.token_hex(12)
        suffix = body.suffix or "specjax"
        job = {"id": job_id, "object": "fine_tuning.job", "created_at": int(time.time()), "finished_at": None,
               "model": self.model_name, "fine_tuned_model": None, "organization_id": "specjax",
               "result_files": [], "status": "queued", "validation_file": body.validation_file,
               "training_file": body.training_file, "trained_tokens": None, "error": None, "seed": settings.seed,
               "estimated_finish": None, "integrations": [], "user_provided_suffix": body.suffix,
               "metadata": body.metadata,
               "hyperparameters": {"n_epochs": self._epochs(body),
                                   "batch_size": settings.batch_size,
                                   "learning_rate_multiplier": settings.learning_rate / BASE_LEARNING_RATE,
                                   "lora_rank": settings.lora.r, "lora_alpha": settings.lora.lora_alpha,
                                   "lora_target_modules": list(settings.lora.target_modules)},
               "method": {"type": "supervised"},
               "specjax": {"settings": settings.as_dict(), "total_steps": settings.total_steps, "step": 0,
                           "dropped_conversations": dropped,
                           "fine_tuned_model": f"ft:{self.model_name}:{suffix}:{job_id.removeprefix('ftjob-')[:8]}"}}
        self._dir(job_id).mkdir(parents=True)
        with self._lock:
            self.jobs[job_id] = job
        self._save(job)
        self._event(job_id, f"Created fine-tuning job {job_id}: {len(examples)} conversations, "
                            f"{settings.total_steps} steps")
        try:
            self._on_engine(lambda: self._start(job_id, examples, validation))
        except EngineError as e:
            raise ApiError(503, str(e), type="server_error") from None
        except JobLimit as e:
            raise ApiError(429, str(e), type="rate_limit_error", code="too_many_jobs") from None
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        return self.job(job_id)

    def _validation(self, file_id: str | None, max_len: int):
        """The validation file's conversations as examples (None without one)."""
        if file_id is None:
            return None
        examples, _ = tokenize(self.llm.tokenizer, self._conversations(file_id, "validation_file"), max_len)
        if not len(examples):
            raise ApiError(400, f"no conversation of {file_id} has an assistant token within the first {max_len} "
                                "tokens (--max-finetune-len)", "validation_file")
        return examples

    def _on_engine(self, fn):
        return self.engine.call(fn).result()

    # -- the engine thread ------------------------------------------------------------------------
    def _start(self, job_id: str, examples, validation=None, resume: bool = False) -> None:
        import orbax.checkpoint as ocp

        job = self.jobs[job_id]
        settings = FinetuneSettings.from_dict(job["specjax"]["settings"])
        manager = ocp.CheckpointManager((self._dir(job_id) / "checkpoints").absolute(),
                                        options=ocp.CheckpointManagerOptions(max_to_keep=3, create=True,
                                                                             enable_async_checkpointing=False))
        adapter = opt_state = None
        step = 0
        if resume and (latest := manager.latest_step()) is not None:
            import jax

            from specjax.finetune import make_optimizer
            from specjax.lora import init_adapter

            template = init_adapter(settings.lora, self.llm.engine.config, jax.random.key(settings.seed))
            abstract = jax.eval_shape(lambda: {"adapter": template, "opt_state": make_optimizer(settings).init(template)})
            restored = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
            adapter, opt_state, step = restored["adapter"], restored["opt_state"], latest
        try:
            coserved = self.finetuner.add(job_id, settings, examples, adapter=adapter, opt_state=opt_state,
                                          step=step, on_update=self._updated, validation=validation)
        except (JobLimit, ValueError) as e:
            manager.close()
            self._end(job, "failed", error={"code": "invalid_job", "message": str(e), "param": None})
            raise
        self._managers[job_id] = manager
        job["specjax"]["tokens_before"] = job["trained_tokens"] or 0  # what runs before this start trained
        job["status"] = "running"
        job["specjax"]["step"] = step
        self._save(job)
        self._event(job_id, f"Resumed from the checkpoint of step {step}" if resume and step else "Fine-tuning started")
        if coserved.status == "succeeded":  # a stop between the final checkpoint and the export
            self._succeed(job_id)

    def _updated(self, coserved: CoservedJob, loss: float | None) -> None:
        """After each optimizer step of a job (engine thread), and when it fails (``loss`` None)."""
        job = self.jobs[coserved.id]
        if loss is None:
            self._close(coserved.id)
            self._end(job, "failed", error={"code": "training_failed", "message": coserved.error, "param": None})
            return
        step, total = coserved.step, coserved.settings.total_steps
        job["specjax"]["step"] = step
        job["trained_tokens"] = job["specjax"]["tokens_before"] + coserved.tokens_done
        metrics = {"step": step, "train_loss": loss}
        message = f"Step {step}/{total}: training loss={loss:.4f}"
        if coserved.valid_losses and coserved.valid_losses[-1][0] == step:
            # The whole validation file each time: OpenAI's batch and full validation losses are one.
            valid = coserved.valid_losses[-1][1]
            metrics.update(valid_loss=valid, full_valid_loss=valid)
            message += f", validation loss={valid:.4f}"
        self._event(coserved.id, message, type="metrics", data={**metrics, "total_steps": total})
        self.engine.metrics.finetune_progress(coserved.id, step, total, loss, coserved.tokens_done,
                                              metrics.get("valid_loss"))
        if step % self.checkpoint_every == 0 or step == total:
            self._checkpoint(coserved.id, metrics)
        if coserved.status == "succeeded":
            self._succeed(coserved.id)

    def _checkpoint(self, job_id: str, metrics: dict) -> None:
        import orbax.checkpoint as ocp

        step = metrics["step"]
        state = self.finetuner.state(job_id)
        self._managers[job_id].save(step, args=ocp.args.StandardSave({"adapter": state.adapter,
                                                                      "opt_state": state.opt_state}))
        self._managers[job_id].wait_until_finished()
        job = self.jobs[job_id]
        job["specjax"].setdefault("checkpoints", []).append({**metrics, "created_at": int(time.time())})
        self._save(job)

    def _succeed(self, job_id: str) -> None:
        from specjax.lora import LoraAdapter, save_peft

        job = self.jobs[job_id]
        state = self.finetuner.remove(job_id)
        self._close(job_id)
        settings = FinetuneSettings.from_dict(job["specjax"]["settings"])
        lora = dataclasses.replace(settings.lora, base_model_name_or_path=self.model_name)
        save_peft(self._dir(job_id) / "adapter", LoraAdapter(a=state.adapter.a, b=state.adapter.b, config=lora))
        name = job["specjax"]["fine_tuned_model"]
        self.llm.add_adapter(name, self._dir(job_id) / "adapter")
        job["fine_tuned_model"] = name
        self._end(job, "succeeded")
        self._event(job_id, f"The job has successfully completed: {name} is served")

    def _cancel(self, job_id: str) -> None:
        job = self.jobs[job_id]
        if job["status"] not in UNFINISHED:
            raise ApiError(400, f"job {job_id} is already {job['status']}", "fine_tuning_job_id")
        if job_id in self.finetuner.jobs:
            self.finetuner.remove(job_id)
        self._close(job_id)
        self._end(job, "cancelled")
        self._event(job_id, "The job was cancelled")

    def _close(self, job_id: str) -> None:
        manager = self._managers.pop(job_id, None)
        if manager is not None:
            manager.close()

    def _end(self, job: dict, status: str, error: dict | None = None) -> None:
        job["status"], job["error"] = status, error
        job["finished_at"] = int(time.time())
        self._save(job)
        if error is not None:
            self._event(job["id"], f"The job failed: {error['message']}", level="error")

    def resume_unfinished(self) -> None:
        """On the engine thread at start-up: every job a stopped server left unfinished goes on
        from its last checkpoint (or fails, saying why, if its data is gone)."""
        for job_id, job in list(self.jobs.items()):
            if job["status"] not in UNFINISHED:
                continue
            try:
                conversations = self._conversations(job["training_file"], "training_file")
                max_len = job["specjax"]["settings"]["max_len"]
                examples, _ = tokenize(self.llm.tokenizer, conversations, max_len)
                self._start(job_id, examples, self._validation(job["validation_file"], max_len), resume=True)
            except Exception as e:
                log.exception("fine-tuning job %s could not resume", job_id)
                if job["status"] in UNFINISHED:
                    self._end(job, "failed", error={"code": "resume_failed", "message": str(e), "param": None})

    # -- reading (any thread) -------------------------------------------------------------------------
    def _dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def _save(self, job: dict) -> None:
        _write_json(self._dir(job["id"]) / "job.json", job)

    def _event(self, job_id: str, message: str, *, level: str = "info", type: str = "message",
               data: dict | None = None) -> None:
        event = {"id": "ftevent-" + secrets.token_hex(12), "object": "fine_tuning.job.event",
                 "created_at": int(time.time()), "level": level, "message": message, "data": data or {}, "type": type}
        with self._lock, open(self._dir(job_id) / "events.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")

    def _load(self) -> None:
        for path in sorted(self.jobs_dir.glob("ftjob-*/job.json")):
            job = json.loads(path.read_text(encoding="utf-8"))
            self.jobs[job["id"]] = job
            adapter = path.parent / "adapter"
            if job["status"] == "succeeded" and adapter.is_dir():
                self.llm.add_adapter(job["fine_tuned_model"], adapter)

    def job(self, job_id: str) -> dict:
        with self._lock:
            job = self.jobs.get(job_id)
            if job is None:
                raise ApiError(404, f"no fine-tuning job with id {job_id!r}", "fine_tuning_job_id",
                               code="fine_tuning_job_not_found")
            public = {k: v for k, v in job.items() if k != "specjax"}
        return json.loads(json.dumps(public))

    def list_jobs(self, after: str | None, limit: int) -> dict:
        with self._lock:
            ordered = sorted(self.jobs.values(), key=lambda j: (j["created_at"], j["id"]), reverse=True)
        ids = [j["id"] for j in ordered]
        return _page([self.job(i) for i in ids], after, limit)

    def events(self, job_id: str, after: str | None, limit: int) -> dict:
        self.job(job_id)
        with self._lock:
            lines = (self._dir(job_id) / "events.jsonl").read_text(encoding="utf-8").splitlines()
        return _page([json.loads(line) for line in reversed(lines)], after, limit)  # newest first, as OpenAI's

    def checkpoints(self, job_id: str, after: str | None, limit: int) -> dict:
        self.job(job_id)
        with self._lock:
            job = self.jobs[job_id]
            saved = list(job["specjax"].get("checkpoints", []))
        kept = {int(p.name) for p in (self._dir(job_id) / "checkpoints").glob("*") if p.name.isdigit()}
        items = [{"id": f"ftckpt-{job_id.removeprefix('ftjob-')[:8]}-{c['step']}",
                  "object": "fine_tuning.job.checkpoint", "created_at": c["created_at"],
                  "fine_tuned_model_checkpoint": f"{job['specjax']['fine_tuned_model']}:ckpt-step-{c['step']}",
                  "fine_tuning_job_id": job_id, "step_number": c["step"],
                  "metrics": {k: v for k, v in c.items() if k != "created_at"}}
                 for c in reversed(saved) if c["step"] in kept]
        return _page(items, after, limit)

    def cancel(self, job_id: str) -> dict:
        self.job(job_id)
        try:
            self._on_engine(lambda: self._cancel(job_id))
        except EngineError as e:
            raise ApiError(503, str(e), type="server_error") from None
        return self.job(job_id)


def _page(items: list[dict], after: str | None, limit: int) -> dict:
    """OpenAI's cursor page: the items after the one with id ``after``, at most ``limit``."""
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    page = items[:limit]
    return {"object": "list", "data": page, "has_more": len(items) > limit,
            "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None}


# -- routes -------------------------------------------------------------------------------------
def router(service: FineTuning) -> APIRouter:
    """The fine-tuning API's routes (mounted under /v1)."""
    routes = APIRouter()

    def limit_of(limit: int) -> int:
        if not 1 <= limit <= 100:
            raise ApiError(400, f"limit must be between 1 and 100, got {limit}", "limit")
        return limit

    @routes.post("/files")
    async def upload(file: UploadFile = File(...), purpose: str = Form(...)):
        data = await file.read()
        return await asyncio.to_thread(service.add_file, file.filename or "upload.jsonl", data, purpose)

    @routes.get("/files")
    async def files():
        return {"object": "list", "data": service.files(), "has_more": False}

    @routes.get("/files/{file_id}")
    async def file(file_id: str):
        return service.file(file_id)

    @routes.post("/fine_tuning/jobs")
    async def create(body: CreateJob):
        return await asyncio.to_thread(service.create_job, body)

    @routes.get("/fine_tuning/jobs")
    async def jobs(after: str | None = None, limit: int = 20):
        return service.list_jobs(after, limit_of(limit))

    @routes.get("/fine_tuning/jobs/{job_id}")
    async def job(job_id: str):
        return service.job(job_id)

    @routes.post("/fine_tuning/jobs/{job_id}/cancel")
    async def cancel(job_id: str):
        return await asyncio.to_thread(service.cancel, job_id)

    @routes.get("/fine_tuning/jobs/{job_id}/events")
    async def events(job_id: str, after: str | None = None, limit: int = 20):
        return service.events(job_id, after, limit_of(limit))

    @routes.get("/fine_tuning/jobs/{job_id}/checkpoints")
    async def checkpoints(job_id: str, after: str | None = None, limit: int = 10):
        return service.checkpoints(job_id, after, limit_of(limit))

    return routes
