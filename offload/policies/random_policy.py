"""Random eviction (seeded): a uniform choice among the eligible resident experts.

Compiled twin: the same draw (numba's ``Generator.integers`` is numpy's stream) over the same list
(resident keys layer by layer, each layer in touch order), located through per-layer counts instead
of a list of every eligible key: only the running layer can hold keys that may not go.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numba as nb
import numpy as np
from numba.np.random.generator_core import next_uint32
from numba.np.random.random_methods import buffered_bounded_lemire_uint32

from offload.policies.base import Eligible, EvictionPolicy, Key
from offload.policies.compiled import (
    Allowed,
    KernelContext,
    PolicyKernel,
    Touch,
    allowed,
    hook,
    touch_access,
    touch_evict,
    touch_insert,
    touch_lists,
)


class RandomEviction(EvictionPolicy):
    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed
        super().__init__()

    def bind(self, num_layers: int, num_experts: int) -> None:
        super().bind(num_layers, num_experts)
        self.rng = np.random.default_rng(self.seed)

    def victim(self, eligible: Eligible, *, for_prefetch: bool = False) -> Key | None:
        keys = [k for k in self.resident() if eligible(k)]
        if not keys:
            return None
        return keys[int(self.rng.integers(len(keys)))]

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, "seed": self.seed}

    def kernel_state(self, ctx: KernelContext) -> RandomState:
        return RandomState(touch_lists(ctx, per_layer=True), np.zeros(ctx.num_layers, dtype=np.int64),
                           np.zeros(1, dtype=np.int64), np.random.default_rng(self.seed), ctx.per_layer)


# ---------------------------------------------------------------------------------- compiled twin
class RandomState(NamedTuple):
    touch: Touch  # one list per layer: resident() order
    count: np.ndarray  # resident keys per layer
    here: np.ndarray  # [execution point]
    rng: np.random.Generator
    per_layer: bool


@hook
def _layer_start(st: RandomState, layer: int) -> None:
    st.here[0] = layer


@hook
def _insert(st: RandomState, k: int, prefetch: bool, hint: int, clock: int) -> None:
    touch_insert(st.touch, k, prefetch, hint, clock)
    st.count[st.touch.lst[k]] += 1


@hook
def _access(st: RandomState, k: int, score: float, hint: int, clock: int) -> None:
    touch_access(st.touch, k, score, hint, clock)


@hook
def _evict(st: RandomState, k: int) -> None:
    touch_evict(st.touch, k)
    st.count[st.touch.lst[k]] -= 1


@hook
def _draw(rng: np.random.Generator, n: int) -> int:
    """``rng.integers(0, n)`` for 1 <= n <= 2**32, the steps of numba's (numpy's) own ``integers``
    without the one-element array it allocates (the kernel runs without reference counting)."""
    high = n - 1
    if high == 0:
        return 0
    if high == 0xFFFFFFFF:
        return nb.int64(next_uint32(rng.bit_generator))
    return nb.int64(buffered_bounded_lemire_uint32(rng.bit_generator, high))


@hook
def _victim(st: RandomState, el: Allowed, for_prefetch: bool) -> int:
    lo, hi = (el.part, el.part + 1) if st.per_layer else (0, st.count.shape[0])
    here = st.here[0]
    t = st.touch
    n_here = 0  # see Allowed: only the running layer can hold keys that may not go
    if lo <= here < hi:
        k = t.head[here]
        while k >= 0:
            n_here += allowed(el, k)
            k = t.nxt[k]
    others = el.mode != 1  # mode 1 allows nothing outside the running layer
    total = n_here
    if others:
        for layer in range(lo, hi):
            if layer != here:
                total += st.count[layer]
    if total == 0:
        return -1
    i = _draw(st.rng, total)
    for layer in range(lo, hi):  # the i-th allowed key in resident() order: layer by layer, touch order
        if layer == here:
            if i < n_here:
                k = t.head[here]
                while True:
                    if allowed(el, k):
                        if i == 0:
                            return k
                        i -= 1
                    k = t.nxt[k]
            i -= n_here
        elif others:
            if i < st.count[layer]:
                k = t.head[layer]
                for _ in range(i):
                    k = t.nxt[k]
                return k
            i -= st.count[layer]
    return -1


RandomEviction.kernel = PolicyKernel(victim=_victim, on_insert=_insert, on_access=_access, on_evict=_evict,
                                     on_layer_start=_layer_start)
