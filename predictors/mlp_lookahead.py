"""Learned lookahead on hidden states: a small MLP that corrects the gating-lookahead answer.

One MLP is shared by every (layer, distance), told which one by added layer and distance
embeddings; it reads the normalised MoE input ``h_l`` and outputs, per target layer ``l+d``, a
correction added to the gate-lookahead logits ``W_{l+d} h_l`` (frozen router matrices, with a
learned scale and offset per (layer, distance)). The correction head starts at zero, so before
training the family ranks experts exactly as :class:`~predictors.gate_lookahead.GateLookahead`
does and training can only move it where the data says the router on a stale hidden state is
wrong -- which is more often the farther ahead it looks.

With a token table (:class:`~predictors.token_lookahead.TokenPrior`, built when the store has
token ids) the token is an extra input: its embedding (zero-initialised) is added to the MLP's
input, and the log of the counted P(expert at l+d | token) is added to the logits with a learned
weight per (layer, distance) that starts at 1 -- real routers are token-driven, so the untrained
model trusts the token as much as the router; training moves the weight where the data says
(starting it at 0 instead, Adam's step size keeps it near 0 for the few hundred steps a demo
trains). A store without tokens builds neither, and the family is exactly what it was.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError
from predictors.base import PredictContext
from predictors.gate_lookahead import stack_router_weights
from predictors.learned import LearnedPredictor
from predictors.token_lookahead import TokenPrior, prior_from_store, warn_missing_token


class MLPLookahead(LearnedPredictor):
    family = "mlp_lookahead"
    needs = frozenset({"hidden"})
    kernels = 6  # norm, two linears, the gate matmul, the head, the sigmoid

    def __init__(self, router_weights: torch.Tensor, top_k: int, lookahead: int, width: int = 128,
                 dropout: float = 0.0, tokens: TokenPrior | None = None):
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
        self.tokens = tokens
        if tokens is not None:
            self.needs = frozenset({"hidden", "token"})
            self.tok_emb = nn.Embedding(tokens.size + 1, width)  # last row: unknown token
            nn.init.zeros_(self.tok_emb.weight)
            self.token_weight = nn.Parameter(torch.ones(num_layers, lookahead))
            self._warned = False

    @classmethod
    def from_store(cls, store: Any, lookahead: int, rows: Any = None, use_tokens: bool = True,
                   **hparams: Any) -> MLPLookahead:
        """From the store's router matrices; with ``use_tokens``, a token table counted on ``rows``."""
        model = store.model
        if not store.hidden_layers:
            raise UserError(
                f"{store.path} has no hidden states: mlp_lookahead cannot train on it "
                f"(families that work without them: frequency, conditional_frequency, trajectory)"
            )
        tokens = prior_from_store(store, rows) if use_tokens else None
        return cls(stack_router_weights(store.router_weights(), model.num_layers), model.top_k, lookahead,
                   tokens=tokens, **hparams)

    def logits(self, ctx: PredictContext) -> torch.Tensor:
        return self._logits(ctx, None)

    def training_logits(self, ctx: PredictContext, future_ids: torch.Tensor) -> torch.Tensor:
        """Logits for counted tokens: each token's own routes are left out of the token prior."""
        return self._logits(ctx, future_ids)

    def _logits(self, ctx: PredictContext, future_ids: torch.Tensor | None) -> torch.Tensor:
        if ctx.hidden is None:
            raise UserError(f"{self.family} needs the MoE-input hidden state of layer {ctx.layer}")
        h = ctx.hidden.float()
        targets = self.target_layers(ctx.layer)
        n = targets.stop - targets.start
        gate = torch.einsum("th,deh->tde", h, self.router_weights[targets])  # (T, D', E)
        gate = gate * self.gate_scale[ctx.layer, :n, None] + self.gate_offset[ctx.layer, :n, None]
        x = self.inp(self.norm(h))  # (T, W)
        if self.tokens is not None:
            if ctx.token is None and not self._warned:
                warn_missing_token(self.family)
                self._warned = True
            idx = self.tokens.index(ctx.token, h.shape[0])
            layers = torch.arange(targets.start, targets.stop, device=h.device)
            gate = gate + self.token_weight[ctx.layer, :n, None] * self.tokens.log_probs(idx, layers, future_ids)
            x = x + self.tok_emb(idx)
        x = x[:, None] + self.layer_emb.weight[ctx.layer] + self.dist_emb.weight[:n]  # (T, D', W)
        x = self.drop(F.gelu(self.mid(F.gelu(x))))
        correction = torch.einsum("tdw,dew->tde", x, self.head_w[targets]) + self.head_b[targets]
        return self.pad_distances(gate + correction)

    def hparams(self) -> dict[str, Any]:
        return {"top_k": self.top_k, "lookahead": self.lookahead, "width": self.width, "dropout": self.dropout,
                "token_vocab": self.tokens.size if self.tokens is not None else 0}

    @classmethod
    def build(cls, hparams: dict[str, Any], state: dict[str, torch.Tensor]) -> MLPLookahead:
        return cls(state["router_weights"], int(hparams["top_k"]), int(hparams["lookahead"]),
                   width=int(hparams["width"]), dropout=float(hparams.get("dropout", 0.0)),
                   tokens=TokenPrior.from_state(state, "tokens."))
