"""Held-out evaluation of eviction policies: replay every pass, count only the passes of one split part.

A reuse forecaster is fitted on the training passes of a store; its policy must be judged on
passes it never saw. The cache and the forecaster's history still run through every pass in
order (a deployed cache would have seen the earlier passes too), but hits, misses and collision
misses are tallied per split part (train/val/test), so the test numbers count only held-out
passes. The loop is the simulator's: the one per-layer step (:mod:`offload.step`) with demand
fetch, standard routing, the running layer protected and no prefetch; a test checks that its totals
equal the simulator's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from core.passes import Passes
from offload.cache import ExpertCache
from offload.hardware import get_hardware
from offload.policies.base import EvictionPolicy
from offload.sim_result import PARTS
from offload.simulator import Future, Replay, SimBackend, layer_accesses
from offload.step import LayerStep


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
    """Demand-fetch replay of all passes through the one per-layer step (:mod:`offload.step`); counts
    per part of ``pass_part`` ((P,) 0/1/2, default all train)."""
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
    replay = Replay(None, passes, None, get_hardware("a100-5gbs"), capacity_slots, np.ones(L), 2.0)
    step = LayerStep(cache, SimBackend(replay))
    future = Future(passes) if policy.needs_future else None
    part = np.zeros(passes.num_passes, dtype=np.int64) if pass_part is None else np.asarray(pass_part)
    ptok = passes.pass_tokens
    for p in range(passes.num_passes):
        counts = result.parts[PARTS[int(part[p])]] if part[p] >= 0 else PartCounts()
        before = step.counters.snapshot()
        step.begin_pass(int(passes.phase[p]))
        for layer in range(L):
            step.run_layer(layer, layer_accesses(passes, p, layer, future), int(ptok[p]))
        delta = step.counters.minus(before)
        counts.passes += 1
        counts.accesses += delta.accesses
        counts.hits += delta.hits
        counts.collision_misses += delta.collision_misses
        if progress is not None:
            progress(p)
    return result


def gap_closed(policy_hit: float, lru_hit: float, belady_hit: float) -> float:
    """Fraction of the LRU -> Belady hit-rate gap a policy closes (nan when there is no gap)."""
    gap = belady_hit - lru_hit
    return (policy_hit - lru_hit) / gap if gap > 1e-12 else float("nan")
