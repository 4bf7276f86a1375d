"""Token-aware forecasts: which experts a token needs at every layer, known before layer 0 runs.

Real routers are strongly token-driven (the same token id tends to go to the same experts at a
layer whatever its context; ``python -m data_pipeline.inspect_store`` measures how much), and the token
is the one input an engine has before the pass starts. Two pieces:

- :class:`TokenPrior` (shared): P(expert e at layer t | token), **counted** on the training rows
  (the most frequent ``max_vocab`` token ids), smoothed towards the layer's popularity so a rare
  token leans on it and an unknown one (outside the table, or -1 on an imported trace without
  tokens) *is* popularity. Counting is what makes a few thousand training tokens enough: a
  network alone cannot learn 64 experts x 8 layers for thousands of token ids from them.
- :class:`TokenLookahead` (family ``token``): the log of that prior, with a learned scale and
  offset per target layer, plus a small learned residual on an **embedding of the token and the
  layer** (token embedding + target-layer embedding -> one hidden layer -> a head per target
  layer, zero-initialised so the untrained model ranks exactly as the counts do). It ignores the
  context layer: its forecast of layer t is the same from anywhere, so its lookahead is the whole
  pass (:meth:`TokenLookahead.forecast_pass` gives all L layers before layer 0 runs); through the
  common interface it answers layers ``l+1 .. l+D`` like every family.

The MLP and trajectory families take the same prior and a token embedding as an extra input
(:mod:`predictors.mlp_lookahead`, :mod:`predictors.trajectory`). While training, each token's own
routes are left out of the counts it is scored with (as the trajectory family does with its
transitions): otherwise the counts "know" the answer on training tokens and the model learns to
over-trust them.

Fallback: a store without token ids builds no prior (the MLP and trajectory families are then
exactly what they were; the ``token`` family refuses such a store). A context without tokens
(an engine that does not feed them yet) is treated as all-unknown tokens, with a warning once.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError
from data_pipeline.token_routing import has_tokens, token_expert_counts, token_vocab
from predictors.base import PredictContext
from predictors.learned import LearnedPredictor

PROB_FLOOR = 1e-4  # before the log: an expert never seen with a token is unlikely, not impossible
DEFAULT_MAX_VOCAB = 16384


class TokenPrior(nn.Module):
    """Counted P(expert at layer t | token) for a vocabulary of token ids; see the module doc."""

    def __init__(self, vocab: torch.Tensor, counts: torch.Tensor, occurrences: torch.Tensor,
                 popularity: torch.Tensor, smoothing: float = 1.0):
        super().__init__()
        self.register_buffer("vocab", vocab.long())  # (V,) sorted token ids
        self.register_buffer("counts", counts.float())  # (V, L, E)
        self.register_buffer("occurrences", occurrences.float())  # (V,)
        self.register_buffer("popularity", popularity.float())  # (L, E), rows sum to K
        self.smoothing = float(smoothing)

    @property
    def size(self) -> int:
        return int(self.vocab.numel())

    @classmethod
    def fit(cls, token_ids: Any, topk_ids: Any, num_experts: int, *, max_vocab: int | None = DEFAULT_MAX_VOCAB,
            smoothing: float = 1.0) -> TokenPrior | None:
        """Count (N,) token ids against (N, L, K) routes; None when no row has a token id."""
        token_ids, topk_ids = np.asarray(token_ids), np.asarray(topk_ids)
        if not has_tokens(token_ids):
            return None
        vocab = token_vocab(token_ids, max_vocab)
        counts, occ = token_expert_counts(token_ids, topk_ids, num_experts, vocab)
        hot = np.zeros((topk_ids.shape[1], num_experts), dtype=np.float64)
        for layer in range(topk_ids.shape[1]):
            hot[layer] = np.bincount(topk_ids[:, layer].reshape(-1).astype(np.int64), minlength=num_experts)
        popularity = hot / max(len(topk_ids), 1)
        return cls(torch.from_numpy(vocab), torch.from_numpy(counts), torch.from_numpy(occ),
                   torch.from_numpy(popularity), smoothing)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], prefix: str, smoothing: float = 1.0) -> TokenPrior | None:
        """The prior saved under ``prefix`` in a predictor's state (None when it has none)."""
        if f"{prefix}vocab" not in state:
            return None
        return cls(*(state[f"{prefix}{k}"] for k in ("vocab", "counts", "occurrences", "popularity")), smoothing)

    def index(self, token: torch.Tensor | None, n: int) -> torch.Tensor:
        """(T,) token ids -> rows of the table; ``size`` = unknown (outside it, -1, or no tokens)."""
        if token is None:
            return torch.full((n,), self.size, dtype=torch.long, device=self.vocab.device)
        token = token.long().to(self.vocab.device)
        if self.size == 0:
            return torch.full_like(token, 0)
        pos = torch.searchsorted(self.vocab, token).clamp(max=self.size - 1)
        return torch.where((self.vocab[pos] == token) & (token >= 0), pos, self.size)

    def probs(self, idx: torch.Tensor, layers: torch.Tensor, future_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(T, n, E) smoothed P(expert | token) at ``layers`` (n,) for table rows ``idx`` (T,).

        ``future_ids`` (T, L, K): the rows' own routes, left out of the counts (training rows).
        """
        known = idx < self.size
        safe = idx.clamp(max=max(self.size - 1, 0))
        counts = self.counts[safe][:, layers] * known[:, None, None]  # (T, n, E)
        occ = self.occurrences[safe] * known  # (T,)
        if future_ids is not None:
            own = torch.zeros_like(counts)
            own.scatter_(2, future_ids[:, layers].long().to(counts.device), 1.0)
            counts = (counts - own * known[:, None, None]).clamp(min=0)
            occ = (occ - known.float()).clamp(min=0)
        prior = self.popularity[layers][None]  # (1, n, E)
        return (counts + self.smoothing * prior) / (occ[:, None, None] + self.smoothing)

    def log_probs(self, idx: torch.Tensor, layers: torch.Tensor, future_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.probs(idx, layers, future_ids).clamp(min=PROB_FLOOR).log()


def prior_from_store(store: Any, rows: Any, max_vocab: int | None = DEFAULT_MAX_VOCAB) -> TokenPrior | None:
    """The token prior counted on ``rows`` of a trace store (its training split); None without tokens."""
    rows = np.arange(store.num_tokens) if rows is None else np.asarray(rows)
    return TokenPrior.fit(store.token_ids[rows], store.topk_ids()[rows], store.num_experts, max_vocab=max_vocab)


def warn_missing_token(family: str) -> None:
    warnings.warn(f"{family} was trained with token ids but the context has none: forecasting as for unknown "
                  f"tokens (feed PredictContext.token to use them)", RuntimeWarning, stacklevel=3)


class TokenLookahead(LearnedPredictor):
    family = "token"
    needs = frozenset({"token"})

    def __init__(self, prior: TokenPrior, top_k: int, lookahead: int, dim: int = 64, dropout: float = 0.1):
        num_layers, num_experts = prior.popularity.shape
        super().__init__(num_layers, num_experts, top_k, lookahead)
        self.prior = prior
        self.dim, self.dropout = dim, dropout
        self.scale = nn.Parameter(torch.ones(num_layers))
        self.offset = nn.Parameter(torch.zeros(num_layers))
        self.tok_emb = nn.Embedding(prior.size + 1, dim)  # last row: unknown token
        self.layer_emb = nn.Embedding(num_layers, dim)
        self.mid = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        self.head_w = nn.Parameter(torch.zeros(num_layers, num_experts, dim))
        self.head_b = nn.Parameter(torch.zeros(num_layers, num_experts))
        self._warned = False

    @classmethod
    def from_store(cls, store: Any, lookahead: int, rows: Any = None, max_vocab: int | None = DEFAULT_MAX_VOCAB,
                   **hparams: Any) -> TokenLookahead:
        prior = prior_from_store(store, rows, max_vocab)
        if prior is None:
            raise UserError(f"{store.path} has no token ids (token_id = -1): the token family cannot train on it "
                            f"(families that work without them: frequency, conditional_frequency, trajectory)")
        return cls(prior, store.top_k, lookahead, **hparams)

    def layer_logits(self, token: torch.Tensor | None, layers: torch.Tensor, n: int,
                     future_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(T, len(layers), E) logits of the target ``layers`` for T tokens (``token`` None: unknown)."""
        if token is None and not self._warned:
            warn_missing_token(self.family)
            self._warned = True
        idx = self.prior.index(token, n)
        out = self.prior.log_probs(idx, layers, future_ids) * self.scale[layers, None] + self.offset[layers, None]
        x = self.tok_emb(idx)[:, None] + self.layer_emb(layers)  # (T, n, dim)
        x = self.drop(F.gelu(self.mid(F.gelu(x))))
        return out + torch.einsum("tnd,ned->tne", x, self.head_w[layers]) + self.head_b[layers]

    @torch.no_grad()
    def forecast_pass(self, token: torch.Tensor) -> torch.Tensor:
        """(T, L, E) probabilities for every layer of the pass: available before layer 0 runs."""
        was_training = self.training
        self.eval()
        layers = torch.arange(self.num_layers, device=self.head_b.device)
        probs = torch.sigmoid(self.layer_logits(token, layers, len(token)))
        self.train(was_training)
        return probs

    def _logits(self, ctx: PredictContext, future_ids: torch.Tensor | None) -> torch.Tensor:
        targets = self.target_layers(ctx.layer)
        layers = torch.arange(targets.start, targets.stop, device=self.head_b.device)
        n = _num_tokens(ctx)
        return self.pad_distances(self.layer_logits(ctx.token, layers, n, future_ids))

    def logits(self, ctx: PredictContext) -> torch.Tensor:
        return self._logits(ctx, None)

    def training_logits(self, ctx: PredictContext, future_ids: torch.Tensor) -> torch.Tensor:
        return self._logits(ctx, future_ids)

    def hparams(self) -> dict[str, Any]:
        return {"top_k": self.top_k, "lookahead": self.lookahead, "dim": self.dim, "dropout": self.dropout,
                "token_vocab": self.prior.size, "smoothing": self.prior.smoothing}

    @classmethod
    def build(cls, hparams: dict[str, Any], state: dict[str, torch.Tensor]) -> TokenLookahead:
        prior = TokenPrior.from_state(state, "prior.", float(hparams.get("smoothing", 1.0)))
        if prior is None:
            raise KeyError("prior.vocab")
        return cls(prior, int(hparams["top_k"]), int(hparams["lookahead"]), dim=int(hparams["dim"]),
                   dropout=float(hparams.get("dropout", 0.0)))


def _num_tokens(ctx: PredictContext) -> int:
    for field in (ctx.token, ctx.hidden, ctx.chosen, ctx.previous):
        if field is not None:
            return int(field.shape[0])
    raise UserError("a forecast needs at least one of token, hidden, chosen or previous in its context")
