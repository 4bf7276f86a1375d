"""Train the lookahead expert predictors and compare every family on held-out tokens.

    python train.py                              # offline demo: collect traces/demo if absent, train, table
    python train.py --config configs/olmoe.yaml  # the real run (OLMoE-1B-7B, public text, GPU)
    python train.py --trainer.max_epochs 3 --trainer.devices 2 --trainer.strategy ddp
    python train.py --data.store traces/gemma --families '[frequency, conditional_frequency, trajectory]'
    python train.py --families '[mlp_lookahead, reuse_logistic, reuse_mlp]'  # + reuse forecasters (forecast policy)
    python train.py --print_config               # the full configuration, as YAML

Every ``lightning.pytorch.Trainer`` argument is a ``--trainer.*`` flag. Predictors land in
``checkpoints/<run>/<family>.safetensors`` with ``run.json`` (see predictors.checkpoint); W&B logs
go offline unless an API key is configured (``--wandb.mode online|offline|disabled``).

The reuse forecasters of the forecast eviction policies (``reuse_counted``, ``reuse_logistic``,
``reuse_mlp``) are families too, but not in the default list: they replay every pass of the store
(~40 s more on the demo store, 2 cores). Ask for them by name; ``evaluate.py --policy forecast
--predictor checkpoints/<run>`` then serves the run's reuse forecaster.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from lightning.pytorch import Trainer

from core.errors import UserError, run_cli
from data_pipeline.collect import main as collect_main
from data_pipeline.trace_store import MANIFEST_NAME
from predictors.report import (
    comparison,
    html_report,
    log_figures,
    pair_comparison,
    plots,
    print_comparison,
    print_pairs,
    print_reuse_comparison,
    reuse_comparison,
)
from predictors.training import (
    ALL_FAMILIES,
    DEFAULT_FAMILIES,
    DataConfig,
    MLPConfig,
    ReuseConfig,
    SklearnConfig,
    TokenConfig,
    TrajectoryConfig,
    check_arguments,
    is_rank_zero,
    run_training,
)
from predictors.wandb_setup import (
    WandbConfig,
    family_logger,
    log_artifact,
    log_table,
    make_logger,
    resolve_mode,
)
from reporting import html
from reporting.figures import notes
from reporting.provenance import command_line

RUN_ENV = "MOE_LOOKAHEAD_RUN"
DEMO_TRAINER = {"max_epochs": 5, "accelerator": "cpu", "devices": 1, "log_every_n_steps": 10,
                "enable_model_summary": False}


@dataclass
class CollectConfig:
    """How to collect the store when ``data.store`` does not exist yet (data_pipeline.collect flags)."""

    enabled: bool = True
    model: str = "olmoe-mini"
    dataset: str = "demo:heldout"
    split: str | None = None
    max_tokens: int = 40_000
    seq_len: int = 128
    hidden_layers: str = "all"
    device: str = "cpu"
    dtype: str = "auto"
    seed: int = 0

    def argv(self, out: str) -> list[str]:
        args = ["--out", out, "--model", self.model, "--dataset", self.dataset, "--max-tokens", str(self.max_tokens),
                "--seq-len", str(self.seq_len), "--hidden-layers", self.hidden_layers, "--device", self.device,
                "--dtype", self.dtype, "--seed", str(self.seed)]
        return args + (["--split", self.split] if self.split else [])


def build_parser():
    parser = ArgumentParser(prog="python train.py", description=__doc__.split("\n")[0])
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options (configs/)")
    parser.add_argument("--run", type=str | None, default=None,
                        help="run name: the folder under --checkpoints (default: <store>-<date>-<time>)")
    parser.add_argument("--checkpoints", type=str, default="checkpoints", help="where run folders go")
    parser.add_argument("--families", type=list[str], default=list(DEFAULT_FAMILIES),
                        help=f"predictor families to fit and compare: {', '.join(ALL_FAMILIES)} (default: all but "
                        f"the reuse_* forecasters, which replay every pass of the store)")
    parser.add_argument("--lookahead", type=int, default=3, help="D: forecast layers l+1..l+D")
    parser.add_argument("--overfetch", type=float, default=1.5, help="second k of the metrics = round(top_k * this)")
    parser.add_argument("--patience", type=int, default=3, help="early stopping: epochs without better val recall")
    parser.add_argument("--report", type=str | None, default=None,
                        help="write the self-contained HTML report here (default: checkpoints/<run>/report.html, "
                        "beside run.json; 'none': no report)")
    parser.add_argument("--threads", type=int | None, default=1,
                        help="torch CPU threads; null = torch's default. The predictors' per-layer ops are small: "
                        "with more threads than idle cores OpenMP spin-waits and a step gets ~100x slower")
    parser.add_class_arguments(DataConfig, "data")
    parser.add_class_arguments(CollectConfig, "collect")
    parser.add_class_arguments(MLPConfig, "mlp")
    parser.add_class_arguments(TrajectoryConfig, "trajectory")
    parser.add_class_arguments(SklearnConfig, "sklearn")
    parser.add_class_arguments(TokenConfig, "token")
    parser.add_class_arguments(ReuseConfig, "reuse")
    parser.add_class_arguments(WandbConfig, "wandb")
    parser.add_class_arguments(Trainer, "trainer", skip={"logger", "callbacks"})
    parser.set_defaults({f"trainer.{k}": v for k, v in DEMO_TRAINER.items()})
    return parser


def ensure_store(data: DataConfig, collect: CollectConfig) -> None:
    """Collect the store with data_pipeline.collect when it does not exist (and collection is enabled)."""
    path = Path(data.store)
    if (path / MANIFEST_NAME).exists():
        return
    if not collect.enabled:
        raise UserError(f"trace store {path} does not exist (collection is off: --collect.enabled false)")

    print(f"no trace store at {path}: collecting one with {collect.model} on {collect.dataset}")
    collect_main(collect.argv(str(path)))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    cfg = parser.parse_args(argv)
    plain = parser.dump(cfg, format="yaml")
    if cfg.threads is not None and cfg.threads < 1:
        raise UserError(f"--threads must be >= 1 (or null for torch's default), got {cfg.threads}")
    # every argument is checked before anything is collected, trained or written
    data, collect = DataConfig(**vars(cfg.data)), CollectConfig(**vars(cfg.collect))
    mlp, trajectory = MLPConfig(**vars(cfg.mlp)), TrajectoryConfig(**vars(cfg.trajectory))
    sk, token = SklearnConfig(**vars(cfg.sklearn)), TokenConfig(**vars(cfg.token))
    reuse = ReuseConfig(**vars(cfg.reuse))
    sk.pairs = [tuple(p) for p in sk.pairs]
    trainer_kwargs = {k: v for k, v in cfg.trainer.as_dict().items()}
    check_arguments(list(cfg.families), cfg.lookahead, cfg.overfetch, cfg.patience, trainer_kwargs)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ensure_store(data, collect)

    # DDP workers re-run this script: they inherit the run name through the environment
    run = cfg.run or os.environ.get(RUN_ENV) or f"{Path(data.store).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    os.environ[RUN_ENV] = run
    run_dir = Path(cfg.checkpoints) / run
    wandb_cfg = WandbConfig(**vars(cfg.wandb))
    logger = make_logger(wandb_cfg, run, {"config_yaml": plain, **_flat(cfg.as_dict())})
    split_text: list[str] = []

    def on_split(how: str) -> None:
        split_text.append(how)
        print(f"{data.store}: {how}")

    try:
        result = run_training(
            families=list(cfg.families), data=data, lookahead=cfg.lookahead, overfetch=cfg.overfetch,
            run_dir=run_dir, trainer_kwargs=trainer_kwargs,
            logger_factory=lambda family: family_logger(logger, family),
            mlp=mlp, trajectory=trajectory, sklearn=sk, token=token, reuse=reuse,
            patience=cfg.patience, on_split=on_split,
        )
        if not is_rank_zero():
            return 0
        title = f"held-out {result.split}-split tokens of {data.store}: forecasts from layer l of layer l+d"
        reuse_title = (f"reuse forecasters on held-out {result.split}-split passes of {data.store}: chosen at the "
                       f"next opportunity?")
        print_comparison(result.results, title)
        print_reuse_comparison(result.results, reuse_title)
        columns, rows = comparison(result.results)
        if rows:
            log_table(logger, "comparison", columns, rows)
        columns, rows = reuse_comparison(result.results)
        if rows:
            log_table(logger, "reuse_comparison", columns, rows)
        if "sklearn_logreg" in cfg.families:
            print_pairs(result.results, sk.pairs)
            log_table(logger, "comparison_at_pairs", *pair_comparison(result.results, sk.pairs))
        for r in result.results:
            if not r.trained:
                print(f"{r.family}: no validation epoch finished, so no weights were selected; saved, but never "
                      f"picked as the run's best")
            elif r.samples_per_s:
                print(f"{r.family}: trained in {r.seconds:.1f}s, {r.samples_per_s:,.0f} samples/s")
        best = next(r for r in result.results if r.family == result.best) if result.best else None
        if best is not None and best.path is not None:
            log_artifact(logger, f"predictor-{run}", [best.path, run_dir / "run.json"],
                         {"family": best.family, "store": data.store})
        print(f"saved {len(result.results)} predictors to {run_dir} (best learned: {result.best})")
        _report(cfg, argv, result, title, reuse_title, split_text, logger, wandb_cfg)
    finally:
        _finish(logger)
    return 0


def _report(cfg: Any, argv: list[str], result: Any, title: str, reuse_title: str, split_text: list[str],
            logger: Any, wandb_cfg: WandbConfig) -> None:
    """Figures to W&B (when on) and the HTML report (unless ``--report none``), beside run.json by default."""
    page = result.run_dir / "report.html" if cfg.report is None else html.report_path(cfg.report, None, "train")
    wandb_on = resolve_mode(wandb_cfg.mode) != "disabled"
    if page is None and not wandb_on:
        return
    figures = plots(result.results)
    for line in notes(figures):
        print(f"plot note: {line}")
    if wandb_on:
        log_figures(logger, figures)
    if page is None:
        return
    store = cfg.data.store
    setup = [f"trace store {store}", f"families: {', '.join(cfg.families)}; lookahead D = {cfg.lookahead}; "
             f"over-fetch {cfg.overfetch}; best learned: {result.best}",
             f"trainer: max_epochs {cfg.trainer.max_epochs}, accelerator {cfg.trainer.accelerator}, devices "
             f"{cfg.trainer.devices}; predictors saved to {result.run_dir}"]
    split = (f"{'; '.join(split_text) or result.split} (seed {cfg.data.seed}). Counting families and the "
             f"scikit-learn baseline fit on the train part, learned families pick their weights on val, and every "
             f"number here is on the test part, never trained on. Reuse forecasters learn from the same train "
             f"part's passes (a pass belongs to the part holding its first token).")
    pairs = [tuple(p) for p in cfg.sklearn.pairs] if "sklearn_logreg" in cfg.families else None
    doc = html_report(result.results, figures, command=command_line("train.py", argv), title=title, setup=setup,
                      split=split, pairs=pairs, reuse_title=reuse_title)
    print(f"HTML report: {html.write(doc, page).resolve()}")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (str, int, float, bool, type(None), list)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


def _finish(logger: Any) -> None:
    exp = getattr(logger, "_experiment", None)
    if exp is not None and hasattr(exp, "finish"):
        exp.finish()


if __name__ == "__main__":
    run_cli(main)
