"""Lower-bit expert copies in the one per-layer step: the link's upgrade tier, fetch-lowest-bit,
fetch-priority and HOBBIT's precision cascade, on hand-timed traces (no model: offload/precision.py
sizes the copies)."""

from __future__ import annotations

import numpy as np
import pytest

from core.errors import UserError
from core.passes import passes_from_lists
from offload.cache import ExpertCache
from offload.hardware import get_hardware
from offload.link import DEMAND, PREFETCH, UPGRADE, SimLink
from offload.miss_handling import MissHandling, importance
from offload.policies import make_policy
from offload.precision import byte_ratios, moe_expert_shapes, precision_ladder
from offload.simulator import Replay, SimBackend, SimConfig, simulate_reference
from offload.step import Access, LayerStep

MS, US = 1e-3, 1e-6
# 1 MB copies take 1 ms; a layer's non-expert part 10 us; experts, dequantization and on-device copies
# take a few ns (HBM 1 PB/s, no launch cost), so the hand timings below are the link's
HW = "a100-5gbs:link_gbps=1,tflops=1e9,hbm_gbps=1e6,layer_us=10,token_us=0,expert_us=0,kernel_us=0"
RATIO = {"native": 1.0, "int8": 0.5, "int4": 0.25, "int2": 0.125}  # hand-picked: 1 MB, 500, 250, 125 kB


def _step(num_layers: int, capacity: int, miss: str, *, policy: str = "lru", precisions: str = "native,int2",
          ratio: dict[str, float] | None = None) -> LayerStep:
    ps = passes_from_lists([[[0]] * num_layers], num_experts=8)
    replay = Replay(None, ps, None, get_hardware(HW), capacity, np.full(num_layers, 1e6), 2.0,
                    shapes=moe_expert_shapes(128, 64, "float32"), link_ratio=ratio or RATIO)
    cache = ExpertCache(num_layers, 8, capacity, make_policy(policy))
    return LayerStep(cache, SimBackend(replay), miss=MissHandling(miss, precisions=precisions), depth=8)


def _decode(step: LayerStep, layers: list[list[int]]) -> None:
    step.begin_pass(1)
    for layer, experts in enumerate(layers):
        step.run_layer(layer, [Access(e, best_rank=r) for r, e in enumerate(experts)], 1)


def test_link_runs_an_upgrade_only_when_no_demand_or_prefetch_wants_it():
    """1 kB copies take 1 ms. u starts at once on the idle link; p waits for it; an upgrade u2 queued
    before prefetch p2 still goes after it, and demand d goes ahead of both."""
    link = SimLink(1e6)
    u = link.submit("u", 1e3, UPGRADE, 0.0)
    p = link.submit("p", 1e3, PREFETCH, 0.5 * MS)
    u2 = link.submit("u2", 1e3, UPGRADE, 0.5 * MS)
    p2 = link.submit("p2", 1e3, PREFETCH, 0.7 * MS)
    assert link.started(u, 0.7 * MS) and link.free_at(0.7 * MS) == pytest.approx(3 * MS)  # u2 is not ahead of a prefetch
    d = link.submit("d", 1e3, DEMAND, 1.5 * MS)
    assert [(c.start, c.arrival) for c in (u, p, d)] == [(0.0, pytest.approx(1 * MS)),
                                                        (pytest.approx(1 * MS), pytest.approx(2 * MS)),
                                                        (pytest.approx(2 * MS), pytest.approx(3 * MS))]
    assert not link.started(u2, 3.5 * MS) and p2.start == pytest.approx(3 * MS)
    u3 = link.submit("u3", 1e3, UPGRADE, 3.5 * MS)
    assert link.cancel(u3, 3.5 * MS) and link.queued(3.5 * MS) == 1  # u2 waits; u3 moves no bytes
    assert link.arrived(u2, 5 * MS) and u2.start == pytest.approx(4 * MS) and link.bytes_moved == 5e3


def test_cascade_serves_a_miss_at_low_precision_and_replaces_it_by_the_full_copy_exactly_once():
    """Layer 0 misses expert 0 at t = 10 us: its int2 copy (125 kB) arrives at 135, and its upgrade (1 MB)
    starts as soon as the link is free: 135 -> 1135. Layer 1's miss at 145 waits behind the upgrade on the
    link (1135 -> 1260); its own upgrade follows (1260 -> 2260). Pass k >= 1 starts at 1260 + 20 (k - 1) us
    and its layer 1 at 1260 + 20 k: expert 0 is served at full precision from pass 1 on, expert 1 from
    pass 50 on (2260); each upgrade is applied once and the cache forgets it."""
    step = _step(2, 4, "precision-cascade")
    _decode(step, [[0], [1]])
    c, cache = step.counters, step.cache
    assert step.backend.now() == pytest.approx(1260 * US, abs=0.1 * US)
    assert (c.misses, c.upgrades_issued, c.upgrades, c.served_int2, c.dequantized) == (2, 2, 0, 2, 2)
    assert cache.precision_of((0, 0)) == cache.precision_of((1, 1)) == "int2"
    passes = 0
    while step.counters.upgrades < 2:
        _decode(step, [[0], [1]])
        passes += 1
    assert passes == 50
    _decode(step, [[0], [1]])
    assert cache.precision_of((0, 0)) == cache.precision_of((1, 1)) == "native"
    assert (c.upgrades_issued, c.upgrades, c.upgrades_cancelled, c.dequantized) == (2, 2, 0, 2)
    assert (c.hits_native, c.hits_int2) == (51 + 2, 49)  # passes 1-51: layer 0 native; layer 1 from pass 50
    assert c.served_int2 == 2 + 49 and c.hits == c.hits_native + c.hits_int2
    assert c.demand_bytes == 2 * 125e3 and c.upgrade_bytes == 2e6 and step.backend.link.copies == 4
    assert c.bytes_moved == c.demand_bytes + c.upgrade_bytes and not step._upgrades


def test_an_evicted_expert_takes_its_queued_upgrade_with_it():
    """Layer 0 misses experts 0 and 1 (int2: 10 -> 135 -> 260); their upgrades queue, 0's starts at 260.
    Layer 1's two misses evict both (LRU): 0's upgrade is on the link (moved for nothing), 1's is still
    queued and is withdrawn without moving a byte. Nothing is ever applied to a slot that changed hands."""
    step = _step(2, 2, "precision-cascade")
    _decode(step, [[0, 1], [2, 3]])
    c = step.counters
    assert (c.upgrades_issued, c.upgrades_cancelled, c.upgrades) == (4, 1, 0)
    assert c.upgrade_bytes == 3e6  # 0's (moved), and 2's and 3's (queued behind the demand copies)
    assert set(step._upgrades) == {(1, 2), (1, 3)}
    for _ in range(200):  # later passes only hit layer 1's 2 and 3; 0's stale upgrade never lands
        _decode(step, [[], [2, 3]])
    assert (c.upgrades, c.misses, c.upgrades_cancelled) == (2, 4, 1)
    assert {k: step.cache.precision_of(k) for k in step.cache.resident()} == {(1, 2): "native", (1, 3): "native"}


def test_fetch_priority_bands_follow_the_router_rank():
    """Eight accesses (top-8): importance (i + 0.5) / 8. The top 40 % at full precision, then int8, int4,
    int2 bands of 20 % each; a band not held falls back to the next lower precision held."""
    full = MissHandling("fetch-priority")
    assert [full.precision(importance(i, 8)) for i in range(8)] == [
        "native", "native", "native", "int8", "int8", "int4", "int2", "int2"]
    assert [full.precision(importance(i, 4)) for i in range(4)] == ["native", "native", "int4", "int2"]
    int8_int2 = MissHandling("fetch-priority", precisions="native,int8,int2")
    assert [int8_int2.precision(importance(i, 8)) for i in range(8)] == [
        "native", "native", "native", "int8", "int8", "int2", "int2", "int2"]
    only_int8 = MissHandling("fetch-priority", precisions="int8")
    assert [only_int8.precision(importance(i, 4)) for i in range(4)] == ["native", "native", "int8", "int8"]
    step = _step(1, 8, "fetch-priority", precisions="native,int8,int4,int2")
    _decode(step, [list(range(8))])
    c = step.counters
    assert c.by_precision("served") == {"native": 3, "int8": 2, "int4": 1, "int2": 2}
    assert c.demand_bytes == pytest.approx(1e6 * (3 + 2 * 0.5 + 0.25 + 2 * 0.125))
    assert c.dequantized == 5 and c.upgrades_issued == 0


def test_lowest_bit_copies_fewer_bytes_and_is_faster_on_a_copy_bound_link():
    """Random decode passes, no prefetch: every miss moves 1 MB under fetch and an int2 copy's real share
    of it under fetch-lowest-bit (the tiny model's fp32 shapes: 7.8 %), dequantized once at its run."""
    rng = np.random.default_rng(0)
    passes = [[list(rng.choice(8, size=2, replace=False)) for _ in range(3)] for _ in range(30)]
    ps = passes_from_lists(passes, 8, top_k=2)
    shapes = moe_expert_shapes(128, 64, "float32")
    ratio = byte_ratios(shapes)
    out = {}
    for miss in ("fetch", "fetch-lowest-bit"):
        replay = Replay(None, ps, None, get_hardware(HW), 6, np.full(3, 1e6), 4.0, shapes=shapes, link_ratio=ratio)
        out[miss] = simulate_reference(replay, SimConfig(policy="lru", capacity="6", miss=miss))
    fetch, low = out["fetch"], out["fetch-lowest-bit"]
    assert fetch["misses"] == low["misses"] > 0  # the same decisions, cheaper copies
    assert low["demand_bytes"] == pytest.approx(fetch["demand_bytes"] * ratio["int2"])
    assert ratio["int2"] == pytest.approx((24576 / 4 + 384 * 4) / (24576 * 4))
    assert low["dequantized"] == low["misses"] and fetch["dequantized"] == 0
    assert low["served_by_precision"]["int2"] == low["accesses"] and low["hits_by_precision"]["int2"] == low["hits"] > 0
    assert fetch["hits_by_precision"]["native"] == fetch["hits"]
    assert low["tpot_s"] < 0.2 * fetch["tpot_s"]


def test_lower_bit_modes_refuse_a_ladder_without_a_low_precision():
    with pytest.raises(UserError, match="lower-bit precision"):
        MissHandling("precision-cascade", precisions="native")
    with pytest.raises(UserError, match="unknown precision"):
        precision_ladder("native,int3")
    assert precision_ladder("int2,int8") == ("native", "int8", "int2")
    assert MissHandling("fetch-lowest-bit", precisions="int4,int8").low_precisions == ("int4",)
