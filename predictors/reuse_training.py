"""Training the reuse forecasters of :mod:`predictors.reuse` on a trace store, and their CLI.

The label of a row is Belady's own knowledge: whether the expert is chosen at its next
opportunity. Rows come from a replay of the store's passes (:func:`reuse_rows`), split like the
lookahead predictors' data (:func:`split_of_passes`); ``reuse_counted`` and ``reuse_logistic``
fit in numpy, ``reuse_mlp`` with Lightning (imported only then). Serving -- what the forecast
policy loads -- stays in :mod:`predictors.reuse`, which imports none of this.

CLI: ``python -m predictors.reuse_training --trace traces/NAME --out checkpoints/reuse [--family reuse_mlp]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

from core.errors import UserError, run_cli
from core.passes import Passes, build_passes, take_passes
from data_pipeline.splits import split_rows
from data_pipeline.trace_store import TraceStore
from predictors.checkpoint import checkpoint_meta
from predictors.reuse import (
    FAMILIES,
    CountedReuse,
    LogisticReuse,
    MLPReuse,
    ReuseForecaster,
    save_reuse_forecaster,
)
from predictors.reuse_features import NUM_FEATURES, replay_rows


# ---------------------------------------------------------------------------------- training data
def split_of_passes(store: TraceStore, passes: Passes, *, seed: int = 0, val_fraction: float = 0.15,
                    test_fraction: float = 0.35) -> tuple[np.ndarray, str]:
    """(P,) 0/1/2 = train/val/test of every pass, and the split's description.

    Uses the lookahead predictors' split (:func:`data_pipeline.splits.split_rows`): by
    sequence when the store has at least 3, else by position in the decode (a single-prompt
    trace: the prefill and the first part of the decode train, the rest evaluates). A pass
    belongs to the part holding its first row.
    """
    split = split_rows(store, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
    part = np.full(store.num_tokens, -1, dtype=np.int64)
    for i, rows in enumerate((split.train, split.val, split.test)):
        part[rows] = i
    return part[passes.row_start], split.describe()


def reuse_rows(passes: Passes, pass_part: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Features and labels per split part (0 train, 1 val, 2 test).

    Training rows come from a replay of the training passes alone, so nothing of a validation or
    test pass -- neither its labels nor its share of the history features -- reaches the fit.
    Validation and test rows come from a replay of every pass in order, as the policy sees them
    at run time (a held-out pass is forecast from everything before it).
    """
    def collect(ps: Passes, part_of: np.ndarray, want: set[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        feats: dict[int, list[np.ndarray]] = {k: [] for k in want}
        labels: dict[int, list[np.ndarray]] = {k: [] for k in want}
        for p, _layer, _experts, f, reused in replay_rows(ps):
            part = int(part_of[p])
            if part in feats:
                feats[part].append(f)
                labels[part].append(reused)
        return {k: (np.concatenate(feats[k]) if feats[k] else np.zeros((0, NUM_FEATURES), np.float32),
                    np.concatenate(labels[k]) if labels[k] else np.zeros(0, bool)) for k in want}

    train = pass_part == 0
    out = collect(take_passes(passes, train), np.zeros(int(train.sum()), dtype=np.int64), {0})
    out.update(collect(passes, pass_part, {1, 2}))
    return out


def _reuse_module(forecaster: MLPReuse, lr: float, weight_decay: float, meta: dict[str, Any]):
    """Build the LightningModule lazily (``import lightning`` costs seconds; serving never needs it).

    Why not :class:`predictors.lightning_module.LookaheadModule`: its loss is multi-label BCE over
    expert sets of layers ``l+d`` from token batches; a reuse forecast is one binary label per
    (pass, layer, expert) row built from a sequential replay, so the batch format differs.
    """
    # lightning + torchmetrics: ~3 s to import; only when reuse_mlp trains
    import lightning.pytorch as pl
    from torchmetrics.classification import BinaryAUROC

    class ReuseModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = forecaster.net
            self.val_auroc = BinaryAUROC()
            self.meta = meta
            self.save_hyperparameters({"family": forecaster.family, "hidden": forecaster.hidden, "lr": lr,
                                       "weight_decay": weight_decay})

        def training_step(self, batch, _):
            x, y = batch
            loss = F.binary_cross_entropy_with_logits(self.net(x), y)
            self.log("train/bce", loss, prog_bar=True)
            return loss

        def validation_step(self, batch, _):
            x, y = batch
            logits = self.net(x)
            self.log("val/bce", F.binary_cross_entropy_with_logits(logits, y), prog_bar=True)
            self.val_auroc.update(torch.sigmoid(logits), y.long())

        def on_validation_epoch_end(self) -> None:
            self.log("val/auroc", self.val_auroc.compute(), prog_bar=True)
            self.val_auroc.reset()

        def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
            checkpoint["predictor_meta"] = self.meta

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=weight_decay)

    return ReuseModule()


def _reuse_datamodule(parts: dict[int, tuple[np.ndarray, np.ndarray]], batch_size: int, seed: int):
    """Whole batches are sliced out of two tensors at once (BatchSampler + ``batch_size=None``):
    per-row fetching and collation would cost more than the tiny MLP's forward."""
    import lightning.pytorch as pl  # lightning: ~3 s to import; only when reuse_mlp trains

    def loader(part: int, shuffle: bool) -> DataLoader:
        x, y = parts[part]
        ds = TensorDataset(torch.from_numpy(x), torch.from_numpy(y.astype(np.float32)))
        inner = RandomSampler(ds, generator=torch.Generator().manual_seed(seed)) if shuffle else SequentialSampler(ds)
        return DataLoader(ds, sampler=BatchSampler(inner, batch_size, drop_last=False), batch_size=None)

    class ReuseDataModule(pl.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            return loader(0, shuffle=True)

        def val_dataloader(self) -> DataLoader:
            return loader(1, shuffle=False)

    return ReuseDataModule()


def fit_reuse(store: TraceStore, family: str, *, seed: int = 0, val_fraction: float = 0.15,
              test_fraction: float = 0.35, max_epochs: int = 12, batch_size: int = 4096, lr: float = 1e-2,
              weight_decay: float = 1e-4, hidden: int = 32, logger: Any = False, max_train_rows: int = 500_000,
              passes: Passes | None = None) -> tuple[ReuseForecaster, dict[str, Any]]:
    """Fit one family on the training passes of ``store``; returns it and a summary (split, sizes, metrics).

    The MLP sees at most ``max_train_rows`` training rows (a seeded sample): a long store yields
    millions of near-duplicate rows and a 1.5k-parameter model stops improving long before.
    """
    if family not in FAMILIES:
        raise UserError(f"unknown reuse family {family!r}; valid: {', '.join(FAMILIES)}")
    passes = passes if passes is not None else build_passes(store)
    pass_part, how = split_of_passes(store, passes, seed=seed, val_fraction=val_fraction,
                                     test_fraction=test_fraction)
    parts = reuse_rows(passes, pass_part)
    x_train, y_train = parts[0]
    if len(x_train) == 0:
        raise UserError(f"{store.path}: no training rows (the training part has fewer than 2 passes)")
    info = {"split": how, "rows": {k: int(len(parts[i][0])) for i, k in enumerate(("train", "val", "test"))},
            "train_passes": int((pass_part == 0).sum()), "test_passes": int((pass_part == 2).sum()),
            "split_fractions": {"val": val_fraction, "test": test_fraction}, "seed": seed}
    L, E, K = store.num_layers, store.num_experts, store.top_k
    if family == CountedReuse.family:
        forecaster: ReuseForecaster = CountedReuse(L, E, K).fit(x_train, y_train)
    elif family == LogisticReuse.family:
        forecaster = LogisticReuse(L, E, K).fit(x_train, y_train, seed=seed)
    else:
        import lightning.pytorch as pl  # lightning: ~3 s to import; only when reuse_mlp trains

        pl.seed_everything(seed, workers=True, verbose=False)
        if len(x_train) > max_train_rows:
            pick = np.sort(np.random.default_rng(seed).choice(len(x_train), max_train_rows, replace=False))
            parts[0] = (x_train[pick], y_train[pick])
            x_train = parts[0][0]
        mlp = MLPReuse(L, E, K, hidden=hidden)
        mlp.set_standardisation(x_train)
        meta = checkpoint_meta(mlp, store.model, store.fingerprint(), {"reuse": info})  # type: ignore[arg-type]
        module = _reuse_module(mlp, lr, weight_decay, meta)
        has_val = len(parts[1][0]) > 0
        trainer = pl.Trainer(max_epochs=max_epochs, logger=logger, enable_checkpointing=False,
                             enable_progress_bar=True, enable_model_summary=False, deterministic=True,
                             limit_val_batches=1.0 if has_val else 0, num_sanity_val_steps=0)
        trainer.fit(module, datamodule=_reuse_datamodule(parts, batch_size, seed))
        mlp._np = None
        forecaster = mlp
    info["metrics"] = evaluate_rows(forecaster, parts)
    return forecaster, info


def evaluate_rows(forecaster: ReuseForecaster, parts: dict[int, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """AUROC and BCE of the reuse probability on the validation and test rows."""
    # sklearn: ~1 s to import; bad arguments are refused before it loads
    from sklearn.metrics import log_loss, roc_auc_score

    out: dict[str, float] = {}
    for i, name in ((1, "val"), (2, "test")):
        x, y = parts[i]
        if len(y) == 0 or y.all() or not y.any():
            continue
        p = np.clip(forecaster.reuse_probability(x), 1e-6, 1 - 1e-6)
        out[f"{name}_auroc"] = float(roc_auc_score(y, p))
        out[f"{name}_bce"] = float(log_loss(y, p))
    return out


# ---------------------------------------------------------------------------------- CLI
def check_reuse_arguments(families: list[str], val_fraction: float, test_fraction: float, epochs: int) -> None:
    """Refuse what cannot work before any store is read or any forecaster fitted (one line each)."""
    if not families:
        raise UserError(f"no reuse family given; valid: {', '.join(FAMILIES)}")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise UserError(f"unknown reuse family {unknown[0]!r}; valid: {', '.join(FAMILIES)}")
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserError(f"--val-fraction ({val_fraction}) and --test-fraction ({test_fraction}) must be in (0, 1) "
                        f"and sum to less than 1")
    if MLPReuse.family in families and epochs < 1:
        raise UserError(f"--epochs {epochs} would save an untrained {MLPReuse.family}; train at least one epoch")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train reuse forecasters (for the forecast eviction policy).")
    ap.add_argument("--trace", required=True, help="trace store folder")
    ap.add_argument("--out", default="checkpoints/reuse", help="folder for the predictor files")
    ap.add_argument("--family", default=",".join(FAMILIES), help=f"comma list of {', '.join(FAMILIES)}")
    ap.add_argument("--val-fraction", type=float, default=0.15)
    ap.add_argument("--test-fraction", type=float, default=0.35)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--phase", default="both", help="passes to learn from: prefill, decode or both")
    ap.add_argument("--wandb", action="store_true", help="log training to Weights & Biases")
    args = ap.parse_args(argv)
    families = [f.strip() for f in args.family.split(",") if f.strip()]
    check_reuse_arguments(families, args.val_fraction, args.test_fraction, args.epochs)

    store = TraceStore(args.trace)
    passes = build_passes(store, args.phase)
    out = Path(args.out)
    for family in families:
        logger: Any = False
        if args.wandb and family == MLPReuse.family:
            from lightning.pytorch.loggers import WandbLogger  # lightning: ~3 s to import; only with --wandb

            logger = WandbLogger(project="moe-lookahead", name=f"{family}-{store.path.name}")
        forecaster, info = fit_reuse(store, family, seed=args.seed, val_fraction=args.val_fraction,
                                     test_fraction=args.test_fraction, max_epochs=args.epochs, logger=logger,
                                     passes=passes)
        path = save_reuse_forecaster(forecaster, out / f"{family}.safetensors", model=store.model,
                                     store_fingerprint=store.fingerprint(), extra={"reuse": info})
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in info["metrics"].items())
        print(f"{family}: {info['split']}; {info['rows']['train']} training rows; {metrics} -> {path}")


if __name__ == "__main__":
    run_cli(main)
