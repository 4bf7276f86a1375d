"""Prefetchers: which experts of layers l+1..l+D to copy in while layer l runs.

A prefetcher turns a replay (:class:`offload.passes.Passes`) into a :class:`Forecast`: for every pass
``p``, layer ``l`` and distance ``d`` the experts of layer ``l+d`` to fetch, best first. Forecasts
are computed for the whole store before the replay (one ``predict`` call per layer over all tokens),
so the replay loop only walks arrays.

- ``none``: nothing.
- ``oracle``: the true experts of layers l+1..l+D (the upper bound).
- ``topk`` (SpecMD / Eliseev-Mazur): the next layer's router on the current hidden state (gating
  lookahead), top ``ceil(k * overfetch)`` experts per token; next layer only, as in the paper.
- ``score`` (Zhu et al.): the same forecast, every expert whose predicted probability is above the
  ``q``-th percentile (default 80th) of that token's distribution over the E experts; next layer only.
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

from data_pipeline.errors import UserError
from data_pipeline.trace_store import TraceStore
from offload.passes import Passes


@dataclass
class Forecast:
    """Ragged forecasts: entries of (p, l, d) are ``expert[ptr[i]:ptr[i+1]]`` with i = (p*L + l)*D + d-1."""

    lookahead: int
    ptr: np.ndarray  # (P*L*D + 1,) int64
    expert: np.ndarray  # int32, best first
    covered: np.ndarray  # (L, D) bool: whether (l, d) forecasts were made (l+d < L and the predictor covers it)

    def entries(self, p: int, layer: int, d: int, num_layers: int) -> np.ndarray:
        i = (p * num_layers + layer) * self.lookahead + d - 1
        return self.expert[self.ptr[i]: self.ptr[i + 1]]


def forecast_quality(passes: Passes, fc: Forecast) -> tuple[float, float]:
    """Micro-averaged precision and recall of the forecast against the true experts of the target layers."""
    P, L, E, D = passes.num_passes, passes.num_layers, passes.num_experts, fc.lookahead
    truth = np.zeros((P * L, E), dtype=bool)
    truth[np.repeat(np.arange(P * L), np.diff(passes.layer_ptr)), passes.expert] = True
    sizes = truth.sum(axis=1).reshape(P, L)
    counts = np.diff(fc.ptr)
    idx = np.repeat(np.arange(P * L * D), counts)
    p, rem = np.divmod(idx, L * D)
    layer, dm1 = np.divmod(rem, D)
    target = p * L + layer + dm1 + 1
    hits = int(truth[target, fc.expert].sum())
    predicted = int(len(fc.expert))
    relevant = 0
    for layer in range(L):
        for d in range(1, D + 1):
            if fc.covered[layer, d - 1]:
                relevant += int(sizes[:, layer + d].sum())
    precision = hits / predicted if predicted else 0.0
    recall = hits / relevant if relevant else 0.0
    return precision, recall


def _ragged_from_dense(dense: np.ndarray, lookahead: int, covered: np.ndarray) -> Forecast:
    """(P, L, D, M) int expert ids padded with -1 -> ragged Forecast."""
    valid = dense >= 0
    counts = valid.sum(axis=3).reshape(-1)
    ptr = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    return Forecast(lookahead, ptr, dense[valid].astype(np.int32), covered)


class Prefetcher(ABC):
    name: str = ""

    def __init__(self, lookahead: int = 1):
        if lookahead < 1:
            raise UserError(f"lookahead distance must be at least 1 (got {lookahead})")
        self.lookahead = lookahead

    @abstractmethod
    def forecast(self, passes: Passes, store: TraceStore | None) -> Forecast | None:
        """Forecasts for every pass and layer, or None when nothing is prefetched."""

    def describe(self) -> dict[str, Any]:
        return {"prefetch": self.name, "lookahead": self.lookahead}


class NoPrefetch(Prefetcher):
    name = "none"

    def forecast(self, passes: Passes, store: TraceStore | None) -> Forecast | None:
        return None


class OraclePrefetch(Prefetcher):
    """The true experts of layers l+1..l+D, in rank order."""

    name = "oracle"

    def forecast(self, passes: Passes, store: TraceStore | None) -> Forecast:
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
        return Forecast(D, ptr, passes.expert[gather].astype(np.int32), covered)


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
            raise UserError(f"score percentile must be in [0, 1) (got {q})")
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
        return PredictContext(layer=layer, hidden=hidden, chosen=chosen, previous=previous)

    def forecast(self, passes: Passes, store: TraceStore | None) -> Forecast:
        if store is None:
            raise UserError(f"prefetch {self.name} needs the trace store")
        L, E, K, D, P = passes.num_layers, passes.num_experts, passes.top_k, self.lookahead, passes.num_passes
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
        is_prefill = lens > 1
        covered = np.zeros((L, D), dtype=bool)
        per_layer: list[list[np.ndarray]] = []
        width = 1
        for layer in range(L):
            outs: list[np.ndarray] = []
            ds = [d for d in range(1, D + 1) if self.predictor.covers(layer, d)
                  and ("hidden" not in needs or store.has_hidden(layer))]
            for d in ds:
                covered[layer, d - 1] = True
            if not ds:
                per_layer.append([np.full((P, 0), -1, dtype=np.int32)] * D)
                continue
            probs = np.empty((len(rows), D, E), dtype=np.float32)
            for s in range(0, len(rows), self.batch_rows):
                r = rows[s: s + self.batch_rows]
                ctx = self._context(store, layer, r, ids, prev_row)
                probs[s: s + len(r)] = self.predictor.predict(ctx).detach().cpu().numpy()[:, :D]
            for d in range(1, D + 1):
                if d not in ds:
                    outs.append(np.full((P, 0), -1, dtype=np.int32))
                    continue
                pr = probs[:, d - 1]
                order = np.argsort(-pr, axis=1, kind="stable")
                n = self.selection.counts(pr, K)
                m = int(n.max()) if len(n) else 0
                top = np.where(np.arange(m)[None, :] < n[:, None], order[:, :m], -1)
                out = np.full((P, max(m, 1)), -1, dtype=np.int32)
                single = ~is_prefill[row_pass]
                out[row_pass[single], :m] = top[single]
                for p in np.flatnonzero(is_prefill):  # prefill: union of the tokens' picks
                    sel = top[row_pass == p]
                    mask = np.zeros(E, dtype=bool)
                    mask[sel[sel >= 0]] = True
                    total = pr[row_pass == p].sum(axis=0)
                    picked = np.flatnonzero(mask)
                    picked = picked[np.argsort(-total[picked], kind="stable")]
                    if len(picked) > out.shape[1]:
                        out = np.concatenate([out, np.full((P, len(picked) - out.shape[1]), -1, np.int32)], axis=1)
                    out[p, : len(picked)] = picked
                outs.append(out)
            per_layer.append(outs)
            width = max(width, *(o.shape[1] for o in outs))
        dense = np.full((P, L, D, width), -1, dtype=np.int32)
        for layer, outs in enumerate(per_layer):
            for d, o in enumerate(outs):
                dense[:, layer, d, : o.shape[1]] = o
        return _ragged_from_dense(dense, D, covered)


PREFETCHERS = ("none", "topk", "score", "oracle", "gate")


def make_prefetcher(spec: str, store: TraceStore | None, *, lookahead: int = 1, overfetch: float = 1.0,
                    percentile: float = 0.8) -> Prefetcher:
    """Build a prefetcher from its command-line name (see the module docstring)."""
    if spec == "none":
        return NoPrefetch(lookahead)
    if spec == "oracle":
        return OraclePrefetch(lookahead)
    if spec in ("topk", "score", "gate"):
        if store is None:
            raise UserError(f"prefetch {spec} needs a trace store")
        if not store.hidden_layers:
            raise UserError(f"prefetch {spec} needs hidden states, and {store.path} has none "
                            f"(collect with hidden states, or use --prefetch oracle/none)")
        if not store.has_router_weights:
            raise UserError(f"prefetch {spec} needs the router weights saved beside {store.path}")
        from predictors.gate_lookahead import GateLookahead

        d = 1 if spec in ("topk", "score") else lookahead
        predictor = GateLookahead.from_store(store, d)
        sel: Selection = PercentileSelection(percentile) if spec == "score" else TopKSelection(overfetch)
        return PredictorPrefetch(predictor, sel, d, name=spec)
    if spec.startswith("ckpt:"):
        if store is None:
            raise UserError("a checkpoint prefetcher needs a trace store")
        try:
            from predictors.checkpoint import load_predictor
        except ImportError:
            raise UserError("learned predictor checkpoints are not available in this build") from None
        predictor = load_predictor(spec[5:], store.model)
        return PredictorPrefetch(predictor, TopKSelection(overfetch), min(lookahead, predictor.lookahead), name=spec)
    raise UserError(f"unknown prefetcher {spec!r}; valid: {', '.join(PREFETCHERS)}, ckpt:PATH")
