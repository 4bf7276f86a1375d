"""Belady (oracle): evict the expert whose next demand access is farthest in the future.

It needs the future, so it exists in the simulator only: the simulator passes the global index of
the key's next demand access as ``hint`` on every insert and access (``math.inf`` = never again).
Ties (several never used again) go to the least recently used.
"""

from __future__ import annotations

import math
from typing import Any

from offload.policies.base import Eligible, EvictionPolicy, Key


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
