"""LFU: evict the expert used least often; ties go to the least recently used.

``scope="run"`` (default, the paper's LFU) counts demand accesses over the whole run, so an expert
evicted and fetched again keeps its count. ``scope="cache"`` forgets the count on eviction (in-cache
LFU, as libCacheSim's ``LFU`` does: a new object starts at 1, each hit adds 1, ties evict the object
that reached its count first, i.e. the least recently used). The libCacheSim comparison test uses
``scope="cache"``. A prefetch insertion does not count as a use.

Compiled twin: the resident keys in a heap on (count, touch stamp); the count array outlives
evictions (run scope) or is reset on insertion (cache scope).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from core.errors import UserError
from offload.policies.base import Eligible, EvictionPolicy, Key
from offload.policies.compiled import (
    Heap,
    KernelContext,
    PolicyKernel,
    heap_evict,
    heap_push,
    heap_sink,
    heap_victim,
    hook,
    key_heap,
)

SCOPES = ("run", "cache")


class LFU(EvictionPolicy):
    name = "lfu"

    def __init__(self, scope: str = "run"):
        if scope not in SCOPES:
            raise UserError(f"unknown LFU scope {scope!r}; valid: {', '.join(SCOPES)}")
        self.scope = scope
        super().__init__()

    def bind(self, num_layers: int, num_experts: int) -> None:
        super().bind(num_layers, num_experts)
        self.count: dict[Key, int] = {}

    def on_insert(self, key: Key, *, prefetch: bool, hint: Any = None) -> None:
        super().on_insert(key, prefetch=prefetch, hint=hint)
        if self.scope == "cache":
            self.count[key] = 0
        else:
            self.count.setdefault(key, 0)

    def on_access(self, key: Key, *, score: float = 0.0, hint: Any = None) -> None:
        super().on_access(key, score=score, hint=hint)
        self.count[key] = self.count.get(key, 0) + 1

    def victim(self, eligible: Eligible, *, for_prefetch: bool = False) -> Key | None:
        return self._min_by(lambda k: self.count[k], eligible)

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, "scope": self.scope}

    def kernel_state(self, ctx: KernelContext) -> LFUState:
        return LFUState(key_heap(ctx), np.zeros(ctx.num_keys, dtype=np.int64), self.scope == "cache")


# ---------------------------------------------------------------------------------- compiled twin
class LFUState(NamedTuple):
    heap: Heap  # priority: the count
    count: np.ndarray
    cache_scope: bool


@hook
def _insert(st: LFUState, k: int, prefetch: bool, hint: int, clock: int) -> None:
    if st.cache_scope:
        st.count[k] = 0
    st.heap.prio[k] = st.count[k]
    st.heap.stamp[k] = clock
    heap_push(st.heap, k)


@hook
def _access(st: LFUState, k: int, score: float, hint: int, clock: int) -> None:
    st.count[k] += 1
    st.heap.prio[k] = st.count[k]
    st.heap.stamp[k] = clock
    heap_sink(st.heap, k)


LFU.kernel = PolicyKernel(victim=heap_victim, on_insert=_insert, on_access=_access, on_evict=heap_evict)
