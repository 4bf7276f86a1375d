"""Routing: which experts run. ``standard`` replays the trace's own top-k; ``cache-aware`` re-routes.

Cache-aware routing (MixtureCache, Skliar et al. 2025): z' = z + lambda * delta_avg * 1_C, where z
are the router logits, 1_C marks experts resident now and delta_avg is a running average logit
scale. Our reading of "historical average logit": delta_avg is the running mean, over the tokens
routed so far at that layer, of the gap between the top-1 and the k-th largest logit, so
lambda is the fraction of a typical decision margin that residency is worth. Top-k is taken on z',
but the chosen experts are weighted by the ORIGINAL softmax (dual-logit semantics).

A replay cannot know how re-routing would change later hidden states; later layers keep the trace's
logits. Needs router logits in the store.
"""

from __future__ import annotations

import numpy as np

from core.errors import UserError

ROUTINGS = ("standard", "cache-aware")


class CacheAwareRouter:
    def __init__(self, num_layers: int, top_k: int, lam: float = 0.3):
        if lam < 0:
            raise UserError(f"cache-aware routing lambda must be non-negative (got {lam})")
        self.top_k = top_k
        self.lam = lam
        self.gap_sum = np.zeros(num_layers)
        self.gap_count = np.zeros(num_layers, dtype=np.int64)

    def route(self, layer: int, logits: np.ndarray, cached: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(T, E) logits, (E,) bool resident mask -> ids (T, k) best first and their original softmax weights."""
        z = logits.astype(np.float64)
        k = self.top_k
        part = -np.sort(-z, axis=1)
        gaps = part[:, 0] - part[:, k - 1]
        if self.gap_count[layer] == 0:
            delta = float(gaps.mean())
        else:
            delta = self.gap_sum[layer] / self.gap_count[layer]
        self.gap_sum[layer] += gaps.sum()
        self.gap_count[layer] += len(gaps)
        boosted = z + self.lam * delta * cached[None, :]
        ids = np.argsort(-boosted, axis=1, kind="stable")[:, :k]
        probs = np.exp(z - z.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        return ids, np.take_along_axis(probs, ids, axis=1)
