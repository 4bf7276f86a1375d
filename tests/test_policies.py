"""Hand-built traces with hand-computed hits and victims for every eviction policy."""

from __future__ import annotations

import math
import random

import pytest

from core.errors import UserError
from offload.cache import ExpertCache
from offload.policies import FIFO, FLD, LFU, LHU, LRU, Belady, LeastStale, RandomEviction, ScoreBased
from tests.cache_replay import replay

# Two layers, capacity 3. Pass 0: L0 {a}, L1 {x}; pass 1: L0 {a}, L1 {y}; pass 2: L0 {c}, L1 {x}.
# (a = (0,0), c = (0,2), x = (1,0), y = (1,1))
STALE_TRACE = [[[0], [0]], [[0], [1]], [[2], [0]]]


def summary(events):
    return ([e[2] for e in events], [e[3] for e in events if e[3]], sum(e[4] for e in events))


def test_lru_evicts_the_old_right_layer_expert_and_collides():
    hits, victims, collisions = summary(replay(ExpertCache(2, 4, 3, LRU()), STALE_TRACE))
    # pass 2: c evicts x (oldest, t=2), then x misses again in the same pass (collision) and evicts a
    assert hits == [False, False, True, False, False, False]
    assert victims == [(1, 0), (0, 0)] and collisions == 1


def test_least_stale_evicts_the_stale_expert_of_the_running_layer_first():
    policy = LeastStale(layer_order="fifo", stale_order="layer")
    hits, victims, collisions = summary(replay(ExpertCache(2, 4, 3, policy), STALE_TRACE))
    # pass 2 at layer 0: all of a, x, y are stale; FIFO by layer position takes layer 0 first -> a
    assert hits == [False, False, True, False, False, True]
    assert victims == [(0, 0)] and collisions == 0


def test_least_stale_reverse_order_takes_the_highest_layer_first():
    policy = LeastStale(layer_order="reverse", stale_order="layer")
    hits, victims, _ = summary(replay(ExpertCache(2, 4, 3, policy), STALE_TRACE))
    assert victims[0] == (1, 0)  # layer 1 before layer 0, oldest touch inside layer 1


def test_least_stale_age_order_takes_the_oldest_stale_pass_first():
    # pass 2 at layer 0: stale a (last used pass 1), x (pass 0), y (pass 1): x went stale first
    policy = LeastStale(layer_order="fifo", stale_order="age")
    hits, victims, _ = summary(replay(ExpertCache(2, 4, 3, policy), STALE_TRACE))
    assert victims[0] == (1, 0)


def test_least_stale_prefers_stale_left_over_stale_right():
    # 3 layers, capacity 4. Pass 0 fills L0{0}, L1{0}, L2{0}; pass 1: L0{0} hit, L1{1} -> must evict.
    # stale: (1,0) (layer 1 = execution point, "right") and (2,0) (right); left layer 0 holds (0,0),
    # current. So the victim is the oldest stale of the lowest right layer: (1,0)? It is not pinned
    # (layer 1 needs (1,1)), so yes. Then at L2 {1}: stale-left is now empty (layer 0/1 current),
    # stale-right (2,0) goes.
    passes = [[[0], [0], [0]], [[0], [1], [1]]]
    cache = ExpertCache(3, 4, 3, LeastStale(layer_order="fifo"))
    hits, victims, _ = summary(replay(cache, passes))
    assert victims == [(1, 0), (2, 0)]
    # with a stale left expert available it goes before any right one
    cache = ExpertCache(3, 4, 3, LeastStale(layer_order="fifo"))
    passes = [[[0], [0], [0]], [[1], [0], [1]]]
    hits, victims, _ = summary(replay(cache, passes))
    # pass 1 L0: (0,1) evicts (0,0) (stale, lowest layer); L1: (1,0) hit; L2: (2,1) evicts (2,0)?
    # stale-left at execution point 2: layers 0,1 hold only current experts -> stale-right (2,0)
    assert victims == [(0, 0), (2, 0)] and hits == [False] * 4 + [True, False]


def test_least_stale_never_evicts_current_while_stale_is_cached():
    rng = random.Random(3)
    policy = LeastStale()
    cache = ExpertCache(4, 8, 6, policy)
    for _ in range(60):
        cache.begin_pass()
        for layer in range(4):
            keys = [(layer, e) for e in rng.sample(range(8), 2)]
            cache.begin_layer(layer, keys)
            for key in keys:
                before = {k: policy.is_stale(k) for k in cache.resident()}
                r = cache.access(key)
                if r.evicted is not None and not before[r.evicted]:
                    assert not any(s for k, s in before.items() if k not in keys), "evicted current while stale cached"


def test_fifo_ignores_hits():
    # capacity 2, one layer per pass: a, b, a(hit), c -> FIFO evicts a (first in), LRU would evict b
    passes = [[[0]], [[1]], [[0]], [[2]], [[0]]]
    hits, victims, _ = summary(replay(ExpertCache(1, 4, 2, FIFO()), passes))
    assert hits == [False, False, True, False, False] and victims == [(0, 0), (0, 1)]
    hits, victims, _ = summary(replay(ExpertCache(1, 4, 2, LRU()), passes))
    assert hits == [False, False, True, False, True] and victims == [(0, 1)]


def test_lfu_run_scope_remembers_counts_and_cache_scope_forgets():
    # capacity 2: a a b c b a d
    passes = [[[e]] for e in [0, 0, 1, 2, 1, 0, 3]]
    # run scope: a=2 b=1 -> c evicts b; b (count 1 kept) evicts c (count 1, older? c t4, b evicted)...
    hits, victims, _ = summary(replay(ExpertCache(1, 4, 2, LFU()), passes))
    # a(1) a(2) b(1) c: evict b (1) -> {a2,c1}; b: miss, count becomes 2 (run scope); evict c -> {a2,b2}
    # a hit -> a3; d: evict b (2 < 3)
    assert victims == [(0, 1), (0, 2), (0, 1)]
    assert hits == [False, True, False, False, False, True, False]
    # where the scopes part: b b c a a c d (a=0, b=1, c=2, d=3). c is evicted with count 1 and comes back:
    # run scope remembers it (c=2 ties a=2, a is older: d evicts a); cache scope restarts it (c=1: d evicts c)
    passes = [[[e]] for e in [1, 1, 2, 0, 0, 2, 3]]
    for scope, last in (("run", (0, 0)), ("cache", (0, 2))):
        hits, victims, _ = summary(replay(ExpertCache(1, 4, 2, LFU(scope=scope)), passes))
        assert hits == [False, True, False, False, True, False, False]
        assert victims == [(0, 2), (0, 1), last], scope


def test_lfu_ties_go_to_least_recently_used():
    passes = [[[e]] for e in [1, 0, 2]]  # b then a (both 1), c evicts b, the older
    _, victims, _ = summary(replay(ExpertCache(1, 4, 2, LFU()), passes))
    assert victims == [(0, 1)]


def _precision_trace(cache: ExpertCache, uses: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """One layer, one access per pass: expert ``e`` fetched at ``precision`` on a miss (a hit runs at the
    resident copy's precision, whatever is asked); ``"upgrade"`` raises resident ``e`` to full precision.
    Returns the victims."""
    victims = []
    for e, precision in uses:
        if precision == "upgrade":
            cache.upgrade((0, e))
            continue
        cache.begin_pass()
        cache.begin_layer(0, [(0, e)])
        r = cache.access((0, e), precision=precision)
        if r.evicted is not None:
            victims.append(r.evicted)
    return victims


def test_lhu_counts_only_high_precision_uses():
    """a is used twice at full precision; b is fetched at int4 and used three times at int4; c needs a
    slot. LHU: a counts 2, b 0 -> b goes. LFU counts every use: a 2 < b 3 -> a goes."""
    uses = [(0, "native"), (0, "native"), (1, "int4"), (1, "int4"), (1, "int4"), (2, "native")]
    assert _precision_trace(ExpertCache(1, 4, 2, LHU()), uses) == [(0, 1)]
    assert _precision_trace(ExpertCache(1, 4, 2, LFU()), uses) == [(0, 0)]
    # int8 counted as high precision: b's int4 uses still do not count, an int8 copy's do
    assert _precision_trace(ExpertCache(1, 4, 2, LHU(high="int8")), uses) == [(0, 1)]
    int8 = [(e, "int8" if p == "int4" else p) for e, p in uses]
    assert _precision_trace(ExpertCache(1, 4, 2, LHU(high="int8")), int8) == [(0, 0)]
    assert _precision_trace(ExpertCache(1, 4, 2, LHU()), int8) == [(0, 1)]


def test_lhu_counts_uses_after_an_upgrade_and_keeps_counts_across_evictions():
    """b: three int4 uses (0), upgraded to full precision, then three full-precision uses (3) > a's 2:
    c evicts a. a comes back and evicts c (1 < b's 3); its count goes 2 -> 3 (run scope keeps it). d then
    finds a and b both at 3: the tie goes to the least recently used, b."""
    uses = [(0, "native"), (0, "native"), (1, "int4"), (1, "int4"), (1, "int4"), (1, "upgrade"),
            (1, "native"), (1, "native"), (1, "native")]
    cache = ExpertCache(1, 4, 2, LHU())
    assert _precision_trace(cache, uses + [(2, "native")]) == [(0, 0)]
    assert cache.precision_of((0, 1)) == "native" and cache.policy.count[(0, 1)] == 3
    assert _precision_trace(cache, [(0, "native"), (3, "native")]) == [(0, 2), (0, 1)]
    with pytest.raises(UserError, match="high precision"):
        LHU(high="int3")


def test_fld_evicts_the_layer_farthest_ahead_in_execution_order():
    # 4 layers, capacity 3; pass 0 fills (0,0),(1,0),(2,0); at layer 3 the forward distances are
    # layer 0: 1, layer 1: 2, layer 2: 3 -> (2,0) goes
    passes = [[[0], [0], [0], [0]]]
    _, victims, _ = summary(replay(ExpertCache(4, 2, 3, FLD()), passes))
    assert victims == [(2, 0)]
    _, victims, _ = summary(replay(ExpertCache(4, 2, 3, FLD(cyclic=False)), passes))
    assert victims == [(0, 0)]  # |0 - 3| is the largest


def test_score_evicts_lowest_accumulated_gate_score():
    passes = [[[e]] for e in [0, 1, 0, 2]]
    _, victims, _ = summary(replay(ExpertCache(1, 4, 2, ScoreBased()), passes, scores=[0.1, 0.5, 0.1, 0.9]))
    assert victims == [(0, 0)]  # a has 0.2 < b's 0.5 although a is more recent


def test_belady_evicts_the_farthest_next_use():
    seq = [0, 1, 2, 0, 1, 3, 1]
    # next-use index of each access
    nxt = []
    for i, e in enumerate(seq):
        later = [j for j in range(i + 1, len(seq)) if seq[j] == e]
        nxt.append(later[0] if later else math.inf)
    passes = [[[e]] for e in seq]
    hits, victims, _ = summary(replay(ExpertCache(1, 4, 2, Belady()), passes, hints=nxt))
    # {0,1} + 2: next uses 0->3, 1->4 -> evict 1; {0,2}; 0 hit; 1: evict 2 (never) ; 3: evict 0 (never) ; 1 hit
    assert victims == [(0, 1), (0, 2), (0, 0)]
    assert hits == [False, False, False, True, False, False, True]


def test_belady_without_future_is_an_error():
    cache = ExpertCache(1, 4, 1, Belady())
    cache.begin_pass()
    cache.begin_layer(0)
    with pytest.raises(ValueError, match="next-use"):
        cache.access((0, 0))


def test_random_is_seeded():
    passes = [[[e % 5]] for e in range(40)]
    runs = [summary(replay(ExpertCache(1, 5, 3, RandomEviction(seed=s)), passes))[1] for s in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
