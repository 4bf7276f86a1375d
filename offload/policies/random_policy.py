"""Random eviction (seeded): a uniform choice among the eligible resident experts."""

from __future__ import annotations

from typing import Any

import numpy as np

from offload.policies.base import Eligible, EvictionPolicy, Key


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
