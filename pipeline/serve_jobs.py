"""The sampling queue behind `knnd serve`: one worker thread runs one job at a time, in order.

Sampling takes the whole CPU (or the GPU), so requests wait in a bounded line instead of running
side by side; every job can say how many run before it and how far its denoising has come.
"""
from __future__ import annotations

import collections
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.files import StageError, UsageError

Progress = Callable[[int, int], None]  # (steps done, steps in all)


class QueueFull(Exception):
    """More jobs wait than the queue takes."""


@dataclass(eq=False)  # compared by identity: a job is one request
class Job:
    """One sampling request; `work(progress)` returns its result (a dict), run by the worker."""
    id: int
    work: Callable[[Progress], dict]
    steps: int
    describe: dict = field(default_factory=dict)  # what was asked, echoed in every answer
    status: str = "queued"  # queued -> running -> done | failed
    step: int = 0
    result: dict | None = None
    error: str | None = None
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    done: threading.Event = field(default_factory=threading.Event)


class JobQueue:
    """A single worker thread over a FIFO of at most `max_waiting` jobs; the last `keep` finished
    jobs stay readable."""

    def __init__(self, max_waiting: int = 16, keep: int = 64):
        self.max_waiting, self.keep = max_waiting, keep
        self._lock = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._jobs: collections.OrderedDict[int, Job] = collections.OrderedDict()
        self._running: Job | None = None
        self._next_id = 1
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="knnd-serve-sampler", daemon=True)
        self._thread.start()

    def submit(self, work: Callable[[Progress], dict], steps: int, describe: dict | None = None) -> Job:
        with self._lock:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} sampling jobs are already waiting (at most {self.max_waiting}): "
                                f"try again when one has finished")
            job = Job(self._next_id, work, steps, describe or {})
            self._next_id += 1
            self._jobs[job.id] = job
            self._waiting.append(job)
            self._forget_old()
            self._lock.notify_all()
            return job

    def get(self, job_id: int) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def ahead(self, job: Job) -> int:
        """How many jobs run before this one starts (0 once it runs)."""
        with self._lock:
            if job.status != "queued":
                return 0
            waiting = list(self._waiting)
            return (self._running is not None) + (waiting.index(job) if job in waiting else 0)

    def counts(self) -> dict:
        with self._lock:
            return {"running": int(self._running is not None), "waiting": len(self._waiting),
                    "max_waiting": self.max_waiting}

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking jobs; the running one finishes (within `timeout`), waiting ones are dropped."""
        with self._lock:
            self._closed = True
            for job in self._waiting:
                job.status, job.error = "failed", "the server stopped before this job ran"
                job.done.set()
            self._waiting.clear()
            self._lock.notify_all()
        self._thread.join(timeout)

    def _forget_old(self) -> None:
        finished = [j.id for j in self._jobs.values() if j.status in ("done", "failed")]
        for job_id in finished[:max(0, len(finished) - self.keep)]:
            del self._jobs[job_id]

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                job = self._running = self._waiting.popleft()
                job.status, job.started = "running", time.time()
            self._run(job)
            with self._lock:
                self._running = None

    def _run(self, job: Job) -> None:
        def progress(done: int, total: int) -> None:
            job.step, job.steps = done, total

        status, error = "done", None
        try:
            job.result = job.work(progress)
        except (UsageError, StageError) as e:  # the request or the files: the message says what to change
            status, error = "failed", str(e)
        except Exception as e:  # noqa: BLE001 - a failed job must not stop the worker; the trace goes to the log
            traceback.print_exc(file=sys.stderr)
            status, error = "failed", f"sampling failed ({type(e).__name__}: {e}); the server log has the details"
        job.finished, job.error = time.time(), error  # before the status: a poll that sees "done" sees `finished`
        job.status = status
        job.done.set()
