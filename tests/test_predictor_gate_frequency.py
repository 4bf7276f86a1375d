"""Training-free families on hand-computed tiny cases."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_predictor_synthetic import make_synthetic_store

from core.errors import UserError
from predictors.base import PredictContext
from predictors.frequency import ConditionalFrequency, FrequencyPredictor
from predictors.gate_lookahead import GateLookahead


def _routers() -> torch.Tensor:
    w = torch.zeros(3, 3, 2)
    w[1] = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    w[2] = torch.tensor([[0.0, 2.0], [2.0, 0.0], [0.0, 0.0]])
    return w


def test_gate_lookahead_is_the_next_routers_softmax() -> None:
    gate = GateLookahead(_routers(), top_k=1, lookahead=2)
    scores = gate.predict(PredictContext(layer=0, hidden=torch.tensor([[1.0, 0.0]])))
    assert scores.shape == (1, 2, 3)
    z = [math.exp(1), 1.0, math.exp(-1)]
    assert torch.allclose(scores[0, 0], torch.tensor(z) / sum(z))
    z = [1.0, math.exp(2), 1.0]
    assert torch.allclose(scores[0, 1], torch.tensor(z) / sum(z))
    # from layer 1, d=2 would be layer 3: past the end, zeros
    past = gate.predict(PredictContext(layer=1, hidden=torch.tensor([[1.0, 0.0]])))
    assert torch.equal(past[0, 1], torch.zeros(3)) and gate.covers(1, 1) and not gate.covers(1, 2)


def test_gate_lookahead_refuses_bad_input() -> None:
    with pytest.raises(UserError, match="D=3 runs past the last layer.*at most 2"):
        GateLookahead(_routers(), top_k=1, lookahead=3)
    with pytest.raises(UserError, match="needs the MoE-input hidden state"):
        GateLookahead(_routers(), top_k=1, lookahead=1).predict(PredictContext(layer=0))


def test_gate_lookahead_from_store_reproduces_routing_at_distance_zero(tmp_path: Path) -> None:
    store = make_synthetic_store(tmp_path / "s", num_sequences=2, seq_len=6)
    gate = GateLookahead.from_store(store, lookahead=2)
    assert gate.predict(PredictContext(layer=1, hidden=torch.zeros(12, 32))).shape == (12, 2, store.num_experts)
    # the forecast of layer 2 made at layer 1 uses layer 2's router: fed h_2 itself, it is the routing
    h2 = torch.from_numpy(store.hidden(2).astype(np.float32))
    own = gate.predict(PredictContext(layer=1, hidden=h2))[:, 0].topk(store.top_k).indices
    truth = torch.from_numpy(store.topk_ids([2]).astype(np.int64))[:, 0]
    assert torch.equal(own.sort(dim=1).values, truth.sort(dim=1).values)


def test_gate_lookahead_without_router_weights(tmp_path: Path) -> None:
    store = make_synthetic_store(tmp_path / "s", num_sequences=1, seq_len=3, router_weights=False)
    with pytest.raises(UserError, match="no router weights"):
        GateLookahead.from_store(store, lookahead=1)


ROUTES = np.array([[[0], [1]], [[0], [2]]])  # 2 tokens, 2 layers, top-1


def test_popularity_counts_each_layer() -> None:
    freq = FrequencyPredictor.fit(ROUTES, num_experts=3, lookahead=1)
    scores = freq.predict(PredictContext(layer=0, chosen=torch.tensor([[[1]]])))
    assert torch.allclose(scores, torch.tensor([[[0.0, 0.5, 0.5]]]))
    assert torch.allclose(freq.popularity[0], torch.tensor([1.0, 0.0, 0.0]))


def test_conditional_frequency_by_hand() -> None:
    exact = ConditionalFrequency.fit(ROUTES, num_experts=3, lookahead=1, smoothing=0.0)
    got = exact.predict(PredictContext(layer=0, chosen=torch.tensor([[[0]]])))
    assert torch.allclose(got, torch.tensor([[[0.0, 0.5, 0.5]]]))
    smooth = ConditionalFrequency.fit(ROUTES, num_experts=3, lookahead=1, smoothing=1.0)
    # seen source expert 0 (2 tokens): (counts + 1 * popularity) / (2 + 1)
    got = smooth.predict(PredictContext(layer=0, chosen=torch.tensor([[[0]], [[1]]])))
    assert torch.allclose(got[0, 0], torch.tensor([0.0, 1.5, 1.5]) / 3)
    # unseen source expert 1 falls back to the popularity of layer 1
    assert torch.allclose(got[1, 0], torch.tensor([0.0, 0.5, 0.5]))


def test_conditional_frequency_averages_over_the_chosen_set() -> None:
    routes = np.array([[[0, 1], [2, 3]], [[0, 2], [2, 1]], [[1, 3], [0, 3]]])  # N=3, L=2, K=2
    cond = ConditionalFrequency.fit(routes, num_experts=4, lookahead=1, smoothing=0.0)
    got = cond.predict(PredictContext(layer=0, chosen=torch.tensor([[[0, 1]]])))[0, 0]
    p0 = torch.tensor([0.0, 1, 2, 1]) / 2  # tokens with 0 at layer 0: {2,3}, {2,1}
    p1 = torch.tensor([1.0, 0, 1, 2]) / 2  # tokens with 1 at layer 0: {2,3}, {0,3}
    assert torch.allclose(got, (p0 + p1) / 2)


def test_frequency_refuses_empty_routes() -> None:
    with pytest.raises(UserError, match="no training tokens"):
        ConditionalFrequency.fit(np.zeros((0, 2, 1), dtype=np.int64), num_experts=3, lookahead=1)
