"""Score-based eviction (Zhu et al.): evict the expert with the lowest accumulated gate score.

Each demand access adds the router weight the expert received in that pass (summed over the pass's
tokens); the sum is kept over the whole run. Ties: least recently used.
"""

from __future__ import annotations

from typing import Any

from offload.policies.base import Eligible, EvictionPolicy, Key


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
