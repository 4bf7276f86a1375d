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

They are predictor families of ``train.py`` (``python train.py --families '[reuse_logistic, reuse_mlp]'``):
the same split, DataModule layer (:class:`~data_pipeline.datamodule.ReuseDataModule`), Lightning
path for ``reuse_mlp`` and run folder as the lookahead families (``python -m predictors.reuse_training``
is an alias of it). Checkpoints are predictor files of :mod:`predictors.checkpoint` (safetensors + the
same ``predictor`` metadata: family, hyper-parameters, model identity, store fingerprint, split);
:func:`load_reuse_forecaster` reads one back -- from the file, or from a run folder -- and refuses one
trained for another model. This module is what a policy serves from: it never imports Lightning or
any training module.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from core.errors import UserError
from core.model_info import ModelInfo
from predictors.checkpoint import RUN_FILE, check_identity, read_checkpoint, read_run, save_predictor
from predictors.reuse_features import FEATURE_NAMES, NUM_FEATURES, ReuseHistory

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

    def weights_changed(self) -> None:
        """Drop the numpy copies of the weights (after training changed ``net``): the next forecast remakes them."""
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
    a store's training passes beforehand (``python train.py --families '[reuse_logistic]'``);
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


# ---------------------------------------------------------------------------------- checkpoints
# which reuse forecaster of a train.py run folder the forecast policy serves: the default family of
# the policies first (it keeps learning online), then the learned and the counted one
RUN_PREFERENCE = ("reuse_logistic", "reuse_mlp", "reuse_counted")


def save_reuse_forecaster(forecaster: ReuseForecaster, path: str | os.PathLike[str], *, model: ModelInfo,
                          store_fingerprint: str | None = None, extra: dict[str, Any] | None = None) -> Path:
    """One forecaster as a predictor file (train.py saves its run's the same way, through ``save_predictor``)."""
    return save_predictor(forecaster, path, model=model, store_fingerprint=store_fingerprint,  # type: ignore[arg-type]
                          extra=extra)


def is_reuse_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a predictor file holding a reuse forecaster (not a lookahead predictor)."""
    meta, _ = read_checkpoint(path)
    return meta.get("family") in FAMILIES


def reuse_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The predictor file ``path`` names: ``path`` itself, or in a train.py run folder the trained reuse
    forecaster it holds (:data:`RUN_PREFERENCE` picks when it holds several)."""
    path = Path(path)
    if not path.is_dir():
        return path
    run = read_run(path)
    if run is None:
        raise UserError(f"{path} is a folder without a readable {RUN_FILE}: not a finished train.py run; give a "
                        f"reuse-forecaster file or such a run folder")
    files: dict[str, str] = run.get("predictors", {})
    for family in RUN_PREFERENCE:
        if family in files and family not in run.get("untrained", []) and (path / files[family]).is_file():
            return path / files[family]
    held = ", ".join(files) or "nothing"
    raise UserError(f"run folder {path} holds no trained reuse forecaster (it holds {held}); train one with "
                    f"python train.py --families '[reuse_logistic]'")


def load_reuse_forecaster(path: str | os.PathLike[str], model_info: ModelInfo | None = None) -> ReuseForecaster:
    """Rebuild a reuse forecaster from a predictor file or a train.py run folder (refusing another model's).

    The identity checks are :func:`predictors.checkpoint.check_identity`, the lookahead predictors' own.
    """
    path = reuse_checkpoint(path)
    meta, state = read_checkpoint(path)
    check_identity(meta, path, model_info)
    family = meta.get("family")
    if family not in FAMILIES:
        raise UserError(f"checkpoint {path} holds {family!r}, not a reuse forecaster ({', '.join(FAMILIES)})")
    hparams = {**meta.get("model_key", {}), **meta.get("hparams", {})}
    try:
        return FAMILIES[family].from_state(hparams, state)
    except (KeyError, RuntimeError) as e:
        raise UserError(f"checkpoint {path} does not fit family {family} ({str(e).splitlines()[0]})") from None


def default_forecaster(num_layers: int, num_experts: int, top_k: int) -> ReuseForecaster:
    """What the ``forecast`` policy uses without a checkpoint: learned online from the run itself."""
    return LogisticReuse(num_layers, num_experts, top_k, online=True)
