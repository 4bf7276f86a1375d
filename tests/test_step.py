"""The one per-layer step (offload/step.py) and its link (offload/link.py): hand-timed traces,
prefetch admission by value, and eviction that knows what is coming."""

from __future__ import annotations

import numpy as np
import pytest

import offload.simulator as sim
from core.passes import passes_from_lists
from offload.cache import ExpertCache
from offload.hardware import get_hardware
from offload.link import DEMAND, PREFETCH, SimLink
from offload.policies import make_policy
from offload.prefetch import OraclePrefetch
from offload.simulator import Replay, SimBackend, SimConfig, simulate_reference
from offload.step import Access, Candidates, LayerStep

MS = 1e-3
# copies of 1 MB take 1 ms; a layer's non-expert part 10 us, an expert 1 us
HW = "a100-5gbs:link_gbps=1,tflops=1e6,hbm_gbps=1000,layer_us=10,token_us=0,expert_us=0"


def _step(num_layers: int, capacity: int, *, policy: str = "lru", admission: str = "greedy", hardware: str = HW,
          lookahead: int = 2) -> LayerStep:
    ps = passes_from_lists([[[0]] * num_layers], num_experts=8)
    replay = Replay(None, ps, None, get_hardware(hardware), capacity, np.full(num_layers, 1e6), 2.0)
    cache = ExpertCache(num_layers, 8, capacity, make_policy(policy))
    return LayerStep(cache, SimBackend(replay), admission=admission, lookahead=lookahead, depth=8)


def _forecasts(table: dict[int, list[Candidates]]):
    return lambda layer: table.get(layer, [])


def test_link_serves_demand_ahead_of_queued_prefetches():
    link = SimLink(1e6)  # 1 MB/s: a 1 kB copy takes 1 ms
    first = link.submit("a", 1e3, PREFETCH, 0.0)
    queued = link.submit("b", 1e3, PREFETCH, 0.0)
    assert link.started(first, 0.0) and not link.started(queued, 0.5 * MS)
    demand = link.submit("c", 1e3, DEMAND, 0.5 * MS)  # the prefetch on the link is not interrupted
    assert (demand.start, demand.arrival) == (pytest.approx(1 * MS), pytest.approx(2 * MS))
    assert link.arrival(queued, 0.5 * MS) == pytest.approx(3 * MS)  # behind the demand copy
    late = link.submit("d", 1e3, PREFETCH, 0.6 * MS)
    assert link.cancel(late, 0.6 * MS) and not link.cancel(first, 0.6 * MS)
    assert link.free_at(0.6 * MS) == pytest.approx(3 * MS) and link.bytes_moved == 3e3


def test_step_hand_timed_demand_first_and_a_prefetch_dropped_at_its_layer():
    """Layer 0 misses expert 0 at t = 10 us (copy until 1010). The forecast wrongly names expert 1 for
    layer 1 (queued behind: starts at 1010) and expert 2 for layer 2 (queued behind it). Layer 1 starts at
    1021 and needs expert 3: its demand copy goes ahead of the queued layer-2 prefetch (2010 -> 3010), the
    wrong layer-1 prefetch already on the link is wasted. Layer 2 finds expert 2 in flight (3010 -> 4010):
    a late hit. A greedy FIFO link would have delivered expert 3 at 4010 instead of 3010."""
    step = _step(3, 8)
    table = {0: [Candidates(1, 1, np.array([1]), 1), Candidates(2, 2, np.array([2]), 1)]}
    step.begin_pass(1)
    for layer, expert in enumerate((0, 3, 2)):
        step.run_layer(layer, [Access(expert)], 1, forecaster=_forecasts(table))
    c, t = step.counters, step.backend.now()
    assert (c.misses, c.hits, c.late_prefetch, c.prefetch_issued, c.prefetch_used) == (2, 1, 1, 2, 1)
    assert c.wasted_bytes == 1e6 and c.bytes_moved == 4e6
    # stalls: 1000 (layer 0) + 1989 (layer 1 waits until 3010) + 989 (layer 2 waits until 4010) us
    assert c.stall_s == pytest.approx((1000 + 1989 + 989) * 1e-6)
    assert t == pytest.approx(4011e-6)


def test_a_queued_prefetch_its_layer_does_not_need_is_cancelled_and_moves_no_bytes():
    step = _step(3, 8)
    # three prefetches for layer 2 queue behind layer 0's demand copy (0 -> 1010 us): 5 starts at 1010;
    # layer 1's demand copy (at 1021) goes ahead of 6 and 7 (2010 -> 3010); 6 then starts at 3010, and
    # layer 2 starts at 3021 with 7 still queued: it is not needed there, so it is dropped unmoved
    table = {0: [Candidates(2, 2, np.array([5, 6, 7]), 3)]}
    step.begin_pass(1)
    for layer, expert in enumerate((0, 1, 6)):
        step.run_layer(layer, [Access(expert)], 1, forecaster=_forecasts(table))
    c = step.counters
    assert (c.prefetch_issued, c.prefetch_cancelled, c.prefetch_used) == (3, 1, 1)
    assert c.prefetch_bytes == 2e6 and c.wasted_bytes == 1e6  # 5 moved for nothing; 7 moved nothing
    assert (2, 7) not in step.cache and {(2, 5), (2, 6)} <= set(step.cache.resident())


def test_value_admission_refuses_a_prefetch_that_cannot_arrive_in_time():
    """A sure forecast (P = 1) one layer ahead: a 1 ms copy cannot arrive in the ~11 us before layer 1
    starts, so admission by value refuses it; greedy admission copies it anyway; on a link 1000x faster
    it arrives in time and is admitted."""
    sure = {0: [Candidates(1, 1, np.array([1]), 1, probs=np.array([1.0]))]}
    for admission, hardware, issued in (("value", HW, 0), ("greedy", HW, 1),
                                        ("value", HW.replace("link_gbps=1", "link_gbps=1000"), 1)):
        step = _step(2, 8, admission=admission, hardware=hardware)
        step.begin_pass(1)
        step.run_layer(0, [Access(0)], 1, forecaster=_forecasts(sure))
        assert step.counters.prefetch_issued == issued, (admission, hardware)
        assert step.counters.prefetch_late_refused == (1 if (admission, hardware) == ("value", HW) else 0)


def test_value_admission_refuses_a_prefetch_whose_victim_is_more_valuable():
    """A full cache whose LRU victim is expert 4 of layer 2. At layer 0 a forecast names layer 3's expert
    5 with P = 0.3. Taking it evicts the victim; when the same forecast call says layer 2 will use
    expert 4 with P = 0.9, the victim is worth more than the prefetch (0.9 x copy > 0.3 x copy): refused.
    When it says P = 0 for expert 4, the prefetch goes ahead."""
    fast = HW.replace("link_gbps=1", "link_gbps=1000")
    for p_victim, issued in ((0.9, 0), (0.0, 1)):
        step = _step(4, 3, admission="value", hardware=fast, lookahead=3)
        step.begin_pass(1)
        for layer, expert in enumerate((0, 7, 4, 1)):
            step.run_layer(layer, [Access(expert)], 1)
        assert set(step.cache.resident()) == {(1, 7), (2, 4), (3, 1)}
        step.begin_pass(1)  # layer 0's miss evicts (1, 7): (2, 4) is then the least recently used
        table = {0: [Candidates(2, 2, np.array([4]), 1, probs=np.array([p_victim])),
                     Candidates(3, 3, np.array([5]), 1, probs=np.array([0.3]))]}
        step.run_layer(0, [Access(6)], 1, forecaster=_forecasts(table))
        assert step.counters.prefetch_issued == issued, p_victim


@pytest.mark.parametrize("policy", ["forecast", "least_stale", "least_stale_forecast"])
@pytest.mark.parametrize("seed", [0, 1])
def test_forecast_and_prefetch_never_evict_a_predicted_key_while_an_unpredicted_stale_one_is_evictable(
        policy, seed):
    """Random decode passes, oracle prefetch two layers ahead, a small cache. At every eviction: if the
    victim is a key predicted for a layer still ahead in this pass, no stale key (untouched in this pass)
    that this pass's forecasts rule out was evictable -- the policy weighs what is coming."""
    rng = np.random.default_rng(seed)
    L, E, K = 6, 8, 2
    lists = [[list(rng.choice(E, size=K, replace=False)) for _ in range(L)] for _ in range(40)]
    ps = passes_from_lists(lists, E, top_k=K)
    fc = OraclePrefetch(2).forecast(ps, None)
    replay = Replay(None, ps, fc, get_hardware(HW), 10, np.full(L, 1e6), 2.0)

    checked = []
    real = sim.make_policy

    def instrumented(name, **params):
        pol = real(name, **params)
        inner = pol.victim

        def victim(eligible, *, for_prefetch=False):
            key = inner(eligible, for_prefetch=for_prefetch)
            if key is None:
                return key
            here, p = pol.layer, pol.pass_index
            if hasattr(pol, "last_pass"):  # Least-Stale: ahead of the execution point, only a forecast touches
                touched = pol.last_pass
                predicted_ahead = {k for k in pol.resident() if k[0] > here and touched[k] == p}
                ruled_out = {k for k in pol.resident() if touched[k] < p and eligible(k) and k[0] < here}
            else:  # forecast policies: what on_forecast told them about this pass
                told = ~np.isnan(pol.this_pass).all(axis=1)
                predicted_ahead = {k for k in pol.resident() if k[0] > here and pol.this_pass[k] == 1.0}
                ruled_out = {k for k in pol.resident() if int(pol.touch_pass[k]) < p and eligible(k)
                             and (k[0] < here or (k[0] > here and told[k[0]] and pol.this_pass[k] == 0.0))}
            checked.append(key)
            assert not (key in predicted_ahead and ruled_out), (key, ruled_out)
            return key

        pol.victim = victim
        return pol

    sim.make_policy = instrumented
    try:
        simulate_reference(replay, SimConfig(policy=policy, prefetch="oracle", lookahead=2, capacity="10"))
    finally:
        sim.make_policy = real
    assert len(checked) > 50
