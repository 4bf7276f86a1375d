"""precision@k / recall@k / exact-set on hand-computed cases."""

from __future__ import annotations

import math

import torch

from predictors.metrics import LookaheadMetrics, overfetch_k


def test_metrics_by_hand() -> None:
    # 2 layers, 5 experts, top-2, D=1, overfetch 1.5 -> k_over = 3
    m = LookaheadMetrics(num_layers=2, lookahead=1, num_experts=5, top_k=2, overfetch=1.5)
    assert m.k_over == 3 == overfetch_k(2, 1.5)
    future = torch.tensor([[[0, 1], [2, 3]], [[0, 1], [4, 0]]])  # (T=2, L=2, K=2)
    scores = torch.tensor([[[0.0, 0.1, 0.9, 0.2, 0.8]],   # top-2 {2,4}: 1 hit of {2,3}; top-3 {2,4,3}: 2 hits
                           [[0.7, 0.0, 0.1, 0.2, 0.9]]])  # top-2 {4,0}: exact; top-3 adds 3: still 2 hits
    m.update(scores, future, layer=0, distances=[1])
    table = m.compute()
    assert math.isclose(table["recall@k"][0, 0].item(), (1 + 2) / 4)
    assert math.isclose(table["precision@3"][0, 0].item(), (2 + 2) / 6)
    assert math.isclose(table["recall@3"][0, 0].item(), (2 + 2) / 4)
    assert math.isclose(table["exact"][0, 0].item(), 0.5)
    assert math.isnan(table["recall@k"][1, 0].item())  # nothing forecast from layer 1
    per_d = m.per_distance()
    assert math.isclose(per_d["recall@k"][0].item(), 0.75)


def test_per_distance_weights_layers_by_tokens() -> None:
    m = LookaheadMetrics(num_layers=3, lookahead=2, num_experts=2, top_k=1)
    future = torch.tensor([[[0], [0], [1]]])
    right = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # layer 0: d=1 -> expert 0 (hit), d=2 -> 1 (hit)
    m.update(right, future, layer=0, distances=[1, 2])
    m.update(torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]), future, layer=1, distances=[1])  # d=1 -> 0: miss
    per_d = m.per_distance()
    assert per_d["recall@k"].tolist() == [0.5, 1.0]
    assert m.tokens.tolist() == [[1, 1], [1, 0], [0, 0]]
