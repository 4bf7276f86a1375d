"""Fit every requested family on one trace store, compare them on held-out tokens, save them.

The flow behind ``python train.py`` (the CLI only parses arguments and prints):

1. check the request against the store before anything is written (families that need hidden
   states or router weights on a store without them, a distance past the last layer, a store
   too small to split);
2. split the store (:func:`data_pipeline.splits.split_rows`), fit the counting families and
   the scikit-learn baseline on the training tokens, train each learned family with Lightning
   (:func:`train_learned`: ``ModelCheckpoint`` on the family's validation metric, early stopping on
   it), and load its best weights;
3. score every family on the test tokens with the same metric and write the predictor files and
   ``run.json`` (last: a run folder without it is unfinished) into ``checkpoints/<run>/``.

The reuse forecasters of the forecast eviction policies (:data:`REUSE`, see :mod:`predictors.reuse`)
are families of the same run: their rows come from a :class:`~data_pipeline.datamodule.ReuseDataModule`
on the same split, ``reuse_counted`` and ``reuse_logistic`` fit in numpy, ``reuse_mlp`` trains through
the same :func:`train_learned` (monitoring ``val/auroc``), and they are scored by held-out AUROC and
BCE (:func:`~predictors.evaluation.evaluate_reuse_rows`) -- recall@k does not apply -- so they never
compete for the run's ``best`` lookahead predictor.

If anything fails after the run folder was created, the folder is removed: a failed run leaves
no partial checkpoint behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import UserError, one_line
from core.model_info import check_lookahead
from data_pipeline.splits import SPLITS
from data_pipeline.token_routing import has_tokens
from data_pipeline.trace_store import TraceStore
from predictors.base import Predictor
from predictors.checkpoint import RUN_FILE, save_predictor
from predictors.evaluation import evaluate_predictor, evaluate_reuse_rows
from predictors.frequency import ConditionalFrequency, FrequencyPredictor
from predictors.gate_lookahead import GateLookahead
from predictors.metrics import LookaheadMetrics
from predictors.mlp_lookahead import MLPLookahead
from predictors.reuse import CountedReuse, LogisticReuse, MLPReuse, ReuseForecaster
from predictors.sklearn_baseline import SklearnLogReg
from predictors.token_lookahead import TokenLookahead
from predictors.trajectory import TrajectoryPredictor

TRAINING_FREE = ("frequency", "conditional_frequency", "gate_lookahead")
LEARNED = ("mlp_lookahead", "trajectory", "token")
CLASSICAL = ("sklearn_logreg",)
REUSE = (CountedReuse.family, LogisticReuse.family, MLPReuse.family)
ALL_FAMILIES = TRAINING_FREE + CLASSICAL + LEARNED + REUSE
# train.py's default: the lookahead families. The reuse forecasters replay every pass of the store
# (~40 s more on the 40k-token demo store, 4M rows, 2 cores), so they are asked for by name
DEFAULT_FAMILIES = TRAINING_FREE + CLASSICAL + LEARNED
GRADIENT_TRAINED = LEARNED + (MLPReuse.family,)  # through train_learned: they need training epochs
PHASES = ("prefill", "decode", "both")
NEEDS_HIDDEN = ("gate_lookahead", "mlp_lookahead", "sklearn_logreg")
NEEDS_ROUTERS = ("gate_lookahead", "mlp_lookahead")
NEEDS_TOKENS = ("token",)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _check_optimiser(prefix: str, lr: float, weight_decay: float, dropout: float) -> None:
    _require(lr > 0 and np.isfinite(lr), f"--{prefix}.lr must be a positive number, got {lr}")
    _require(weight_decay >= 0 and np.isfinite(weight_decay), f"--{prefix}.weight_decay must be >= 0, got {weight_decay}")
    _require(0 <= dropout < 1, f"--{prefix}.dropout must be in [0, 1), got {dropout}")


@dataclass
class MLPConfig:
    """mlp_lookahead: width of the shared MLP, optimiser settings."""

    width: int = 128
    dropout: float = 0.0
    lr: float = 3e-3
    weight_decay: float = 1e-4
    tokens: bool = True  # the token as an extra input, when the store has token ids

    def __post_init__(self) -> None:
        _require(self.width >= 1, f"--mlp.width must be >= 1, got {self.width}")
        _check_optimiser("mlp", self.lr, self.weight_decay, self.dropout)


@dataclass
class TrajectoryConfig:
    """trajectory: embedding/GRU size, how many earlier layers it reads, optimiser settings."""

    dim: int = 32
    window: int = 3
    dropout: float = 0.1
    lr: float = 3e-3
    weight_decay: float = 1e-3
    tokens: bool = True  # the token as an extra input, when the store has token ids

    def __post_init__(self) -> None:
        _require(self.dim >= 0, f"--trajectory.dim must be >= 0 (0: counts only), got {self.dim}")
        _require(self.window >= 1, f"--trajectory.window must be >= 1, got {self.window}")
        _check_optimiser("trajectory", self.lr, self.weight_decay, self.dropout)


@dataclass
class TokenConfig:
    """token: the token-only family (counted prior + embedding of token and layer), optimiser settings."""

    dim: int = 64
    dropout: float = 0.1
    max_vocab: int = 16384
    lr: float = 3e-3
    weight_decay: float = 1e-4

    def __post_init__(self) -> None:
        _require(self.dim >= 0, f"--token.dim must be >= 0, got {self.dim}")
        _require(self.max_vocab >= 1, f"--token.max_vocab must be >= 1, got {self.max_vocab}")
        _check_optimiser("token", self.lr, self.weight_decay, self.dropout)


@dataclass
class SklearnConfig:
    """sklearn_logreg: the layer pairs (layer, distance) to fit, PCA size, inverse regularisation."""

    pairs: list[tuple[int, int]] = field(default_factory=lambda: [(1, 1)])
    n_components: int = 32
    C: float = 1.0
    max_train_tokens: int = 5000

    def __post_init__(self) -> None:
        _require(self.n_components >= 1, f"--sklearn.n_components must be >= 1, got {self.n_components}")
        _require(self.C > 0 and np.isfinite(self.C), f"--sklearn.C must be a positive number, got {self.C}")
        _require(self.max_train_tokens >= 1, f"--sklearn.max_train_tokens must be >= 1, got {self.max_train_tokens}")
        for pair in self.pairs:
            _require(len(pair) == 2 and int(pair[0]) >= 0 and int(pair[1]) >= 1,
                     f"--sklearn.pairs holds {list(pair)}; each pair is [layer >= 0, distance >= 1]")


@dataclass
class ReuseConfig:
    """Reuse forecasters: which passes they learn from, reuse_mlp's width and optimiser, its batch and row cap."""

    phase: str = "both"  # passes to learn from: prefill, decode or both
    hidden: int = 32
    lr: float = 1e-2
    weight_decay: float = 1e-4
    batch_size: int = 4096
    max_train_rows: int = 500_000  # reuse_mlp's seeded sample of the training rows

    def __post_init__(self) -> None:
        _require(self.phase in PHASES, f"--reuse.phase must be one of {', '.join(PHASES)}, got {self.phase!r}")
        _require(self.hidden >= 1, f"--reuse.hidden must be >= 1, got {self.hidden}")
        _require(self.batch_size >= 1, f"--reuse.batch_size must be >= 1, got {self.batch_size}")
        _require(self.max_train_rows >= 1, f"--reuse.max_train_rows must be >= 1, got {self.max_train_rows}")
        _check_optimiser("reuse", self.lr, self.weight_decay, 0.0)


@dataclass
class DataConfig:
    """The trace store and how it is split and batched."""

    store: str = "traces/demo"
    split: str = "auto"
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    batch_size: int = 512
    num_workers: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, f"--data.batch_size must be >= 1, got {self.batch_size}")
        _require(self.num_workers >= 0, f"--data.num_workers must be >= 0, got {self.num_workers}")
        _require(self.split in SPLITS, f"--data.split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        v, t = self.val_fraction, self.test_fraction
        _require(0 < v < 1 and 0 < t < 1 and v + t < 1,
                 f"--data.val_fraction ({v}) and --data.test_fraction ({t}) must be in (0, 1) and sum to less than 1")


@dataclass
class FamilyResult:
    family: str
    predictor: Predictor | ReuseForecaster
    metrics: LookaheadMetrics | None  # None: a reuse forecaster (scored in ``reuse`` instead)
    path: Path | None = None
    seconds: float = 0.0
    samples_per_s: float | None = None
    trained: bool = True  # False: a learned family whose weights no validation epoch ever selected
    reuse: dict[str, Any] | None = None  # a reuse forecaster: its rows and held-out AUROC / BCE ("metrics")

    @property
    def is_reuse(self) -> bool:
        return self.metrics is None


@dataclass
class RunResult:
    run_dir: Path
    split: str
    results: list[FamilyResult]
    best: str | None


def check_arguments(families: list[str], lookahead: int, overfetch: float, patience: int,
                    trainer_kwargs: dict[str, Any]) -> None:
    """Refuse out-of-range arguments before any work starts (no store opened, nothing collected or written)."""
    unknown = [f for f in families if f not in ALL_FAMILIES]
    if unknown:
        raise UserError(f"unknown predictor family {unknown[0]!r}; choose from {', '.join(ALL_FAMILIES)}")
    _require(bool(families), "no predictor families requested")
    _require(lookahead >= 1, f"lookahead distance D must be at least 1 (got {lookahead})")
    _require(overfetch >= 1 and np.isfinite(overfetch),
             f"--overfetch must be >= 1 (a prefetcher loads at least top-k), got {overfetch}")
    _require(patience >= 0, f"--patience must be >= 0, got {patience}")
    check_trainer(trainer_kwargs, families)


def check_trainer(trainer_kwargs: dict[str, Any], families: list[str]) -> None:
    """Build the Trainer once, up front, so a misconfiguration (``--trainer.accelerator gpu`` without a
    GPU, an unknown strategy) is one line before any family is fitted; refuse a run that would save
    untrained learned predictors."""
    learned = [f for f in families if f in GRADIENT_TRAINED]
    if not learned:
        return
    for key in ("max_epochs", "max_steps"):
        if trainer_kwargs.get(key) == 0:
            raise UserError(f"--trainer.{key} 0 would save untrained {', '.join(learned)}; train at least one "
                            f"epoch, or drop them from --families")
    if trainer_kwargs.get("limit_val_batches") == 0:
        raise UserError(f"--trainer.limit_val_batches 0: without validation no weights of {', '.join(learned)} can "
                        f"be selected (checkpointing and early stopping watch a validation metric)")

    # lightning: ~3 s to import; only once a learned family is asked for
    import lightning.pytorch as pl
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from predictors.lightning_module import MONITOR

    kwargs = {k: v for k, v in trainer_kwargs.items() if k not in ("logger", "default_root_dir")}
    # the callbacks train_learned adds, so a clash with them (enable_checkpointing false) shows here too
    kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), ModelCheckpoint(monitor=MONITOR, mode="max"),
                           EarlyStopping(monitor=MONITOR, mode="max")]
    quiet = [logging.getLogger(n) for n in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        pl.Trainer(**kwargs, logger=False)
    except (MisconfigurationException, ValueError, TypeError) as e:
        raise UserError(f"the --trainer options do not work here: {one_line(str(e))}") from None
    finally:
        for log, level in zip(quiet, levels, strict=True):
            log.setLevel(level)


def check_request(store: TraceStore, families: list[str], lookahead: int) -> None:
    """Refuse what cannot work on this store, in one line that says what would."""
    unknown = [f for f in families if f not in ALL_FAMILIES]
    if unknown:
        raise UserError(f"unknown predictor family {unknown[0]!r}; choose from {', '.join(ALL_FAMILIES)}")
    if not families:
        raise UserError("no predictor families requested")
    if all(f in REUSE for f in families):
        return  # the reuse forecasters read expert ids only (foreign traces too), at no lookahead distance
    check_lookahead(lookahead, store.num_layers)
    skipped = set((store.manifest.get("skipped_routes") or {}).get("layers", [])) - {store.num_layers - 1}
    if skipped:  # the predictors read chosen experts of earlier layers; only the last layer is never read
        raise UserError(f"{store.path} has routes that did not run at layer(s) {sorted(skipped)}; the predictors "
                        f"handle skipped routes at the last layer only (llama.cpp output-layer pruning)")
    if not store.hidden_layers:
        blocked = [f for f in families if f in NEEDS_HIDDEN]
        if blocked:
            works = ", ".join(f for f in ALL_FAMILIES if f not in NEEDS_HIDDEN)
            raise UserError(f"{store.path} has no hidden states, which {', '.join(blocked)} need(s); "
                            f"families that work on it: {works}")
    if not store.has_router_weights:
        blocked = [f for f in families if f in NEEDS_ROUTERS]
        if blocked:
            raise UserError(f"{store.path} has no router weights, which {', '.join(blocked)} need(s); "
                            f"recollect it with data_pipeline.collect or drop those families")
    if not has_tokens(store.token_ids):
        blocked = [f for f in families if f in NEEDS_TOKENS]
        if blocked:
            raise UserError(f"{store.path} has no token ids (token_id = -1), which {', '.join(blocked)} need(s); "
                            f"import it with a token column or drop those families")


def fit_counting(family: str, store: TraceStore, train_rows: np.ndarray, lookahead: int) -> Predictor:
    if family == "gate_lookahead":
        return GateLookahead.from_store(store, lookahead)
    ids = store.topk_ids()[train_rows]
    cls = FrequencyPredictor if family == "frequency" else ConditionalFrequency
    return cls.fit(ids, store.num_experts, lookahead)


def fit_sklearn(store: TraceStore, train_rows: np.ndarray, lookahead: int, cfg: SklearnConfig,
                seed: int) -> Predictor:
    rng = np.random.default_rng(seed)
    rows = train_rows if len(train_rows) <= cfg.max_train_tokens else np.sort(
        rng.choice(train_rows, cfg.max_train_tokens, replace=False))
    pairs = [(int(a), int(b)) for a, b in cfg.pairs]
    hidden = {layer: store.hidden(layer)[rows] for layer in {p[0] for p in pairs} if store.has_hidden(layer)}
    return SklearnLogReg.fit(hidden, store.topk_ids()[rows], pairs, num_experts=store.num_experts,
                             lookahead=lookahead, n_components=cfg.n_components, C=cfg.C, seed=seed)


def build_learned(family: str, store: TraceStore, train_rows: np.ndarray, lookahead: int, mlp: MLPConfig,
                  traj: TrajectoryConfig, token: TokenConfig | None = None):
    """An untrained learned family (its counted parts fitted on ``train_rows``) and its config."""
    if family == "mlp_lookahead":
        return MLPLookahead.from_store(store, lookahead, rows=train_rows, use_tokens=mlp.tokens, width=mlp.width,
                                       dropout=mlp.dropout), mlp
    if family == "token":
        token = token or TokenConfig()
        return TokenLookahead.from_store(store, lookahead, rows=train_rows, max_vocab=token.max_vocab, dim=token.dim,
                                         dropout=token.dropout), token
    return TrajectoryPredictor.from_store(store, lookahead, rows=train_rows, use_tokens=traj.tokens, dim=traj.dim,
                                          window=traj.window, dropout=traj.dropout), traj


def _throughput_callback():
    """A callback that measures training samples/s over training batches only (not validation)."""
    # lightning: ~3 s to import; only when a learned family trains
    from lightning.pytorch.callbacks import Callback

    class TrainingThroughput(Callback):
        def __init__(self) -> None:
            self.samples, self.seconds, self._t = 0, 0.0, 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.seconds += time.perf_counter() - self._t
            self.samples += pl_module.batch_size(batch)

        @property
        def rate(self) -> float:
            return self.samples / self.seconds if self.seconds else 0.0

    return TrainingThroughput()


def train_learned(module, datamodule, *, run_dir: Path, trainer_kwargs: dict[str, Any], logger: Any,
                  patience: int, seed: int) -> tuple[float, bool]:
    """Train ``module`` (a :class:`~predictors.lightning_module.PredictorModule`) with Lightning and load
    its best validation weights: the one Trainer set-up of every gradient-trained family.

    ``ModelCheckpoint`` keeps the best epoch by ``module.monitor`` under ``<run>/lightning/<family>/``,
    early stopping watches the same metric with ``patience``, a callback measures training throughput,
    and ``--trainer.deterministic`` defaults to ``"warn"``: deterministic kernels wherever they exist,
    a warning (not a crash of the run) on a GPU kernel that has none.

    Returns (training samples/s, trained): ``trained`` is False when no validation epoch finished
    (``fast_dev_run``, ``max_time`` reached before the first one...), so no weights were selected and
    the predictor must not become a run's best.
    """
    # lightning: ~3 s to import; only when a learned family trains
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    pl.seed_everything(seed, workers=True, verbose=False)
    ckpt = ModelCheckpoint(dirpath=run_dir / "lightning" / module.family, filename="best", monitor=module.monitor,
                           mode="max", save_top_k=1, auto_insert_metric_name=False)
    stop = EarlyStopping(monitor=module.monitor, mode="max", patience=patience)
    speed = _throughput_callback()
    kwargs = dict(trainer_kwargs)
    callbacks = [*(kwargs.pop("callbacks", None) or []), ckpt, stop, speed]
    kwargs.setdefault("default_root_dir", str(run_dir))
    if kwargs.get("deterministic") is None:
        kwargs["deterministic"] = "warn"
    trainer = pl.Trainer(**kwargs, logger=logger, callbacks=callbacks)
    trainer.fit(module, datamodule=datamodule)
    trained = bool(ckpt.best_model_path)
    module.restore(ckpt.best_model_path or None)
    return speed.rate, trained


def fit_learned(predictor, datamodule, cfg: Any, *, overfetch: float, meta: dict[str, Any],
                **train: Any) -> tuple[float, bool]:
    """A learned lookahead family: its LookaheadModule through :func:`train_learned`."""
    from predictors.lightning_module import LookaheadModule  # imports lightning (~3 s); only when one trains

    module = LookaheadModule(predictor, datamodule.datasets["train"].hidden_layers, lr=cfg.lr,
                             weight_decay=cfg.weight_decay, overfetch=overfetch, meta=meta)
    return train_learned(module, datamodule, **train)


def fit_reuse(family: str, datamodule, cfg: ReuseConfig, *, store: TraceStore, meta: dict[str, Any],
              seed: int, **train: Any) -> tuple[ReuseForecaster, float | None, bool]:
    """One reuse forecaster on the training rows of ``datamodule`` (a ReuseDataModule).

    ``reuse_counted`` counts and ``reuse_logistic`` runs AdaGrad in numpy (no epochs, nothing to
    select on validation); ``reuse_mlp`` trains as a ReuseModule through :func:`train_learned`.
    Returns (forecaster, training samples/s or None, trained).
    """
    L, E, K = store.num_layers, store.num_experts, store.top_k
    x, y = datamodule.parts[0]
    if family == CountedReuse.family:
        return CountedReuse(L, E, K).fit(x, y), None, True
    if family == LogisticReuse.family:
        return LogisticReuse(L, E, K).fit(x, y, seed=seed), None, True
    from predictors.lightning_module import ReuseModule  # imports lightning (~3 s); only when one trains

    torch.manual_seed(seed)  # the MLP's initial weights
    mlp = MLPReuse(L, E, K, hidden=cfg.hidden)
    mlp.set_standardisation(datamodule.train_rows[0])
    module = ReuseModule(mlp, lr=cfg.lr, weight_decay=cfg.weight_decay, meta=meta)
    rate, trained = train_learned(module, datamodule, seed=seed, **train)
    return mlp, rate, trained


def run_training(
    *,
    families: list[str],
    data: DataConfig,
    lookahead: int,
    overfetch: float,
    run_dir: Path,
    trainer_kwargs: dict[str, Any],
    logger_factory: Callable[[str], Any] | None = None,
    mlp: MLPConfig | None = None,
    trajectory: TrajectoryConfig | None = None,
    sklearn: SklearnConfig | None = None,
    token: TokenConfig | None = None,
    reuse: ReuseConfig | None = None,
    patience: int = 3,
    on_split: Callable[[str], None] | None = None,
) -> RunResult:
    """Fit, compare and save ``families`` on ``data.store`` into ``run_dir`` (see the module docstring)."""
    # data_pipeline.datamodule imports lightning (~3 s); only when training runs
    from data_pipeline.datamodule import ReuseDataModule, TraceDataModule

    configs = _Configs(mlp or MLPConfig(), trajectory or TrajectoryConfig(), sklearn or SklearnConfig(),
                       token or TokenConfig(), reuse or ReuseConfig())
    store = TraceStore(data.store)
    check_request(store, families, lookahead)
    hidden = any(f in NEEDS_HIDDEN for f in families)
    dm = TraceDataModule(store.path, hidden=hidden, batch_size=data.batch_size, num_workers=data.num_workers,
                         seed=data.seed, val_fraction=data.val_fraction, test_fraction=data.test_fraction,
                         split=data.split)
    if on_split:
        on_split(dm.split.describe())
    reuse_dm = None
    if any(f in REUSE for f in families):  # replays every pass: only when a reuse forecaster is asked for
        reuse_dm = ReuseDataModule(store, dm.split, phase=configs.reuse.phase, batch_size=configs.reuse.batch_size,
                                   seed=data.seed, max_train_rows=configs.reuse.max_train_rows)
    meta = {"model": store.model.__dict__, "model_key": store.model.key(), "store_fingerprint": store.fingerprint(),
            "store": str(store.path), "split": dm.split.how, "seed": data.seed}
    if not is_rank_zero():  # DDP workers re-run the script: rank 0 owns the run folder
        return _fit_all(store, dm, reuse_dm, families, lookahead, overfetch, run_dir, trainer_kwargs,
                        logger_factory, configs, patience, meta, data.seed)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"run folder {run_dir} already exists; choose another run name")
    existed = run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _fit_all(store, dm, reuse_dm, families, lookahead, overfetch, run_dir, trainer_kwargs,
                        logger_factory, configs, patience, meta, data.seed)
    except BaseException:
        _remove_partial_run(run_dir, keep_folder=existed)
        raise


def _remove_partial_run(run_dir: Path, *, keep_folder: bool) -> None:
    """Never leave a partial checkpoint behind; an empty folder the caller made (``--out``) stays theirs."""
    if not keep_folder:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for child in list(run_dir.iterdir()) if run_dir.is_dir() else []:
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):  # as rmtree's ignore_errors: the failure being raised matters
                child.unlink(missing_ok=True)


@dataclass
class _Configs:
    mlp: MLPConfig
    trajectory: TrajectoryConfig
    sklearn: SklearnConfig
    token: TokenConfig
    reuse: ReuseConfig


def is_rank_zero() -> bool:
    """True outside DDP and in its rank-0 process (Lightning's launcher sets RANK / LOCAL_RANK)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def _fit_all(store, dm, reuse_dm, families, lookahead, overfetch, run_dir, trainer_kwargs, logger_factory,
             configs: _Configs, patience, meta, seed) -> RunResult:
    lookahead_families = [f for f in families if f not in REUSE]
    hidden_layers = dm.datasets["test"].hidden_layers
    test_batches = list(dm.test_dataloader()) if lookahead_families else []
    results: list[FamilyResult] = []
    for family in families:
        start = time.perf_counter()
        rate, trained = None, True
        train = {"run_dir": run_dir, "trainer_kwargs": trainer_kwargs, "patience": patience,
                 "logger": logger_factory(family) if logger_factory and family in GRADIENT_TRAINED else False}
        if family in REUSE:
            forecaster, rate, trained = fit_reuse(family, reuse_dm, configs.reuse, store=store, meta=meta, seed=seed,
                                                  **train)
            summary = {**reuse_dm.summary(), "metrics": evaluate_reuse_rows(forecaster, reuse_dm.parts)}
            results.append(FamilyResult(family, forecaster, None, seconds=time.perf_counter() - start,
                                        samples_per_s=rate, trained=trained, reuse=summary))
            continue
        if family in TRAINING_FREE:
            predictor = fit_counting(family, store, dm.split.train, lookahead)
        elif family in CLASSICAL:
            predictor = fit_sklearn(store, dm.split.train, lookahead, configs.sklearn, seed)
        else:
            # the initial weights come from the global torch generator: seed it per family, or they depend on
            # the process (torch's start-up seed is not fixed here) and on the families fitted before
            torch.manual_seed(seed)
            predictor, cfg = build_learned(family, store, dm.split.train, lookahead, configs.mlp,
                                           configs.trajectory, configs.token)
            rate, trained = fit_learned(predictor, dm, cfg, overfetch=overfetch, meta=meta, seed=seed, **train)
        seconds = time.perf_counter() - start
        metrics = evaluate_predictor(predictor, test_batches, num_experts=store.num_experts,
                                     hidden_layers=hidden_layers, overfetch=overfetch)
        results.append(FamilyResult(family, predictor, metrics, seconds=seconds, samples_per_s=rate,
                                    trained=trained))
    if not is_rank_zero():
        return RunResult(run_dir, meta["split"], results, _best_learned(results))
    for r in results:
        extra: dict[str, Any] = {"split": meta["split"], "seed": seed, "trained": r.trained}
        if r.reuse is not None:
            extra["reuse"] = r.reuse
        else:
            extra["test"] = {k: v.tolist() for k, v in r.metrics.per_distance().items()}
        r.path = save_predictor(r.predictor, run_dir / r.family, model=store.model,  # type: ignore[arg-type]
                                store_fingerprint=meta["store_fingerprint"], extra=extra)
    best = _best_learned(results)
    run = {"store": meta["store"], "store_fingerprint": meta["store_fingerprint"], "model_key": meta["model_key"],
           "split": meta["split"], "lookahead": lookahead, "best": best,
           "predictors": {r.family: r.path.name for r in results if r.path is not None},
           "reuse_forecasters": [r.family for r in results if r.is_reuse],
           "untrained": [r.family for r in results if not r.trained]}
    tmp = run_dir / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps(run, indent=2))
    tmp.replace(run_dir / RUN_FILE)
    return RunResult(run_dir, meta["split"], results, best)


def _best_learned(results: list[FamilyResult]) -> str | None:
    """The family with the highest mean test recall@k, learned families first (they are why we train).

    Never an untrained learned family, nor one whose score is not a number (a failed fit): with
    none left, no best (``latest_checkpoint`` then skips the run). Never a reuse forecaster: the
    best is the lookahead predictor the engine and the prefetchers load.
    """
    def score(r: FamilyResult) -> float:
        return float(torch.nanmean(r.metrics.per_distance()["recall@k"]))  # type: ignore[union-attr]

    usable = [r for r in results if not r.is_reuse and r.trained and np.isfinite(score(r))]
    learned = [r for r in usable if r.family in LEARNED]
    pool = learned or usable
    return max(pool, key=score).family if pool else None
