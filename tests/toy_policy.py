"""A toy eviction policy written the way every policy is: its Python class and its compiled twin in
one file. MRU evicts the most recently touched expert (the worst choice on a layer-cyclic stream,
which makes it a good toy: nothing else does it)."""

from __future__ import annotations

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


class MRU(EvictionPolicy):
    name = "toy_mru"

    def victim(self, eligible: Eligible, *, for_prefetch: bool = False) -> Key | None:
        return self._min_by(lambda k: -self.stamp[k], eligible)

    def kernel_state(self, ctx: KernelContext) -> Touch:
        return touch_lists(ctx, per_layer=ctx.per_layer)


@hook
def _victim(st: Touch, el: Allowed, for_prefetch: bool) -> int:
    k = st.tail[el.part]  # the newest key of the partition, then older ones
    while k >= 0:
        if allowed(el, k):
            return k
        k = st.prv[k]
    return -1


MRU.kernel = PolicyKernel(victim=_victim, on_insert=touch_insert, on_access=touch_access, on_evict=touch_evict)
