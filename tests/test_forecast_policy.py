"""The forecast eviction policies: Belady when the forecast is right, sane when it is learned."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core.model_info import ModelInfo
from core.passes import build_passes, passes_from_lists
from data_pipeline.models import load_model
from offload.cache import ExpertCache
from offload.engine.generate import greedy_generate
from offload.engine.prompts import load_prompts
from offload.engine.run import encode
from offload.forecast_eval import replay_split
from offload.policies import Belady, Forecast, LeastStaleForecast, make_policy
from offload.simulator import SimConfig, simulate_configs
from predictors.gate_lookahead import GateLookahead
from predictors.reuse import CountedReuse, LogisticReuse, MLPReuse, ReuseForecaster, save_reuse_forecaster
from predictors.reuse_features import NUM_FEATURES, ReuseHistory


class TrueNextUse(ReuseForecaster):
    """Test oracle: the exact number of opportunities until each expert is chosen again."""

    family = "test_oracle"

    def __init__(self, passes: list[list[list[int]]], num_experts: int):
        super().__init__(len(passes[0]), num_experts, 1)
        self.passes = passes

    def expected_passes(self, history: ReuseHistory, layer: int, next_pass: int,
                        experts: np.ndarray | None = None) -> np.ndarray:
        out = np.full(self.num_experts, math.inf)
        for q in range(len(self.passes) - 1, next_pass - 1, -1):
            out[self.passes[q][layer]] = q - next_pass + 1
        return out if experts is None else out[experts]

    def reuse_probability(self, features: np.ndarray) -> np.ndarray:
        raise AssertionError("the oracle answers expected_passes directly")

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    @classmethod
    def from_state(cls, hparams, state):
        raise NotImplementedError


def replay(cache: ExpertCache, passes: list[list[list[int]]]) -> tuple[list[bool], list[tuple[int, int]]]:
    """Demand replay; Belady gets the global index of each key's next access as hint."""
    flat = [(layer, e) for p in passes for layer, experts in enumerate(p) for e in experts]
    hits, victims = [], []
    i = 0
    for p in passes:
        cache.begin_pass()
        for layer, experts in enumerate(p):
            keys = [(layer, e) for e in experts]
            cache.begin_layer(layer, keys)
            for key in keys:
                nxt = next((j for j in range(i + 1, len(flat)) if flat[j] == key), math.inf)
                r = cache.access(key, 1.0, hint=nxt)
                hits.append(r.hit)
                if r.evicted is not None:
                    victims.append(r.evicted)
                i += 1
    return hits, victims


# Three layers, one expert each, the same expert every pass: A=(0,0), B=(1,0), C=(2,0), capacity 2.
CYCLE = [[[0], [0], [0]]] * 3


def test_true_forecast_matches_belady_on_the_layer_cycle_where_lru_gets_nothing():
    # Hand-computed Belady: A, B, C miss; C evicts B (A is needed first); A hits; B evicts A (C is
    # needed before A); C hits; A evicts C; B hits; C evicts A (neither is needed again: least
    # recently touched goes). 3 hits of 9; LRU always evicts the next one needed: 0 hits.
    lru_hits, _ = replay(ExpertCache(3, 1, 2, make_policy("lru")), CYCLE)
    bel_hits, bel_victims = replay(ExpertCache(3, 1, 2, Belady()), CYCLE)
    fc_hits, fc_victims = replay(ExpertCache(3, 1, 2, Forecast(TrueNextUse(CYCLE, 1))), CYCLE)
    assert sum(lru_hits) == 0
    assert bel_hits == [False, False, False, True, False, True, False, True, False]
    assert bel_victims == [(1, 0), (0, 0), (2, 0), (0, 0)]
    assert fc_hits == bel_hits and fc_victims == bel_victims


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("capacity", [2, 4, 6])
def test_true_forecast_matches_belady_victim_for_victim_on_random_traces(seed, capacity):
    rng = np.random.default_rng(seed)
    L, E, P = 4, 5, 30
    popularity = rng.dirichlet(np.ones(E) * 0.5, size=L)
    passes = [[[int(rng.choice(E, p=popularity[layer]))] for layer in range(L)] for _ in range(P)]
    bel = replay(ExpertCache(L, E, capacity, Belady()), passes)
    fc = replay(ExpertCache(L, E, capacity, Forecast(TrueNextUse(passes, E))), passes)
    assert fc == bel


def test_forecast_reports_the_layer_distance_plus_whole_passes():
    # L=3; after pass 0 used (0,0),(1,0),(2,0): at layer 1 of pass 1 the oracle says (2,0) is next
    # used in pass 2 -> N counted from its next opportunity (pass 1, layer 2) is 2: 1 + 3 * 1 = 4.
    passes = [[[0], [0], [0]], [[0], [0], [1]], [[0], [0], [0]]]
    policy = Forecast(TrueNextUse(passes, 2))
    cache = ExpertCache(3, 2, 4, policy)
    cache.begin_pass()
    for layer in range(3):
        cache.begin_layer(layer, [(layer, 0)])
        cache.access((layer, 0), 1.0)
    cache.begin_pass()
    cache.begin_layer(0, [(0, 0)])
    cache.access((0, 0), 1.0)
    cache.begin_layer(1, [(1, 0)])
    assert policy.forecast((2, 0)) == 1 + 3 * 1
    assert policy.forecast((0, 0)) == 2  # layer 0 of pass 2: two layer-steps ahead


def test_a_prefetcher_mark_raises_the_reuse_probability_of_a_key_ahead():
    # Oracle says (2,0) is next used 2 passes from its next opportunity (N=3) -> forecast 1 + 3*2 = 7
    # at layer 1. Marked as predicted for this pass with predicted_reuse 0.5: N = min(3, 1/0.5) = 2.
    passes = [[[0], [0], [0]], [[0], [0], [1]], [[0], [0], [1]], [[0], [0], [0]]]
    policy = Forecast(TrueNextUse(passes, 2), predicted_reuse=0.5)
    cache = ExpertCache(3, 2, 4, policy)
    cache.begin_pass()
    for layer in range(3):
        cache.begin_layer(layer, [(layer, 0)])
        cache.access((layer, 0), 1.0)
    cache.begin_pass()
    cache.begin_layer(0, [(0, 0)])
    cache.access((0, 0), 1.0)
    cache.begin_layer(1, [(1, 0)])
    assert policy.forecast((2, 0)) == 1 + 3 * 2
    cache.mark_predicted([(2, 0)])
    assert policy.forecast((2, 0)) == 1 + 3 * 1
    cache.begin_pass()  # marks last one pass
    cache.begin_layer(0, [(0, 0)])
    assert policy.forecast((2, 0)) == 2 + 3 * 1  # N from pass 2: used at pass 3 -> 2


def test_a_prefetched_key_is_forecast_when_it_arrives():
    passes = [[[0], [0], [0]], [[0], [0], [1]], [[1], [0], [0]]]
    policy = Forecast(TrueNextUse(passes, 2))
    cache = ExpertCache(3, 2, 6, policy)
    cache.begin_pass()
    for layer in range(3):
        cache.begin_layer(layer, [(layer, 0)])
        cache.access((layer, 0), 1.0)
    cache.begin_pass()
    cache.begin_layer(0, [(0, 0)])
    cache.insert((2, 1), prefetch=True)  # needed at layer 2 of this pass: 2 layer-steps away
    cache.insert((0, 1), prefetch=True)  # layer 0 is running: next chance is pass 2, where it is used
    assert policy.forecast((2, 1)) == 2
    assert policy.forecast((0, 1)) == 3


def _skewed_passes(seed: int = 0, L: int = 4, E: int = 16, K: int = 2, P: int = 300):
    """Passes with sticky experts: each layer keeps an expert with probability 0.6, else redraws
    from a skewed popularity -- recency and frequency both carry information."""
    rng = np.random.default_rng(seed)
    pop = rng.dirichlet(np.ones(E) * 0.3, size=L)
    cur = [list(rng.choice(E, size=K, replace=False, p=pop[layer])) for layer in range(L)]
    out = []
    for _ in range(P):
        for layer in range(L):
            keep = [e for e in cur[layer] if rng.random() < 0.6]
            while len(keep) < K:
                e = int(rng.choice(E, p=pop[layer]))
                if e not in keep:
                    keep.append(e)
            cur[layer] = keep
        out.append([[int(e) for e in cur[layer]] for layer in range(L)])
    return out


@pytest.mark.parametrize("capacity", [6, 12])
def test_online_forecast_beats_lru_and_never_beats_belady_on_a_sticky_trace(capacity):
    # The sanity bounds: LRU from below (a pass holds 8 accesses, so at 6 slots LRU evicts exactly
    # what comes back next and scores 0), Belady from above (no policy can beat it).
    passes = passes_from_lists(_skewed_passes(), 16, 2)
    rates = {}
    for name in ("lru", "forecast", "belady"):
        rates[name] = replay_split(passes, make_policy(name), capacity).total.hit_rate
    assert rates["lru"] + 0.02 < rates["forecast"] <= rates["belady"]


def test_least_stale_forecast_evicts_stale_before_current():
    # L=2, capacity 2. Pass 0 fills (0,0), (1,0). Pass 1, layer 0 needs (0,1): both residents are
    # stale and (0,0) is never needed again, so it goes. Layer 1 needs (1,1): (1,0) is stale but
    # needed next pass; (0,1) is current (just used) and never needed again. Plain forecast evicts
    # (0,1); the Least-Stale variant must take the stale (1,0).
    passes = [[[0], [0]], [[1], [1]], [[2], [0]]]
    _, plain = replay(ExpertCache(2, 3, 2, Forecast(TrueNextUse(passes, 3))), passes)
    _, ls = replay(ExpertCache(2, 3, 2, LeastStaleForecast(TrueNextUse(passes, 3))), passes)
    assert plain[:2] == [(0, 0), (0, 1)]
    assert ls[:2] == [(0, 0), (1, 0)]


def test_forecast_policy_runs_in_the_reference_simulator_with_the_same_counts(gemma_store):
    passes = build_passes(gemma_store, "decode")
    sim = simulate_configs(gemma_store, [SimConfig(policy="forecast", capacity="5%", phase="decode",
                                                   backend="reference")])[0]
    mine = replay_split(passes, make_policy("forecast"), sim["capacity_slots"]).total
    assert (sim["hits"], sim["accesses"], sim["collision_misses"]) == (mine.hits, mine.accesses,
                                                                        mine.collision_misses)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["forecast", "least_stale_forecast"])
@pytest.mark.parametrize("prefetch", [False, True])
def test_forecast_policies_run_unchanged_in_the_engine(tmp_path, policy, prefetch):
    """Same outputs as the plain model (fetch mode), with and without gate-lookahead prefetch."""
    from offload.engine.engine import EngineConfig, OffloadEngine  # hqq: ~2 s to import; only this test

    torch.set_num_threads(1)
    tiny = load_model("tiny-olmoe")
    a = tiny.adapter
    ids = encode(tiny.tokenizer, load_prompts("demo", 1)[0])
    plain = greedy_generate(tiny.model, ids, 5, keep_logits=True)
    # a checkpoint, as evaluate/engine users pass it: the path goes through policy_params
    fitted = CountedReuse(a.num_layers, a.num_experts, a.top_k).fit(np.zeros((4, NUM_FEATURES), np.float32),
                                                                   np.array([True, False, True, False]))
    path = save_reuse_forecaster(fitted, tmp_path / "reuse", model=tiny.info)
    router = torch.stack([a.router_weight(i).detach().float() for i in range(a.num_layers)])
    predictor = GateLookahead(router, a.top_k, 2) if prefetch else None
    cfg = EngineConfig(capacity_slots=9, policy=policy, policy_params={"forecaster": str(path)}, bandwidth=5e9)
    with OffloadEngine(tiny, cfg, predictor=predictor) as eng:
        gen = eng.generate(ids, 5, keep_logits=True)
        assert gen.tokens == plain.tokens
        torch.testing.assert_close(torch.stack(gen.logits), torch.stack(plain.logits), rtol=1e-4, atol=1e-5)
        c = eng.counters
        assert c.misses > 0 and c.hits + c.misses == c.accesses


REPO = Path(__file__).resolve().parents[1]
TRAINING_MODULES = ("predictors.training", "predictors.reuse_training", "predictors.lightning_module",
                    "data_pipeline.datamodule")


def test_the_policy_serves_a_checkpoint_without_importing_training_code(tmp_path):
    """A fresh interpreter builds the forecast policy from a checkpoint of every reuse family and binds
    it: neither Lightning, torchmetrics nor a training module gets imported (training lives in
    predictors.training; the policy loads through predictors.reuse). The run-folder case:
    tests/test_train_reuse.py."""
    model = ModelInfo("synthetic", "test", 3, 12, 2)
    paths = [str(save_reuse_forecaster(f, tmp_path / f.family, model=model))
             for f in (CountedReuse(3, 12, 2), MLPReuse(3, 12, 2, hidden=8), LogisticReuse(3, 12, 2))]
    code = (f"import sys\nfrom offload.policies import make_policy\nfor path in {paths!r}:\n"
            f"    make_policy('forecast', forecaster=path).bind(3, 12)\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'torchmetrics') "
            f"or m in {TRAINING_MODULES!r}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert r.stdout.strip() == "[]", r.stdout
