"""Reuse forecasters: when will a cached (layer, expert) be needed next?

An expert of layer ``l`` can only be needed at layer ``l`` of some pass, so its next use is
``d0 + L * (N - 1)`` layer-steps away, where ``d0`` is the distance from the execution point to
layer ``l`` (this pass when ``l`` is ahead, the next pass otherwise) and ``N >= 1`` is the number
of opportunities (passes reaching layer ``l``) until it is chosen again. ``d0`` is known; a
forecaster estimates ``N``. The forecast eviction policy (:mod:`offload.policies.forecast`)
evicts the resident expert with the latest estimated next use -- Belady with estimates.

Families (all read the :class:`~predictors.reuse_features.ReuseHistory` features, so they work
on foreign traces without hidden states):

- ``reuse_counted`` (analytic): counted probability that an expert is chosen at its next
  opportunity, per (age bucket, decayed-rate bucket), smoothed towards the age marginal. It can
  keep counting online while it runs (every opportunity reveals its label one pass later).
- ``reuse_mlp`` (learned): a small MLP on the same features, trained with binary cross-entropy
  by a Lightning module on the training passes of a store (the label is Belady's own knowledge:
  whether the expert is used at its next opportunity).
- ``reuse_logistic`` (learned online, the default of the ``forecast`` policies): logistic regression
  on the log rates, recency and ``p_follow`` (the counted chance an expert follows what its layer
  chose at the previous opportunity), fitted by AdaGrad as labels are revealed, optionally
  pre-trained on a store's training passes.

Both turn the probability ``p`` into ``N = 1 / p`` (the mean of a geometric number of trials).
Why a probability and not a regressed distance (LRB regresses log time-to-next-request): the
distance is right-censored at the end of a trace, and on the gemma trace a regressor fitted on
uncensored rows ranked worse than the classifier (22.7 % vs 41.2 % held-out hit rate at 5 %).

Checkpoints use the predictor file format of :mod:`predictors.checkpoint` (safetensors + the
same ``predictor`` metadata: family, hyper-parameters, model identity, store fingerprint), so
they sit in ``checkpoints/`` beside the lookahead predictors; :func:`load_reuse_forecaster`
reads them back and refuses one trained for another model.

CLI: ``python -m predictors.reuse --trace traces/NAME --out checkpoints/reuse [--family reuse_mlp]``.
"""

from __future__ import annotations

import argparse
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from core.errors import UserError, run_cli
from core.model_info import ModelInfo
from core.passes import Passes, build_passes, take_passes
from data_pipeline.trace_store import TraceStore
from predictors.reuse_features import FEATURE_NAMES, NUM_FEATURES, ReuseHistory, replay_rows

P_MIN = 1e-3  # floor of a reuse probability: N = 1/p stays finite
AGE_EDGES = np.array([1, 2, 3, 4, 5, 7, 10, 16, 32, 64, 128])  # passes; bucket i = [edge_i, edge_{i+1})
RATE_EDGES = np.array([0.0, 0.01, 0.03, 0.06, 0.1, 0.15, 0.25, 0.4, 0.6])
RATE_FEATURE = FEATURE_NAMES.index("rate_h16")
AGE_FEATURE = FEATURE_NAMES.index("log_age")


class ReuseForecaster(ABC):
    """Estimate, per expert of one layer, the opportunities until it is chosen again."""

    family: ClassVar[str]

    def __init__(self, num_layers: int, num_experts: int, top_k: int):
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.top_k = top_k

    @abstractmethod
    def reuse_probability(self, features: np.ndarray) -> np.ndarray:
        """(n,) probability that each row's expert is chosen at its next opportunity."""

    def expected_passes(self, history: ReuseHistory, layer: int, next_pass: int,
                        experts: np.ndarray | None = None) -> np.ndarray:
        """(E,) estimated N >= 1 for every expert of ``layer`` (or (n,) for ``experts`` only), whose
        next opportunity is ``next_pass``."""
        p = self.reuse_probability(history.features(layer, next_pass, experts))
        return 1.0 / np.clip(p, P_MIN, 1.0)

    def learn(self, features: np.ndarray, reused: np.ndarray) -> None:
        """Labels revealed at run time (online families override; others ignore them)."""
        return None

    # checkpoint protocol shared with predictors.checkpoint.save_predictor
    def describe(self) -> dict[str, Any]:
        return {"family": self.family, "lookahead": 0}

    def hparams(self) -> dict[str, Any]:
        return {}

    @abstractmethod
    def state(self) -> dict[str, torch.Tensor]:
        """Tensors saved in the checkpoint."""

    @classmethod
    @abstractmethod
    def from_state(cls, hparams: dict[str, Any], state: dict[str, torch.Tensor]) -> ReuseForecaster:
        """Rebuild from :meth:`state` and the checkpoint's hyper-parameters."""


def _bins(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    age = np.exp(features[:, AGE_FEATURE])
    a = np.clip(np.searchsorted(AGE_EDGES, age, side="right") - 1, 0, len(AGE_EDGES) - 1)
    r = np.clip(np.searchsorted(RATE_EDGES, features[:, RATE_FEATURE], side="right") - 1, 0, len(RATE_EDGES) - 1)
    return a, r


class CountedReuse(ReuseForecaster):
    """P(reused at next opportunity | age bucket, rate bucket), counted and smoothed.

    The estimate of a cell is ``(hits + m * q_age) / (trials + m)``, where ``q_age`` is the
    (itself smoothed) reuse rate of the cell's age bucket over all rates: a cell seen a few times
    leans on its age, which on both the gemma trace and the demo traces is the strongest single
    feature (gemma: 36 % reuse one pass after a use, 3 % after 20 passes).
    """

    family = "reuse_counted"

    def __init__(self, num_layers: int, num_experts: int, top_k: int, *, smoothing: float = 8.0,
                 online: bool = True):
        super().__init__(num_layers, num_experts, top_k)
        self.smoothing = smoothing
        self.online = online
        self.hits = np.zeros((len(AGE_EDGES), len(RATE_EDGES)))
        self.trials = np.zeros_like(self.hits)
        self._table: np.ndarray | None = None

    def fit(self, features: np.ndarray, reused: np.ndarray) -> CountedReuse:
        self._count(features, reused)
        return self

    def _count(self, features: np.ndarray, reused: np.ndarray) -> None:
        a, r = _bins(features)
        np.add.at(self.hits, (a, r), np.asarray(reused, dtype=np.float64))
        np.add.at(self.trials, (a, r), 1.0)
        self._table = None

    def learn(self, features: np.ndarray, reused: np.ndarray) -> None:
        if self.online:
            self._count(features, reused)

    def table(self) -> np.ndarray:
        """(age buckets, rate buckets) reuse probabilities."""
        if self._table is None:
            m = self.smoothing
            prior = (self.hits.sum() + 1.0) / (self.trials.sum() + 2.0)
            q_age = (self.hits.sum(1) + m * prior) / (self.trials.sum(1) + m)
            self._table = (self.hits + m * q_age[:, None]) / (self.trials + m)
        return self._table

    def reuse_probability(self, features: np.ndarray) -> np.ndarray:
        a, r = _bins(features)
        return self.table()[a, r]

    def hparams(self) -> dict[str, Any]:
        return {"smoothing": self.smoothing, "online": self.online}

    def state(self) -> dict[str, torch.Tensor]:
        return {"hits": torch.from_numpy(self.hits.copy()), "trials": torch.from_numpy(self.trials.copy())}

    @classmethod
    def from_state(cls, hparams: dict[str, Any], state: dict[str, torch.Tensor]) -> CountedReuse:
        f = cls(hparams["num_layers"], hparams["num_experts"], hparams["top_k"],
                smoothing=float(hparams.get("smoothing", 8.0)), online=bool(hparams.get("online", True)))
        f.hits = state["hits"].double().numpy().copy()
        f.trials = state["trials"].double().numpy().copy()
        if f.hits.shape != (len(AGE_EDGES), len(RATE_EDGES)):
            raise KeyError(f"count table has shape {tuple(f.hits.shape)}")
        return f


class ReuseMLPNet(nn.Module):
    """Standardised features -> one logit of 'chosen at the next opportunity'."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.register_buffer("mean", torch.zeros(NUM_FEATURES))
        self.register_buffer("std", torch.ones(NUM_FEATURES))
        self.body = nn.Sequential(nn.Linear(NUM_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                  nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - self.mean) / self.std).squeeze(-1)


class MLPReuse(ReuseForecaster):
    """The learned family. Inference runs in numpy on copies of the weights: a forecast of one
    layer (E rows) then costs microseconds, not the ~50 us of a torch call."""

    family = "reuse_mlp"

    def __init__(self, num_layers: int, num_experts: int, top_k: int, *, hidden: int = 32):
        super().__init__(num_layers, num_experts, top_k)
        self.hidden = hidden
        self.net = ReuseMLPNet(hidden)
        self._np: list[tuple[np.ndarray, np.ndarray]] | None = None

    def set_standardisation(self, features: np.ndarray) -> None:
        self.net.mean.copy_(torch.from_numpy(features.mean(0)))
        self.net.std.copy_(torch.from_numpy(np.maximum(features.std(0), 1e-3)))
        self._np = None

    def _weights(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(W, b) per linear layer in numpy, the standardisation folded into the first one."""
        if self._np is None:
            lin = [m for m in self.net.body if isinstance(m, nn.Linear)]
            layers = [(m.weight.detach().double().numpy().T.copy(), m.bias.detach().double().numpy().copy())
                      for m in lin]
            mean, std = self.net.mean.double().numpy(), self.net.std.double().numpy()
            w0, b0 = layers[0]
            layers[0] = (w0 / std[:, None], b0 - (mean / std) @ w0)
            self._np = layers
        return self._np

    def logits(self, features: np.ndarray) -> np.ndarray:
        layers = self._weights()
        x = features
        for w, b in layers[:-1]:
            x = np.maximum(x @ w + b, 0.0)
        w, b = layers[-1]
        return (x @ w + b)[:, 0]

    def reuse_probability(self, features: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logits(features)))

    def hparams(self) -> dict[str, Any]:
        return {"hidden": self.hidden}

    def state(self) -> dict[str, torch.Tensor]:
        return dict(self.net.state_dict())

    @classmethod
    def from_state(cls, hparams: dict[str, Any], state: dict[str, torch.Tensor]) -> MLPReuse:
        f = cls(hparams["num_layers"], hparams["num_experts"], hparams["top_k"], hidden=int(hparams.get("hidden", 32)))
        f.net.load_state_dict(state)
        return f


LOGISTIC_FEATURES = ("log_age", "rate_h1", "rate_h4", "rate_h16", "rate_h64", "p_follow", "last_weight", "mean_weight",
                     "never_used")
_LOGISTIC_INDEX = np.array([FEATURE_NAMES.index(n) for n in LOGISTIC_FEATURES])
_LOGISTIC_LOG = np.array([n.startswith(("rate_", "p_follow")) for n in LOGISTIC_FEATURES])


def _log_loss(y: np.ndarray, p: np.ndarray) -> float:
    return float(-(y * np.log(p) + (1.0 - y) * np.log(1.0 - p)).mean())


class LogisticReuse(ReuseForecaster):
    """Logistic regression of "chosen at the next opportunity", learned online by AdaGrad.

    Every opportunity reveals its labels one pass later (``learn``), so the model keeps fitting the
    run it serves -- on the labels of the past only, which keeps held-out numbers held out. Rates and
    ``p_follow`` enter as logs (their effect is multiplicative); one AdaGrad step per revealed layer.
    It answers with the counted forecaster (which learns from the same labels) until ``warmup``
    labels have been seen, and afterwards whenever the counted table has predicted the recent
    labels better (a running prequential log loss: each model scored on labels before it learns
    from them) -- on a short or simple stream the table can be the better model. ``fit`` trains it on
    a store's training passes beforehand (``python -m predictors.reuse --family reuse_logistic``);
    it then keeps learning online unless ``online=False``.

    On the held-out gemma decode steps (a100-5gbs) it lifts the forecast policy from the counted
    table's 31 / 44 / 34 % of the TPOT gap at 5 / 10 / 25 % capacity to 38 / 53 / 45 %; LFU reaches
    33 / 45 / 43 %.
    """

    family = "reuse_logistic"

    def __init__(self, num_layers: int, num_experts: int, top_k: int, *, lr: float = 0.05, l2: float = 1e-4,
                 warmup: int = 5000, online: bool = True):
        super().__init__(num_layers, num_experts, top_k)
        self.lr, self.l2, self.warmup, self.online = lr, l2, warmup, online
        n = len(LOGISTIC_FEATURES) + 1
        self.w = np.zeros(n)
        self.g2 = np.full(n, 1e-8)  # AdaGrad's running sum of squared gradients
        self.seen = 0
        self.fallback = CountedReuse(num_layers, num_experts, top_k)
        self.loss_gap = 0.0  # running (mine - counted) log loss on labels not yet learned from

    @staticmethod
    def design(features: np.ndarray) -> np.ndarray:
        x = features[:, _LOGISTIC_INDEX].astype(np.float64)
        x[:, _LOGISTIC_LOG] = np.log(x[:, _LOGISTIC_LOG] + 1e-3)
        return np.column_stack([x, np.ones(len(x))])

    def _step(self, x: np.ndarray, y: np.ndarray) -> None:
        p = 1.0 / (1.0 + np.exp(-(x @ self.w)))
        grad = x.T @ (p - y) / len(y) + self.l2 * self.w
        self.g2 += grad * grad
        self.w -= self.lr * grad / np.sqrt(self.g2)
        self.seen += len(y)

    def learn(self, features: np.ndarray, reused: np.ndarray) -> None:
        if not self.online or len(reused) == 0:
            return
        x, y = self.design(features), np.asarray(reused, dtype=np.float64)
        # prequential score: how well each model predicted these labels before seeing them
        mine = np.clip(1.0 / (1.0 + np.exp(-(x @ self.w))), 1e-6, 1 - 1e-6)
        theirs = np.clip(self.fallback.reuse_probability(features), 1e-6, 1 - 1e-6)
        self.loss_gap += 0.01 * (_log_loss(y, mine) - _log_loss(y, theirs) - self.loss_gap)
        self.fallback.learn(features, reused)
        self._step(x, y)

    def fit(self, features: np.ndarray, reused: np.ndarray, *, epochs: int = 3, batch: int = 256,
            seed: int = 0) -> LogisticReuse:
        """AdaGrad over shuffled mini-batches of training rows (then it is warm: no fallback)."""
        self.fallback.fit(features, reused)
        x, y = self.design(features), np.asarray(reused, dtype=np.float64)
        rng = np.random.default_rng(seed)
        for _ in range(epochs):
            order = rng.permutation(len(y))
            for i in range(0, len(y), batch):
                self._step(x[order[i:i + batch]], y[order[i:i + batch]])
        self.seen = max(self.seen, self.warmup)
        return self

    def reuse_probability(self, features: np.ndarray) -> np.ndarray:
        if self.seen < self.warmup or self.loss_gap > 0.0:
            return self.fallback.reuse_probability(features)
        return 1.0 / (1.0 + np.exp(-(self.design(features) @ self.w)))

    def hparams(self) -> dict[str, Any]:
        return {"lr": self.lr, "l2": self.l2, "warmup": self.warmup, "online": self.online}

    def state(self) -> dict[str, torch.Tensor]:
        return {"w": torch.from_numpy(self.w.copy()), "g2": torch.from_numpy(self.g2.copy()),
                "seen": torch.tensor([float(self.seen)], dtype=torch.float64),
                **{f"fallback.{k}": v for k, v in self.fallback.state().items()}}

    @classmethod
    def from_state(cls, hparams: dict[str, Any], state: dict[str, torch.Tensor]) -> LogisticReuse:
        f = cls(hparams["num_layers"], hparams["num_experts"], hparams["top_k"], lr=float(hparams.get("lr", 0.05)),
                l2=float(hparams.get("l2", 1e-4)), warmup=int(hparams.get("warmup", 5000)),
                online=bool(hparams.get("online", True)))
        w = state["w"].double().numpy()
        if w.shape != f.w.shape:
            raise KeyError(f"weights have shape {tuple(w.shape)}, the features need {f.w.shape}")
        f.w, f.g2 = w.copy(), state["g2"].double().numpy().copy()
        f.seen = int(state["seen"].item())
        f.fallback = CountedReuse.from_state(hparams, {"hits": state["fallback.hits"],
                                                       "trials": state["fallback.trials"]})
        return f


FAMILIES: dict[str, type[ReuseForecaster]] = {cls.family: cls for cls in (CountedReuse, MLPReuse, LogisticReuse)}


# ---------------------------------------------------------------------------------- training data
def split_of_passes(store: TraceStore, passes: Passes, *, seed: int = 0, val_fraction: float = 0.15,
                    test_fraction: float = 0.35) -> tuple[np.ndarray, str]:
    """(P,) 0/1/2 = train/val/test of every pass, and the split's description.

    Uses the lookahead predictors' split (:func:`data_pipeline.datamodule.split_rows`): by
    sequence when the store has at least 3, else by position in the decode (a single-prompt
    trace: the prefill and the first part of the decode train, the rest evaluates). A pass
    belongs to the part holding its first row.
    """
    from data_pipeline.datamodule import split_rows

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
    import lightning.pytorch as pl
    import torch.nn.functional as F
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
    import lightning.pytorch as pl
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

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
        import lightning.pytorch as pl

        pl.seed_everything(seed, workers=True, verbose=False)
        if len(x_train) > max_train_rows:
            pick = np.sort(np.random.default_rng(seed).choice(len(x_train), max_train_rows, replace=False))
            parts[0] = (x_train[pick], y_train[pick])
            x_train = parts[0][0]
        mlp = MLPReuse(L, E, K, hidden=hidden)
        mlp.set_standardisation(x_train)
        from predictors.checkpoint import checkpoint_meta

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


# ---------------------------------------------------------------------------------- checkpoints
def save_reuse_forecaster(forecaster: ReuseForecaster, path: str | os.PathLike[str], *, model: ModelInfo,
                          store_fingerprint: str | None = None, extra: dict[str, Any] | None = None) -> Path:
    from predictors.checkpoint import save_predictor

    return save_predictor(forecaster, path, model=model, store_fingerprint=store_fingerprint,  # type: ignore[arg-type]
                          extra=extra)


def is_reuse_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a predictor file holding a reuse forecaster (not a lookahead predictor)."""
    from predictors.checkpoint import read_checkpoint

    meta, _ = read_checkpoint(path)
    return meta.get("family") in FAMILIES


def load_reuse_forecaster(path: str | os.PathLike[str], model_info: ModelInfo | None = None) -> ReuseForecaster:
    """Rebuild a reuse forecaster saved by :func:`save_reuse_forecaster` (refusing another model's)."""
    from predictors.checkpoint import read_checkpoint

    meta, state = read_checkpoint(path)
    key = meta.get("model_key", {})
    if model_info is not None and key != model_info.key():
        raise UserError(f"checkpoint {path} was trained for {key.get('model_id')} ({key.get('num_layers')} layers "
                        f"x {key.get('num_experts')} experts), not for {model_info.model_id}")
    family = meta.get("family")
    if family not in FAMILIES:
        raise UserError(f"checkpoint {path} holds {family!r}, not a reuse forecaster ({', '.join(FAMILIES)})")
    hparams = {**key, **meta.get("hparams", {})}
    try:
        return FAMILIES[family].from_state(hparams, state)
    except (KeyError, RuntimeError) as e:
        raise UserError(f"checkpoint {path} does not fit family {family} ({str(e).splitlines()[0]})") from None


def default_forecaster(num_layers: int, num_experts: int, top_k: int) -> ReuseForecaster:
    """What the ``forecast`` policy uses without a checkpoint: learned online from the run itself."""
    return LogisticReuse(num_layers, num_experts, top_k, online=True)


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
            from lightning.pytorch.loggers import WandbLogger

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
