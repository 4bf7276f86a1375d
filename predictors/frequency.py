"""Counting predictors: the floor every learned model must beat.

- :class:`FrequencyPredictor` (``frequency``): per-layer popularity. Layer ``l+d`` is forecast
  with how often each expert was chosen there, whatever the token.
- :class:`ConditionalFrequency` (``conditional_frequency``): experts at ``l+d`` given the experts
  chosen at ``l``, counted over the training tokens. The score of expert ``j`` at ``l+d`` is the
  mean over the experts ``i`` chosen at ``l`` of P(j at l+d | i at l); an expert ``i`` seen rarely
  in training is shrunk towards the popularity of ``l+d`` (additive smoothing weighted by
  ``smoothing``), so an unseen one falls back to plain popularity instead of to zeros.

Both need only expert ids, so they work on imported traces without hidden states.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from core.errors import UserError
from core.model_info import check_lookahead
from predictors.base import PredictContext, Predictor


def multi_hot(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """(N, K) expert ids -> (N, E) float32 0/1 rows; a row of -1 (a layer the token did not run, see
    data_pipeline.trace_store) stays all zero."""
    ids = np.asarray(ids, dtype=np.int64)
    out = np.zeros((len(ids), num_experts + 1), dtype=np.float32)
    np.put_along_axis(out, np.where(ids < 0, num_experts, ids), 1.0, axis=1)
    return np.ascontiguousarray(out[:, :num_experts])


def layer_popularity(topk_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """(N, L, K) routes -> (L, E) float32: per layer, the fraction of the tokens that ran it choosing each
    expert (rows sum to K; tokens that skipped a layer do not dilute it)."""
    rows = []
    for layer in range(topk_ids.shape[1]):
        ids = np.asarray(topk_ids[:, layer])
        ran = int((ids[:, 0] >= 0).sum()) if ids.shape[1] else 0
        rows.append(np.bincount(ids[ids >= 0].astype(np.int64), minlength=num_experts)[:num_experts] / max(ran, 1))
    return np.stack(rows).astype(np.float32)


def _check_routes(topk_ids: np.ndarray, num_experts: int) -> np.ndarray:
    topk_ids = np.asarray(topk_ids)
    if topk_ids.ndim != 3:
        raise ValueError(f"expected topk_ids of shape (N, L, K), got {topk_ids.shape}")
    if len(topk_ids) == 0:
        raise UserError("no training tokens to count experts on (empty split)")
    return topk_ids


class FrequencyPredictor(Predictor):
    """Per-layer popularity: scores of layer ``l+d`` = fraction of training tokens choosing each expert."""

    family = "frequency"
    needs = frozenset()
    kernels = 1  # a row of the popularity table

    def __init__(self, popularity: torch.Tensor, top_k: int, lookahead: int):
        num_layers, num_experts = popularity.shape
        check_lookahead(lookahead, num_layers)
        super().__init__(num_layers, num_experts, top_k, lookahead)
        self.popularity = popularity.float()  # (L, E), rows sum to top_k

    @classmethod
    def fit(cls, topk_ids: np.ndarray, num_experts: int, lookahead: int) -> FrequencyPredictor:
        """Count (N, L, K) routed expert ids."""
        topk_ids = _check_routes(topk_ids, num_experts)
        top_k = topk_ids.shape[2]
        return cls(torch.from_numpy(layer_popularity(topk_ids, num_experts)), top_k, lookahead)

    @torch.no_grad()
    def predict(self, ctx: PredictContext) -> torch.Tensor:
        t = _num_tokens(ctx)
        out = torch.zeros((self.lookahead, self.num_experts))
        last = min(ctx.layer + self.lookahead, self.num_layers - 1)
        out[: last - ctx.layer] = self.popularity[ctx.layer + 1: last + 1]
        return out.unsqueeze(0).expand(t, -1, -1)

    def state(self) -> dict[str, torch.Tensor]:
        return {"popularity": self.popularity}

    @classmethod
    def from_state(cls, hparams: dict[str, Any], state: dict[str, torch.Tensor]) -> FrequencyPredictor:
        return cls(state["popularity"], int(hparams["top_k"]), int(hparams["lookahead"]))


class ConditionalFrequency(Predictor):
    """P(expert j at l+d | expert i at l), counted; averaged over the experts chosen at ``l``."""

    family = "conditional_frequency"
    needs = frozenset({"chosen"})
    kernels = 2  # gather the chosen experts' transition rows, average

    def __init__(self, counts: torch.Tensor, popularity: torch.Tensor, top_k: int, smoothing: float = 1.0):
        num_layers, lookahead, num_experts, _ = counts.shape
        check_lookahead(lookahead, num_layers)
        super().__init__(num_layers, num_experts, top_k, lookahead)
        self.counts = counts.float()  # (L, D, E_src, E_dst): tokens with i at l and j at l+d
        self.popularity = popularity.float()  # (L, E): fraction of tokens choosing each expert
        self.smoothing = float(smoothing)
        self.table = self._conditional()

    def _conditional(self) -> torch.Tensor:
        """(L, D, E, E) smoothed P(j at l+d | i at l); rows past the last layer stay zero."""
        n_src = self.counts.sum(dim=-1) / self.top_k  # tokens with i at l (each adds K to its row)
        table = torch.zeros_like(self.counts)
        for d in range(1, self.lookahead + 1):
            for layer in range(self.num_layers - d):
                prior = self.popularity[layer + d]  # (E,)
                num = self.counts[layer, d - 1] + self.smoothing * prior
                table[layer, d - 1] = num / (n_src[layer, d - 1, :, None] + self.smoothing)
        return table

    @classmethod
    def fit(cls, topk_ids: np.ndarray, num_experts: int, lookahead: int,
            smoothing: float = 1.0) -> ConditionalFrequency:
        """Count co-occurrences in (N, L, K) routed expert ids."""
        topk_ids = _check_routes(topk_ids, num_experts)
        n, num_layers, top_k = topk_ids.shape
        check_lookahead(lookahead, num_layers)
        hot = [multi_hot(topk_ids[:, layer], num_experts) for layer in range(num_layers)]
        counts = np.zeros((num_layers, lookahead, num_experts, num_experts), dtype=np.float32)
        for d in range(1, lookahead + 1):
            for layer in range(num_layers - d):
                counts[layer, d - 1] = hot[layer].T @ hot[layer + d]
        pop = layer_popularity(topk_ids, num_experts)  # fraction of the tokens choosing each expert
        return cls(torch.from_numpy(counts), torch.from_numpy(pop), top_k, smoothing)

    @torch.no_grad()
    def predict(self, ctx: PredictContext) -> torch.Tensor:
        if ctx.chosen is None:
            raise UserError(f"{self.family} needs the experts chosen at layer {ctx.layer}")
        src = ctx.chosen[:, ctx.layer].long()  # (T, K)
        rows = self.table[ctx.layer][:, src]  # (D, T, K, E)
        return rows.mean(dim=2).transpose(0, 1).contiguous()  # (T, D, E)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "smoothing": self.smoothing}

    def state(self) -> dict[str, torch.Tensor]:
        return {"counts": self.counts, "popularity": self.popularity}

    @classmethod
    def from_state(cls, hparams: dict[str, Any], state: dict[str, torch.Tensor]) -> ConditionalFrequency:
        return cls(state["counts"], state["popularity"], int(hparams["top_k"]), float(hparams["smoothing"]))


def _num_tokens(ctx: PredictContext) -> int:
    for field in (ctx.hidden, ctx.chosen, ctx.previous):
        if field is not None:
            return int(field.shape[0])
    return 1
