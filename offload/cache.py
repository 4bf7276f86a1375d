"""The expert cache: which (layer, expert) pairs are resident in device memory, and in which slot.

One class serves the trace-driven simulator and the real engine. It owns residency, slots, the
protection of the running layer and the counters; the eviction policy (``offload.policies``) only
chooses victims. Typical use from an inference loop::

    cache = ExpertCache(num_layers, num_experts, capacity_slots, make_policy("least_stale"))
    cache.begin_pass(phase)                      # each forward pass (prefill = 0, decode = 1)
    for layer in range(num_layers):
        cache.begin_layer(layer, needed)         # execution point; ``needed`` keys are protected
        for key, weight in needed_in_rank_order:
            r = cache.access(key, weight)        # r.hit; on a miss the key was inserted into r.slot
            if r.evicted: ...                    # free that device copy
        for key in forecast: cache.mark_predicted([key]) / cache.insert(key, prefetch=True)

Every public method takes a lock, so a prefetch worker thread may call :meth:`insert` while the
main thread calls :meth:`access`.

Protection: the keys ``needed`` at the running layer may not be evicted (the layer is about to use
them). If a layer needs more experts than fit (a long prompt's prefill), a key already accessed at
this layer (already computed, since experts run in rank order) goes first, and failing that any
needed key (it will miss when its turn comes). Keys passed as ``protected=`` are never evicted; if
nothing can go, :class:`CacheFullError`.

Counters: a **collision miss** is a miss on a key evicted earlier in the same pass.

Precision: every resident key remembers the precision its copy is at (``native`` unless a lower-bit
miss handler fetched it lower: offload.miss_handling); a hit is served at that precision, which the
access result reports and the policy hears (``EvictionPolicy.on_served``: LHU counts only
high-precision uses). :meth:`ExpertCache.upgrade` raises it when a full-precision copy replaces a
low-bit one (HOBBIT's cascade).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from offload.policies.base import DECODE, EvictionPolicy, Key

PARTITIONS = ("global", "per-layer")


class CacheFullError(RuntimeError):
    """Nothing may be evicted although room is needed (capacity below what one layer pins)."""


@dataclass
class CacheStats:
    """Demand-access and prefetch counters, in total and per layer."""

    num_layers: int
    accesses: np.ndarray = field(init=False)
    hits: np.ndarray = field(init=False)
    misses: np.ndarray = field(init=False)
    collision_misses: np.ndarray = field(init=False)
    evictions: int = 0
    prefetch_inserted: int = 0  # prefetches that became resident (one copy each)
    prefetch_used: int = 0  # of those, demand-accessed before being evicted
    late_prefetch_hits: int = 0  # set by the simulator: used before the copy had arrived

    def __post_init__(self) -> None:
        z = np.zeros(self.num_layers, dtype=np.int64)
        self.accesses, self.hits, self.misses, self.collision_misses = z.copy(), z.copy(), z.copy(), z.copy()

    def totals(self) -> dict[str, int]:
        return {
            "accesses": int(self.accesses.sum()),
            "hits": int(self.hits.sum()),
            "misses": int(self.misses.sum()),
            "collision_misses": int(self.collision_misses.sum()),
            "evictions": self.evictions,
            "prefetch_inserted": self.prefetch_inserted,
            "prefetch_used": self.prefetch_used,
        }


@dataclass(frozen=True)
class AccessResult:
    hit: bool
    slot: int  # device slot of the key, -1 when it was not fetched (miss with fetch=False)
    evicted: Key | None = None  # the key whose slot was reused, if any
    collision: bool = False  # a miss on a key evicted earlier in this pass
    first_use_of_prefetch: bool = False  # a hit on a prefetched key, its first demand access
    precision: str = "native"  # what the access ran at: the resident copy's (hit) or the fetched one's


@dataclass(frozen=True)
class InsertResult:
    slot: int
    evicted: Key | None


class ExpertCache:
    """Residency of (layer, expert) keys in ``capacity`` slots, global or partitioned per layer."""

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        capacity: int,
        policy: EvictionPolicy,
        *,
        partition: str = "global",
    ):
        if partition not in PARTITIONS:
            raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r}")
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.capacity = int(capacity)
        self.partition = partition
        self.layer_capacity = split_capacity(self.capacity, num_layers) if partition == "per-layer" else None
        if self.layer_capacity is not None and min(self.layer_capacity) <= 0:
            raise ValueError(f"a per-layer cache needs at least one slot per layer ({num_layers}), got {capacity}")
        self.policy = policy
        policy.bind(num_layers, num_experts)
        self.stats = CacheStats(num_layers)
        self._lock = threading.RLock()
        self._slot: dict[Key, int] = {}
        self._precision: dict[Key, str] = {}  # resident keys whose copy is not native
        if self.layer_capacity is None:
            self._free: list[list[int]] = [list(range(self.capacity - 1, -1, -1))]
        else:
            starts = np.concatenate([[0], np.cumsum(self.layer_capacity)])
            self._free = [list(range(int(starts[i + 1]) - 1, int(starts[i]) - 1, -1)) for i in range(num_layers)]
        self._pass_index = -1
        self._layer = 0
        self._pinned: frozenset[Key] = frozenset()
        self._served: set[Key] = set()
        self._evicted_in_pass: set[Key] = set()
        self._unused_prefetch: set[Key] = set()

    # ------------------------------------------------------------------ queries
    def __contains__(self, key: Key) -> bool:
        return key in self._slot

    def __len__(self) -> int:
        return len(self._slot)

    def slot_of(self, key: Key) -> int | None:
        return self._slot.get(key)

    def precision_of(self, key: Key) -> str:
        """The precision of resident ``key``'s copy."""
        if key not in self._slot:
            raise KeyError(f"{key} is not resident")
        return self._precision.get(key, "native")

    def resident(self) -> list[Key]:
        with self._lock:
            return list(self._slot)

    @property
    def pass_index(self) -> int:
        return self._pass_index

    @property
    def layer(self) -> int:
        return self._layer

    # ------------------------------------------------------------------ execution progress
    def begin_pass(self, phase: int = DECODE) -> None:
        """A new forward pass starts (phase 0 = prefill, 1 = decode)."""
        with self._lock:
            self._pass_index += 1
            self._layer = 0
            self._pinned = frozenset()
            self._served = set()
            self._evicted_in_pass = set()
            self.policy.on_pass_start(self._pass_index, phase)

    def begin_layer(self, layer: int, needed: Iterable[Key] = ()) -> None:
        """The execution point moves to ``layer``; ``needed`` keys are protected until the next layer."""
        with self._lock:
            self._layer = layer
            self._pinned = frozenset(needed)
            self._served = set()
            self.policy.on_layer_start(layer)

    # ------------------------------------------------------------------ demand path
    def access(
        self,
        key: Key,
        score: float = 0.0,
        *,
        fetch: bool = True,
        hint: Any = None,
        protected: Iterable[Key] = (),
        precision: str = "native",
    ) -> AccessResult:
        """A demand access of ``key`` with router weight ``score``; on a miss, fetch it at ``precision``
        unless told not to (a hit runs at the resident copy's precision)."""
        with self._lock:
            layer = key[0]
            self.stats.accesses[layer] += 1
            self._served.add(key)
            slot = self._slot.get(key)
            if slot is not None:
                self.stats.hits[layer] += 1
                first = key in self._unused_prefetch
                if first:
                    self._unused_prefetch.discard(key)
                    self.stats.prefetch_used += 1
                served = self._precision.get(key, "native")
                self.policy.on_access(key, score=score, hint=hint)
                self.policy.on_served(key, served)
                return AccessResult(True, slot, first_use_of_prefetch=first, precision=served)
            self.stats.misses[layer] += 1
            collision = key in self._evicted_in_pass
            if collision:
                self.stats.collision_misses[layer] += 1
            if not fetch:
                return AccessResult(False, -1, collision=collision)
            ins = self._insert(key, prefetch=False, hint=hint, protected=frozenset(protected))
            assert ins is not None  # a demand insert either succeeds or raises CacheFullError
            if precision != "native":
                self._precision[key] = precision
            self.policy.on_access(key, score=score, hint=hint)
            self.policy.on_served(key, precision)
            return AccessResult(False, ins.slot, ins.evicted, collision, precision=precision)

    def use(self, key: Key, score: float = 0.0, *, hint: Any = None) -> None:
        """A resident key runs in place of another (substitution): the policy sees a use, the
        counters do not (the substituted access was already counted as a miss)."""
        with self._lock:
            if key not in self._slot:
                raise KeyError(f"{key} is not resident")
            self.policy.on_access(key, score=score, hint=hint)
            self.policy.on_served(key, self._precision.get(key, "native"))

    def upgrade(self, key: Key, precision: str = "native") -> None:
        """Resident ``key``'s copy was replaced by one at ``precision`` (a cascade's full-precision copy)."""
        with self._lock:
            if key not in self._slot:
                raise KeyError(f"{key} is not resident")
            if precision == "native":
                self._precision.pop(key, None)
            else:
                self._precision[key] = precision

    # ------------------------------------------------------------------ prefetch path
    def insert(
        self, key: Key, *, prefetch: bool = True, hint: Any = None, protected: Iterable[Key] = (),
        victim: Key | None = None,
    ) -> InsertResult | None:
        """Make ``key`` resident without a demand access (a prefetch). None when the policy refused
        to evict for it, or the key is already resident. ``victim``: the key to evict, as returned by
        :meth:`choose_victim` just before (so a policy is asked once per decision)."""
        with self._lock:
            if key in self._slot:
                return None
            return self._insert(key, prefetch=prefetch, hint=hint, protected=frozenset(protected), victim=victim)

    def full_for(self, layer: int) -> bool:
        """Whether inserting a key of ``layer`` needs an eviction."""
        with self._lock:
            return self._full(layer)

    def choose_victim(self, layer: int, *, prefetch: bool = True, protected: Iterable[Key] = ()) -> Key | bool:
        """The key the policy would evict to insert a key of ``layer`` (without evicting it); False
        when it refuses (a prefetch the policy will not evict for)."""
        with self._lock:
            victim = self._choose_victim(layer, prefetch, frozenset(protected))
            return False if victim is None else victim

    def mark_predicted(self, keys: Iterable[Key]) -> None:
        """Forecast for this pass: resident keys become *current* (Least-Stale); others are ignored."""
        with self._lock:
            for key in keys:
                if key in self._slot:
                    self.policy.on_predicted(key)

    def forecast(self, layer: int, experts: Any, p_use: Any, rest: float) -> None:
        """The whole ranked forecast for ``layer`` in this pass: P(use) of each listed expert and of
        every unlisted one (``rest``), for policies that weigh it (``EvictionPolicy.on_forecast``)."""
        with self._lock:
            self.policy.on_forecast(layer, experts, p_use, rest)

    def reuse_probability(self, key: Key) -> float | None:
        """The policy's estimate that resident ``key`` is needed at its next opportunity (None: no idea)."""
        with self._lock:
            return self.policy.reuse_probability(key)

    def advise(self, key: Key, info: Any) -> None:
        """Hand side information about a resident key to the policy (see policies/base.py)."""
        with self._lock:
            if key in self._slot:
                self.policy.on_advice(key, info)

    def evict(self, key: Key, *, cancelled: bool = False) -> None:
        """Remove ``key`` explicitly. ``cancelled``: a prefetch withdrawn before its copy started (its
        slot is given back; it is not counted as an eviction)."""
        with self._lock:
            self._remove(key, counted=not cancelled)

    # ------------------------------------------------------------------ internals
    def _full(self, layer: int) -> bool:
        if self.layer_capacity is None:
            return len(self._slot) >= self.capacity
        return not self._free[layer]

    def _insert(self, key: Key, *, prefetch: bool, hint: Any, protected: frozenset[Key],
                victim: Key | None = None) -> InsertResult | None:
        layer = key[0]
        evicted = None
        if self._full(layer):
            evicted = victim if victim is not None else self._choose_victim(layer, prefetch, protected)
            if evicted is None:
                return None
            self._remove(evicted)
        free = self._free[0 if self.layer_capacity is None else layer]
        slot = free.pop()
        self._slot[key] = slot
        if prefetch:
            self.stats.prefetch_inserted += 1
            self._unused_prefetch.add(key)
        self.policy.on_insert(key, prefetch=prefetch, hint=hint)
        return InsertResult(slot, evicted)

    def _choose_victim(self, layer: int, prefetch: bool, protected: frozenset[Key]) -> Key | None:
        pinned, same_layer = self._pinned, self.layer_capacity is not None

        def eligible(k: Key) -> bool:
            return k not in pinned and k not in protected and (not same_layer or k[0] == layer)

        victim = self.policy.victim(eligible, for_prefetch=prefetch)
        if victim is None and not prefetch:
            served = self._served

            def eligible_served(k: Key) -> bool:
                return k in served and k not in protected and (not same_layer or k[0] == layer)

            victim = self.policy.victim(eligible_served, for_prefetch=False)
            if victim is None:  # nothing computed yet either: a pinned key goes (it will miss later)

                def eligible_any(k: Key) -> bool:
                    return k not in protected and (not same_layer or k[0] == layer)

                victim = self.policy.victim(eligible_any, for_prefetch=False)
            if victim is None:
                raise CacheFullError(
                    f"no expert may be evicted to make room for layer {layer} "
                    f"(capacity {self.capacity} slots is below what the running layer pins)"
                )
        return victim

    def _remove(self, key: Key, counted: bool = True) -> None:
        slot = self._slot.pop(key)
        self._precision.pop(key, None)
        self._free[0 if self.layer_capacity is None else key[0]].append(slot)
        self.policy.on_evict(key)
        if counted:
            self.stats.evictions += 1
            self._evicted_in_pass.add(key)
        else:
            self.stats.prefetch_inserted -= 1
        self._unused_prefetch.discard(key)


def split_capacity(capacity: int, num_layers: int) -> list[int]:
    """Slots per layer of a partitioned cache: as even as possible, the first layers get the remainder."""
    base, extra = divmod(int(capacity), num_layers)
    return [base + (1 if i < extra else 0) for i in range(num_layers)]
