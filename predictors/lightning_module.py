"""One LightningModule that trains any learned family (see :mod:`predictors.learned`).

Loss: multi-label binary cross-entropy between the family's logits for layer ``l+d`` and the
set of experts layer ``l+d`` chose, averaged over every context layer ``l`` and distance ``d``
the family covers. Validation fills :class:`~predictors.metrics.LookaheadMetrics` from the
same forecasts the engine would see (sigmoid of the logits) and logs ``val/recall@k`` (mean
over distances), the early-stopping and checkpoint criterion.

Every Lightning checkpoint carries ``predictor_meta`` (model identity, trace-store fingerprint,
family and hyper-parameters), so :func:`predictors.checkpoint.load_predictor` can refuse one
trained for another model.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from predictors.evaluation import context_layers, covered_distances, layer_contexts
from predictors.learned import LearnedPredictor
from predictors.metrics import LookaheadMetrics

MONITOR = "val/recall@k"


class LookaheadModule(pl.LightningModule):
    def __init__(self, predictor: LearnedPredictor, hidden_layers: list[int], *, lr: float = 3e-3,
                 weight_decay: float = 1e-4, overfetch: float = 1.5, meta: dict[str, Any] | None = None):
        super().__init__()
        self.predictor = predictor
        self.hidden_layers = list(hidden_layers)
        self.layers = context_layers(predictor, self.hidden_layers)
        self.lr, self.weight_decay = lr, weight_decay
        self.meta = dict(meta or {})
        self.val_metrics = LookaheadMetrics(predictor.num_layers, predictor.lookahead, predictor.num_experts,
                                            predictor.top_k, overfetch)
        self.save_hyperparameters({"family": predictor.family, **predictor.describe(), "lr": lr,
                                   "weight_decay": weight_decay, "overfetch": overfetch})

    def _forecasts(self, batch: dict[str, torch.Tensor], training: bool):
        """(layer, logits (T, D, E), distances) for every context layer of the batch."""
        for ctx in layer_contexts(batch, self.layers, self.hidden_layers):
            logits = (self.predictor.training_logits(ctx, batch["topk_ids"]) if training
                      else self.predictor.logits(ctx))
            yield ctx.layer, logits, covered_distances(self.predictor, ctx.layer)

    def _loss(self, batch: dict[str, torch.Tensor], metric: LookaheadMetrics | None = None) -> torch.Tensor:
        ids = batch["topk_ids"]
        total, terms = ids.new_zeros((), dtype=torch.float32), 0
        for layer, logits, distances in self._forecasts(batch, training=metric is None):
            rows = torch.tensor(distances, device=ids.device) - 1
            future = ids[:, [layer + d for d in distances]]  # (T, D', K); -1 where the token did not run it
            ran = future[..., 0] >= 0
            num_experts = self.predictor.num_experts
            target = torch.zeros(ids.shape[0], len(distances), num_experts + 1, device=ids.device)
            target = target.scatter_(2, torch.where(future < 0, num_experts, future), 1.0)[..., :num_experts]
            if bool(ran.all()):
                total = total + F.binary_cross_entropy_with_logits(logits[:, rows], target, reduction="mean")
            else:  # skipped routes have no target: average over the (token, distance) pairs that ran
                bce = F.binary_cross_entropy_with_logits(logits[:, rows], target, reduction="none").mean(dim=-1)
                total = total + (bce * ran).sum() / ran.sum().clamp(min=1)
            terms += 1
            if metric is not None:
                metric.update(torch.sigmoid(logits.detach()), ids, layer, distances)
        return total / max(terms, 1)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["row"]))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss = self._loss(batch, self.val_metrics)
        self.log("val/loss", loss, batch_size=len(batch["row"]))

    def on_validation_epoch_end(self) -> None:
        with self.val_metrics.sync_context():  # sum the counts over DDP processes first
            per_d = self.val_metrics.per_distance()
        recall = per_d["recall@k"]
        self.log(MONITOR, torch.nanmean(recall).float(), prog_bar=True, sync_dist=True)
        for d, value in enumerate(recall.tolist(), 1):
            self.log(f"val/recall@k/d{d}", value, sync_dist=True)
        self.val_metrics.reset()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.predictor.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["predictor_meta"] = {**self.meta, "family": self.predictor.family,
                                        "hparams": self.predictor.hparams()}
