"""Least-Stale (SpecMD): evict experts that were not needed in this pass before those that were.

A resident expert is **current** when it was accessed, inserted or forecast (``on_predicted``) in
this pass, and **stale** when that last happened in an earlier pass. Victims are taken in this order:

1. stale experts of layers left of the execution point (layers already run in this pass: they will
   not be needed again before the next pass),
2. the other stale experts,
3. current experts left of the execution point (already used in this pass),
4. the remaining current experts (only so the cache never runs out of room).

Choices where the paper is ambiguous, all constructor parameters:

- ``layer_order``: inside each class, layers are visited ``"fifo"`` (default; ascending layer
  position, the order experts entered the queue during a pass, as the paper's "FIFO by layer
  position") or ``"reverse"`` (descending: the layer whose next use is farthest goes first).
- ties inside one layer: the expert touched least recently goes first (FIFO of touches). Because a
  touch always makes an expert current, the stale experts of a layer are a prefix of that layer's
  touch order, which makes every eviction O(layers) (the numba kernel exploits the same fact).
- ``left_first``: classes 1/2 (and 3/4) split by the execution point (default True, the paper's
  "only stale left-layer experts should go in the normal case"); False merges them.
- ``prefill_left_is_stale``: a prefill pass runs each layer once for the whole prompt, so experts of
  layers already run can count as stale immediately (default False: prefill is a pass like any
  other).
- ``prefetch_evicts_current``: whether a *prefetch* may evict a current expert (default False: the
  paper evicts current experts only to avoid running out of memory, and a prefetch is only a
  guess, so it is dropped instead). Demand misses may always evict current experts.
"""

from __future__ import annotations

from typing import Any

from data_pipeline.errors import UserError
from offload.policies.base import PREFILL, Eligible, EvictionPolicy, Key

LAYER_ORDERS = ("fifo", "reverse")


class LeastStale(EvictionPolicy):
    name = "least_stale"

    def __init__(
        self,
        layer_order: str = "fifo",
        left_first: bool = True,
        prefill_left_is_stale: bool = False,
        prefetch_evicts_current: bool = False,
    ):
        if layer_order not in LAYER_ORDERS:
            raise UserError(f"unknown Least-Stale layer order {layer_order!r}; valid: {', '.join(LAYER_ORDERS)}")
        self.layer_order = layer_order
        self.left_first = left_first
        self.prefill_left_is_stale = prefill_left_is_stale
        self.prefetch_evicts_current = prefetch_evicts_current
        super().__init__()

    def bind(self, num_layers: int, num_experts: int) -> None:
        super().bind(num_layers, num_experts)
        self.last_pass: dict[Key, int] = {}

    def _touch(self, key: Key) -> None:
        super()._touch(key)
        self.last_pass[key] = self.pass_index

    def on_predicted(self, key: Key) -> None:
        self._touch(key)

    def on_evict(self, key: Key) -> None:
        super().on_evict(key)
        del self.last_pass[key]

    def is_stale(self, key: Key) -> bool:
        if self.prefill_left_is_stale and self.phase == PREFILL and key[0] < self.layer:
            return True
        return self.last_pass[key] < self.pass_index

    def _layers(self, lo: int, hi: int) -> range:
        return range(lo, hi) if self.layer_order == "fifo" else range(hi - 1, lo - 1, -1)

    def victim(self, eligible: Eligible, *, for_prefetch: bool = False) -> Key | None:
        L, here = self.num_layers, self.layer
        if self.left_first:
            spans = [(0, here), (here, L)]
        else:
            spans = [(0, L)]
        for want_stale in (True, False):
            if not want_stale and for_prefetch and not self.prefetch_evicts_current:
                return None
            for lo, hi in spans:
                for layer in self._layers(lo, hi):
                    for key in self.order[layer]:
                        stale = self.is_stale(key)
                        if want_stale and not stale:
                            break  # the stale experts of a layer are a prefix of its touch order
                        if stale == want_stale and eligible(key):
                            return key
        return None

    def describe(self) -> dict[str, Any]:
        return {
            "policy": self.name,
            "layer_order": self.layer_order,
            "left_first": self.left_first,
            "prefill_left_is_stale": self.prefill_left_is_stale,
            "prefetch_evicts_current": self.prefetch_evicts_current,
        }
