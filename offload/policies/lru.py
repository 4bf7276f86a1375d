"""LRU: evict the least recently used expert (touch = insert or demand access).

Compiled twin: the resident keys in touch order, one list per cache partition (one global list, or
one per layer of a per-layer cache); the victim is the first eligible key of the partition's list.
"""

from __future__ import annotations

from offload.policies.base import Eligible, EvictionPolicy, Key
from offload.policies.compiled import (
    KernelContext,
    PolicyKernel,
    Touch,
    oldest_victim,
    touch_access,
    touch_evict,
    touch_insert,
    touch_lists,
)


class LRU(EvictionPolicy):
    name = "lru"

    def victim(self, eligible: Eligible, *, for_prefetch: bool = False) -> Key | None:
        return self._oldest(eligible)

    def kernel_state(self, ctx: KernelContext) -> Touch:
        return touch_lists(ctx, per_layer=ctx.per_layer)


LRU.kernel = PolicyKernel(victim=oldest_victim, on_insert=touch_insert, on_access=touch_access, on_evict=touch_evict)
