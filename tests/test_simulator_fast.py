"""The numba kernels and the readable reference replay give identical results."""

from __future__ import annotations

import numpy as np
import pytest

from core.passes import passes_from_lists
from offload.simulator import SimConfig, simulate_configs

COMPARED = ("accesses", "hits", "misses", "collision_misses", "collision_misses_per_layer", "evictions",
            "dropped", "prefetch_issued", "prefetch_used", "prefetch_cancelled", "late_prefetch_hits", "passes_counted",
            "prefill_passes", "decode_passes")


def both(store, cfg: SimConfig, passes=None) -> tuple[dict, dict]:
    ref = simulate_configs(store, [SimConfig(**{**cfg.__dict__, "backend": "reference"})], passes=passes)[0]
    fast = simulate_configs(store, [SimConfig(**{**cfg.__dict__, "backend": "fast"})], passes=passes)[0]
    assert ref["backend"] == "reference" and fast["backend"] == "fast"
    return ref, fast


def assert_same(ref: dict, fast: dict) -> None:
    for k in COMPARED:
        assert ref[k] == fast[k], k
    for k in ("stall_time_s", "ttft_s", "tpot_s", "prefetch_bytes", "demand_bytes", "wasted_bytes", "predictor_time_s",
              "compute_ttft_s", "compute_tpot_s", "prefill_bytes", "decode_bytes", "precision", "recall"):
        if ref[k] is None:
            assert fast[k] is None
        else:
            assert fast[k] == pytest.approx(ref[k], rel=1e-9, abs=1e-12), k


@pytest.mark.parametrize("policy,params", [
    ("lru", {}), ("fifo", {}), ("lfu", {}), ("lfu", {"scope": "cache"}), ("lhu", {}), ("belady", {}),
    ("fld", {}), ("score", {}), ("least_stale", {}),
    ("least_stale", {"layer_order": "fifo", "stale_order": "layer", "prefetch_evicts_current": False}),
    ("least_stale", {"left_first": False, "prefill_left_is_stale": True}),
])
@pytest.mark.slow
@pytest.mark.parametrize("capacity", ["1%", "5%"])
def test_fast_equals_reference_on_gemma(gemma_store, policy, params, capacity):
    for prefetch, lookahead in (("none", 1), ("oracle", 2)):
        cfg = SimConfig(policy=policy, policy_params=params, capacity=capacity, prefetch=prefetch, lookahead=lookahead)
        ref, fast = both(gemma_store, cfg)
        assert ref["accesses"] == 24578
        assert_same(ref, fast)


@pytest.mark.parametrize("policy", ["lru", "least_stale", "belady", "lfu"])
def test_fast_equals_reference_per_layer_and_drop(gemma_store, policy):
    for cache, miss in (("per-layer", "fetch"), ("global", "drop"), ("per-layer", "drop")):
        cfg = SimConfig(policy=policy, capacity="10%", cache=cache, miss=miss, prefetch="oracle")
        assert_same(*both(gemma_store, cfg))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_equals_reference_on_random_traces(seed):
    rng = np.random.default_rng(seed)
    L, E, K = 4, 16, 3
    passes = []
    for p in range(60):
        k = 8 if p % 20 == 0 else K  # a prefill-like wide pass now and then
        passes.append([list(rng.choice(E, size=k, replace=False)) for _ in range(L)])
    ps = passes_from_lists(passes, E, top_k=K, phases=[0 if p % 20 == 0 else 1 for p in range(60)])
    ps.tokens[:] = rng.integers(1, 4, size=len(ps.tokens))
    ps.score[:] = rng.random(len(ps.score)).astype(np.float32)
    for policy in ("lru", "fifo", "lfu", "belady", "least_stale", "fld", "score"):
        for capacity, prefetch, protect in (("6", "none", True), ("10", "oracle", True), ("20", "oracle", False)):
            cfg = SimConfig(policy=policy, capacity=capacity, prefetch=prefetch, lookahead=2, protect_layer=protect)
            assert_same(*both(None, cfg, passes=ps))


@pytest.mark.parametrize("policy", ["lru", "least_stale", "belady", "forecast", "least_stale_forecast"])
def test_fast_equals_reference_with_a_ranked_forecast_held_out_and_predictor_cost(gemma_store, tmp_path_factory,
                                                                                  policy):
    """A predictor's ranked candidates (more listed than selected), only the held-out passes counted,
    and the forecast's device time on the clock: both paths take the same decisions and times (the
    forecast policies also weigh the calibrated P(use) of every candidate)."""
    # torch (~1 s to import): only this test writes a predictor checkpoint
    from predictors.checkpoint import save_predictor
    from predictors.frequency import ConditionalFrequency

    path = tmp_path_factory.mktemp("ckpt") / "cf"
    if not path.with_suffix(".safetensors").exists():
        pred = ConditionalFrequency.fit(gemma_store.topk_ids(), gemma_store.num_experts, 2)
        save_predictor(pred, path, model=gemma_store.model)
    for passes, cost in (("held-out", 30.0), ("all", None)):
        cfg = SimConfig(policy=policy, capacity="5%", phase="decode", prefetch=f"ckpt:{path}.safetensors",
                        lookahead=2, overfetch=1.5, passes=passes, predictor_us=cost)
        ref, fast = both(gemma_store, cfg)
        assert ref["prefetch_cancelled"] > 0 and ref["prefetch_used"] > 0
        assert (ref["passes_counted"] < ref["passes_replayed"]) == (passes == "held-out")
        assert_same(ref, fast)
