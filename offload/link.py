"""The host->device copy link: one serial channel, demand copies first.

Both backends of the per-layer step (:mod:`offload.step`) talk to a link through the same five
calls, so the scheduling rules exist once:

- ``submit(key, nbytes, priority, now)``: queue a copy. A **demand** copy (the main loop will wait
  for it) goes ahead of every prefetch that has not started yet; a copy already on the link is never
  interrupted. Prefetches run in the order they were admitted.
- ``promote(copy, now)``: a queued prefetch became a demand (its layer needs it now): it moves ahead
  of the other queued prefetches.
- ``cancel(copy, now)``: withdraw a copy that has not started (its layer began and does not need it);
  it moves no bytes. False when it has already started.
- ``started(copy, now)``: whether the copy has reached the link.
- ``eta(copy, now)``: when a copy is expected to arrive.
- ``free_at(now)``: when the link would be idle if nothing else were submitted (started and queued
  copies included); prefetch admission uses it to decide whether a copy can arrive in time.

:class:`SimLink` runs on a virtual clock (the simulator); :class:`offload.engine.copier.CopierLink`
wraps the engine's real watchdog thread. In :class:`SimLink` a queued prefetch starts at
``max(link free, its submit time)`` unless a demand arrives strictly before that instant; the queue
is advanced lazily to ``now`` before every operation, which is exact because every operation that
can reorder the queue (a submit, a promotion, a cancellation) first advances it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

DEMAND, PREFETCH = 0, 1


@dataclass(eq=False)
class SimCopy:
    """One copy on the virtual link. ``arrival`` is known once it has started."""

    key: Any
    nbytes: float
    seconds: float
    priority: int
    submitted: float
    start: float | None = None
    arrival: float | None = None
    cancelled: bool = False


class Link(Protocol):
    """What the per-layer step needs from a copy link (virtual or real)."""

    def submit(self, key: Any, nbytes: float, priority: int, now: float, *, slot: int = -1) -> Any: ...

    def promote(self, copy: Any, now: float) -> None: ...

    def cancel(self, copy: Any, now: float) -> bool: ...

    def started(self, copy: Any, now: float) -> bool: ...

    def free_at(self, now: float) -> float: ...

    def eta(self, copy: Any, now: float) -> float: ...

    def copy_seconds(self, nbytes: float) -> float: ...


class SimLink:
    """A virtual serial link of ``bytes_per_s``; times are seconds on the simulator's clock."""

    def __init__(self, bytes_per_s: float):
        if not bytes_per_s > 0:
            raise ValueError(f"link bandwidth must be positive, got {bytes_per_s}")
        self.bytes_per_s = float(bytes_per_s)
        self._free = 0.0  # when the last started copy leaves the link
        self._queue: deque[SimCopy] = deque()  # prefetches not started yet, in admission order
        self.busy_s = 0.0
        self.bytes_moved = 0.0

    def copy_seconds(self, nbytes: float) -> float:
        return nbytes / self.bytes_per_s

    def _start(self, c: SimCopy, at: float) -> None:
        c.start = at
        c.arrival = at + c.seconds
        self._free = c.arrival
        self.busy_s += c.seconds
        self.bytes_moved += c.nbytes

    def _advance(self, now: float) -> None:
        """Start, in order, every queued prefetch the link reached strictly before ``now``."""
        q = self._queue
        while q:
            c = q[0]
            if c.cancelled:
                q.popleft()
                continue
            at = c.submitted if c.submitted > self._free else self._free
            if at >= now:
                return
            q.popleft()
            self._start(c, at)

    def submit(self, key: Any, nbytes: float, priority: int, now: float, *, slot: int = -1) -> SimCopy:
        self._advance(now)
        c = SimCopy(key, nbytes, self.copy_seconds(nbytes), priority, now)
        if priority == DEMAND:
            self._start(c, now if now > self._free else self._free)
        else:
            self._queue.append(c)
        return c

    def promote(self, copy: SimCopy, now: float) -> None:
        self._advance(now)
        if copy.start is not None or copy.cancelled:
            return
        self._queue.remove(copy)
        copy.priority = DEMAND  # starts now, ahead of every other queued prefetch
        self._start(copy, now if now > self._free else self._free)

    def cancel(self, copy: SimCopy, now: float) -> bool:
        self._advance(now)
        if copy.start is not None:
            return False
        copy.cancelled = True
        return True

    def started(self, copy: SimCopy, now: float) -> bool:
        self._advance(now)
        return copy.start is not None

    def arrived(self, copy: SimCopy, now: float) -> bool:
        """Whether ``copy`` is usable at ``now``."""
        self._advance(now)
        return copy.arrival is not None and copy.arrival <= now

    def arrival(self, copy: SimCopy, now: float) -> float:
        """When ``copy`` is usable; a still-queued copy is promoted first (someone waits on it)."""
        if copy.start is None:
            self.promote(copy, now)
        assert copy.arrival is not None
        return copy.arrival

    def eta(self, copy: SimCopy, now: float) -> float:
        """When ``copy`` is expected to arrive (exact once it started; queued: behind the queue)."""
        self._advance(now)
        if copy.arrival is not None:
            return copy.arrival
        return self.free_at(now)

    def free_at(self, now: float) -> float:
        self._advance(now)
        t = now if now > self._free else self._free
        for c in self._queue:
            if not c.cancelled:
                t = (c.submitted if c.submitted > t else t) + c.seconds
        return t
