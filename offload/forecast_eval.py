"""Held-out evaluation of eviction policies: replay every pass, count only the passes of one split part.

A reuse forecaster is fitted on the training passes of a store; its policy must be judged on
passes it never saw. The cache and the forecaster's history still run through every pass in
order (a deployed cache would have seen the earlier passes too), but hits, misses and collision
misses are tallied per split part (train/val/test), so the test numbers count only held-out
passes. The loop is the demand-fetch core of :func:`offload.simulator.simulate_reference`
(standard routing, fetch on miss, running layer protected, no prefetch), and a test checks that
its totals equal the simulator's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from offload.cache import ExpertCache
from offload.passes import NEVER, Passes
from offload.policies.base import EvictionPolicy

PARTS = ("train", "val", "test")


@dataclass
class PartCounts:
    accesses: int = 0
    hits: int = 0
    collision_misses: int = 0
    passes: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    @property
    def collision_rate(self) -> float:
        return self.collision_misses / self.accesses if self.accesses else 0.0


@dataclass
class SplitResult:
    policy: str
    capacity_slots: int
    parts: dict[str, PartCounts] = field(default_factory=lambda: {p: PartCounts() for p in PARTS})
    victim_seconds: float = 0.0  # wall time spent in the policy's victim() calls
    victims: int = 0

    @property
    def total(self) -> PartCounts:
        out = PartCounts()
        for c in self.parts.values():
            out.accesses += c.accesses
            out.hits += c.hits
            out.collision_misses += c.collision_misses
            out.passes += c.passes
        return out


def replay_split(passes: Passes, policy: EvictionPolicy, capacity_slots: int,
                 pass_part: np.ndarray | None = None, *, time_victims: bool = False,
                 progress: Callable[[int], None] | None = None) -> SplitResult:
    """Demand-fetch replay of all passes; counts per part of ``pass_part`` ((P,) 0/1/2, default all train)."""
    import time

    L, E = passes.num_layers, passes.num_experts
    cache = ExpertCache(L, E, capacity_slots, policy)
    result = SplitResult(policy.name, capacity_slots)
    if time_victims:
        inner = policy.victim

        def timed(eligible, *, for_prefetch: bool = False):
            t0 = time.perf_counter()
            key = inner(eligible, for_prefetch=for_prefetch)
            result.victim_seconds += time.perf_counter() - t0
            result.victims += 1
            return key

        policy.victim = timed  # type: ignore[method-assign]
    next_use = passes.next_use() if policy.needs_future else None
    part = np.zeros(passes.num_passes, dtype=np.int64) if pass_part is None else np.asarray(pass_part)
    for p in range(passes.num_passes):
        counts = result.parts[PARTS[int(part[p])]] if part[p] >= 0 else PartCounts()
        counts.passes += 1
        cache.begin_pass(int(passes.phase[p]))
        for layer in range(L):
            a, b = int(passes.layer_ptr[p * L + layer]), int(passes.layer_ptr[p * L + layer + 1])
            experts = passes.expert[a:b]
            cache.begin_layer(layer, [(layer, int(e)) for e in experts])
            for j in range(a, b):
                hint = None
                if next_use is not None:
                    hint = math.inf if next_use[j] >= NEVER else float(next_use[j])
                r = cache.access((layer, int(passes.expert[j])), float(passes.score[j]), hint=hint)
                counts.accesses += 1
                counts.hits += int(r.hit)
                counts.collision_misses += int(r.collision)
        if progress is not None:
            progress(p)
    return result


def gap_closed(policy_hit: float, lru_hit: float, belady_hit: float) -> float:
    """Fraction of the LRU -> Belady hit-rate gap a policy closes (nan when there is no gap)."""
    gap = belady_hit - lru_hit
    return (policy_hit - lru_hit) / gap if gap > 1e-12 else float("nan")
