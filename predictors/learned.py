"""The common base of the trained families: an ``nn.Module`` whose logits the LightningModule trains.

A learned family defines :meth:`LearnedPredictor.logits` (differentiable, (T, D, E)); the online
forecast :meth:`predict` is its sigmoid with the distances past the last layer zeroed, so the
function trained is the function the simulator and the engine call.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from torch import nn

from core.model_info import check_lookahead
from predictors.base import PredictContext, Predictor


class LearnedPredictor(Predictor, nn.Module):
    """Predictor + nn.Module; subclasses implement :meth:`logits` and :meth:`hparams`."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int, lookahead: int):
        nn.Module.__init__(self)
        check_lookahead(lookahead, num_layers)
        Predictor.__init__(self, num_layers, num_experts, top_k, lookahead)

    @abstractmethod
    def logits(self, ctx: PredictContext) -> torch.Tensor:
        """(T, D, E) logits of layers ``ctx.layer + 1 .. + D`` (anything past the last layer)."""

    def training_logits(self, ctx: PredictContext, future_ids: torch.Tensor) -> torch.Tensor:
        """Logits on a training batch (``future_ids``: (T, L, K) its true routes); by default :meth:`logits`.

        A family whose parameters were partly counted on the training tokens overrides it to leave
        each token's own count out (see :mod:`predictors.trajectory`).
        """
        return self.logits(ctx)

    @abstractmethod
    def hparams(self) -> dict[str, Any]:
        """Constructor keyword arguments other than tensors: enough to rebuild the module."""

    @torch.no_grad()
    def predict(self, ctx: PredictContext) -> torch.Tensor:
        was_training = self.training
        self.eval()
        probs = torch.sigmoid(self.logits(ctx))
        self.train(was_training)
        probs[:, max(0, self.num_layers - 1 - ctx.layer):] = 0.0
        return probs

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), **self.hparams(),
                "parameters": sum(p.numel() for p in self.parameters() if p.requires_grad)}

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}

    @classmethod
    def from_state(cls, hparams: dict[str, Any], state: dict[str, torch.Tensor]) -> LearnedPredictor:
        model = cls.build(hparams, state)
        model.load_state_dict(state)
        model.eval()
        return model

    @classmethod
    @abstractmethod
    def build(cls, hparams: dict[str, Any], state: dict[str, torch.Tensor]) -> LearnedPredictor:
        """An untrained module with the shapes of ``state`` (weights are loaded afterwards)."""

    def target_layers(self, layer: int) -> slice:
        """Layers ``layer+1 .. layer+D`` clipped to the model (for per-target-layer parameters)."""
        return slice(layer + 1, min(layer + self.lookahead, self.num_layers - 1) + 1)

    def pad_distances(self, per_target: torch.Tensor) -> torch.Tensor:
        """(T, D', ...) for the D' real target layers -> (T, D, ...) with zeros past the last layer."""
        missing = self.lookahead - per_target.shape[1]
        if missing == 0:
            return per_target
        pad = per_target.new_zeros((per_target.shape[0], missing, *per_target.shape[2:]))
        return torch.cat([per_target, pad], dim=1)
