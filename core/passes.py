"""Turn a trace store into forward passes of (layer, expert) accesses.

Passes are what the simulator replays, what the eviction policies see and what the reuse
forecasters learn from; they live here, below all three.

A **pass** is one forward of the model: the prefill of a prompt (all its phase-0 tokens at once) or
one decode step (one phase-1 token). Inside a pass, layers run 0..L-1 and each layer accesses every
distinct expert its tokens chose, in **rank order**:

- decode: the token's top-k in the store's rank order (highest router weight first);
- prefill: distinct experts ordered by their router weight summed over the prompt's tokens (highest
  first), ties by best rank then expert id. ``best_rank`` is the best (lowest) rank the expert had
  for any token (used by drop miss handling); ``tokens`` how many tokens chose it (compute time).

The arrays are flat and ragged so numba kernels can walk them without Python objects.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from core.errors import UserError
from core.model_info import DECODE, PREFILL

PHASES = ("prefill", "decode", "both")


class RoutedStore(Protocol):
    """What :func:`build_passes` reads of a store (a :class:`data_pipeline.trace_store.TraceStore`)."""

    path: Path

    @property
    def num_layers(self) -> int: ...

    @property
    def num_experts(self) -> int: ...

    @property
    def top_k(self) -> int: ...

    @property
    def phases(self) -> np.ndarray: ...

    def topk_ids(self) -> np.ndarray: ...

    def topk_weights(self) -> np.ndarray: ...

    def sequence_bounds(self) -> np.ndarray: ...  # (S, 3) rows of (seq_id, start, stop)


@dataclass
class Passes:
    num_layers: int
    num_experts: int
    top_k: int
    phase: np.ndarray  # (P,) int8: 0 prefill, 1 decode
    seq: np.ndarray  # (P,) int64 sequence id
    row_start: np.ndarray  # (P,) int64 first store row of the pass
    row_stop: np.ndarray  # (P,) int64 one past the last store row
    layer_ptr: np.ndarray  # (P*L+1,) int64: accesses of pass p, layer l are [ptr[p*L+l], ptr[p*L+l+1])
    expert: np.ndarray  # (A,) int32 expert id
    score: np.ndarray  # (A,) float32 router weight summed over the pass's tokens
    best_rank: np.ndarray  # (A,) int32
    tokens: np.ndarray  # (A,) int32 tokens of the pass routed to this expert

    @property
    def num_passes(self) -> int:
        return len(self.phase)

    @property
    def num_accesses(self) -> int:
        return len(self.expert)

    @property
    def pass_tokens(self) -> np.ndarray:
        return (self.row_stop - self.row_start).astype(np.int64)

    def layer_of_access(self) -> np.ndarray:
        """(A,) int32 layer of every access."""
        counts = np.diff(self.layer_ptr)
        return np.tile(np.arange(self.num_layers, dtype=np.int32), self.num_passes).repeat(counts)

    def keys(self) -> np.ndarray:
        """(A,) int64 flat key layer*E + expert."""
        return self.layer_of_access().astype(np.int64) * self.num_experts + self.expert

    def layer_experts(self, p: int, layer: int) -> np.ndarray:
        i = p * self.num_layers + layer
        return self.expert[self.layer_ptr[i]: self.layer_ptr[i + 1]]

    def next_use(self) -> np.ndarray:
        """(A,) int64 index of the next access of the same key; ``A`` + large when never again."""
        keys = self.keys()
        n = len(keys)
        order = np.argsort(keys, kind="stable")
        nxt = np.full(n, NEVER, dtype=np.int64)
        same = keys[order[1:]] == keys[order[:-1]]
        nxt[order[:-1][same]] = order[1:][same]
        return nxt


NEVER = np.int64(2**62)


def prefill_layer(ids: np.ndarray, weights: np.ndarray, num_experts: int):
    """Distinct experts of one layer over a prompt's tokens, in rank order."""
    flat_ids = ids.reshape(-1).astype(np.int64)
    valid = flat_ids >= 0
    flat_ids = flat_ids[valid]
    ranks = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).reshape(-1)[valid]
    score = np.bincount(flat_ids, weights=weights.reshape(-1)[valid], minlength=num_experts)
    count = np.bincount(flat_ids, minlength=num_experts)
    best = np.full(num_experts, 1 << 30, dtype=np.int64)
    np.minimum.at(best, flat_ids, ranks)
    experts = np.flatnonzero(count)
    order = np.lexsort((experts, best[experts], -score[experts]))
    e = experts[order]
    return e, score[e], best[e], count[e]


def build_passes(store: RoutedStore, phase: str = "both") -> Passes:
    """All passes of a store in storage order (sequence by sequence: its prefill, then its decode steps)."""
    if phase not in PHASES:
        raise UserError(f"unknown phase {phase!r}; valid: {', '.join(PHASES)}")
    L, E, K = store.num_layers, store.num_experts, store.top_k
    ids_all = store.topk_ids()
    w_all = store.topk_weights()
    phases = store.phases
    want_prefill = phase in ("prefill", "both")
    want_decode = phase in ("decode", "both")
    p_phase, p_seq, p_start, p_stop, layer_counts = [], [], [], [], []
    chunks_e, chunks_s, chunks_r, chunks_t = [], [], [], []
    for seq_id, start, stop in store.sequence_bounds():
        ph = phases[start:stop]
        pre = np.flatnonzero(ph == PREFILL) + start
        dec = np.flatnonzero(ph == DECODE) + start
        if want_prefill and len(pre):
            if not np.all(np.diff(pre) == 1):
                raise UserError(f"{store.path}: the prefill rows of sequence {seq_id} are not contiguous")
            p_phase.append(PREFILL)
            p_seq.append(seq_id)
            p_start.append(pre[0])
            p_stop.append(pre[-1] + 1)
            for layer in range(L):
                e, s, b, c = prefill_layer(ids_all[pre, layer], w_all[pre, layer], E)
                chunks_e.append(e)
                chunks_s.append(s)
                chunks_r.append(b)
                chunks_t.append(c)
                layer_counts.append(len(e))
        if want_decode and len(dec):
            n = len(dec)
            ids = ids_all[dec].astype(np.int64)  # (n, L, K)
            valid = ids >= 0
            p_phase.extend([DECODE] * n)
            p_seq.extend([seq_id] * n)
            p_start.extend(dec.tolist())
            p_stop.extend((dec + 1).tolist())
            chunks_e.append(ids[valid])
            chunks_s.append(w_all[dec][valid])
            chunks_r.append(np.broadcast_to(np.arange(K), ids.shape)[valid])
            chunks_t.append(np.ones(int(valid.sum()), dtype=np.int64))
            layer_counts.extend(valid.sum(axis=2).reshape(-1).tolist())
    def cat(xs: list, dt: type) -> np.ndarray:
        return np.concatenate(xs).astype(dt) if xs else np.zeros(0, dtype=dt)

    ptr = np.zeros(len(layer_counts) + 1, dtype=np.int64)
    np.cumsum(layer_counts, out=ptr[1:])
    return Passes(
        num_layers=L,
        num_experts=E,
        top_k=K,
        phase=np.asarray(p_phase, dtype=np.int8),
        seq=np.asarray(p_seq, dtype=np.int64),
        row_start=np.asarray(p_start, dtype=np.int64),
        row_stop=np.asarray(p_stop, dtype=np.int64),
        layer_ptr=ptr,
        expert=cat(chunks_e, np.int32),
        score=cat(chunks_s, np.float32),
        best_rank=cat(chunks_r, np.int32),
        tokens=cat(chunks_t, np.int32),
    )


def take_passes(passes: Passes, keep: np.ndarray) -> Passes:
    """The passes where ``keep`` is True, in order, as a new :class:`Passes`."""
    L = passes.num_layers
    idx = np.flatnonzero(keep)
    counts = np.diff(passes.layer_ptr).reshape(-1, L)[idx].reshape(-1)
    starts = passes.layer_ptr[:-1].reshape(-1, L)[idx].reshape(-1)
    access = np.concatenate([np.arange(a, a + n) for a, n in zip(starts, counts, strict=True)]) if len(counts) else \
        np.zeros(0, dtype=np.int64)
    ptr = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    return replace(passes, phase=passes.phase[idx], seq=passes.seq[idx], row_start=passes.row_start[idx],
                   row_stop=passes.row_stop[idx], layer_ptr=ptr, expert=passes.expert[access],
                   score=passes.score[access], best_rank=passes.best_rank[access], tokens=passes.tokens[access])


def passes_from_lists(passes: list[list[list[int]]], num_experts: int, top_k: int | None = None,
                      phases: list[int] | None = None) -> Passes:
    """Hand-built passes (per pass, per layer, expert ids in rank order) for tests and benchmarks."""
    L = len(passes[0])
    counts = [len(layer) for p in passes for layer in p]
    ptr = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    experts = np.array([e for p in passes for layer in p for e in layer], dtype=np.int32)
    ranks = np.array([r for p in passes for layer in p for r in range(len(layer))], dtype=np.int32)
    P = len(passes)
    return Passes(
        num_layers=L, num_experts=num_experts, top_k=top_k or max(counts),
        phase=np.asarray(phases if phases is not None else [DECODE] * P, dtype=np.int8),
        seq=np.zeros(P, dtype=np.int64), row_start=np.arange(P, dtype=np.int64),
        row_stop=np.arange(1, P + 1, dtype=np.int64), layer_ptr=ptr, expert=experts,
        score=np.ones(len(experts), dtype=np.float32), best_rank=ranks,
        tokens=np.ones(len(experts), dtype=np.int32),
    )
