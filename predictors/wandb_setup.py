"""Weights & Biases wiring for training: always a WandbLogger, offline unless a key is configured.

Mode resolution (first that applies): ``--wandb.mode``; the ``WANDB_MODE`` environment variable;
``online`` when an API key is configured (``WANDB_API_KEY`` or an ``api.wandb.ai`` entry in
``~/.netrc``); otherwise ``offline`` (runs land under ``$WANDB_DIR/wandb``, default ``./wandb``,
and ``wandb sync`` uploads them later).
"""

from __future__ import annotations

import netrc
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import UserError

MODES = ("online", "offline", "disabled")


@dataclass
class WandbConfig:
    """W&B run settings; mode None = offline unless an API key is configured."""

    mode: str | None = None
    project: str = "moe-lookahead"
    name: str | None = None
    tags: list[str] = field(default_factory=list)


def api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(mode: str | None) -> str:
    if mode is None:
        env = os.environ.get("WANDB_MODE")
        mode = env if env in MODES else ("online" if api_key_configured() else "offline")
    if mode not in MODES:
        raise UserError(f"--wandb.mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def make_logger(cfg: WandbConfig, run_name: str, config: dict[str, Any]):
    """The run's main WandbLogger; the config is logged up front."""
    from lightning.pytorch.loggers import WandbLogger  # lightning: ~3 s to import; only when a run logs

    mode = resolve_mode(cfg.mode)
    save_dir = Path(os.environ.get("WANDB_DIR", "."))
    save_dir.mkdir(parents=True, exist_ok=True)
    logger = WandbLogger(project=cfg.project, name=cfg.name or run_name, tags=list(cfg.tags), mode=mode,
                         save_dir=str(save_dir), log_model=False)
    # Lightning always passes ``anonymous`` (None by default) to wandb.init, and wandb >= 0.2x warns on
    # stderr that the setting has no effect: drop the key so a run prints only its own messages
    getattr(logger, "_wandb_init", {}).pop("anonymous", None)
    logger.log_hyperparams(config)  # rank-zero only: DDP workers hold a dummy experiment
    return logger


def family_logger(main: Any, family: str):
    """A logger that writes into the main run with metric keys prefixed by the family name."""
    from lightning.pytorch.loggers import WandbLogger  # lightning: ~3 s to import; only when a run logs

    return WandbLogger(experiment=main.experiment, prefix=family, log_model=False)


def log_table(logger: Any, key: str, columns: list[str], rows: list[list[Any]]) -> None:
    logger.log_table(key=key, columns=columns, data=rows)


def log_artifact(logger: Any, name: str, files: list[Path], metadata: dict[str, Any]) -> None:
    """The best checkpoint (and the run manifest) as a W&B model artifact; skipped when disabled."""
    import wandb  # wandb: ~0.5 s to import; only to upload an artifact

    run = logger.experiment
    if getattr(run, "disabled", False) or resolve_mode_of(run) == "disabled":
        return
    artifact = wandb.Artifact(name=name, type="model", metadata=metadata)
    for f in files:
        artifact.add_file(str(f))
    run.log_artifact(artifact)


def resolve_mode_of(run: Any) -> str:
    settings = getattr(run, "settings", None)
    return str(getattr(settings, "mode", "")) if settings is not None else ""
