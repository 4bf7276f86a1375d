"""Belady (oracle): evict the expert whose next demand access is farthest in the future.

It needs the future, so it exists in the simulator only: the simulator passes the global index of
the key's next demand access as ``hint`` on every insert and access (``math.inf`` = never again).
Ties (several never used again) go to the least recently used.

Compiled twin: the resident keys in a heap on (minus the next use, touch stamp); "never" is the
replay's ``NEVER`` index, larger than every real one.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from offload.policies.base import Eligible, EvictionPolicy, Key
from offload.policies.compiled import (
    Heap,
    KernelContext,
    PolicyKernel,
    heap_evict,
    heap_push,
    heap_update,
    heap_victim,
    hook,
    key_heap,
)


class Belady(EvictionPolicy):
    name = "belady"
    needs_future = True

    def bind(self, num_layers: int, num_experts: int) -> None:
        super().bind(num_layers, num_experts)
        self.next_use: dict[Key, float] = {}

    def _remember(self, key: Key, hint: Any) -> None:
        if hint is None:
            raise ValueError("belady needs the next-use index of every key as hint (simulator only)")
        self.next_use[key] = float(hint)

    def on_insert(self, key: Key, *, prefetch: bool, hint: Any = None) -> None:
        super().on_insert(key, prefetch=prefetch, hint=hint)
        self._remember(key, hint)

    def on_access(self, key: Key, *, score: float = 0.0, hint: Any = None) -> None:
        super().on_access(key, score=score, hint=hint)
        self._remember(key, hint)

    def on_advice(self, key: Key, info: Any) -> None:
        self.next_use[key] = float(info)

    def victim(self, eligible: Eligible, *, for_prefetch: bool = False) -> Key | None:
        return self._min_by(lambda k: -self.next_use.get(k, math.inf), eligible)

    def kernel_state(self, ctx: KernelContext) -> BeladyState:
        return BeladyState(key_heap(ctx))


# ---------------------------------------------------------------------------------- compiled twin
class BeladyState(NamedTuple):
    heap: Heap  # priority: minus the next use


@hook
def _insert(st: BeladyState, k: int, prefetch: bool, hint: int, clock: int) -> None:
    st.heap.prio[k] = -float(hint)
    st.heap.stamp[k] = clock
    heap_push(st.heap, k)


@hook
def _access(st: BeladyState, k: int, score: float, hint: int, clock: int) -> None:
    st.heap.prio[k] = -float(hint)
    st.heap.stamp[k] = clock
    heap_update(st.heap, k)


Belady.kernel = PolicyKernel(victim=heap_victim, on_insert=_insert, on_access=_access, on_evict=heap_evict)
