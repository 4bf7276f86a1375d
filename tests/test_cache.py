"""ExpertCache mechanics: slots, protection of the running layer, counters, partitions, prefetch."""

from __future__ import annotations

import pytest

from core.errors import UserError
from offload.cache import CacheFullError, ExpertCache, split_capacity
from offload.policies import LRU, LeastStale, make_policy
from tests.cache_replay import replay


def test_lru_hand_trace_counts_and_collisions():
    cache = ExpertCache(2, 4, 3, LRU())
    events = replay(cache, [[[0, 1], [0, 1]], [[0, 1], [0, 1]]])
    assert [e[2] for e in events] == [False, False, False, False, False, True, False, True]
    # pass 0: (1,1) evicts (0,0); pass 1: (0,0) evicts (1,0) since (0,1) is pinned, then (1,0) evicts (0,0)
    assert [e[3] for e in events if e[3]] == [(0, 0), (1, 0), (0, 0)]
    t = cache.stats.totals()
    assert (t["accesses"], t["hits"], t["misses"], t["collision_misses"]) == (8, 2, 6, 1)
    assert cache.stats.collision_misses.tolist() == [0, 1]


def test_slots_are_reused_and_unique():
    cache = ExpertCache(2, 8, 3, LRU())
    replay(cache, [[[0, 1, 2], [3, 4]], [[5, 6], [7, 0]]])
    slots = [cache.slot_of(k) for k in cache.resident()]
    assert len(cache) == 3 and sorted(slots) == [0, 1, 2]


def test_protection_keeps_running_layer_and_falls_back_to_served():
    cache = ExpertCache(1, 8, 2, LRU())
    cache.begin_pass()
    cache.begin_layer(0, [(0, 0), (0, 1), (0, 2)])  # needs more than fits: a prefill layer
    cache.access((0, 0))
    cache.access((0, 1))
    r = cache.access((0, 2))  # nothing unpinned: evict an already computed one (LRU among served)
    assert r.evicted == (0, 0)
    cache.begin_layer(0, [(0, 3)])
    with pytest.raises(CacheFullError):
        cache.insert((0, 4), prefetch=False, protected=[(0, 1), (0, 2)])


def test_miss_without_fetch_counts_but_does_not_insert():
    cache = ExpertCache(1, 4, 2, LRU())
    cache.begin_pass()
    cache.begin_layer(0, [(0, 1)])
    r = cache.access((0, 1), fetch=False)
    assert not r.hit and r.slot == -1 and (0, 1) not in cache
    assert cache.stats.totals()["misses"] == 1


def test_prefetch_used_and_wasted_counts():
    cache = ExpertCache(2, 4, 2, LRU())
    cache.begin_pass()
    cache.begin_layer(0, [(0, 0)])
    cache.access((0, 0))
    assert cache.insert((1, 2)) is not None
    assert cache.insert((1, 2)) is None  # already resident
    cache.begin_layer(1, [(1, 2)])
    r = cache.access((1, 2))
    assert r.hit and r.first_use_of_prefetch
    assert cache.stats.prefetch_inserted == 1 and cache.stats.prefetch_used == 1


def test_per_layer_partition_evicts_only_inside_the_layer():
    assert split_capacity(7, 3) == [3, 2, 2]
    cache = ExpertCache(2, 8, 4, LRU(), partition="per-layer")
    events = replay(cache, [[[0, 1], [0]], [[2], [1]]])
    # layer 0 has 2 slots: (0,2) evicts (0,0) (the LRU of layer 0) although (1,0) is older overall
    assert [e[3] for e in events if e[3]] == [(0, 0)]
    assert {k[0] for k in cache.resident()}.issuperset({0, 1})


def test_least_stale_refuses_to_evict_current_for_a_prefetch():
    cache = ExpertCache(2, 4, 2, LeastStale(prefetch_evicts_current=False))
    cache.begin_pass()
    cache.begin_layer(0, [(0, 0), (0, 1)])
    cache.access((0, 0))
    cache.access((0, 1))
    assert cache.insert((1, 3)) is None  # both resident experts are current: the guess is dropped
    cache2 = ExpertCache(2, 4, 2, LeastStale(prefetch_evicts_current=True))
    cache2.begin_pass()
    cache2.begin_layer(0, [(0, 0)])
    cache2.access((0, 0))
    cache2.access((0, 1))
    cache2.begin_layer(1, [])
    assert cache2.insert((1, 3)).evicted == (0, 0)


def test_unknown_policy_lists_valid_names():
    with pytest.raises(UserError, match="least_stale.*lru"):
        make_policy("nope")
