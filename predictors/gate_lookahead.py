"""Gating lookahead: layer ``l+d``'s router applied to layer ``l``'s MoE input (training-free).

This is what mixtral-offloading and SpecMD prefetch with. It works because the residual stream
changes slowly from layer to layer, so the hidden state at ``l`` is already close to what the
router of ``l+d`` will see; the error grows with ``d``, which is what the learned
:mod:`predictors.mlp_lookahead` corrects.

Scores are the family's routing probabilities: the softmax over the router logits (OLMoE, Mixtral
and Qwen2-MoE all rank experts by it; top-k renormalisation does not change the order).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from core.errors import UserError
from core.model_info import check_lookahead
from predictors.base import PredictContext, Predictor


def stack_router_weights(weights: Mapping[int, np.ndarray | torch.Tensor], num_layers: int) -> torch.Tensor:
    """``layer -> (E, H)`` matrices as one float32 (L, E, H) tensor; every layer must be present."""
    missing = [layer for layer in range(num_layers) if layer not in weights]
    if missing:
        raise UserError(f"router weights are missing for layer(s) {', '.join(map(str, missing))}")
    return torch.stack([torch.as_tensor(np.asarray(weights[layer]), dtype=torch.float32)
                        for layer in range(num_layers)])


class GateLookahead(Predictor):
    """Scores for layer ``l+d`` = softmax(W_{l+d} h_l), for d = 1..D."""

    family = "gate_lookahead"
    needs = frozenset({"hidden"})
    kernels = 2  # one batched matmul with the next routers, one softmax

    def __init__(self, router_weights: torch.Tensor, top_k: int, lookahead: int):
        num_layers, num_experts, _ = router_weights.shape
        check_lookahead(lookahead, num_layers)
        super().__init__(num_layers, num_experts, top_k, lookahead)
        self.router_weights = router_weights.float()  # (L, E, H)

    @classmethod
    def from_store(cls, store: Any, lookahead: int) -> GateLookahead:
        """Build from the router matrices saved beside a trace store (``store.router_weights()``)."""
        model = store.model
        return cls(stack_router_weights(store.router_weights(), model.num_layers), model.top_k, lookahead)

    def logits(self, ctx: PredictContext) -> torch.Tensor:
        """Router logits (T, D, E) of layers ``l+1..l+D`` on ``h_l``; zeros past the last layer."""
        if ctx.hidden is None:
            raise UserError(f"{self.family} needs the MoE-input hidden state of layer {ctx.layer}")
        h = ctx.hidden.float()
        out = h.new_zeros((h.shape[0], self.lookahead, self.num_experts))
        last = min(ctx.layer + self.lookahead, self.num_layers - 1)
        if last > ctx.layer:
            w = self.router_weights[ctx.layer + 1: last + 1].to(h.device)  # (D', E, H)
            out[:, : last - ctx.layer] = torch.einsum("th,deh->tde", h, w)
        return out

    @torch.no_grad()
    def predict(self, ctx: PredictContext) -> torch.Tensor:
        probs = torch.softmax(self.logits(ctx), dim=-1)
        probs[:, max(0, self.num_layers - 1 - ctx.layer):] = 0.0  # past the last layer
        return probs

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "scores": "softmax(router_{l+d}(h_l))"}

    def state(self) -> dict[str, torch.Tensor]:
        return {"router_weights": self.router_weights}

    @classmethod
    def from_state(cls, hparams: dict[str, Any], state: dict[str, torch.Tensor]) -> GateLookahead:
        return cls(state["router_weights"], int(hparams["top_k"]), int(hparams["lookahead"]))
