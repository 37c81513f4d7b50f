"""The server's decode loop: one thread that admits waiting requests (a prefill each), then decodes one token for
every active row of each model (with `OrtBatch`, one session run for all of a model's rows), samples each row
with its own seeded sampler and hands the text to the request's event queue.

Bounded: at most `max_batch` rows decode and at most `max_queue` requests wait; `submit` refuses more
(`Overloaded`). A cancelled request (its client left) is dropped from the queue at once, or its row at the next
step. `max_batch=1` serves the requests one after another (a queue).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from exporter.runtime.decoders import Decoder
from exporter.runtime.reply import Reply
from exporter.runtime.sampling import Sampling

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """Every row decodes and the queue is full."""


@dataclass
class Served:
    """A model in the server's table: built at start-up, looked up by name, never by a path."""

    name: str
    format: str
    runtime: str
    decoder: Decoder
    tokenizer: Any
    ends: set[int]
    defaults: dict[str, Any]  # temperature, top_p, repetition_penalty, max_tokens from generation_config.json
    lock: threading.Lock = field(default_factory=threading.Lock)  # the tokenizer is not shared across threads


@dataclass(frozen=True)
class Event:
    text: str
    finish: str | None = None  # "stop" or "length" with the last piece
    error: str | None = None


class Job:
    """One request: its prompt and sampler, its reply so far, and the queue its client reads."""

    def __init__(self, model: Served, ids: list[int], sampling: Sampling, max_tokens: int, stops: list[str]) -> None:
        self.model, self.ids, self.max_tokens = model, ids, max_tokens
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.reply = Reply(model.tokenizer, model.ends, max_tokens, stops)
        self.choose = sampling.chooser()
        self.seen = list(ids)
        self.token = -1  # the last token, fed at the next step
        self.cancelled = False

    @property
    def done(self) -> bool:
        return self.cancelled or self.reply.finish is not None

    def emit(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: nobody reads this job any more
            self.cancelled = True

    def advance(self, logits: np.ndarray) -> None:
        """Sample the next token from `logits` and hand on the text it completes."""
        self.token = self.choose(logits, self.seen)
        self.seen.append(self.token)
        with self.model.lock:
            piece = self.reply.add(self.token)
        if piece or self.reply.finish:
            self.emit(Event(piece, self.reply.finish))


class Scheduler:
    def __init__(self, models: dict[str, Served], max_batch: int, max_queue: int) -> None:
        self.models, self.max_batch, self.max_queue = models, max_batch, max_queue
        self.waiting: deque[Job] = deque()
        self.active: dict[str, list[Job]] = {name: [] for name in models}  # row order of each decoder
        self.in_flight = 0  # accepted and not ended
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0, "most_rows": 0}  # most rows decoded in one step
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="decode", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join()
        for job in [*self.waiting, *(j for jobs in self.active.values() for j in jobs)]:
            job.emit(Event("", error="the server is shutting down"))
        for name, model in self.models.items():
            model.decoder.clear()
            self.active[name].clear()

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.in_flight >= self.max_batch + self.max_queue:
                raise Overloaded
            self.in_flight += 1
            self.waiting.append(job)
            self.cond.notify()

    def cancel(self, job: Job) -> None:
        """The client left: drop the job (a waiting one now, a decoding one at the next step)."""
        with self.cond:
            if job.done:
                return
            job.cancelled = True
            if job in self.waiting:
                self.waiting.remove(job)
                self._ended("cancelled")

    def status(self) -> dict[str, int]:
        with self.cond:
            active = sum(len(jobs) for jobs in self.active.values())
            return {"active": active, "waiting": len(self.waiting), **self.counts}

    def _ended(self, how: str) -> None:  # under self.cond
        self.in_flight -= 1
        self.counts[how] += 1

    def _take(self) -> list[Job] | None:
        """Waiting jobs for the free rows; blocks while there is nothing to do; None once stopping."""
        with self.cond:
            while not self.stopping and not self.waiting and not any(self.active.values()):
                self.cond.wait()
            if self.stopping:
                return None
            free = self.max_batch - sum(len(jobs) for jobs in self.active.values())
            return [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]

    def _loop(self) -> None:
        while (admitted := self._take()) is not None:
            for job in admitted:
                self._prefill(job)
            for name in self.models:
                self._step(name)

    def _prefill(self, job: Job) -> None:
        jobs = self.active[job.model.name]
        if job.cancelled:
            with self.cond:
                self._ended("cancelled")
            return
        try:
            logits = job.model.decoder.add(job.ids, job.max_tokens)
        except Exception as exc:  # onnxruntime's own error types; the server keeps serving
            log.exception("prefill failed on %s", job.model.name)
            job.emit(Event("", error=f"decoding failed: {exc}"))
            with self.cond:
                self._ended("failed")
            return
        with self.cond:
            jobs.append(job)
        job.advance(logits)
        self._prune(job.model.name)

    def _step(self, name: str) -> None:
        jobs, decoder = self.active[name], self.models[name].decoder
        self._prune(name)
        if not jobs:
            return
        self.counts["most_rows"] = max(self.counts["most_rows"], len(jobs))
        try:
            logits = decoder.step([job.token for job in jobs])
        except Exception as exc:
            log.exception("decoding failed on %s", name)
            for job in jobs:
                job.emit(Event("", error=f"decoding failed: {exc}"))
            with self.cond:
                for _ in jobs:
                    self._ended("failed")
                jobs.clear()
            decoder.clear()
            return
        for row, job in enumerate(jobs):
            job.advance(logits[row])
        self._prune(name)

    def _prune(self, name: str) -> None:
        """Free the rows of finished and cancelled jobs."""
        jobs = self.active[name]
        for row in reversed(range(len(jobs))):
            if jobs[row].done:
                self.models[name].decoder.remove(row)
                with self.cond:
                    self._ended("cancelled" if jobs[row].cancelled else "completed")
                    del jobs[row]
