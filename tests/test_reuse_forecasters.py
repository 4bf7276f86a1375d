"""Reuse history features, the counted and MLP reuse forecasters, their split and checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.errors import UserError
from core.model_info import ModelInfo
from core.passes import build_passes, passes_from_lists, take_passes
from data_pipeline.splits import split_rows
from data_pipeline.trace_store import TraceStoreWriter
from offload.forecast_eval import replay_split
from offload.policies import make_policy
from predictors.reuse import (
    CountedReuse,
    LogisticReuse,
    MLPReuse,
    is_reuse_checkpoint,
    load_reuse_forecaster,
    save_reuse_forecaster,
)
from predictors.reuse_features import AGE_CAP, FEATURE_NAMES, ReuseHistory, replay_rows, reuse_rows

F = {name: i for i, name in enumerate(FEATURE_NAMES)}


def test_history_features_are_the_hand_computed_ages_gaps_and_rates():
    h = ReuseHistory(1, 3)
    h.observe(0, 0, np.array([0]), np.array([0.5]))
    h.observe(0, 1, np.array([0, 1]), np.array([0.25, 0.75]))
    h.observe(0, 3, np.array([0]), np.array([1.0]))  # pass 2 unobserved: the layer used nothing
    f = h.features(0, 4)
    # expert 0: uses at 0, 1, 3 -> age 1, gaps 2 and 1
    assert f[0, F["log_age"]] == pytest.approx(0.0)
    assert f[0, F["log_gap1"]] == pytest.approx(math.log(2))
    assert f[0, F["log_gap2"]] == pytest.approx(0.0)
    # half-life 1 pass: ema 0.5 -> 0.75 -> 0.75/4 + 0.5; its normaliser follows the same steps
    assert f[0, F["rate_h1"]] == pytest.approx(1.0)
    assert f[1, F["rate_h1"]] == pytest.approx(0.125 / 0.6875)
    assert f[0, F["last_weight"]] == pytest.approx(1.0)
    assert f[0, F["mean_weight"]] == pytest.approx((0.5 + 0.25 + 1.0) / 3)
    # expert 1: one use at pass 1 -> age 3, no gap; expert 2 never used
    assert f[1, F["log_age"]] == pytest.approx(math.log(3))
    assert f[1, F["log_gap1"]] == pytest.approx(math.log(AGE_CAP))
    assert f[2, F["never_used"]] == 1.0 and f[1, F["never_used"]] == 0.0
    assert f[2, F["log_age"]] == pytest.approx(math.log(AGE_CAP))
    with pytest.raises(ValueError):
        h.observe(0, 3, np.array([1]))


def test_replay_rows_label_the_next_opportunity_from_earlier_passes_only():
    passes = passes_from_lists([[[0, 1]], [[1, 2]], [[0, 2]]], num_experts=4)
    rows = list(replay_rows(passes))
    # pass 1 ranks the experts seen before (0, 1): 1 is reused, 0 is not
    (p, layer, experts, feats, reused) = rows[0]
    assert (p, layer, experts.tolist(), reused.tolist()) == (1, 0, [0, 1], [False, True])
    # pass 2 ranks 0, 1, 2: 0 and 2 are reused; expert 0's age is 2 passes
    (p, _, experts, feats, reused) = rows[1]
    assert (p, experts.tolist(), reused.tolist()) == (2, [0, 1, 2], [True, False, True])
    assert feats[0, F["log_age"]] == pytest.approx(math.log(2))


def test_counted_table_is_the_smoothed_bucket_rate():
    f = np.zeros((4, len(FEATURE_NAMES)), dtype=np.float32)  # age 1 (log 0), rate 0: one cell
    c = CountedReuse(1, 4, 1, smoothing=2.0).fit(f, np.array([True, True, True, False]))
    prior = (3 + 1) / (4 + 2)
    q_age = (3 + 2 * prior) / (4 + 2)
    assert c.reuse_probability(f[:1])[0] == pytest.approx((3 + 2 * q_age) / (4 + 2))
    n = c.expected_passes(ReuseHistory(1, 4), 0, 0)  # never used: an empty cell -> the prior
    assert n.shape == (4,) and np.all(n >= 1.0)


def _sticky_store(path, n_seq: int = 6, decode: int = 60, L: int = 3, E: int = 12, K: int = 2, seed: int = 0):
    """A small store whose experts are sticky from token to token (reuse carries information)."""
    rng = np.random.default_rng(seed)
    pop = rng.dirichlet(np.ones(E) * 0.3, size=L)
    w = TraceStoreWriter(path, ModelInfo("sticky", "test", L, E, K, expert_bytes=1000))
    for s in range(n_seq):
        T = 4 + decode
        ids = np.zeros((T, L, K), dtype=np.int64)
        cur = [list(rng.choice(E, K, replace=False, p=pop[layer])) for layer in range(L)]
        for t in range(T):
            for layer in range(L):
                keep = [e for e in cur[layer] if rng.random() < 0.7]
                while len(keep) < K:
                    e = int(rng.choice(E, p=pop[layer]))
                    if e not in keep:
                        keep.append(e)
                cur[layer] = keep
                ids[t, layer] = keep
        w.write_shard(seq_id=np.full(T, s), position=np.arange(T), token_id=np.zeros(T, dtype=np.int64),
                      phase=(np.arange(T) >= 4).astype(np.int8), topk_ids=ids,
                      topk_weights=np.full((T, L, K), 1.0 / K, dtype=np.float32))
    return w.finalize()


def test_training_rows_never_see_a_held_out_pass(tmp_path):
    store = _sticky_store(tmp_path / "s")
    passes = build_passes(store)
    split = split_rows(store, val_fraction=0.2, test_fraction=0.3)
    part = split.parts_of(passes.row_start)
    assert split.how == "sequence"
    # every pass in exactly one part, whole sequences per part, and the parts' sequences disjoint
    assert set(np.unique(part)) == {0, 1, 2}
    seqs = [set(passes.seq[part == k].tolist()) for k in range(3)]
    assert not (seqs[0] & seqs[1] or seqs[0] & seqs[2] or seqs[1] & seqs[2])
    rows = reuse_rows(passes, part)
    # scramble every held-out pass: the training rows must not change by a single bit
    scrambled = passes_from_lists([[list(passes.layer_experts(p, layer)) for layer in range(3)]
                                   for p in range(passes.num_passes)], 12, 2)
    rng = np.random.default_rng(1)
    held = np.isin(np.repeat(np.arange(passes.num_passes), np.diff(scrambled.layer_ptr).reshape(-1, 3).sum(1)),
                   np.flatnonzero(part > 0))
    scrambled.expert[held] = rng.permutation(scrambled.expert[held])
    scrambled.score[:] = passes.score
    rows2 = reuse_rows(scrambled, part)
    assert np.array_equal(rows[0][0], rows2[0][0]) and np.array_equal(rows[0][1], rows2[0][1])
    assert not np.array_equal(rows[2][1], rows2[2][1])
    # take_passes keeps exactly the training passes, in order
    train = take_passes(passes, part == 0)
    assert train.num_passes == int((part == 0).sum())
    assert [list(train.layer_experts(i, 1)) for i in range(3)] == [
        list(passes.layer_experts(p, 1)) for p in np.flatnonzero(part == 0)[:3]]


def test_gemma_split_trains_on_the_first_part_of_the_decode_only(gemma_store):
    passes = build_passes(gemma_store, "decode")
    split = split_rows(gemma_store, test_fraction=0.35)  # the reuse_training alias's default
    part = split.parts_of(passes.row_start)
    assert split.how == "position"
    # one prompt: training passes are a prefix, then validation, then test, no pass in two parts
    assert np.all(np.diff(part) >= 0) and part[0] == 0 and part[-1] == 2
    assert np.bincount(part).tolist() == [64, 19, 45]


def test_checkpoints_round_trip_and_refuse_another_model(tmp_path):
    model = ModelInfo("m", "test", 3, 12, 2)
    x = np.random.default_rng(0).normal(size=(50, len(FEATURE_NAMES))).astype(np.float32)
    y = np.arange(50) % 3 == 0
    counted = CountedReuse(3, 12, 2).fit(np.abs(x), y)
    mlp = MLPReuse(3, 12, 2, hidden=8)
    mlp.set_standardisation(x)
    logistic = LogisticReuse(3, 12, 2).fit(np.abs(x), y)
    for f in (counted, mlp, logistic):
        path = save_reuse_forecaster(f, tmp_path / f.family, model=model, store_fingerprint="abc")
        assert is_reuse_checkpoint(path)
        back = load_reuse_forecaster(path, model)
        assert type(back) is type(f)
        assert np.allclose(back.reuse_probability(np.abs(x)), f.reuse_probability(np.abs(x)))
        with pytest.raises(UserError, match="trained for m"):
            load_reuse_forecaster(path, ModelInfo("other", "test", 3, 12, 2))


@pytest.mark.slow
def test_mlp_trains_with_lightning_and_drives_the_policy_from_its_checkpoint(tmp_path):
    from predictors.training import DataConfig, ReuseConfig, run_training  # lightning (~3 s): only this test

    store = _sticky_store(tmp_path / "s")
    data = DataConfig(store=str(store.path), val_fraction=0.2, test_fraction=0.3)
    run = run_training(families=["reuse_mlp"], data=data, lookahead=1, overfetch=1.5, run_dir=tmp_path / "run",
                       trainer_kwargs={"max_epochs": 6, "accelerator": "cpu", "devices": 1,
                                       "enable_progress_bar": False, "enable_model_summary": False},
                       reuse=ReuseConfig(hidden=16))
    (mlp,) = run.results
    assert mlp.trained and mlp.reuse["metrics"]["val_auroc"] > 0.7  # recency alone separates sticky experts well
    passes = build_passes(store)
    part = split_rows(store, val_fraction=0.2, test_fraction=0.3).parts_of(passes.row_start)
    rates = {name: replay_split(passes, make_policy(name, **params), 4, part).parts["test"].hit_rate
             for name, params in (("lru", {}), ("forecast", {"forecaster": str(tmp_path / "run")}), ("belady", {}))}
    assert rates["lru"] < rates["forecast"] <= rates["belady"]


def test_numpy_serving_of_the_mlp_equals_its_torch_forward():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, len(FEATURE_NAMES))).astype(np.float32)
    mlp = MLPReuse(3, 8, 2, hidden=16)
    mlp.set_standardisation(x * 3 + 1)
    torch_logits = mlp.net(torch.from_numpy(x)).detach().numpy()
    assert np.allclose(mlp.logits(x), torch_logits, atol=1e-5)


def _follow_stream(seed: int, L: int = 2, E: int = 12, P: int = 400) -> list:
    """Each layer's next pick is decided by its last one (a fixed successor map), now and then a
    random expert: what the layer chose last time says everything, recency and rates little."""
    rng = np.random.default_rng(seed)
    successor = [rng.permutation(E) for _ in range(L)]
    cur = [int(rng.integers(E)) for _ in range(L)]
    out = []
    for _ in range(P):
        for layer in range(L):
            cur[layer] = int(successor[layer][cur[layer]]) if rng.random() < 0.85 else int(rng.integers(E))
        out.append([[cur[layer]] for layer in range(L)])
    return out


def test_p_follow_counts_who_follows_whom():
    h = ReuseHistory(1, 4)
    for p, e in enumerate([0, 1, 0, 1, 0]):  # 1 always follows 0
        h.observe(0, p, np.array([e]))
    f = h.features(0, 5)
    # after 0: expert 1 followed it twice in 2 chances, smoothed by 2 pseudo-chances of its overall rate
    base1 = (2 + 1) / (5 + 2)
    assert f[1, F["p_follow"]] == pytest.approx((2 + 2 * base1) / (2 + 2), rel=1e-6)
    assert f[2, F["p_follow"]] == pytest.approx((0 + 2 * (1 / 7)) / 4, rel=1e-6)  # never used, never followed


def test_logistic_reuse_learns_online_what_follows_and_beats_the_counted_table():
    """On a stream where the last pick decides the next, the online logistic forecaster (p_follow among
    its features) ranks 'chosen at the next opportunity' better than the counted (age, rate) table,
    judged on later opportunities before it learns from them (benchmarks/latency.py shows what that
    buys the forecast policy on the real gemma trace)."""
    from sklearn.metrics import roc_auc_score  # sklearn: ~1 s to import; only this test

    passes = passes_from_lists(_follow_stream(0), 12, 1)
    logistic, counted = LogisticReuse(2, 12, 1, warmup=200), CountedReuse(2, 12, 1)
    scores = {"logistic": [], "counted": []}
    labels = []
    for p, _layer, _experts, f, used in replay_rows(passes):
        if p > 200:
            scores["logistic"].append(logistic.reuse_probability(f))
            scores["counted"].append(counted.reuse_probability(f))
            labels.append(used)
        logistic.learn(f, used)
        counted.learn(f, used)
    y = np.concatenate(labels)
    auc = {k: roc_auc_score(y, np.concatenate(v)) for k, v in scores.items()}
    assert auc["logistic"] > auc["counted"] + 0.1, auc


def test_logistic_reuse_answers_with_the_table_while_the_table_predicts_better():
    """Prequential switch: while the counted table's recent log loss is lower, its answer is served."""
    rng = np.random.default_rng(1)
    f = LogisticReuse(1, 8, 1, warmup=0)
    x = np.abs(rng.normal(size=(64, len(FEATURE_NAMES)))).astype(np.float32)
    f.w[:] = 0.1  # a fitted model: its answer differs from the empty table's 0.5
    f.loss_gap = 0.5  # the table has been the better predictor
    assert np.array_equal(f.reuse_probability(x), f.fallback.reuse_probability(x))
    f.loss_gap = -0.5
    assert not np.array_equal(f.reuse_probability(x), f.fallback.reuse_probability(x))
