"""Deterministic train/val/test splits of a trace store, shared by training and held-out evaluation.

Neighbouring tokens of one sequence share most of their routing, so a split by token would leak
the test set into training; splits are by sequence. A store with fewer sequences than the split
needs (an imported single-prompt log, such as the gemma trace) is split by position instead:
every sequence's prefill and the first part of its decode train, the next part validates, the
last part tests -- a forecast of later decode steps from earlier ones, which is what an engine
serving that prompt would face. :attr:`TraceSplit.how` says which split was made.

This module imports neither torch nor Lightning: ``evaluate.py`` replays the held-out passes of the
same split without paying for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.errors import UserError
from core.model_info import DECODE
from data_pipeline.trace_store import TraceStore

SPLITS = ("auto", "sequence", "position")


@dataclass
class TraceSplit:
    train: np.ndarray  # global row indices
    val: np.ndarray
    test: np.ndarray
    how: str  # "sequence" or "position"

    def parts_of(self, rows: np.ndarray) -> np.ndarray:
        """0/1/2 (train/val/test) of each store row in ``rows``; -1 for a row no part holds.

        The reuse forecasters learn from whole passes: a pass belongs to the part holding its first
        row (``parts_of(passes.row_start)``), so they split a store exactly as the lookahead families do.
        """
        rows = np.asarray(rows, dtype=np.int64)
        size = 1 + max([int(r.max()) for r in (rows, self.train, self.val, self.test) if len(r)], default=-1)
        part = np.full(size, -1, dtype=np.int64)
        for i, held in enumerate((self.train, self.val, self.test)):
            part[held] = i
        return part[rows]

    def describe(self) -> str:
        sizes = f"{len(self.train)}/{len(self.val)}/{len(self.test)} tokens"
        if self.how == "sequence":
            return f"split by sequence (train/val/test {sizes})"
        return f"split by position within each sequence's decode: train on the first part, evaluate on the rest ({sizes})"


def _counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    n_val = max(1, int(round(n * val_fraction)))
    n_test = max(1, int(round(n * test_fraction)))
    return n - n_val - n_test, n_val, n_test


def split_rows(store: TraceStore, *, seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15,
               split: str = "auto") -> TraceSplit:
    """Deterministic train/val/test rows for ``seed``; by sequence unless there are too few."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserError("val_fraction and test_fraction must be in (0, 1) and sum to less than 1")
    bounds = store.sequence_bounds()
    if store.num_tokens == 0:
        raise UserError(f"trace store {store.path} is empty (0 tokens); collect or import traces first")
    n_seq = len(bounds)
    how = split if split != "auto" else ("sequence" if n_seq >= 3 else "position")
    if how == "sequence":
        n_train, n_val, n_test = _counts(n_seq, val_fraction, test_fraction)
        if n_train < 1:
            raise UserError(
                f"trace store {store.path} has {n_seq} sequence(s); a train/val/test split by sequence needs "
                f"at least 3 (collect more, or use split: position)"
            )
        order = np.random.default_rng(seed).permutation(n_seq)
        parts = [order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]]
        rows = [np.concatenate([np.arange(bounds[i, 1], bounds[i, 2]) for i in sorted(p)]) for p in parts]
        return TraceSplit(*rows, how="sequence")
    phases = store.phases
    parts_rows: list[list[np.ndarray]] = [[], [], []]
    for _, start, stop in bounds:
        rows = np.arange(start, stop)
        decode = rows[phases[start:stop] == DECODE]
        timeline = decode if len(decode) >= 3 else rows  # no decode phase: split the prompt itself
        n_train, n_val, n_test = _counts(len(timeline), val_fraction, test_fraction)
        if n_train < 1:
            continue
        first_val = timeline[n_train]
        parts_rows[0].append(rows[rows < first_val])
        parts_rows[1].append(timeline[n_train:n_train + n_val])
        parts_rows[2].append(timeline[n_train + n_val:])
    if not parts_rows[0]:
        raise UserError(
            f"trace store {store.path} is too small to split: {store.num_tokens} token(s) in {n_seq} sequence(s); "
            f"a split by position needs at least 3 tokens in a sequence"
        )
    return TraceSplit(*(np.concatenate(p) for p in parts_rows), how="position")
