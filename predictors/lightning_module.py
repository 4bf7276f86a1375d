"""The LightningModules that train every gradient-trained family, on one shared base.

:class:`PredictorModule` holds what they share: AdamW over the trainable parameters, the
``predictor_meta`` entry of every Lightning checkpoint (model identity, trace-store fingerprint,
family and hyper-parameters, so :func:`predictors.checkpoint.read_checkpoint` can refuse one trained
for another model), the name of the validation metric that checkpointing and early stopping watch
(:attr:`PredictorModule.monitor`), and restoring the best weights after a fit. The network sits at
``self.predictor``: a checkpoint's ``predictor.*`` tensors are the family's own state.

:class:`LookaheadModule` trains any learned lookahead family (see :mod:`predictors.learned`).
Loss: multi-label binary cross-entropy between the family's logits for layer ``l+d`` and the
set of experts layer ``l+d`` chose, averaged over every context layer ``l`` and distance ``d``
the family covers. Validation fills :class:`~predictors.metrics.LookaheadMetrics` from the
same forecasts the engine would see (sigmoid of the logits) and logs ``val/recall@k`` (mean
over distances).

:class:`ReuseModule` trains the ``reuse_mlp`` forecaster (:mod:`predictors.reuse`): one binary
label per (pass, layer, expert) row of a :class:`~data_pipeline.datamodule.ReuseDataModule`,
binary cross-entropy, ``val/auroc`` (torchmetrics' BinaryAUROC) as the monitored metric.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import BinaryAUROC

from predictors.evaluation import context_layers, covered_distances, layer_contexts
from predictors.learned import LearnedPredictor
from predictors.metrics import LookaheadMetrics
from predictors.reuse import MLPReuse

MONITOR = "val/recall@k"  # the lookahead families' monitored metric
REUSE_MONITOR = "val/auroc"  # reuse_mlp's


class PredictorModule(pl.LightningModule):
    """What every gradient-trained family shares (see the module docstring); subclasses add the loss."""

    monitor: ClassVar[str]  # the validation metric ModelCheckpoint and EarlyStopping watch (higher is better)

    def __init__(self, net: nn.Module, *, lr: float, weight_decay: float, meta: dict[str, Any] | None,
                 logged: dict[str, Any]):
        super().__init__()
        self.predictor = net
        self.lr, self.weight_decay = lr, weight_decay
        self.meta = dict(meta or {})
        self.save_hyperparameters({**logged, "lr": lr, "weight_decay": weight_decay})

    @property
    @abstractmethod
    def family(self) -> str:
        """The family being trained (names its checkpoint folder and its metadata)."""

    @abstractmethod
    def family_hparams(self) -> dict[str, Any]:
        """The hyper-parameters its ``from_state`` reads back."""

    @abstractmethod
    def batch_size(self, batch: Any) -> int:
        """Training samples in ``batch`` (for the throughput the training report shows)."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.predictor.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["predictor_meta"] = {**self.meta, "family": self.family, "hparams": self.family_hparams()}

    def restore(self, best_model_path: str | None) -> None:
        """Load the weights a validation epoch selected (when one did) and leave training mode."""
        if best_model_path:
            state = torch.load(best_model_path, map_location="cpu", weights_only=False)["state_dict"]
            self.load_state_dict(state)
        self.eval()


class LookaheadModule(PredictorModule):
    monitor = MONITOR

    def __init__(self, predictor: LearnedPredictor, hidden_layers: list[int], *, lr: float = 3e-3,
                 weight_decay: float = 1e-4, overfetch: float = 1.5, meta: dict[str, Any] | None = None):
        super().__init__(predictor, lr=lr, weight_decay=weight_decay, meta=meta,
                         logged={"family": predictor.family, **predictor.describe(), "overfetch": overfetch})
        self.hidden_layers = list(hidden_layers)
        self.layers = context_layers(predictor, self.hidden_layers)
        self.val_metrics = LookaheadMetrics(predictor.num_layers, predictor.lookahead, predictor.num_experts,
                                            predictor.top_k, overfetch)

    @property
    def family(self) -> str:
        return self.predictor.family

    def family_hparams(self) -> dict[str, Any]:
        return self.predictor.hparams()

    def batch_size(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["row"])

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


class ReuseModule(PredictorModule):
    """Trains :class:`~predictors.reuse.MLPReuse` (its ``net``) on (features, reused) batches."""

    monitor = REUSE_MONITOR

    def __init__(self, forecaster: MLPReuse, *, lr: float = 1e-2, weight_decay: float = 1e-4,
                 meta: dict[str, Any] | None = None):
        super().__init__(forecaster.net, lr=lr, weight_decay=weight_decay, meta=meta,
                         logged={"family": forecaster.family, **forecaster.hparams()})
        self.forecaster = forecaster  # not an nn.Module: its net is registered once, as self.predictor
        self.val_auroc = BinaryAUROC()

    @property
    def family(self) -> str:
        return self.forecaster.family

    def family_hparams(self) -> dict[str, Any]:
        return self.forecaster.hparams()

    def batch_size(self, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        return len(batch[1])

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.binary_cross_entropy_with_logits(self.predictor(x), y)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(y))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.predictor(x)
        self.log("val/loss", F.binary_cross_entropy_with_logits(logits, y), batch_size=len(y))
        self.val_auroc.update(torch.sigmoid(logits), y.long())

    def on_validation_epoch_end(self) -> None:
        self.log(REUSE_MONITOR, self.val_auroc.compute(), prog_bar=True, sync_dist=True)
        self.val_auroc.reset()

    def restore(self, best_model_path: str | None) -> None:
        super().restore(best_model_path)
        self.forecaster.weights_changed()
