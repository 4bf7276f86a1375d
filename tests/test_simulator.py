"""The simulator's semantics: timing, miss handling, routing, prefetch, capacity, passes, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.errors import UserError
from core.model_info import ModelInfo
from core.passes import build_passes, passes_from_lists
from data_pipeline.trace_store import TraceStoreWriter
from offload.capacity import parse_capacity
from offload.hardware import get_hardware
from offload.prefetch import (
    OraclePrefetch,
    PercentileSelection,
    PredictorPrefetch,
    TopKSelection,
    forecast_quality,
)
from offload.simulator import Replay, SimConfig, simulate_configs, simulate_reference
from offload.simulator_fast import simulate_fast
from predictors.base import PredictContext, Predictor
from predictors.checkpoint import save_predictor
from predictors.frequency import FrequencyPredictor

L, E, K, H = 4, 8, 2, 16


@pytest.fixture(scope="module")
def synth_store(tmp_path_factory):
    """A tiny store with hidden states, router logits and router weights. The hidden state of a
    token is the same at every layer, so gating lookahead (router of l+1 on h_l) is exact."""
    rng = np.random.default_rng(0)
    W = rng.normal(size=(L, E, H)).astype(np.float32)
    model = ModelInfo("synthetic", "test", L, E, K, hidden_size=H, expert_bytes=1_000_000, dtype="bfloat16")
    w = TraceStoreWriter(tmp_path_factory.mktemp("synth") / "store", model, hidden_layers=range(L),
                         store_router_logits=True)
    seq, pos, phase, hid = [], [], [], []
    for s in range(3):
        for t in range(11):
            seq.append(s)
            pos.append(t)
            phase.append(0 if t < 5 else 1)
            hid.append(rng.normal(size=H))
    hidden = np.asarray(hid, dtype=np.float16)
    logits = np.einsum("th,leh->tle", hidden.astype(np.float32), W).astype(np.float16).astype(np.float32)
    ids = np.argsort(-logits, axis=2, kind="stable")[:, :, :K]
    probs = np.exp(logits - logits.max(axis=2, keepdims=True))
    probs /= probs.sum(axis=2, keepdims=True)
    weights = np.take_along_axis(probs, ids, axis=2)
    n = len(seq)
    w.write_shard(seq_id=np.array(seq), position=np.array(pos), token_id=np.zeros(n), phase=np.array(phase),
                  topk_ids=ids, topk_weights=weights, router_logits=logits, hidden={i: hidden for i in range(L)})
    w.save_router_weights({i: W[i] for i in range(L)})
    return w.finalize()


def hand_replay(passes, forecast=None, capacity=4):
    hw = get_hardware("a100-5gbs:link_gbps=1,tflops=1e6,hbm_gbps=1000,layer_us=10,token_us=0,expert_us=0")
    return Replay(None, passes, forecast, hw, capacity, np.full(passes.num_layers, 1e6), 2.0)


def test_timing_hand_computed_demand_fetch():
    ps = passes_from_lists([[[0], [1]], [[0], [2]]], num_experts=4)
    cfg = SimConfig(policy="lru")
    for run in (simulate_reference, simulate_fast):
        r = run(hand_replay(ps), cfg)
        # copy 1 ms, expert 1 us, layer 10 us; pass 0: 10+1000+1 + 10+1000+1; pass 1: 10+1 + 10+1000+1
        assert r["stall_time_s"] == pytest.approx(3000e-6)
        assert r["tpot_s"] == pytest.approx((2022e-6 + 1022e-6) / 2)
        assert (r["hits"], r["misses"], r["ttft_s"]) == (1, 3, None)


def test_timing_hand_computed_late_prefetch():
    ps = passes_from_lists([[[0], [1]], [[0], [2]]], num_experts=4)
    fc = OraclePrefetch(1).forecast(ps, None)
    for run in (simulate_reference, simulate_fast):
        r = run(hand_replay(ps, fc), SimConfig(policy="lru", prefetch="oracle"))
        # the prefetch of layer 1 queues behind layer 0's demand copy and arrives 989 us late
        assert (r["hits"], r["late_prefetch_hits"], r["prefetch_issued"], r["prefetch_used"]) == (3, 2, 2, 2)
        assert r["stall_time_s"] == pytest.approx((1000 + 989 + 989) * 1e-6)
        assert r["tpot_s"] == pytest.approx((2011e-6 + 1011e-6) / 2)
        assert r["precision"] == 1.0 and r["recall"] == 1.0
        assert r["prefetch_bytes"] == 2e6


def test_drop_skips_low_ranks_only():
    ps = passes_from_lists([[[0, 1, 2]], [[3, 4, 5]]], num_experts=8)
    for run in (simulate_reference, simulate_fast):
        r = run(hand_replay(ps, capacity=8), SimConfig(policy="lru", miss="drop"))
        assert (r["misses"], r["dropped"], r["hits"]) == (6, 2, 0)  # rank 2 of each pass dropped
        r = run(hand_replay(ps, capacity=8), SimConfig(policy="lru", miss="drop", drop_from_rank=1))
        assert r["dropped"] == 4


def test_capacity_parsing():
    m = ModelInfo("m", "f", 16, 64, 8, expert_bytes=12 * 2**20)
    assert parse_capacity("5%", m) == round(0.05 * 1024)
    assert parse_capacity("600MiB", m) == 50
    assert parse_capacity("0.6GB", m) == int(0.6e9 // (12 * 2**20))
    assert parse_capacity("512", m) == 512
    assert parse_capacity("1024", m) == parse_capacity("100%", m) == 1024
    for bad in ("0", "-3", "0%", "7", "abc", "1.5", "", "nan", "inf", "nan%", "inf%", "150%", "5000", "20GB"):
        with pytest.raises(UserError):
            parse_capacity(bad, m)
    with pytest.raises(UserError, match="per layer"):
        parse_capacity("100", m, "per-layer")  # 100 < 8 x 16
    with pytest.raises(UserError, match="expert bytes"):
        parse_capacity("1GB", ModelInfo("m", "f", 16, 64, 8))


def test_passes_prefill_is_one_pass_ordered_by_summed_weight(synth_store):
    ps = build_passes(synth_store)
    assert ps.num_passes == 3 * (1 + 6)
    assert list(ps.phase[:7]) == [0] + [1] * 6
    ids = synth_store.topk_ids()[:5, 0]
    w = synth_store.topk_weights()[:5, 0]
    total = np.bincount(ids.reshape(-1), weights=w.reshape(-1), minlength=E)
    first = ps.layer_experts(0, 0)
    assert sorted(first.tolist()) == sorted(np.unique(ids).tolist())
    assert np.all(np.diff(total[first]) <= 0)
    assert ps.tokens[: len(first)].sum() == 5 * K
    assert len(build_passes(synth_store, "decode").phase) == 18
    assert len(build_passes(synth_store, "prefill").phase) == 3


def test_gate_prefetch_is_exact_when_hidden_states_do_not_change(synth_store):
    res = simulate_configs(synth_store, [SimConfig(policy="lru", capacity="50%", prefetch=p, lookahead=1)
                                         for p in ("topk", "gate", "oracle")])
    topk, gate, oracle = res
    assert topk["precision"] == pytest.approx(1.0) and topk["recall"] == pytest.approx(1.0)
    for k in ("hits", "misses", "prefetch_issued", "collision_misses"):
        assert topk[k] == gate[k] == oracle[k]
    deeper = simulate_configs(synth_store, [SimConfig(policy="lru", capacity="50%", prefetch="gate", lookahead=2)])[0]
    # the same hidden state at every layer makes every distance exact, and copies start a layer earlier
    assert deeper["precision"] == pytest.approx(1.0) and deeper["recall"] == pytest.approx(1.0)
    assert deeper["late_prefetch_hits"] < topk["late_prefetch_hits"]


def test_percentile_prefetch_takes_the_top_fifth():
    probs = np.array([[0.5, 0.2, 0.1, 0.1, 0.05, 0.03, 0.01, 0.01, 0.0, 0.0]])
    assert PercentileSelection(0.8).counts(probs, 2).tolist() == [2]


def test_percentile_prefetch_runs_with_precision_and_recall(synth_store):
    r = simulate_configs(synth_store, [SimConfig(policy="least_stale", capacity="50%", prefetch="percentile")])[0]
    assert r["prefetch_issued"] > 0 and 0 < r["precision"] <= 1 and 0 < r["recall"] <= 1


def test_forecast_quality_counts_hits_over_predictions():
    ps = passes_from_lists([[[0], [1, 2]]], num_experts=4)
    fc = OraclePrefetch(1).forecast(ps, None)
    fc.expert[:] = [1, 3][: len(fc.expert)]  # predict {1, 3} for layer 1 whose truth is {1, 2}
    assert forecast_quality(ps, fc) == (0.5, 0.5)


def test_cache_aware_routing(synth_store):
    base = dict(policy="lru", capacity="25%", backend="reference")
    std, zero, strong = simulate_configs(synth_store, [
        SimConfig(**base), SimConfig(**base, routing="cache-aware", routing_lambda=0.0),
        SimConfig(**base, routing="cache-aware", routing_lambda=5.0)])
    assert (zero["hits"], zero["misses"]) == (std["hits"], std["misses"])  # lambda 0 = the model's own top-k
    assert strong["hit_rate"] > std["hit_rate"]


def test_substitute_replaces_misses_with_resident_experts(synth_store):
    loose, tight = simulate_configs(synth_store, [
        SimConfig(policy="lru", capacity="25%", miss="substitute", substitute_tolerance=1.0),
        SimConfig(policy="lru", capacity="25%", miss="substitute", substitute_tolerance=0.0)])
    assert loose["backend"] == "reference"
    assert loose["substituted"] > tight["substituted"]
    assert loose["evictions"] < tight["evictions"]


def test_bad_input_is_a_user_error(gemma_store):
    cases = [SimConfig(routing="cache-aware"), SimConfig(miss="substitute"), SimConfig(prefetch="gate"),
             SimConfig(prefetch="topk"), SimConfig(policy="nope"), SimConfig(prefetch="nope"),
             SimConfig(hardware="nope"), SimConfig(capacity="0"), SimConfig(capacity="5"),
             SimConfig(cache="per-layer", capacity="100"), SimConfig(lookahead=0, prefetch="oracle")]
    for cfg in cases:
        with pytest.raises(UserError):
            simulate_configs(gemma_store, [cfg])


def test_belady_with_cache_aware_routing_is_refused(synth_store):
    with pytest.raises(UserError, match="belady"):
        simulate_configs(synth_store, [SimConfig(policy="belady", routing="cache-aware")])


@pytest.mark.parametrize("capacity", ["1%", "5%", "10%", "25%"])
def test_least_stale_has_fewer_collisions_than_lru_on_gemma(gemma_store, capacity):
    ls, lru = simulate_configs(gemma_store, [SimConfig(policy="least_stale", capacity=capacity),
                                             SimConfig(policy="lru", capacity=capacity)])
    assert ls["collision_misses"] < lru["collision_misses"]
    assert ls["hit_rate"] >= lru["hit_rate"]


class PreviousTokenPredictor(Predictor):
    """A tiny Predictor: layer l+d will pick what the previous token picked there (needs "previous")."""

    family = "previous_token"
    needs = frozenset({"previous"})

    def predict(self, ctx: PredictContext) -> torch.Tensor:
        prev = ctx.previous  # (T, L, K); num_experts = no previous token
        out = torch.zeros(prev.shape[0], self.lookahead, self.num_experts + 1)
        for d in range(1, self.lookahead + 1):
            if ctx.layer + d < self.num_layers:
                out[:, d - 1].scatter_(1, prev[:, ctx.layer + d], 1.0)
        return out[:, :, : self.num_experts]


def test_predictor_backed_prefetch_uses_the_forecast(gemma_store):
    m = gemma_store.model
    pf = PredictorPrefetch(PreviousTokenPredictor(m.num_layers, m.num_experts, m.top_k, 2), TopKSelection(1.0))
    ps = build_passes(gemma_store, "decode")
    fc = pf.forecast(ps, gemma_store)
    ids = gemma_store.topk_ids()
    row = int(ps.row_start[5])
    for layer, d in ((0, 1), (3, 2), (27, 2)):
        assert sorted(fc.picks(5, layer, d, m.num_layers).tolist()) == sorted(ids[row - 1, layer + d].tolist())
    assert len(fc.entries(5, 29, 1, m.num_layers)) == 0 and not fc.covered[29, 0]
    precision, recall = forecast_quality(ps, fc)
    assert 0 < precision < 1 and precision == pytest.approx(recall)  # k predictions for k true experts


def test_checkpoint_prefetch(gemma_store, tmp_path):
    pred = FrequencyPredictor.fit(gemma_store.topk_ids(), gemma_store.num_experts, 2)
    path = save_predictor(pred, tmp_path / "freq", model=gemma_store.model)
    r = simulate_configs(gemma_store, [SimConfig(policy="least_stale", prefetch=f"ckpt:{path}", lookahead=2)])[0]
    assert r["prefetch_issued"] > 0 and 0 < r["precision"] < 1
    with pytest.raises(UserError):
        simulate_configs(gemma_store, [SimConfig(prefetch=f"ckpt:{tmp_path / 'missing.safetensors'}")])
