"""FIFO: evict the expert that entered the cache first; hits do not refresh it.

Compiled twin: LRU's insertion-ordered lists without the touch on access.
"""

from __future__ import annotations

from typing import Any

from offload.policies.base import Eligible, EvictionPolicy, Key
from offload.policies.compiled import (
    KernelContext,
    PolicyKernel,
    Touch,
    oldest_victim,
    touch_evict,
    touch_insert,
    touch_lists,
)


class FIFO(EvictionPolicy):
    name = "fifo"

    def on_access(self, key: Key, *, score: float = 0.0, hint: Any = None) -> None:
        pass  # the order is insertion order only

    def victim(self, eligible: Eligible, *, for_prefetch: bool = False) -> Key | None:
        return self._oldest(eligible)

    def kernel_state(self, ctx: KernelContext) -> Touch:
        return touch_lists(ctx, per_layer=ctx.per_layer)


FIFO.kernel = PolicyKernel(victim=oldest_victim, on_insert=touch_insert, on_evict=touch_evict)
