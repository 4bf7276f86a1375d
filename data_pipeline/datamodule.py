"""Training pairs from a trace store: the token dataset and the DataModule.

The train/val/test split (by sequence, or by position for single-prompt traces) lives in
:mod:`data_pipeline.splits`, which evaluation shares without importing Lightning.

A batch is a dict of tensors over B tokens:

- ``topk_ids`` (B, L, K) long: the experts every layer chose;
- ``previous`` (B, L, K) long: the previous token's experts in the same sequence; the first
  token of a sequence has ``num_experts`` everywhere (= no previous token);
- ``token`` (B,) long: the token ids (-1 where the store has none, e.g. imported traces);
- ``hidden`` (B, L_h, H) float32 at the layers in :attr:`TokenDataset.hidden_layers` (only when
  asked for);
- ``row`` (B,) the global row index in the store.

:class:`ReuseDataModule` serves the reuse forecasters' rows instead (see :mod:`predictors.reuse`):
one row per (pass, layer, expert used before), built by a replay of the passes, on the same split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
)

from core.errors import UserError
from core.passes import build_passes
from data_pipeline.splits import TraceSplit, split_rows
from data_pipeline.trace_store import TraceStore
from predictors.reuse_features import reuse_rows


def previous_rows(store: TraceStore) -> np.ndarray:
    """(N,) global row of each token's predecessor in its sequence, -1 for a sequence's first token."""
    prev = np.arange(store.num_tokens, dtype=np.int64) - 1
    prev[store.sequence_bounds()[:, 1]] = -1
    return prev


class ShardedColumn:
    """Row gather over one column of a store, shard by shard, without concatenating the shards.

    ``TraceStore.column`` concatenates a multi-shard column into memory (once); for hidden states
    of a real model that is gigabytes (OLMoE: 64 KiB per token over 16 layers), so batches gather
    their rows from each shard's memory-mapped view instead. Reads the store's shard list
    (``_shards`` / ``_offsets``, internal to data_pipeline.trace_store).
    """

    def __init__(self, store: TraceStore, name: str):
        self.parts = [shard.column(name) for shard in store._shards]
        self.offsets = store._offsets

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        if len(self.parts) == 1:
            return self.parts[0][rows]
        shard = np.searchsorted(self.offsets, rows, side="right") - 1
        out = np.empty((len(rows), self.parts[0].shape[1]), dtype=self.parts[0].dtype)
        for s in np.unique(shard):
            hit = shard == s
            out[hit] = self.parts[s][rows[hit] - self.offsets[s]]
        return out


class TokenDataset(Dataset):
    """Tokens of a store by global row; fetches whole batches at once (``__getitems__``).

    Columns stay memory-mapped: a batch reads only its rows. The store is reopened in each
    worker process (Arrow memory maps do not pickle).
    """

    def __init__(self, store: TraceStore | str | Path, rows: np.ndarray, *, hidden: bool = False):
        self.store = store if isinstance(store, TraceStore) else TraceStore(store)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.with_hidden = hidden
        self.hidden_layers = list(self.store.hidden_layers) if hidden else []
        if hidden and not self.hidden_layers:
            raise UserError(f"{self.store.path} has no hidden states")
        self._open()

    def _open(self) -> None:
        self._ids = self.store.topk_ids()
        self._prev = previous_rows(self.store)
        self._tokens = self.store.token_ids
        self._hidden = [ShardedColumn(self.store, f"hidden_{layer}") for layer in self.hidden_layers]

    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.store.path), "rows": self.rows, "with_hidden": self.with_hidden,
                "hidden_layers": self.hidden_layers}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a worker process: the parent checked every shard it reads when it opened them (_open), so the
        # worker does not hash them all again
        self.store = TraceStore(state["path"], verify_on_read=False)
        self.rows, self.with_hidden, self.hidden_layers = state["rows"], state["with_hidden"], state["hidden_layers"]
        self._open()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([index]).items()}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = self.rows[np.asarray(indices, dtype=np.int64)]
        ids = torch.from_numpy(self._ids[rows].astype(np.int64))
        prev_rows = self._prev[rows]
        previous = torch.from_numpy(self._ids[np.maximum(prev_rows, 0)].astype(np.int64))
        previous[torch.from_numpy(prev_rows < 0)] = self.store.num_experts
        batch = {"topk_ids": ids, "previous": previous, "token": torch.from_numpy(self._tokens[rows].astype(np.int64)),
                 "row": torch.from_numpy(rows)}
        if self._hidden:
            batch["hidden"] = torch.from_numpy(np.stack([h[rows] for h in self._hidden], axis=1).astype(np.float32))
        return batch


def _keep_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Collate for ``__getitems__`` datasets: the batch is already assembled."""
    return batch


class TraceDataModule(pl.LightningDataModule):
    """Train/val/test loaders over one trace store, split by sequence (see :func:`split_rows`)."""

    def __init__(self, store: str | Path, *, hidden: bool = False, batch_size: int = 256, num_workers: int = 0,
                 seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15, split: str = "auto"):
        super().__init__()
        self.store = TraceStore(store)
        self.hidden = hidden
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.split = split_rows(self.store, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
                                split=split)
        self.datasets = {name: TokenDataset(self.store, getattr(self.split, name), hidden=hidden)
                         for name in ("train", "val", "test")}

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.datasets[name], batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, collate_fn=_keep_batch, generator=generator,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


class ReuseDataModule(pl.LightningDataModule):
    """Rows of the reuse forecasters: (features (n, F) float32, "chosen at the next opportunity" (n,)).

    Built on the run's :class:`~data_pipeline.splits.TraceSplit`, so the reuse families train,
    validate and test on the same sequences (or decode positions) as the lookahead families; a pass
    belongs to the part holding its first row. :attr:`parts` holds every part's rows (0 train, 1 val,
    2 test) for the families fitted in numpy and for scoring; the loaders serve the gradient-trained
    ``reuse_mlp``, whose training rows are a seeded sample of at most ``max_train_rows`` (a long store
    yields millions of near-duplicate rows and a 1.5k-parameter model stops improving long before).

    Batches are sliced out of two tensors at once (BatchSampler, ``batch_size=None``): per-row
    fetching and collation would cost more than the tiny MLP's forward.
    """

    def __init__(self, store: TraceStore, split: TraceSplit, *, phase: str = "both", batch_size: int = 4096,
                 seed: int = 0, max_train_rows: int = 500_000):
        super().__init__()
        self.store, self.split, self.phase = store, split, phase
        self.batch_size, self.seed = batch_size, seed
        passes = build_passes(store, phase)
        self.pass_part = split.parts_of(passes.row_start)
        self.parts = reuse_rows(passes, self.pass_part)
        x, y = self.parts[0]
        if len(x) == 0:
            raise UserError(f"{store.path}: no reuse-forecaster training rows (the training part has fewer than 2 "
                            f"{'' if phase == 'both' else phase + ' '}passes)")
        if len(x) > max_train_rows:
            pick = np.sort(np.random.default_rng(seed).choice(len(x), max_train_rows, replace=False))
            x, y = x[pick], y[pick]
        self.train_rows = (x, y)

    def summary(self) -> dict[str, Any]:
        """Sizes of the parts, for the checkpoint metadata and the report."""
        return {"split": self.split.describe(), "phase": self.phase,
                "rows": {k: int(len(self.parts[i][0])) for i, k in enumerate(("train", "val", "test"))},
                "passes": {k: int((self.pass_part == i).sum()) for i, k in enumerate(("train", "val", "test"))}}

    def _loader(self, rows: tuple[np.ndarray, np.ndarray], shuffle: bool) -> DataLoader:
        x, y = rows
        ds = TensorDataset(torch.from_numpy(x), torch.from_numpy(y.astype(np.float32)))
        inner = (RandomSampler(ds, generator=torch.Generator().manual_seed(self.seed)) if shuffle
                 else SequentialSampler(ds))
        return DataLoader(ds, sampler=BatchSampler(inner, self.batch_size, drop_last=False), batch_size=None)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_rows, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.parts[1], shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.parts[2], shuffle=False)
