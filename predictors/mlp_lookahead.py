"""Learned lookahead on hidden states: a small MLP that corrects the gating-lookahead answer.

One MLP is shared by every (layer, distance), told which one by added layer and distance
embeddings; it reads the normalised MoE input ``h_l`` and outputs, per target layer ``l+d``, a
correction added to the gate-lookahead logits ``W_{l+d} h_l`` (frozen router matrices, with a
learned scale and offset per (layer, distance)). The correction head starts at zero, so before
training the family ranks experts exactly as :class:`~predictors.gate_lookahead.GateLookahead`
does and training can only move it where the data says the router on a stale hidden state is
wrong -- which is more often the farther ahead it looks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from data_pipeline.errors import UserError
from predictors.base import PredictContext
from predictors.gate_lookahead import stack_router_weights
from predictors.learned import LearnedPredictor


class MLPLookahead(LearnedPredictor):
    family = "mlp_lookahead"
    needs = frozenset({"hidden"})
    kernels = 6  # norm, two linears, the gate matmul, the head, the sigmoid

    def __init__(self, router_weights: torch.Tensor, top_k: int, lookahead: int, width: int = 128,
                 dropout: float = 0.0):
        num_layers, num_experts, hidden_size = router_weights.shape
        super().__init__(num_layers, num_experts, top_k, lookahead)
        self.hidden_size, self.width, self.dropout = hidden_size, width, dropout
        self.register_buffer("router_weights", router_weights.float())  # (L, E, H), frozen
        self.gate_scale = nn.Parameter(torch.ones(num_layers, lookahead))
        self.gate_offset = nn.Parameter(torch.zeros(num_layers, lookahead))
        self.norm = nn.LayerNorm(hidden_size)
        self.inp = nn.Linear(hidden_size, width)
        self.layer_emb = nn.Embedding(num_layers, width)
        self.dist_emb = nn.Embedding(lookahead, width)
        self.mid = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)
        # correction head per target layer (expert ids mean different things at different layers)
        self.head_w = nn.Parameter(torch.zeros(num_layers, num_experts, width))
        self.head_b = nn.Parameter(torch.zeros(num_layers, num_experts))

    @classmethod
    def from_store(cls, store: Any, lookahead: int, **hparams: Any) -> MLPLookahead:
        model = store.model
        if not store.hidden_layers:
            raise UserError(
                f"{store.path} has no hidden states: mlp_lookahead cannot train on it "
                f"(families that work without them: frequency, conditional_frequency, trajectory)"
            )
        return cls(stack_router_weights(store.router_weights(), model.num_layers), model.top_k, lookahead,
                   **hparams)

    def logits(self, ctx: PredictContext) -> torch.Tensor:
        if ctx.hidden is None:
            raise UserError(f"{self.family} needs the MoE-input hidden state of layer {ctx.layer}")
        h = ctx.hidden.float()
        targets = self.target_layers(ctx.layer)
        n = targets.stop - targets.start
        gate = torch.einsum("th,deh->tde", h, self.router_weights[targets])  # (T, D', E)
        gate = gate * self.gate_scale[ctx.layer, :n, None] + self.gate_offset[ctx.layer, :n, None]
        x = self.inp(self.norm(h))  # (T, W)
        x = x[:, None] + self.layer_emb.weight[ctx.layer] + self.dist_emb.weight[:n]  # (T, D', W)
        x = self.drop(F.gelu(self.mid(F.gelu(x))))
        correction = torch.einsum("tdw,dew->tde", x, self.head_w[targets]) + self.head_b[targets]
        return self.pad_distances(gate + correction)

    def hparams(self) -> dict[str, Any]:
        return {"top_k": self.top_k, "lookahead": self.lookahead, "width": self.width, "dropout": self.dropout}

    @classmethod
    def build(cls, hparams: dict[str, Any], state: dict[str, torch.Tensor]) -> MLPLookahead:
        return cls(state["router_weights"], int(hparams["top_k"]), int(hparams["lookahead"]),
                   width=int(hparams["width"]), dropout=float(hparams.get("dropout", 0.0)))
