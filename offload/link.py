"""The host->device copy link: one serial channel, demand copies first.

Both backends of the per-layer step (:mod:`offload.step`) talk to a link through the same five
calls, so the scheduling rules exist once:

- ``submit(key, nbytes, priority, now)``: queue a copy. A **demand** copy (the main loop will wait
  for it) goes ahead of every prefetch that has not started yet; a copy already on the link is never
  interrupted. Prefetches run in the order they were admitted. An **upgrade** (the full-precision
  copy of an expert already served at low precision: HOBBIT's cascade) runs only when the link has
  room: behind every demand copy and every prefetch not started yet, upgrades in submission order.
- ``promote(copy, now)``: a queued prefetch became a demand (its layer needs it now): it moves ahead
  of the other queued prefetches.
- ``cancel(copy, now)``: withdraw a copy that has not started (its layer began and does not need it);
  it moves no bytes. False when it has already started.
- ``started(copy, now)``: whether the copy has reached the link.
- ``eta(copy, now)``: when a copy is expected to arrive.
- ``free_at(now)``: when a prefetch submitted now would start: the copy on the link and the queued
  prefetches go first, queued upgrades do not; prefetch admission uses it to decide whether a copy
  can arrive in time.

:class:`SimLink` is that link, whatever the clock: the simulator drives it with its virtual time,
the engine (:class:`offload.engine.copier.ThrottledCopier`) with the wall clock, issuing the real
copy when a copy starts (``on_start``) and waiting until its arrival. A queued prefetch starts at
``max(link free, its submit time)`` unless a demand arrives before that instant (a queued upgrade
likewise, unless a prefetch can start by then); the queues are advanced lazily to ``now`` before
every operation, which is exact because every operation that can reorder them (a submit, a
promotion, a cancellation) first advances them, and ``now`` never goes back.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

DEMAND, PREFETCH, UPGRADE = 0, 1, 2


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
    payload: Any = None  # what the backend copies (the engine: host tensors -> a device slot)
    precision: str = "native"  # the copy's precision (offload.quantization): a low-bit copy moves fewer bytes


class Link(Protocol):
    """What the per-layer step needs from a copy link (virtual or real)."""

    def submit(self, key: Any, nbytes: float, priority: int, now: float, *, slot: int = -1,
               precision: str = "native") -> Any: ...

    def promote(self, copy: Any, now: float) -> None: ...

    def cancel(self, copy: Any, now: float) -> bool: ...

    def started(self, copy: Any, now: float) -> bool: ...

    def free_at(self, now: float) -> float: ...

    def eta(self, copy: Any, now: float) -> float: ...

    def copy_seconds(self, nbytes: float) -> float: ...


class SimLink:
    """A serial link of ``bytes_per_s`` (None: copies take no time); times are seconds on the caller's
    clock. ``on_start(copy)`` runs when a copy starts (the engine issues the real copy there)."""

    def __init__(self, bytes_per_s: float | None, on_start: Callable[[SimCopy], None] | None = None):
        if bytes_per_s is not None and not bytes_per_s > 0:
            raise ValueError(f"link bandwidth must be positive, got {bytes_per_s}")
        self.bytes_per_s = None if bytes_per_s is None else float(bytes_per_s)
        self.on_start = on_start
        self._free = 0.0  # when the last started copy leaves the link
        self._queue: deque[SimCopy] = deque()  # prefetches not started yet, in admission order
        self._upgrades: deque[SimCopy] = deque()  # upgrades not started yet, in submission order
        self.busy_s = 0.0
        self.bytes_moved = 0.0
        self.copies = 0

    def copy_seconds(self, nbytes: float) -> float:
        return 0.0 if self.bytes_per_s is None else nbytes / self.bytes_per_s

    def _start(self, c: SimCopy, at: float) -> None:
        c.start = at
        c.arrival = at + c.seconds
        self._free = c.arrival
        self.busy_s += c.seconds
        self.bytes_moved += c.nbytes
        self.copies += 1
        if self.on_start is not None:
            self.on_start(c)

    def _advance(self, now: float) -> None:
        """Start, in order, every queued copy the link has reached by ``now`` (a prefetch submitted to a
        free link starts at once); when the link frees, a prefetch already submitted goes before an upgrade."""
        if not self._upgrades:  # the common case, kept tight: prefetches only
            q = self._queue
            while q:
                c = q[0]
                if c.cancelled:
                    q.popleft()
                    continue
                at = c.submitted if c.submitted > self._free else self._free
                if at > now:
                    return
                q.popleft()
                self._start(c, at)
            return
        while True:
            prefetch, upgrade = self._head(self._queue), self._head(self._upgrades)
            if prefetch is None and upgrade is None:
                return
            at_p = max(prefetch.submitted, self._free) if prefetch is not None else float("inf")
            at_u = max(upgrade.submitted, self._free) if upgrade is not None else float("inf")
            c, at, queue = (prefetch, at_p, self._queue) if at_p <= at_u else (upgrade, at_u, self._upgrades)
            if at > now:
                return
            queue.popleft()
            self._start(c, at)  # type: ignore[arg-type]

    @staticmethod
    def _head(queue: deque[SimCopy]) -> SimCopy | None:
        """The first copy of ``queue`` not cancelled (cancelled ones are dropped on the way)."""
        while queue and queue[0].cancelled:
            queue.popleft()
        return queue[0] if queue else None

    def submit(self, key: Any, nbytes: float, priority: int, now: float, *, slot: int = -1,
               payload: Any = None, precision: str = "native") -> SimCopy:
        self._advance(now)
        c = SimCopy(key, nbytes, self.copy_seconds(nbytes), priority, now, payload=payload, precision=precision)
        if priority == DEMAND:
            self._start(c, now if now > self._free else self._free)
        else:
            (self._upgrades if priority == UPGRADE else self._queue).append(c)
        return c

    def promote(self, copy: SimCopy, now: float) -> None:
        self._advance(now)
        if copy.start is not None or copy.cancelled:
            return
        (self._upgrades if copy.priority == UPGRADE else self._queue).remove(copy)
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

    def queued(self, now: float) -> int:
        """Prefetches and upgrades waiting for the link."""
        self._advance(now)
        return sum(not c.cancelled for c in self._queue) + sum(not c.cancelled for c in self._upgrades)

    def free_at(self, now: float) -> float:
        self._advance(now)
        t = now if now > self._free else self._free
        for c in self._queue:
            if not c.cancelled:
                t = (c.submitted if c.submitted > t else t) + c.seconds
        return t
