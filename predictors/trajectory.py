"""Learned lookahead from expert ids alone: works on traces without hidden states.

The context at layer ``l`` is the path the token has taken through the experts (the sets chosen
at the last ``window`` layers ``l-window+1 .. l``) and the experts the previous token chose. The
forecast of layer ``l+d`` is built in two parts:

1. **a learned mixture of counted transitions.** For every layer ``s = l-m`` of the window,
   P(j at l+d | the experts chosen at s) is counted on the training tokens (the conditional
   frequency, over distance ``d+m``); the model mixes these ``window`` distributions and the
   previous token's multi-hot at ``l+d`` with weights learned per (layer, distance), and takes
   the log. The weights start at "only the last layer" (``m = 0``), so the untrained model ranks
   exactly as :class:`~predictors.frequency.ConditionalFrequency` does.
2. **a small sequence model as a residual.** Each set of the window is embedded as the sum of
   its (layer, expert) embeddings; a GRU runs over the window (oldest first); its state, a
   distance embedding and the embedded previous-token set at ``l+d`` go through one hidden layer
   and a head per target layer. The head starts at zero. ``dim=0`` leaves it out: on the gemma
   trace (about a hundred training tokens) it memorises the training tokens and held-out recall
   drops, while the mixture alone improves it.

Why counts inside a learned model: on a single prompt (the gemma trace: about a hundred training
tokens, 128 experts) a network alone cannot learn 128 x 128 transitions per layer, but counting
can; what the data can teach is how much to trust each layer of the path and the previous token,
which is a few hundred numbers. On larger traces the residual network adds what counts miss.

While training, each token's own count is left out of the transitions it is scored with (see
:meth:`TrajectoryPredictor.training_logits`): otherwise the counts "know" the answer on training
tokens and the model learns to over-trust them.

**The token** (when the store has token ids): the counted P(j at l+d | token) of
:class:`~predictors.token_lookahead.TokenPrior` is one more part of the mixture, with a weight
starting at 1 (as much as the last layer's transitions: real routers are token-driven), and a
token embedding (zero-initialised) joins the residual network's input. A store without tokens
builds neither, and the untrained model is conditional frequency as before.

Only the last ``window`` layers are read, so the online cost per layer does not grow with depth.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError
from predictors.base import PredictContext
from predictors.frequency import layer_popularity, multi_hot
from predictors.learned import LearnedPredictor
from predictors.token_lookahead import TokenPrior, prior_from_store, warn_missing_token

PROB_FLOOR = 1e-4  # mixture floor before the log: an unseen transition is unlikely, not impossible


def count_transitions(topk_ids: np.ndarray, num_experts: int, max_distance: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts (L, max_distance, E, E), popularity (L, E)) of (N, L, K) routes.

    counts[s, g-1, i, j] = tokens with expert i at layer s and j at layer s+g.
    """
    topk_ids = np.asarray(topk_ids)
    if topk_ids.ndim != 3 or len(topk_ids) == 0:
        raise UserError("no training tokens to count expert transitions on (empty split)")
    n, num_layers, _ = topk_ids.shape
    hot = [multi_hot(topk_ids[:, layer], num_experts) for layer in range(num_layers)]
    counts = np.zeros((num_layers, max_distance, num_experts, num_experts), dtype=np.float32)
    for g in range(1, max_distance + 1):
        for s in range(num_layers - g):
            counts[s, g - 1] = hot[s].T @ hot[s + g]
    return torch.from_numpy(counts), torch.from_numpy(layer_popularity(topk_ids, num_experts))


class TrajectoryPredictor(LearnedPredictor):
    family = "trajectory"
    needs = frozenset({"chosen", "previous"})

    def work(self, tokens: int) -> tuple[float, float, int]:
        """Gathers of the window's transition rows, the mixture and its log (3 kernels); the GRU
        residual adds a step per window layer and its head."""
        flops, nbytes, _ = super().work(tokens)
        return flops, nbytes, 3 + (self.window + 2 if self.dim > 0 else 0)

    def __init__(self, counts: torch.Tensor, popularity: torch.Tensor, top_k: int, lookahead: int, dim: int = 32,
                 window: int = 3, dropout: float = 0.1, smoothing: float = 1.0, tokens: TokenPrior | None = None):
        num_layers, max_distance, num_experts, _ = counts.shape
        super().__init__(num_layers, num_experts, top_k, lookahead)
        if max_distance < min(lookahead + window - 1, num_layers - 1):
            raise ValueError(f"counts cover distances up to {max_distance}; need {lookahead + window - 1}")
        self.dim, self.window, self.dropout, self.smoothing = dim, window, dropout, smoothing
        self.register_buffer("counts", counts.float())  # (L, G, E, E), frozen
        self.register_buffer("popularity", popularity.float())  # (L, E), frozen
        n_src = counts.sum(dim=-1) / top_k  # tokens with i at s (each adds K to its row)
        self.register_buffer("n_src", n_src, persistent=False)  # (L, G, E)
        self.tokens = tokens
        # mixture weights per (context layer, distance): window layers, the previous token, [the token]
        mix = torch.zeros(num_layers, lookahead, window + 1 + (tokens is not None))
        mix[..., 0] = 1.0
        if tokens is not None:
            mix[..., -1] = 1.0
        self.mix = nn.Parameter(mix)
        self.offset = nn.Parameter(torch.zeros(num_layers, lookahead))
        self.pad = num_layers * num_experts  # id of "no expert" (first token, layers before 0)
        if dim > 0:  # residual sequence model
            self.path_emb = nn.Embedding(self.pad + 1, dim, padding_idx=self.pad)
            self.prev_emb = nn.Embedding(self.pad + 1, dim, padding_idx=self.pad)
            self.gru = nn.GRU(dim, dim, batch_first=True)
            self.dist_emb = nn.Embedding(lookahead, dim)
            self.mid = nn.Linear(dim, dim)
            self.drop = nn.Dropout(dropout)
            self.head_w = nn.Parameter(torch.zeros(num_layers, num_experts, dim))
            self.head_b = nn.Parameter(torch.zeros(num_layers, num_experts))
        if tokens is not None:
            self.needs = frozenset({"chosen", "previous", "token"})
            self._warned = False
            if dim > 0:
                self.tok_emb = nn.Embedding(tokens.size + 1, dim)  # last row: unknown token
                nn.init.zeros_(self.tok_emb.weight)

    @classmethod
    def fit(cls, topk_ids: Any, num_experts: int, lookahead: int, window: int = 3, **hparams: Any) -> TrajectoryPredictor:
        """An untrained model whose transitions are counted on the (N, L, K) routes of its training tokens."""
        num_layers = np.asarray(topk_ids).shape[1]
        counts, popularity = count_transitions(topk_ids, num_experts, min(lookahead + window - 1, num_layers - 1))
        return cls(counts, popularity, int(np.asarray(topk_ids).shape[2]), lookahead, window=window, **hparams)

    @classmethod
    def from_store(cls, store: Any, lookahead: int, rows: Any = None, use_tokens: bool = True,
                   **hparams: Any) -> TrajectoryPredictor:
        """Transitions (and, with ``use_tokens``, the token table) counted on ``rows`` of the store
        (its training split; all tokens when None)."""
        ids = store.topk_ids()
        tokens = prior_from_store(store, rows) if use_tokens else None
        return cls.fit(ids if rows is None else ids[rows], store.num_experts, lookahead, tokens=tokens, **hparams)

    # ------------------------------------------------------------------ forecasts
    def logits(self, ctx: PredictContext) -> torch.Tensor:
        return self._logits(ctx, None)

    def training_logits(self, ctx: PredictContext, future_ids: torch.Tensor) -> torch.Tensor:
        """Logits for tokens that were counted: each token's own transitions are left out."""
        return self._logits(ctx, future_ids)

    def _transitions(self, sources: list[int], targets: range, chosen: torch.Tensor,
                     future_ids: torch.Tensor | None) -> torch.Tensor:
        """(P, T, D', E): for every window layer s and target t, the mean over the experts chosen at
        s of P(j at t | i at s); all pairs gathered at once (one forecast = a handful of ops)."""
        device = chosen.device
        src_layers = torch.tensor(sources, device=device).repeat_interleave(len(targets))  # (P*D',)
        tgt_layers = torch.tensor(list(targets), device=device).repeat(len(sources))
        gaps = tgt_layers - src_layers
        ids = chosen[:, src_layers]  # (T, P*D', K)
        pair = torch.arange(len(src_layers), device=device)[None, :, None]
        counts = self.counts[src_layers, gaps - 1][pair, ids]  # (T, P*D', K, E)
        n_src = self.n_src[src_layers, gaps - 1][pair, ids]  # (T, P*D', K)
        if future_ids is not None:  # leave the token itself out of the counts
            own = torch.zeros(ids.shape[0], len(tgt_layers), self.num_experts + 1, device=device)
            future = future_ids[:, tgt_layers].long()
            own = own.scatter_(2, torch.where(future < 0, self.num_experts, future), 1.0)[..., :-1]  # -1: not run
            counts = (counts - own[:, :, None]).clamp(min=0)
            n_src = (n_src - 1).clamp(min=0)
        prior = self.popularity[tgt_layers][None, :, None]  # (1, P*D', 1, E)
        p = ((counts + self.smoothing * prior) / (n_src[..., None] + self.smoothing)).mean(dim=2)
        return p.reshape(p.shape[0], len(sources), len(targets), -1).transpose(0, 1)

    def _global_ids(self, ids: torch.Tensor, layers: torch.Tensor) -> torch.Tensor:
        """(T, n, K) expert ids at ``layers`` (n,) -> (layer, expert) ids; out-of-range ids become padding."""
        g = layers[None, :, None] * self.num_experts + ids
        return torch.where((ids >= 0) & (ids < self.num_experts) & (layers[None, :, None] >= 0), g, self.pad)

    def _logits(self, ctx: PredictContext, future_ids: torch.Tensor | None) -> torch.Tensor:
        if ctx.chosen is None:
            raise UserError(f"{self.family} needs the experts chosen at layers <= {ctx.layer}")
        chosen = ctx.chosen.long()
        previous = (ctx.previous.long() if ctx.previous is not None  # None: no previous token (a prompt's first)
                    else chosen.new_full((chosen.shape[0], self.num_layers, self.top_k), self.num_experts))
        t, device, layer = chosen.shape[0], chosen.device, ctx.layer
        targets = self.target_layers(layer)
        tl = torch.arange(targets.start, targets.stop, device=device)
        n = len(tl)
        prev_ids = previous[:, tl]  # (T, D', K); num_experts = no previous token, -1 = it did not run the layer
        prev_hot = torch.zeros(t, n, self.num_experts + 1, device=device)
        prev_hot.scatter_(2, torch.where(prev_ids < 0, self.num_experts, prev_ids.clamp(max=self.num_experts)), 1.0)

        # 1. mixture of counted transitions from the window's layers, plus the previous token
        sources = [layer - m for m in range(self.window) if layer - m >= 0]
        parts = [*self._transitions(sources, range(targets.start, targets.stop), chosen, future_ids),
                 prev_hot[..., : self.num_experts]]  # each (T, D', E)
        columns = [*range(len(sources)), self.window]
        idx = None
        if self.tokens is not None:
            if ctx.token is None and not self._warned:
                warn_missing_token(self.family)
                self._warned = True
            idx = self.tokens.index(ctx.token, t)
            parts.append(self.tokens.probs(idx, tl, future_ids))
            columns.append(self.window + 1)
        weights = self.mix[layer, :n][:, columns]  # (D', parts)
        mixture = torch.einsum("ptde,dp->tde", torch.stack(parts), weights)
        out = mixture.clamp(min=PROB_FLOOR).log() + self.offset[layer, :n, None]
        if self.dim == 0:
            return self.pad_distances(out)

        # 2. residual: a GRU over the window's embedded sets, joined with the previous token's set
        window_layers = torch.arange(layer - self.window + 1, layer + 1, device=device)
        path = self.path_emb(self._global_ids(chosen[:, window_layers.clamp(min=0)], window_layers)).sum(dim=2)
        state = self.gru(path)[1][0]  # (T, dim)
        if idx is not None:
            state = state + self.tok_emb(idx)
        prev = self.prev_emb(self._global_ids(prev_ids, tl)).sum(dim=2)  # (T, D', dim)
        x = self.drop(F.gelu(self.mid(F.gelu(state[:, None] + prev + self.dist_emb.weight[:n]))))
        out = out + torch.einsum("tdw,dew->tde", x, self.head_w[targets]) + self.head_b[targets]
        return self.pad_distances(out)

    # ------------------------------------------------------------------ checkpoints
    def hparams(self) -> dict[str, Any]:
        return {"top_k": self.top_k, "lookahead": self.lookahead, "dim": self.dim, "window": self.window,
                "dropout": self.dropout, "smoothing": self.smoothing,
                "token_vocab": self.tokens.size if self.tokens is not None else 0}

    @classmethod
    def build(cls, hparams: dict[str, Any], state: dict[str, torch.Tensor]) -> TrajectoryPredictor:
        return cls(state["counts"], state["popularity"], int(hparams["top_k"]), int(hparams["lookahead"]),
                   dim=int(hparams["dim"]), window=int(hparams["window"]), dropout=float(hparams.get("dropout", 0.0)),
                   smoothing=float(hparams.get("smoothing", 1.0)), tokens=TokenPrior.from_state(state, "tokens."))
