"""Turning a batch of tokens into per-layer contexts, and scoring any family on a split.

Reuse forecasters (:mod:`predictors.reuse`) are scored on their own rows: :func:`evaluate_reuse_rows`.

Training and evaluation both walk the layers of a batch with :func:`layer_contexts`, so a learned
family is trained on exactly the contexts the simulator and the engine will give it online.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from predictors.base import PredictContext, Predictor
from predictors.metrics import LookaheadMetrics


def context_layers(predictor: Predictor, hidden_layers: list[int]) -> list[int]:
    """Layers at which ``predictor`` can forecast anything, given where the store has hidden states."""
    layers = [layer for layer in range(predictor.num_layers - 1)
              if any(predictor.covers(layer, d) for d in range(1, predictor.lookahead + 1))]
    if "hidden" in predictor.needs:
        layers = [layer for layer in layers if layer in hidden_layers]
    return layers


def layer_contexts(batch: dict[str, torch.Tensor], layers: Iterable[int],
                   hidden_layers: list[int]) -> Iterator[PredictContext]:
    """One :class:`PredictContext` per layer for the tokens of ``batch`` (see data_pipeline.datamodule)."""
    hidden = batch.get("hidden")
    where = {layer: i for i, layer in enumerate(hidden_layers)}
    for layer in layers:
        yield PredictContext(
            layer=layer,
            hidden=hidden[:, where[layer]] if hidden is not None and layer in where else None,
            chosen=batch["topk_ids"][:, : layer + 1],
            previous=batch["previous"],
            token=batch.get("token"),
        )


def covered_distances(predictor: Predictor, layer: int) -> list[int]:
    return [d for d in range(1, predictor.lookahead + 1) if predictor.covers(layer, d)]


@torch.no_grad()
def evaluate_predictor(predictor: Predictor, batches: Iterable[dict[str, torch.Tensor]], *, num_experts: int,
                       hidden_layers: list[int], overfetch: float = 1.5, desc: str | None = None) -> LookaheadMetrics:
    """Run ``predictor.predict`` over every token and layer of ``batches``; the filled metric."""
    metric = LookaheadMetrics(predictor.num_layers, predictor.lookahead, num_experts, predictor.top_k, overfetch)
    layers = context_layers(predictor, hidden_layers)
    for batch in tqdm(batches, desc=desc or f"evaluate {predictor.family}", leave=False, disable=desc == ""):
        for ctx in layer_contexts(batch, layers, hidden_layers):
            metric.update(predictor.predict(ctx), batch["topk_ids"], ctx.layer, covered_distances(predictor, ctx.layer))
    return metric


def evaluate_reuse_rows(forecaster: Any, parts: dict[int, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """AUROC and BCE of a reuse forecaster's probability on the validation and test rows.

    A reuse forecaster answers one yes/no question per (pass, layer, expert) -- chosen at its next
    opportunity? -- so recall@k does not apply; a part with one class only has no AUROC and is left out.
    """
    # sklearn: ~1 s to import; only when a reuse forecaster is scored
    from sklearn.metrics import log_loss, roc_auc_score

    out: dict[str, float] = {}
    for i, name in ((1, "val"), (2, "test")):
        x, y = parts[i]
        if len(y) == 0 or y.all() or not y.any():
            continue
        p = np.clip(forecaster.reuse_probability(x), 1e-6, 1 - 1e-6)
        out[f"{name}_auroc"] = float(roc_auc_score(y, p))
        out[f"{name}_bce"] = float(log_loss(y, p))
    return out
