"""FLD (HOBBIT, Farthest Layer Distance): evict the expert whose layer is farthest from the layer now running.

``cyclic=True`` (default) measures the distance forward in execution order, wrapping into the next
pass: from execution point ``l`` the layer ``j`` runs again after ``(j - l) mod L`` layers, so the
expert of layer ``l-1`` goes first. ``cyclic=False`` uses ``|j - l|``. Ties: least recently used.

Compiled twin: one touch-ordered list per layer; the layers are visited from the farthest, and the
first with an eligible key gives the victim (its least recently used one; with ``|j - l|`` the two
layers at one distance compare their candidates' stamps): O(L) instead of a scan of the cache.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from offload.policies.base import Eligible, EvictionPolicy, Key
from offload.policies.compiled import (
    Allowed,
    KernelContext,
    PolicyKernel,
    Touch,
    hook,
    touch_access,
    touch_evict,
    touch_first,
    touch_insert,
    touch_lists,
)


class FLD(EvictionPolicy):
    name = "fld"

    def __init__(self, cyclic: bool = True):
        self.cyclic = cyclic
        super().__init__()

    def distance(self, layer: int) -> int:
        if self.cyclic:
            return (layer - self.layer) % self.num_layers
        return abs(layer - self.layer)

    def victim(self, eligible: Eligible, *, for_prefetch: bool = False) -> Key | None:
        return self._min_by(lambda k: -self.distance(k[0]), eligible)

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, "cyclic": self.cyclic}

    def kernel_state(self, ctx: KernelContext) -> FLDState:
        return FLDState(touch_lists(ctx, per_layer=True), np.zeros(1, dtype=np.int64), self.cyclic, ctx.per_layer)


# ---------------------------------------------------------------------------------- compiled twin
class FLDState(NamedTuple):
    touch: Touch  # one list per layer
    here: np.ndarray  # [execution point]
    cyclic: bool
    per_layer: bool


@hook
def _pass_start(st: FLDState, pass_index: int, phase: int) -> None:
    st.here[0] = 0


@hook
def _layer_start(st: FLDState, layer: int) -> None:
    st.here[0] = layer


@hook
def _insert(st: FLDState, k: int, prefetch: bool, hint: int, clock: int) -> None:
    touch_insert(st.touch, k, prefetch, hint, clock)


@hook
def _access(st: FLDState, k: int, score: float, hint: int, clock: int) -> None:
    touch_access(st.touch, k, score, hint, clock)


@hook
def _evict(st: FLDState, k: int) -> None:
    touch_evict(st.touch, k)


@hook
def _victim(st: FLDState, el: Allowed, for_prefetch: bool) -> int:
    t = st.touch
    if st.per_layer:
        return touch_first(t, el.part, el)
    L = t.head.shape[0]
    here = st.here[0]
    if st.cyclic:  # distance (j - here) mod L, from L-1 (layer here-1) down to 0 (layer here)
        for d in range(L - 1, -1, -1):
            j = here + d
            if j >= L:
                j -= L
            k = touch_first(t, j, el)
            if k >= 0:
                return k
        return -1
    for d in range(max(here, L - 1 - here), -1, -1):  # |j - here|: layers here-d and here+d
        best = -1
        if here - d >= 0:
            best = touch_first(t, here - d, el)
        if d > 0 and here + d < L:
            k = touch_first(t, here + d, el)
            if k >= 0 and (best < 0 or t.stamp[k] < t.stamp[best]):
                best = k
        if best >= 0:
            return best
    return -1


FLD.kernel = PolicyKernel(victim=_victim, on_insert=_insert, on_access=_access, on_evict=_evict,
                          on_pass_start=_pass_start, on_layer_start=_layer_start)
