"""The agent's memory: every job and every attempt (code, feedback, result, tokens) in one SQLite file.

Each attempt is committed as soon as it is judged, so a crashed job loses at most the attempt in
flight; running the same job id again continues from what is stored (``agent.loop.run_job``).
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, task TEXT NOT NULL, provider TEXT NOT NULL, config TEXT NOT NULL,
    status TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, job TEXT NOT NULL REFERENCES jobs(id), round INTEGER NOT NULL,
    code TEXT, params TEXT NOT NULL, correct INTEGER NOT NULL, feedback TEXT NOT NULL, result TEXT NOT NULL,
    tokens INTEGER NOT NULL, seconds REAL NOT NULL, created REAL NOT NULL);
"""


@dataclasses.dataclass(frozen=True)
class Attempt:
    """One judged proposal. ``code`` is None when the proposer produced none (the reason is in feedback)."""
    id: int
    job: str
    round: int
    code: str | None
    params: dict
    correct: bool
    feedback: str
    result: dict
    tokens: int
    seconds: float

    @property
    def speedup(self) -> float | None:
        timing = self.result.get("timing")
        return timing["speedup"] if timing else None


def quality(attempt: Attempt) -> tuple[bool, float]:
    """What makes a kernel better: correct first, then its measured speedup (GPU only; 0 where untimed)."""
    return attempt.correct, attempt.speedup or 0.0


def rank_key(attempt: Attempt) -> tuple:
    """Sort key, higher is better: quality, then the smaller error ratio, then the earlier attempt."""
    ratio = attempt.result.get("max_ratio")
    return quality(attempt), -(ratio if ratio is not None else float("inf")), -attempt.id


@dataclasses.dataclass(frozen=True)
class Job:
    id: str
    task: str
    provider: str
    config: dict
    status: str


class Store:
    def __init__(self, path: Path | str):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path)
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def open_job(self, job_id: str, task: str, provider: str, config: dict) -> Job:
        """The stored job ``job_id``, created if new; resuming it with another task or provider is an error."""
        job = self.job(job_id)
        if job is None:
            now = time.time()
            with self._db:
                self._db.execute("INSERT INTO jobs VALUES (?, ?, ?, ?, 'running', ?, ?)",
                                 (job_id, task, provider, json.dumps(config), now, now))
            return Job(job_id, task, provider, config, "running")
        if (job.task, job.provider) != (task, provider):
            raise ValueError(f"job {job_id!r} is task {job.task!r} with provider {job.provider!r}, "
                             f"not {task!r} with {provider!r}: pick another --job")
        self.set_status(job_id, "running")
        return job

    def job(self, job_id: str) -> Job | None:
        row = self._db.execute("SELECT id, task, provider, config, status FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job(row[0], row[1], row[2], json.loads(row[3]), row[4]) if row else None

    def jobs(self) -> list[Job]:
        rows = self._db.execute("SELECT id, task, provider, config, status FROM jobs ORDER BY created").fetchall()
        return [Job(r[0], r[1], r[2], json.loads(r[3]), r[4]) for r in rows]

    def set_status(self, job_id: str, status: str) -> None:
        with self._db:
            self._db.execute("UPDATE jobs SET status = ?, updated = ? WHERE id = ?", (status, time.time(), job_id))

    def add_attempt(self, job_id: str, round_: int, code: str | None, params: dict, correct: bool, feedback: str,
                    result: dict, tokens: int, seconds: float) -> Attempt:
        with self._db:
            cursor = self._db.execute(
                "INSERT INTO attempts (job, round, code, params, correct, feedback, result, tokens, seconds, created)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, round_, code, json.dumps(params), int(correct), feedback, json.dumps(result), tokens,
                 seconds, time.time()))
        return Attempt(cursor.lastrowid, job_id, round_, code, params, correct, feedback, result, tokens, seconds)

    def attempts(self, job_id: str) -> list[Attempt]:
        rows = self._db.execute("SELECT id, job, round, code, params, correct, feedback, result, tokens, seconds "
                                "FROM attempts WHERE job = ? ORDER BY id", (job_id,)).fetchall()
        return [Attempt(r[0], r[1], r[2], r[3], json.loads(r[4]), bool(r[5]), r[6], json.loads(r[7]), r[8], r[9])
                for r in rows]
