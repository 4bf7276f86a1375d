"""Prediction metrics per lookahead distance and per layer, as one torchmetrics ``Metric``.

For a token whose layer ``l+d`` picked the set S (|S| = K) and a forecast made at layer ``l``:

- precision@k = |top-k(scores) ∩ S| / k
- recall@k    = |top-k(scores) ∩ S| / K
- exact-set match = top-K(scores) == S

with k = K (the model's top-k) and k = round(K * overfetch) (what a prefetcher that over-fetches
would load). Counts are summed per (layer, distance) and synchronised across processes by
torchmetrics, so the same class serves training-free families, validation during training and
DDP runs.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


def overfetch_k(top_k: int, overfetch: float) -> int:
    return max(top_k, int(round(top_k * overfetch)))


def top_hits(scores: torch.Tensor, truth: torch.Tensor, k: int) -> torch.Tensor:
    """(T, E) scores and (T, E) 0/1 truth -> (T,) number of true experts among the top-k scores."""
    top = scores.topk(k, dim=-1).indices
    return truth.gather(-1, top).sum(dim=-1)


class LookaheadMetrics(Metric):
    """precision@k, recall@k (k = K and K*overfetch) and exact-set match, per (layer, distance)."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_layers: int, lookahead: int, num_experts: int, top_k: int, overfetch: float = 1.5):
        super().__init__()
        self.num_layers, self.lookahead, self.num_experts = num_layers, lookahead, num_experts
        self.top_k = top_k
        self.k_over = min(num_experts, overfetch_k(top_k, overfetch))
        for name in ("hits", "hits_over", "exact", "tokens"):
            self.add_state(name, default=torch.zeros(num_layers, lookahead, dtype=torch.float64),
                           dist_reduce_fx="sum")

    def update(self, scores: torch.Tensor, future_ids: torch.Tensor, layer: int, distances: list[int]) -> None:
        """Score the forecast made at ``layer``.

        scores: (T, D, E); future_ids: (T, L, K) the true expert ids at every layer (-1 where the
        token did not run the layer: those tokens are not counted at that target);
        distances: which d (1-based) to count (the ones the family covers at ``layer``).
        """
        for d in distances:
            target = future_ids[:, layer + d].long()
            s = scores[:, d - 1].float()
            ran = target[:, 0] >= 0  # a token that did not run layer l+d (ids -1) has nothing to forecast
            if not bool(ran.all()):
                target, s = target[ran], s[ran]
            truth = torch.zeros(s.shape[0], self.num_experts, device=scores.device)
            truth.scatter_(1, target, 1.0)
            hits = top_hits(s, truth, self.top_k)
            self.hits[layer, d - 1] += hits.sum().double()
            self.hits_over[layer, d - 1] += top_hits(s, truth, self.k_over).sum().double()
            self.exact[layer, d - 1] += (hits == self.top_k).sum().double()
            self.tokens[layer, d - 1] += s.shape[0]

    def compute(self) -> dict[str, torch.Tensor]:
        """Per (layer, distance) tables; NaN where nothing was counted."""
        n = self.tokens.clamp(min=1)
        nan = torch.where(self.tokens > 0, 0.0, float("nan")).to(self.tokens)
        k, ko = self.top_k, self.k_over
        return {
            "precision@k": self.hits / (n * k) + nan,
            "recall@k": self.hits / (n * k) + nan,
            f"precision@{ko}": self.hits_over / (n * ko) + nan,
            f"recall@{ko}": self.hits_over / (n * k) + nan,
            "exact": self.exact / n + nan,
        }

    def per_distance(self) -> dict[str, torch.Tensor]:
        """(D,) token-weighted means over the layers counted at each distance."""
        n = self.tokens.sum(dim=0)
        safe = n.clamp(min=1)
        nan = torch.where(n > 0, 0.0, float("nan")).to(n)
        k, ko = self.top_k, self.k_over
        hits, over = self.hits.sum(dim=0), self.hits_over.sum(dim=0)
        return {
            "precision@k": hits / (safe * k) + nan,
            "recall@k": hits / (safe * k) + nan,
            f"precision@{ko}": over / (safe * ko) + nan,
            f"recall@{ko}": over / (safe * k) + nan,
            "exact": self.exact.sum(dim=0) / safe + nan,
        }
