"""Every registered policy has a compiled twin that takes the same decisions as its Python class.

Reference: the Python class driven by offload/step.py's LayerStep (``backend="reference"``). Fast:
the replay kernel compiled for the policy's hooks (``backend="fast"``). The tests walk the registry,
so a policy added without its twin, or whose twin drifts, fails here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.passes import passes_from_lists
from offload.policies import POLICIES, policy_names
from offload.simulator import SimConfig
from offload.simulator_fast import _source_files, supports
from tests.test_simulator_fast import assert_same, both
from tests.toy_policy import MRU

L, E, K = 4, 16, 3

# replay settings that reach every path of the kernel: eviction with the layer pinned, prefetch
# (greedy, two distances: cancellations, promotions), a per-layer cache, drop miss handling, no pins
CONFIGS = (
    {"capacity": "6"},
    {"capacity": "10", "prefetch": "oracle", "lookahead": 2},
    {"capacity": "16", "prefetch": "oracle", "cache": "per-layer"},
    {"capacity": "10", "prefetch": "oracle", "miss": "drop"},
    {"capacity": "20", "prefetch": "oracle", "lookahead": 2, "protect_layer": False},
)


def trace(seed: int, num_passes: int = 200):
    """Decode passes with a sticky popularity, a wide prefill-like pass every 25, random router
    weights and token counts. 200 passes teach the forecast policies' online model past its
    warm-up (5000 labels), so both its counted fallback and its logistic model decide victims."""
    rng = np.random.default_rng(seed)
    pop = rng.dirichlet(np.full(E, 0.5), size=L)
    passes, phases = [], []
    for p in range(num_passes):
        k = 8 if p % 25 == 0 else K
        passes.append([list(rng.choice(E, size=k, replace=False, p=pop[layer])) for layer in range(L)])
        phases.append(0 if p % 25 == 0 else 1)
    ps = passes_from_lists(passes, E, top_k=K, phases=phases)
    ps.tokens[:] = rng.integers(1, 4, size=len(ps.tokens))
    ps.score[:] = rng.random(len(ps.score)).astype(np.float32)
    return ps


def test_every_registered_policy_declares_a_compiled_twin():
    for name, cls in POLICIES.items():
        assert cls.kernel is not None, name
        assert supports(SimConfig(policy=name)), name


@pytest.mark.parametrize("policy", policy_names())
def test_every_registered_policy_takes_the_same_decisions_on_both_paths(policy):
    ps = trace(0)
    for cfg in CONFIGS:
        assert_same(*both(None, SimConfig(policy=policy, **cfg), passes=ps))


def _params(spec: dict) -> dict:
    # predictors.reuse imports torch (~1 s): only the forecast policies' cases
    from predictors.reuse import CountedReuse, LogisticReuse

    forecasters = {"counted": CountedReuse(L, E, K), "logistic-warm": LogisticReuse(L, E, K, warmup=50),
                   "logistic-frozen": LogisticReuse(L, E, K, warmup=0, online=False)}
    return {k: forecasters[v] if k == "forecaster" else v for k, v in spec.items()}


@pytest.mark.parametrize("policy,params", [
    ("lfu", {"scope": "cache"}), ("fld", {"cyclic": False}), ("random", {"seed": 7}),
    ("least_stale", {"layer_order": "fifo", "stale_order": "layer", "prefetch_evicts_current": False}),
    ("least_stale", {"left_first": False, "prefill_left_is_stale": True}),
    ("forecast", {"forecaster": "counted"}), ("forecast", {"forecaster": "logistic-warm"}),
    ("forecast", {"forecaster": "logistic-frozen", "predicted_reuse": 0.5}),
    ("forecast", {"use_forecasts": False, "prefetch_may_evict": False}),
    ("least_stale_forecast", {"left_first": True, "prefetch_evicts_current": True, "forecaster": "logistic-warm"}),
])
def test_policy_parameters_take_the_same_decisions_on_both_paths(policy, params):
    ps = trace(1)
    for cfg in CONFIGS:
        assert_same(*both(None, SimConfig(policy=policy, policy_params=_params(params), **cfg), passes=ps))


def test_a_new_policy_is_one_file_plus_the_registry_and_runs_on_both_paths(monkeypatch):
    monkeypatch.setitem(POLICIES, MRU.name, MRU)  # the registry entry; tests/toy_policy.py is the rest
    ps = trace(2, num_passes=60)
    for cfg in CONFIGS:
        ref, fast = both(None, SimConfig(policy=MRU.name, **cfg), passes=ps)
        assert_same(ref, fast)
    lru = both(None, SimConfig(policy="lru", capacity="6"), passes=ps)[1]
    mru = both(None, SimConfig(policy=MRU.name, capacity="6"), passes=ps)[1]
    assert mru["misses"] != lru["misses"]  # the toy's own victims, not another policy's


def test_a_compiled_replay_is_named_after_every_source_file_its_hooks_use():
    """numba watches only the cached function's own file; the kernel's cache name hashes these."""
    def files(cls) -> set[str]:
        hooks = [h for h in cls.kernel.hooks().values() if h is not None]
        return {str(p.relative_to(Path(__file__).resolve().parents[1])) for p in _source_files(hooks)}

    assert {"offload/simulator_fast.py", "offload/policies/compiled.py", "offload/policies/lfu.py"} <= files(
        POLICIES["lfu"])
    assert {"offload/policies/forecast.py", "predictors/reuse_compiled.py"} <= files(POLICIES["forecast"])
    assert "tests/toy_policy.py" in files(MRU)
