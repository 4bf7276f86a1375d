"""Prefetchers: which experts of layers l+1..l+D to copy in while layer l runs.

A prefetcher turns a replay (:class:`core.passes.Passes`) into an :class:`ExpertForecast`: for every
pass ``p``, layer ``l`` and distance ``d`` the ranked candidate experts of layer ``l+d``, best first, and how
many of them the selection rule picks. Forecasts
are computed for the whole store before the replay (one ``predict`` call per layer over all tokens),
so the replay loop only walks arrays.

- ``none``: nothing.
- ``oracle``: the true experts of layers l+1..l+D (the upper bound).
- ``topk`` (SpecMD / Eliseev-Mazur): the next layer's router on the current hidden state (gating
  lookahead), top ``ceil(k * overfetch)`` experts per token; next layer only, as in the paper.
- ``percentile`` (Zhu et al.): the same forecast, every expert whose predicted probability is above the
  ``q``-th percentile (default 80th) of that token's distribution over the E experts; next layer only.
  (Called ``score`` before; that name is now the eviction policy's only, :mod:`offload.policies.score`.)
- ``gate``: the Predictor-backed prefetcher with gating lookahead over distances 1..D (top-k rule;
  with D = 1 it equals ``topk``).
- ``ckpt:PATH``: a learned predictor checkpoint (``predictors.checkpoint.load_predictor``), top-k
  rule over distances 1..D.

Prefill passes (many tokens) take the union of the tokens' selections, ordered by summed predicted
probability. Forecasts never cross a pass boundary: layer 0 of the next pass is not prefetched.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.errors import UserError
from core.passes import Passes
from data_pipeline.trace_store import TraceStore

#: ranked candidates kept per forecast: ``DEPTH_FACTOR * top_k`` (at least what the selection picks).
#: Admission by value may go past the selected ones; eviction weighs every listed candidate.
DEPTH_FACTOR = 4


def forecast_depth(num_experts: int, top_k: int) -> int:
    return min(num_experts, DEPTH_FACTOR * top_k)


@dataclass
class ExpertForecast:
    """Ragged ranked forecasts: entries of (p, l, d) are ``expert[ptr[i]:ptr[i+1]]``, best first, with
    i = (p*L + l)*D + d-1. The first ``selected[i]`` of them are the selection rule's picks (what a
    greedy prefetcher copies and what Least-Stale counts as current); ``prob`` holds P(use) when it
    is known (the oracle: 1), else None and the step calibrates ranks online."""

    lookahead: int
    ptr: np.ndarray  # (P*L*D + 1,) int64
    expert: np.ndarray  # int32, best first
    selected: np.ndarray  # (P*L*D,) int32
    covered: np.ndarray  # (L, D) bool: whether (l, d) forecasts were made (l+d < L and the predictor covers it)
    prob: np.ndarray | None = None  # (len(expert),) float32

    def index(self, p: int, layer: int, d: int, num_layers: int) -> int:
        return (p * num_layers + layer) * self.lookahead + d - 1

    def entries(self, p: int, layer: int, d: int, num_layers: int) -> np.ndarray:
        i = self.index(p, layer, d, num_layers)
        return self.expert[self.ptr[i]: self.ptr[i + 1]]

    def picks(self, p: int, layer: int, d: int, num_layers: int) -> np.ndarray:
        """The selected entries of (p, layer, d): what a greedy prefetcher copies."""
        i = self.index(p, layer, d, num_layers)
        return self.expert[self.ptr[i]: self.ptr[i] + self.selected[i]]

    def selected_mask(self) -> np.ndarray:
        """(len(expert),) bool: whether each entry is among its forecast's selected ones."""
        counts = np.diff(self.ptr)
        rank = np.arange(len(self.expert)) - np.repeat(self.ptr[:-1], counts)
        return rank < np.repeat(self.selected, counts)


def rank_candidates(scores: np.ndarray, selection: Selection, top_k: int, depth: int) -> tuple[np.ndarray, int]:
    """(T, E) scores of one pass's tokens for one target layer -> (ranked experts, how many selected).

    One token: its experts by score; the selection rule picks the first ones. Several tokens (a
    prefill pass): the union of every token's picks, ordered by score summed over the tokens, then
    the other experts by summed score. At least ``depth`` are listed (all selected ones always).
    Written once: the simulator's precomputed forecasts and the engine's live ones both use it.
    """
    counts = selection.counts(scores, top_k)
    order = np.argsort(-scores, axis=1, kind="stable")
    if scores.shape[0] == 1:
        n = int(counts[0])
        return order[0, : max(n, depth)], n
    mask = np.zeros(scores.shape[1], dtype=bool)
    for t, n in enumerate(counts):
        mask[order[t, :n]] = True
    total = scores.sum(axis=0)
    picked = np.flatnonzero(mask)
    picked = picked[np.argsort(-total[picked], kind="stable")]
    rest = np.flatnonzero(~mask)
    rest = rest[np.argsort(-total[rest], kind="stable")]
    return np.concatenate([picked, rest])[: max(len(picked), depth)], len(picked)


def forecast_quality(passes: Passes, fc: ExpertForecast) -> tuple[float, float]:
    """Micro-averaged precision and recall of the selected forecasts against the true experts of the
    target layers."""
    P, L, E, D = passes.num_passes, passes.num_layers, passes.num_experts, fc.lookahead
    truth = np.zeros((P * L, E), dtype=bool)
    truth[np.repeat(np.arange(P * L), np.diff(passes.layer_ptr)), passes.expert] = True
    sizes = truth.sum(axis=1).reshape(P, L)
    counts = np.diff(fc.ptr)
    idx = np.repeat(np.arange(P * L * D), counts)
    sel = fc.selected_mask()
    idx, experts = idx[sel], fc.expert[sel]
    p, rem = np.divmod(idx, L * D)
    layer, dm1 = np.divmod(rem, D)
    target = p * L + layer + dm1 + 1
    hits = int(truth[target, experts].sum())
    predicted = int(len(experts))
    relevant = 0
    for layer in range(L):
        for d in range(1, D + 1):
            if fc.covered[layer, d - 1]:
                relevant += int(sizes[:, layer + d].sum())
    precision = hits / predicted if predicted else 0.0
    recall = hits / relevant if relevant else 0.0
    return precision, recall


def _ragged_from_dense(dense: np.ndarray, selected: np.ndarray, lookahead: int, covered: np.ndarray) -> ExpertForecast:
    """(P, L, D, M) int expert ids padded with -1, (P, L, D) selected counts -> ragged ExpertForecast."""
    valid = dense >= 0
    counts = valid.sum(axis=3).reshape(-1)
    ptr = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    return ExpertForecast(lookahead, ptr, dense[valid].astype(np.int32), selected.reshape(-1).astype(np.int32),
                          covered)


class Prefetcher(ABC):
    name: str = ""
    #: the forecast's P(use) is known exactly (the oracle); otherwise the step calibrates ranks
    exact = False

    def __init__(self, lookahead: int = 1):
        if lookahead < 1:
            raise UserError(f"lookahead distance must be at least 1 (got {lookahead})")
        self.lookahead = lookahead

    @abstractmethod
    def forecast(self, passes: Passes, store: TraceStore | None) -> ExpertForecast | None:
        """Forecasts for every pass and layer, or None when nothing is prefetched."""

    def describe(self) -> dict[str, Any]:
        return {"prefetch": self.name, "lookahead": self.lookahead}


class NoPrefetch(Prefetcher):
    name = "none"

    def forecast(self, passes: Passes, store: TraceStore | None) -> ExpertForecast | None:
        return None


class OraclePrefetch(Prefetcher):
    """The true experts of layers l+1..l+D, in rank order; P(use) = 1 and every other expert 0."""

    name = "oracle"
    exact = True

    def forecast(self, passes: Passes, store: TraceStore | None) -> ExpertForecast:
        P, L, D = passes.num_passes, passes.num_layers, self.lookahead
        counts = np.diff(passes.layer_ptr).reshape(P, L)
        src = np.full((P, L, D), -1, dtype=np.int64)  # index p*L + target, -1 when past the last layer
        for d in range(1, D + 1):
            if d < L:
                src[:, : L - d, d - 1] = np.arange(P)[:, None] * L + np.arange(d, L)[None, :]
        src = src.reshape(-1)
        lens = np.where(src >= 0, counts.reshape(-1)[np.maximum(src, 0)], 0)
        ptr = np.zeros(len(src) + 1, dtype=np.int64)
        np.cumsum(lens, out=ptr[1:])
        starts = passes.layer_ptr[np.maximum(src, 0)]
        gather = np.repeat(starts - ptr[:-1], lens) + np.arange(ptr[-1])
        covered = np.array([[layer + d < L for d in range(1, D + 1)] for layer in range(L)], dtype=bool)
        return ExpertForecast(D, ptr, passes.expert[gather].astype(np.int32), lens.astype(np.int32), covered,
                              prob=np.ones(int(ptr[-1]), dtype=np.float32))


class Selection(ABC):
    """How many of a token's predicted experts to fetch."""

    @abstractmethod
    def counts(self, probs: np.ndarray, top_k: int) -> np.ndarray:
        """(T,) number of experts to take from each row of (T, E) scores, best first."""

    @abstractmethod
    def describe(self) -> dict[str, Any]: ...


class TopKSelection(Selection):
    """``ceil(k * overfetch)`` experts per token (OLMoE k=8, overfetch 1.5 -> 12)."""

    def __init__(self, overfetch: float = 1.0):
        if overfetch <= 0:
            raise UserError(f"overfetch factor must be positive (got {overfetch})")
        self.overfetch = overfetch

    def counts(self, probs: np.ndarray, top_k: int) -> np.ndarray:
        m = min(probs.shape[1], math.ceil(top_k * self.overfetch - 1e-9))
        return np.full(probs.shape[0], m, dtype=np.int64)

    def describe(self) -> dict[str, Any]:
        return {"select": "topk", "overfetch": self.overfetch}


class PercentileSelection(Selection):
    """Every expert whose score is above the ``q``-quantile of the token's scores over the E experts."""

    def __init__(self, q: float = 0.8):
        if not 0.0 <= q < 1.0:
            raise UserError(f"prefetch percentile must be in [0, 1) (got {q})")
        self.q = q

    def counts(self, probs: np.ndarray, top_k: int) -> np.ndarray:
        thr = np.quantile(probs, self.q, axis=1, keepdims=True)
        return (probs > thr).sum(axis=1).astype(np.int64)

    def describe(self) -> dict[str, Any]:
        return {"select": "percentile", "q": self.q}


class PredictorPrefetch(Prefetcher):
    """Prefetch what a :class:`predictors.base.Predictor` forecasts, through a :class:`Selection` rule."""

    def __init__(self, predictor: Any, selection: Selection, lookahead: int | None = None, name: str = "predictor",
                 batch_rows: int = 8192):
        super().__init__(lookahead if lookahead is not None else predictor.lookahead)
        if self.lookahead > predictor.lookahead:
            raise UserError(f"the predictor forecasts {predictor.lookahead} layers ahead, not {self.lookahead}")
        self.predictor = predictor
        self.selection = selection
        self.name = name
        self.batch_rows = batch_rows

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), **self.selection.describe(), "predictor": self.predictor.describe()}

    def _context(self, store: TraceStore, layer: int, rows: np.ndarray, ids: np.ndarray, prev_row: np.ndarray):
        # torch: ~1 s to import; only the predictor-backed prefetchers run it
        import torch

        from predictors.base import PredictContext

        needs = self.predictor.needs
        hidden = chosen = previous = None
        if "hidden" in needs:
            hidden = torch.from_numpy(np.asarray(store.hidden(layer)[rows], dtype=np.float32))
        if "chosen" in needs or not needs:  # cheap, and tells a context-free predictor how many tokens
            chosen = torch.from_numpy(ids[rows, : layer + 1].astype(np.int64))
        if "previous" in needs:
            prev = ids[np.maximum(prev_row[rows], 0)].astype(np.int64)
            prev[prev_row[rows] < 0] = self.predictor.num_experts  # the datamodule's "no previous token" id
            previous = torch.from_numpy(prev)
        token = None
        if "token" in needs:  # -1 where the store has none (an imported trace): the prior's popularity
            token = torch.from_numpy(np.asarray(store.token_ids[rows], dtype=np.int64))
        return PredictContext(layer=layer, hidden=hidden, chosen=chosen, previous=previous, token=token)

    def forecast(self, passes: Passes, store: TraceStore | None) -> ExpertForecast:
        if store is None:
            raise UserError(f"prefetch {self.name} needs the trace store")
        L, E, K, D, P = passes.num_layers, passes.num_experts, passes.top_k, self.lookahead, passes.num_passes
        depth = forecast_depth(E, K)
        needs = self.predictor.needs
        if "hidden" in needs and not store.hidden_layers:
            raise UserError(f"prefetch {self.name} needs hidden states, and {store.path} has none "
                            f"(collect with hidden states, or use --prefetch oracle/none)")
        ids = store.topk_ids()
        seq = store.seq_ids
        prev_row = np.arange(len(seq)) - 1
        prev_row[np.concatenate([[True], seq[1:] != seq[:-1]])] = -1
        # rows of every pass, and the pass each row belongs to
        lens = passes.row_stop - passes.row_start
        rows = np.repeat(passes.row_start - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + np.arange(lens.sum())
        row_pass = np.repeat(np.arange(P), lens)
        single = lens[row_pass] == 1
        covered = np.zeros((L, D), dtype=bool)
        dense = np.full((P, L, D, E), -1, dtype=np.int16 if E < 2**15 else np.int32)
        selected = np.zeros((P, L, D), dtype=np.int32)
        for layer in range(L):
            ds = [d for d in range(1, D + 1) if self.predictor.covers(layer, d)
                  and ("hidden" not in needs or store.has_hidden(layer))]
            if not ds:
                continue
            for d in ds:
                covered[layer, d - 1] = True
            probs = np.empty((len(rows), D, E), dtype=np.float32)
            for s in range(0, len(rows), self.batch_rows):
                r = rows[s: s + self.batch_rows]
                ctx = self._context(store, layer, r, ids, prev_row)
                probs[s: s + len(r)] = self.predictor.predict(ctx).detach().cpu().numpy()[:, :D]
            for d in ds:
                pr = probs[:, d - 1]
                # one-token passes, vectorised: exactly rank_candidates on a single row
                order = np.argsort(-pr[single], axis=1, kind="stable")
                n = self.selection.counts(pr[single], K)
                m = max(depth, int(n.max()) if len(n) else 0)
                top = order[:, :m]
                keep = np.arange(m)[None, :] < np.maximum(n, depth)[:, None]
                p_single = row_pass[single]
                dense[p_single, layer, d - 1, :m] = np.where(keep, top, -1)
                selected[p_single, layer, d - 1] = n
                for p in np.unique(row_pass[~single]):  # a prefill pass: the union of its tokens' picks
                    experts, picked = rank_candidates(pr[row_pass == p], self.selection, K, depth)
                    dense[p, layer, d - 1, : len(experts)] = experts
                    selected[p, layer, d - 1] = picked
        return _ragged_from_dense(dense, selected, D, covered)


PREFETCHERS = ("none", "topk", "percentile", "oracle", "gate")
#: old prefetcher names -> their names now; an old name is refused with one line naming the new one
RENAMED_PREFETCHERS = {"score": "percentile"}


def refuse_renamed_prefetcher(spec: str) -> str:
    """``spec`` unchanged, or one line for an old name (``score`` is the eviction policy's name only)."""
    new = RENAMED_PREFETCHERS.get(spec)
    if new is not None:
        raise UserError(f"the prefetcher {spec!r} is now called {new!r}: use --prefetch {new} "
                        f"('{spec}' names the eviction policy only)")
    return spec


def make_prefetcher(spec: str, store: TraceStore | None, *, lookahead: int = 1, overfetch: float = 1.0,
                    percentile: float = 0.8) -> Prefetcher:
    """Build a prefetcher from its command-line name (see the module docstring)."""
    refuse_renamed_prefetcher(spec)
    if spec == "none":
        return NoPrefetch(lookahead)
    if spec == "oracle":
        return OraclePrefetch(lookahead)
    if spec in ("topk", "percentile", "gate"):
        if store is None:
            raise UserError(f"prefetch {spec} needs a trace store")
        if not store.hidden_layers:
            raise UserError(f"prefetch {spec} needs hidden states, and {store.path} has none "
                            f"(collect with hidden states, or use --prefetch oracle/none)")
        if not store.has_router_weights:
            raise UserError(f"prefetch {spec} needs the router weights saved beside {store.path}")
        # predictors.gate_lookahead imports torch (~1 s): only for these prefetchers
        from predictors.gate_lookahead import GateLookahead

        d = 1 if spec in ("topk", "percentile") else lookahead
        predictor = GateLookahead.from_store(store, d)
        sel: Selection = PercentileSelection(percentile) if spec == "percentile" else TopKSelection(overfetch)
        return PredictorPrefetch(predictor, sel, d, name=spec)
    if spec.startswith("ckpt:"):
        if store is None:
            raise UserError("a checkpoint prefetcher needs a trace store")
        try:
            # predictors.checkpoint imports torch (~1 s): only for ckpt:PATH
            from predictors.checkpoint import load_predictor
        except ImportError:
            raise UserError("learned predictor checkpoints are not available in this build") from None
        predictor = load_predictor(spec[5:], store.model)
        if lookahead > predictor.lookahead:
            raise UserError(f"{spec[5:]} forecasts {predictor.lookahead} layer(s) ahead, not {lookahead}: lower "
                            f"--lookahead or train with a larger one")
        return PredictorPrefetch(predictor, TopKSelection(overfetch), lookahead, name=spec)
    raise UserError(f"unknown prefetcher {spec!r}; valid: {', '.join(PREFETCHERS)}, ckpt:PATH")
