"""The watchdog: one worker that moves expert weights host -> device over an emulated link.

Figure 2 of the SpecMD paper runs three loops: the main loop computes layers, the prefetch loop
decides what to load, and a *watchdog* performs the copies asynchronously. Here the watchdog is a
thread: on CUDA it issues the copy on its own copy stream and waits on a CUDA event, on CPU it
copies with ``Tensor.copy_``. Either way it then holds the link for ``nbytes / bandwidth`` seconds,
so a ``--bandwidth 5GB/s`` run on a fast PCIe bus or on the CPU behaves like the paper's throttled
A100 set-up.

The link is modelled as one serial channel with a virtual clock: a job starts when both the job
exists and the previous job has left the link, and it is *ready* ``nbytes / bandwidth`` later.
Sleeping until that virtual time (instead of sleeping ``duration`` after waking up) keeps the
throughput exact: the jitter of one sleep is not added to the next job, and the last 200 us before a
deadline are spun, since ``time.sleep`` alone overshoots by about a small expert's copy time.

Demand fetches (the main loop is stalled on them) jump ahead of queued prefetches; a job already on
the link is never interrupted. Queued prefetches can be cancelled when the main loop needs their
slot more urgently.

A demand copy submitted while the link is idle and nothing is queued is issued by the caller itself
(the memcpy, or on CUDA the async copy on the copy stream) and only *becomes usable* at its virtual
arrival time: :meth:`CopyJob.wait` sleeps until then. The link timing is the same as through the
worker, minus two thread hand-offs per miss, which on a busy CPU cost more than the emulated copy
of a small expert itself.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

DEMAND, PREFETCH = 0, 1  # job priorities: lower runs first

#: ``time.sleep`` overshoots by tens of microseconds, as long as a small expert's whole emulated copy:
#: the last stretch before a deadline is spun instead (yielding the GIL each round).
_SPIN_S = 200e-6


def sleep_until(deadline: float) -> None:
    """Return at ``deadline`` (perf_counter seconds), accurate to a few microseconds."""
    remaining = deadline - time.perf_counter()
    if remaining > _SPIN_S:
        time.sleep(remaining - _SPIN_S)
    while time.perf_counter() < deadline:
        time.sleep(0)

QUEUED, RUNNING, DONE, CANCELLED = "queued", "running", "done", "cancelled"


@dataclass(eq=False)
class CopyJob:
    """One expert's weights on their way to a slot. ``wait()`` blocks until they are usable."""

    key: tuple[int, int]
    slot: int
    src: Mapping[str, torch.Tensor]
    dst: Mapping[str, torch.Tensor]
    nbytes: int  # bytes the link is held for (an emulated expert size may differ from the real copy)
    priority: int
    submitted_at: float = field(default_factory=time.perf_counter)
    state: str = QUEUED
    ready_at: float | None = None  # perf_counter time the link delivered the last byte
    error: BaseException | None = None
    _done: threading.Event = field(default_factory=threading.Event)
    _event: Any = None  # CUDA event of an inline copy

    def is_ready(self) -> bool:
        if not self._done.is_set() or self.state != DONE:
            return False
        if self._event is not None and not self._event.query():
            return False
        return self.ready_at is None or time.perf_counter() >= self.ready_at

    def wait(self) -> None:
        self._done.wait()
        if self.error is not None:
            raise RuntimeError(f"copy of expert {self.key} failed") from self.error
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        if self.ready_at is not None:
            sleep_until(self.ready_at)


class ThrottledCopier:
    """A single copy worker emulating a host->device link of ``bandwidth`` bytes/s (None: unthrottled)."""

    def __init__(self, bandwidth: float | None, device: torch.device | str = "cpu", *, inline_demand: bool = True):
        if bandwidth is not None and not bandwidth > 0:
            raise ValueError(f"bandwidth must be positive, got {bandwidth}")
        self.bandwidth = bandwidth
        self.device = torch.device(device)
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._queue: list[tuple[int, int, CopyJob]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._link_free_at = 0.0
        self._busy = False  # a copy is being issued (by the worker or inline)
        self.inline_demand = inline_demand
        self.inline_jobs = 0
        self._closed = False
        self.bytes_copied = 0
        self.jobs_done = 0
        self.busy_s = 0.0  # time the link was occupied
        self._thread = threading.Thread(target=self._run, name="expert-watchdog", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ main-loop side
    def submit(self, job: CopyJob) -> CopyJob:
        if self._stream is not None:
            # the slot may still be read by kernels queued on the compute stream: copy after them
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with self._cond:
            if self._closed:
                raise RuntimeError("the copier is closed")
            job.submitted_at = time.perf_counter()
            inline = self.inline_demand and job.priority == DEMAND and not self._queue and not self._busy
            if inline:
                self._busy = True
                job.state = RUNNING
            else:
                heapq.heappush(self._queue, (job.priority, next(self._order), job))
                self._cond.notify()
        if inline:
            try:
                self._copy(job, hold_link=False)
                job.state = DONE
                self.inline_jobs += 1
            except BaseException as e:
                job.error = e
                job.state = DONE
            finally:
                job._done.set()
                with self._cond:
                    self._busy = False
                    self._cond.notify()
        return job

    def promote(self, job: CopyJob) -> None:
        """A queued prefetch became a demand (the main loop now waits on it): move it up front."""
        with self._cond:
            if job.state != QUEUED or job.priority == DEMAND:
                return
            self._queue = [item for item in self._queue if item[2] is not job]
            heapq.heapify(self._queue)
            job.priority = DEMAND
            heapq.heappush(self._queue, (DEMAND, next(self._order), job))

    def cancel(self, job: CopyJob) -> bool:
        """Withdraw a job that has not reached the link yet; False if it is already running/done."""
        with self._cond:
            if job.state != QUEUED:
                return False
            self._queue = [item for item in self._queue if item[2] is not job]
            heapq.heapify(self._queue)
            job.state = CANCELLED
            job._done.set()
            return True

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def free_at(self, now: float) -> float:
        """When the link would be idle if nothing else were submitted (perf_counter seconds)."""
        with self._cond:
            t = max(now, self._link_free_at)
            if self.bandwidth is not None:
                t += sum(job.nbytes for _, _, job in self._queue) / self.bandwidth
            return t

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for _, _, job in self._queue:
                job.state = CANCELLED
                job._done.set()
            self._queue.clear()
            self._cond.notify_all()
        self._thread.join(timeout=10)

    def __enter__(self) -> ThrottledCopier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ worker side
    def _run(self) -> None:
        while True:
            with self._cond:
                while (not self._queue or self._busy) and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                _, _, job = heapq.heappop(self._queue)
                job.state = RUNNING
                self._busy = True
            try:
                self._copy(job, hold_link=True)
                job.state = DONE
            except BaseException as e:  # surfaced to whoever waits on the job
                job.error = e
                job.state = DONE
            finally:
                with self._cond:
                    self._busy = False
                job._done.set()

    def _copy(self, job: CopyJob, *, hold_link: bool) -> None:
        """Issue the copy and book the link. ``hold_link``: the worker sleeps until the virtual
        arrival (so the next job cannot start earlier); inline, the waiter sleeps instead."""
        start = max(self._link_free_at, job.submitted_at)
        if self._stream is not None:
            with torch.cuda.stream(self._stream):
                for name, dst in job.dst.items():
                    dst.copy_(job.src[name], non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
            if hold_link:
                event.synchronize()
            else:
                job._event = event
        else:
            for name, dst in job.dst.items():
                dst.copy_(job.src[name])
        now = time.perf_counter()
        if self.bandwidth is None:
            ready = now
        else:
            ready = max(now, start + job.nbytes / self.bandwidth)
            if hold_link:
                # hold the link (so queued prefetches keep their place behind a later demand) but do
                # not spin: waiters sleep precisely until ``ready_at`` themselves
                remaining = ready - time.perf_counter() - _SPIN_S
                if remaining > 0:
                    time.sleep(remaining)
        self._link_free_at = ready
        self.busy_s += ready - max(start, job.submitted_at)
        self.bytes_copied += job.nbytes
        self.jobs_done += 1
        job.ready_at = ready


class CopierLink:
    """The engine's side of :class:`offload.link.Link`: the step's copy decisions on the real watchdog.

    ``host_expert(key)`` gives the host tensors of an expert, ``slot(i)`` the device views of a slot;
    ``link_bytes`` is what a copy holds the link for (the real expert size, or an emulated one).
    """

    def __init__(self, copier: ThrottledCopier, host_expert, slot, link_bytes: int):
        self.copier = copier
        self._host_expert = host_expert
        self._slot = slot
        self.link_bytes = link_bytes

    def copy_seconds(self, nbytes: float) -> float:
        bw = self.copier.bandwidth
        return 0.0 if bw is None else nbytes / bw

    def submit(self, key, nbytes: float, priority: int, now: float, *, slot: int = -1) -> CopyJob:
        job = CopyJob(key=key, slot=slot, src=self._host_expert(key), dst=self._slot(slot), nbytes=int(nbytes),
                      priority=priority)
        return self.copier.submit(job)

    def promote(self, job: CopyJob, now: float) -> None:
        self.copier.promote(job)

    def cancel(self, job: CopyJob, now: float) -> bool:
        return self.copier.cancel(job)

    def started(self, job: CopyJob, now: float) -> bool:
        return job.state != QUEUED

    def free_at(self, now: float) -> float:
        return self.copier.free_at(now)

    def eta(self, job: CopyJob, now: float) -> float:
        if job.ready_at is not None:
            return job.ready_at
        return self.free_at(now)
