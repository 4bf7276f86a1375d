"""The engine's link: the simulator's link rules on the wall clock, moving the real weights.

Figure 2 of the SpecMD paper runs three loops: the main loop computes layers, the prefetch loop
decides what to load, and a *watchdog* performs the copies asynchronously. Here the watchdog is the
link itself: :class:`offload.link.SimLink` driven by ``time.perf_counter`` -- the very rules the
simulator replays -- whose start hook issues the real copy (a memcpy on CPU; on CUDA an asynchronous
copy on its own stream, recorded by an event). A copy of ``nbytes`` then occupies the emulated link
for ``nbytes / bandwidth`` and becomes usable at that virtual arrival (:meth:`ThrottledCopier.wait`
sleeps until then), so a ``--bandwidth 5GB/s`` run on a fast PCIe bus or on the CPU behaves like the
paper's throttled A100 set-up, and ``nbytes`` may be an emulated expert size while the weights
copied are the model's own.

- a **demand** copy starts as soon as the copy on the link has left it, ahead of every queued
  prefetch, and is issued by the caller at once;
- **prefetches** queue in admission order; one starts when the link reaches it -- issued the next
  time the main loop touches the link (every operation of the per-layer step does), with its
  virtual start and arrival unchanged -- unless it is promoted first (it then starts like a demand
  copy) or cancelled (it moves no bytes). A copy on the link is never interrupted.

Lower-bit copies and upgrades (offload.miss_handling) do not land in the slot itself: a low-bit copy
moves the packed codes, scales and zeros of the host tier (offload.quantization) into a staging area
beside the slot, dequantized into the slot when the expert first runs; an upgrade (the cascade's
full-precision copy) lands beside the slot too, and is copied into it only when the step applies it,
so a slot always holds what the step says it holds. On CPU the staging area is the host tier itself
(there is no link to cross): the bytes are still those the copy's precision moves.

No thread: on a loaded CPU every thread hand-off costs more than a small expert's emulated copy,
which the simulator cannot see; without one the engine's timeline is the simulator's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from offload.link import DEMAND, PREFETCH, UPGRADE, SimCopy, SimLink
from offload.quantization import QuantizedExpert

__all__ = ["DEMAND", "PREFETCH", "UPGRADE", "CopierLink", "CopyPayload", "ThrottledCopier", "sleep_until"]

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


@dataclass
class CopyPayload:
    """The tensors one copy moves, and its CUDA event once issued. ``dst`` None: staged beside the slot
    (a low-bit copy or an upgrade); ``staged`` then holds the device copy once issued."""

    src: Mapping[str, torch.Tensor] | QuantizedExpert
    dst: Mapping[str, torch.Tensor] | None
    event: Any = None
    error: BaseException | None = None
    staged: Mapping[str, torch.Tensor] | QuantizedExpert | None = None


class ThrottledCopier:
    """The emulated host->device link of ``bandwidth`` bytes/s (None: unthrottled) on ``device``."""

    def __init__(self, bandwidth: float | None, device: torch.device | str = "cpu"):
        if bandwidth is not None and not bandwidth > 0:
            raise ValueError(f"bandwidth must be positive, got {bandwidth}")
        self.bandwidth = bandwidth
        self.device = torch.device(device)
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.link = SimLink(bandwidth, on_start=self._issue)
        self.bytes_copied = 0

    # ------------------------------------------------------------------ the link's operations
    def submit(self, key: Any, src: Mapping[str, torch.Tensor] | QuantizedExpert,
               dst: Mapping[str, torch.Tensor] | None, nbytes: int, priority: int = DEMAND, *,
               precision: str = "native") -> SimCopy:
        return self.link.submit(key, nbytes, priority, time.perf_counter(), payload=CopyPayload(src, dst),
                                precision=precision)

    def promote(self, copy: SimCopy) -> None:
        self.link.promote(copy, time.perf_counter())

    def cancel(self, copy: SimCopy) -> bool:
        return self.link.cancel(copy, time.perf_counter())

    def started(self, copy: SimCopy) -> bool:
        return self.link.started(copy, time.perf_counter())

    def ready(self, copy: SimCopy) -> bool:
        """Whether the copy is usable now (arrived on the emulated link, and physically done)."""
        if not self.link.arrived(copy, time.perf_counter()):
            return False
        event = copy.payload.event
        return event is None or event.query()

    def wait(self, copy: SimCopy) -> None:
        """Block until ``copy`` is usable; a copy still queued is promoted first (someone waits on it)."""
        arrival = self.link.arrival(copy, time.perf_counter())
        payload: CopyPayload = copy.payload
        if payload.error is not None:
            raise RuntimeError(f"copy of expert {copy.key} failed") from payload.error
        if payload.event is not None:
            payload.event.synchronize()
            payload.event = None
        sleep_until(arrival)

    def free_at(self, now: float) -> float:
        return self.link.free_at(now)

    def eta(self, copy: SimCopy, now: float) -> float:
        return self.link.eta(copy, now)

    @property
    def copies(self) -> int:
        return self.link.copies

    def close(self) -> None:
        """Nothing runs in the background: kept so an engine can release its link like any resource."""

    def __enter__(self) -> ThrottledCopier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the real copy
    def _issue(self, copy: SimCopy) -> None:
        payload: CopyPayload = copy.payload
        try:
            if self._stream is not None:
                # the slot may still be read by kernels queued on the compute stream: copy after them
                self._stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self._stream):
                    self._move(payload, non_blocking=True)
                    payload.event = torch.cuda.Event()
                    payload.event.record(self._stream)
            else:
                self._move(payload, non_blocking=False)
        except BaseException as e:  # surfaced to whoever waits on the copy
            payload.error = e

    def _move(self, payload: CopyPayload, non_blocking: bool) -> None:
        """Into the slot, or staged beside it (allocated on the copy stream when there is one)."""
        if payload.dst is not None:
            for name, dst in payload.dst.items():
                dst.copy_(payload.src[name], non_blocking=non_blocking)  # type: ignore[index]
            self.bytes_copied += sum(t.numel() * t.element_size() for t in payload.dst.values())
            return
        src = payload.src
        if isinstance(src, QuantizedExpert):
            payload.staged = src.to(self.device, non_blocking=non_blocking)
            self.bytes_copied += src.nbytes
        else:
            payload.staged = {n: t.to(self.device, non_blocking=non_blocking) for n, t in src.items()}
            self.bytes_copied += sum(t.numel() * t.element_size() for t in src.values())

    def release(self, copy: SimCopy, tensors: Mapping[str, torch.Tensor] | QuantizedExpert) -> None:
        """A staged copy has been read on the compute stream: its memory, allocated on the copy stream, may
        be reused only after those reads (CUDA's caching allocator is told so); drops the staging."""
        if self._stream is not None:
            current = torch.cuda.current_stream(self.device)
            parts = tensors.tensors.values() if isinstance(tensors, QuantizedExpert) else tensors.values()
            for part in parts:
                for t in ((part.codes, part.scale, part.zero) if hasattr(part, "codes") else (part,)):
                    t.record_stream(current)
        copy.payload.staged = None


class CopierLink:
    """The per-layer step's :class:`offload.link.Link` in the engine: keys become host and slot tensors.

    ``host_expert(key, precision)`` gives the host copy of an expert at a precision (native tensors or a
    :class:`~offload.quantization.QuantizedExpert`), ``slot(i)`` the device views of a slot;
    ``link_bytes[precision]`` is what a copy holds the link for (the real size, or an emulated one).
    A full-precision demand copy or prefetch lands in its slot; a low-bit copy or an upgrade is staged
    (module doc). The step's ``now`` is ignored: the wall clock is read at every operation.
    """

    def __init__(self, copier: ThrottledCopier,
                 host_expert: Callable[[Any, str], Mapping[str, torch.Tensor] | QuantizedExpert],
                 slot: Callable[[int], Mapping[str, torch.Tensor]], link_bytes: Mapping[str, float]):
        self.copier = copier
        self._host_expert = host_expert
        self._slot = slot
        self.link_bytes = dict(link_bytes)

    def copy_seconds(self, nbytes: float) -> float:
        return self.copier.link.copy_seconds(nbytes)

    def submit(self, key: Any, nbytes: float, priority: int, now: float, *, slot: int = -1,
               precision: str = "native") -> SimCopy:
        staged = precision != "native" or priority == UPGRADE
        return self.copier.submit(key, self._host_expert(key, precision), None if staged else self._slot(slot),
                                  int(nbytes), priority, precision=precision)

    def promote(self, copy: SimCopy, now: float) -> None:
        self.copier.promote(copy)

    def cancel(self, copy: SimCopy, now: float) -> bool:
        return self.copier.cancel(copy)

    def started(self, copy: SimCopy, now: float) -> bool:
        return self.copier.started(copy)

    def free_at(self, now: float) -> float:
        return self.copier.free_at(time.perf_counter())

    def eta(self, copy: SimCopy, now: float) -> float:
        return self.copier.eta(copy, time.perf_counter())
