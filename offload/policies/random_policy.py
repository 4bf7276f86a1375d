"""Random eviction (seeded): a uniform choice among the eligible resident experts.

The candidates are listed layer by layer, each layer's resident keys in slot order: appended on
insert, and on eviction the layer's last key moves into the freed slot. That order is arbitrary (any
order gives a uniform choice) but it is the same in both paths, and it lets the compiled twin find
the i-th candidate without a walk: the same draw (numba's ``Generator.integers`` is numpy's stream),
per-layer counts for the layers where every key may go, and a scan of the running layer only (only
it can hold keys that may not go).
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
    allowed,
    hook,
    nonneg,
)


class RandomEviction(EvictionPolicy):
    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed
        super().__init__()

    def bind(self, num_layers: int, num_experts: int) -> None:
        super().bind(num_layers, num_experts)
        self.rng = np.random.default_rng(self.seed)
        self.members: list[list[Key]] = [[] for _ in range(num_layers)]  # per layer, in slot order
        self.slot: dict[Key, int] = {}

    def on_insert(self, key: Key, *, prefetch: bool, hint: Any = None) -> None:
        super().on_insert(key, prefetch=prefetch, hint=hint)
        members = self.members[key[0]]
        self.slot[key] = len(members)
        members.append(key)

    def on_evict(self, key: Key) -> None:
        super().on_evict(key)
        members = self.members[key[0]]
        i = self.slot.pop(key)
        last = members.pop()
        if last != key:  # the layer's last key fills the freed slot
            members[i] = last
            self.slot[last] = i

    def victim(self, eligible: Eligible, *, for_prefetch: bool = False) -> Key | None:
        keys = [k for members in self.members for k in members if eligible(k)]
        if not keys:
            return None
        return keys[int(self.rng.integers(len(keys)))]

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, "seed": self.seed}

    def kernel_state(self, ctx: KernelContext) -> RandomState:
        L, E = ctx.num_layers, ctx.num_experts
        return RandomState(np.zeros((L, E), dtype=np.int64), np.full(L * E, -1, dtype=np.int64),
                           np.zeros(L, dtype=np.int64), np.zeros(1, dtype=np.int64),
                           np.random.default_rng(self.seed), ctx.per_layer)


# ---------------------------------------------------------------------------------- compiled twin
class RandomState(NamedTuple):
    members: np.ndarray  # (L, E): members[l, :count[l]] = layer l's resident keys in slot order
    slot: np.ndarray  # (L * E,): a resident key's place in its layer's row
    count: np.ndarray  # resident keys per layer
    here: np.ndarray  # [execution point]
    rng: np.random.Generator
    per_layer: bool


@hook
def _layer_start(st: RandomState, layer: int) -> None:
    st.here[0] = layer


@hook
def _insert(st: RandomState, k: int, prefetch: bool, hint: int, clock: int) -> None:
    layer = nonneg(k // st.members.shape[1])
    n = st.count[layer]
    st.members[layer, n] = k
    st.slot[k] = n
    st.count[layer] = n + 1


@hook
def _evict(st: RandomState, k: int) -> None:
    layer = nonneg(k // st.members.shape[1])
    n = st.count[layer] - 1
    i = nonneg(st.slot[k])
    last = nonneg(st.members[layer, n])
    st.members[layer, i] = last
    st.slot[last] = i
    st.slot[k] = -1
    st.count[layer] = n


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
    n_here = 0  # see Allowed: only the running layer can hold keys that may not go
    if lo <= here < hi:
        for j in range(st.count[here]):
            n_here += allowed(el, nonneg(st.members[here, j]))
    others = el.mode != 1  # mode 1 allows nothing outside the running layer
    total = n_here
    if others:
        for layer in range(lo, hi):
            if layer != here:
                total += st.count[layer]
    if total == 0:
        return -1
    i = _draw(st.rng, total)
    for layer in range(lo, hi):  # the i-th allowed key: layer by layer, slot order
        if layer == here:
            if i < n_here:
                for j in range(st.count[here]):
                    k = nonneg(st.members[here, j])
                    if allowed(el, k):
                        if i == 0:
                            return k
                        i -= 1
            i -= n_here
        elif others:
            if i < st.count[layer]:
                return nonneg(st.members[layer, i])
            i -= st.count[layer]
    return -1


RandomEviction.kernel = PolicyKernel(victim=_victim, on_insert=_insert, on_evict=_evict, on_layer_start=_layer_start)
