"""Score-based eviction (Zhu et al.): evict the expert with the lowest accumulated gate score.

Each demand access adds the router weight the expert received in that pass (summed over the pass's
tokens); the sum is kept over the whole run. Ties: least recently used.

Compiled twin: the resident keys in a heap on (accumulated score, touch stamp).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from offload.policies.base import Eligible, EvictionPolicy, Key
from offload.policies.compiled import (
    Heap,
    KernelContext,
    PolicyKernel,
    heap_evict,
    heap_push,
    heap_sink,
    heap_update,
    heap_victim,
    hook,
    key_heap,
)


class ScoreBased(EvictionPolicy):
    name = "score"

    def bind(self, num_layers: int, num_experts: int) -> None:
        super().bind(num_layers, num_experts)
        self.total: dict[Key, float] = {}

    def on_access(self, key: Key, *, score: float = 0.0, hint: Any = None) -> None:
        super().on_access(key, score=score, hint=hint)
        self.total[key] = self.total.get(key, 0.0) + float(score)

    def victim(self, eligible: Eligible, *, for_prefetch: bool = False) -> Key | None:
        return self._min_by(lambda k: self.total.get(k, 0.0), eligible)

    def kernel_state(self, ctx: KernelContext) -> ScoreState:
        return ScoreState(key_heap(ctx), np.zeros(ctx.num_keys, dtype=np.float64))


# ---------------------------------------------------------------------------------- compiled twin
class ScoreState(NamedTuple):
    heap: Heap  # priority: the accumulated score
    total: np.ndarray


@hook
def _insert(st: ScoreState, k: int, prefetch: bool, hint: int, clock: int) -> None:
    st.heap.prio[k] = st.total[k]
    st.heap.stamp[k] = clock
    heap_push(st.heap, k)


@hook
def _access(st: ScoreState, k: int, score: float, hint: int, clock: int) -> None:
    st.total[k] += score
    st.heap.prio[k] = st.total[k]
    st.heap.stamp[k] = clock
    if score >= 0.0:  # router weights: the sum only grows
        heap_sink(st.heap, k)
    else:
        heap_update(st.heap, k)


ScoreBased.kernel = PolicyKernel(victim=heap_victim, on_insert=_insert, on_access=_access, on_evict=heap_evict)
