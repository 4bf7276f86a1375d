"""The timing model: a FIFO copy link and per-pass clocks.

Per layer: the non-expert part runs first (``Hardware.layer_time``); the layer's demand misses are
queued on the link, then the prefetches for later layers; the layer's experts then run one after
another in rank order, each starting when both the device is free and its copy has arrived. Copies
of other layers keep flowing while experts compute (overlap); waiting for a copy is **stall time**.
A prefetched expert still in flight when its layer runs counts as a hit (it was resident in the
cache's books) but its remaining copy time is stall: a "late prefetch".
TTFT = duration of a prefill pass, TPOT = mean duration of a decode pass.
"""

from __future__ import annotations


class Link:
    """One host->device copy engine: copies run one at a time in the order they were queued."""

    def __init__(self) -> None:
        self.free_at = 0.0

    def copy(self, now: float, seconds: float) -> float:
        """Queue a copy at time ``now``; returns when it arrives."""
        start = now if now > self.free_at else self.free_at
        self.free_at = start + seconds
        return self.free_at
