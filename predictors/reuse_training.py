"""``python -m predictors.reuse_training``: an alias of ``train.py`` for the reuse forecasters alone.

The reuse forecasters of :mod:`predictors.reuse` are predictor families of ``train.py``
(``python train.py --families '[reuse_counted, reuse_logistic, reuse_mlp]'``), trained by
:func:`predictors.training.run_training` -- the same split, DataModule layer, Lightning path,
checkpoint files and W&B logger as the lookahead families. This CLI keeps its older flags and maps
them onto that one path: ``--out DIR`` is the run folder (``DIR/<family>.safetensors`` and
``DIR/run.json``; it must be new or empty), ``--epochs`` is ``--trainer.max_epochs``.

    python -m predictors.reuse_training --trace traces/NAME --out checkpoints/reuse [--family reuse_mlp]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from core.errors import UserError, run_cli
from predictors.reuse import FAMILIES, MLPReuse
from predictors.training import DataConfig, ReuseConfig, check_arguments, run_training
from predictors.wandb_setup import WandbConfig, family_logger, make_logger

TRAINER = {"accelerator": "cpu", "devices": 1, "enable_model_summary": False, "enable_progress_bar": True,
           "log_every_n_steps": 10}


def check_reuse_arguments(families: list[str], val_fraction: float, test_fraction: float, epochs: int) -> None:
    """Refuse what cannot work before any store is read or any forecaster fitted (one line each, in this
    CLI's flag names)."""
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
    ap = argparse.ArgumentParser(description="Train reuse forecasters (for the forecast eviction policy); an alias "
                                             "of python train.py --families '[reuse_...]'.")
    ap.add_argument("--trace", required=True, help="trace store folder")
    ap.add_argument("--out", default="checkpoints/reuse", help="the run folder (new or empty)")
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
    data = DataConfig(store=args.trace, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                      seed=args.seed)
    reuse = ReuseConfig(phase=args.phase)
    trainer_kwargs = {**TRAINER, "max_epochs": args.epochs}
    check_arguments(families, 1, 1.5, 3, trainer_kwargs)

    logger: Any = None
    if args.wandb:
        logger = make_logger(WandbConfig(), f"reuse-{Path(args.trace).name}-{time.strftime('%Y%m%d-%H%M%S')}",
                             vars(args))
    try:
        result = run_training(families=families, data=data, lookahead=1, overfetch=1.5, run_dir=Path(args.out),
                              trainer_kwargs=trainer_kwargs, reuse=reuse,
                              logger_factory=(lambda family: family_logger(logger, family)) if logger else None)
    finally:
        if logger is not None:
            logger.experiment.finish()
    for r in result.results:
        if r.reuse is None:
            continue
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in r.reuse["metrics"].items())
        print(f"{r.family}: {r.reuse['split']}; {r.reuse['rows']['train']} training rows; {metrics} -> {r.path}")


if __name__ == "__main__":
    run_cli(main)
