"""Saving and loading predictors of any family, bound to the model they were trained for.

A predictor file is a safetensors file: the family's tensors plus one ``predictor`` metadata
entry (JSON) with the format version, the family and its hyper-parameters, the model identity
(:meth:`ModelInfo.key`, plus the full ModelInfo) and the fingerprint of the trace store it was
fitted on. :func:`load_predictor` also reads the Lightning ``.ckpt`` files that ``train.py``'s
``ModelCheckpoint`` writes (their ``predictor_meta`` entry carries the same identity).

Files are written under a temporary name and renamed, so a crash never leaves a partial file
that reads as whole. Loading never imports Lightning.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import safetensors.torch  # called through the module: the reliability tests patch its save_file
import torch
from safetensors import safe_open

from core.errors import UserError
from core.model_info import ModelInfo
from predictors.base import Predictor
from predictors.frequency import ConditionalFrequency, FrequencyPredictor
from predictors.gate_lookahead import GateLookahead
from predictors.mlp_lookahead import MLPLookahead
from predictors.sklearn_baseline import SklearnLogReg
from predictors.token_lookahead import TokenLookahead
from predictors.trajectory import TrajectoryPredictor

FORMAT_VERSION = 1
SUFFIX = ".safetensors"
RUN_FILE = "run.json"


def families() -> dict[str, type]:
    """family name -> class, for every family that can be saved."""
    classes = (FrequencyPredictor, ConditionalFrequency, GateLookahead, MLPLookahead, TrajectoryPredictor,
               SklearnLogReg, TokenLookahead)
    return {cls.family: cls for cls in classes}


def predictor_hparams(predictor: Predictor) -> dict[str, Any]:
    out = {"num_layers": predictor.num_layers, "num_experts": predictor.num_experts, "top_k": predictor.top_k,
           **predictor.describe()}
    hparams = getattr(predictor, "hparams", None)
    return {**out, **hparams()} if callable(hparams) else out


def checkpoint_meta(predictor: Predictor, model: ModelInfo, store_fingerprint: str | None,
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "family": predictor.family,
        "hparams": predictor_hparams(predictor),
        "model": asdict(model),
        "model_key": model.key(),
        "store_fingerprint": store_fingerprint,
        **(extra or {}),
    }


def save_predictor(predictor: Predictor, path: str | os.PathLike[str], *, model: ModelInfo,
                   store_fingerprint: str | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write ``predictor`` to ``path`` (atomically); ``extra`` goes into the metadata (e.g. metrics)."""
    path = Path(path)
    if path.suffix != SUFFIX:
        path = path.with_name(path.name + SUFFIX)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in predictor.state().items()}  # type: ignore[attr-defined]
    meta = checkpoint_meta(predictor, model, store_fingerprint, extra)
    tmp = path.with_name(path.name + ".tmp")
    try:
        safetensors.torch.save_file(state, str(tmp), metadata={"predictor": json.dumps(meta)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _describe_model(key: dict[str, Any]) -> str:
    return (f"{key.get('model_id')} ({key.get('num_layers')} layers x {key.get('num_experts')} experts, "
            f"top-{key.get('top_k')}, hidden {key.get('hidden_size')})")


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a predictor file or a Lightning checkpoint written by train.py."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    if path.suffix == ".ckpt":
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # torch raises several types for a truncated or foreign file
            raise UserError(f"checkpoint {path} is corrupt or not a checkpoint ({str(e).splitlines()[0]})") from None
        if "predictor_meta" not in ckpt:
            raise UserError(f"checkpoint {path} was not written by train.py (no predictor metadata)")
        state = {k.removeprefix("predictor."): v for k, v in ckpt["state_dict"].items() if k.startswith("predictor.")}
        return ckpt["predictor_meta"], state

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("predictor")
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a bad header
        raise UserError(f"checkpoint {path} is corrupt or not a predictor file ({str(e).splitlines()[0]})") from None
    if raw is None:
        raise UserError(f"{path} is a safetensors file without predictor metadata (not written by save_predictor)")
    return json.loads(raw), state


def check_identity(meta: dict[str, Any], path: str | os.PathLike[str], model_info: ModelInfo | None) -> None:
    """Refuse a checkpoint trained for another model than ``model_info``, or written in another format
    (one line each); every loader of a predictor file -- lookahead or reuse -- calls this."""
    key = meta.get("model_key", {})
    if model_info is not None and key != model_info.key():
        raise UserError(
            f"checkpoint {path} was trained for {_describe_model(key)}, not for {_describe_model(model_info.key())}"
        )
    if meta.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise UserError(f"checkpoint {path} has format_version {meta.get('format_version')}; this code reads "
                        f"{FORMAT_VERSION}")


def load_predictor(path: str | os.PathLike[str], model_info: ModelInfo | None = None) -> Predictor:
    """Rebuild the predictor saved at ``path``; refuse it when it was trained for another model."""
    meta, state = read_checkpoint(path)
    check_identity(meta, path, model_info)
    key = meta.get("model_key", {})
    registry = families()
    family = meta.get("family")
    if family not in registry:
        from predictors.reuse import FAMILIES as REUSE  # predictors.reuse imports this module

        if family in REUSE:
            raise UserError(f"checkpoint {path} holds the reuse forecaster {family}, which the forecast eviction "
                            f"policies read (--policy forecast --predictor {path}), not a lookahead predictor")
        raise UserError(f"checkpoint {path} holds unknown family {family!r}; known: {', '.join(registry)}")
    hparams = {**key, **meta.get("hparams", {})}
    try:
        return registry[family].from_state(hparams, state)
    except (KeyError, RuntimeError) as e:
        raise UserError(f"checkpoint {path} does not fit family {family} ({str(e).splitlines()[0]})") from None


def latest_checkpoint(dir: str | os.PathLike[str] = "checkpoints", family: str | None = None,
                      model_info: ModelInfo | None = None) -> Path | None:
    """The predictor file of the newest finished run under ``dir``, or None when there is none.

    A run folder holds ``run.json`` (written last, when the run is complete) naming its predictor
    files and its best learned family; ``family`` picks another family of that run. Folders
    without ``run.json`` (a run in progress or one that failed) are ignored, and so are runs
    without a best (every learned family untrained) and untrained families (``untrained`` in
    ``run.json``: no validation epoch selected their weights). With ``model_info``,
    only runs trained for that model count (a newer run on another model's traces is skipped).
    """
    root = Path(dir)
    if not root.is_dir():
        return None
    runs = sorted(root.glob(f"*/{RUN_FILE}"), key=lambda p: p.stat().st_mtime, reverse=True)
    for run_file in runs:
        found = run_predictor(run_file.parent, family, model_info)
        if found is not None:
            return found
    return None


def run_predictor(run_dir: str | os.PathLike[str], family: str | None = None,
                  model_info: ModelInfo | None = None) -> Path | None:
    """The predictor file of one finished run folder: its best learned family (or ``family``), None
    when the run is unfinished, trained for another model, or that family is untrained."""
    run_file = Path(run_dir) / RUN_FILE
    run = read_run(run_dir)
    if run is None:
        return None
    if model_info is not None and run.get("model_key", model_info.key()) != model_info.key():
        return None
    files: dict[str, str] = run.get("predictors", {})
    name = family or run.get("best")
    if name in run.get("untrained", []):  # saved for inspection, never served as a trained predictor
        return None
    if name in files and (run_file.parent / files[name]).is_file():
        return run_file.parent / files[name]
    return None


def read_run(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``run.json`` of a finished run folder; None when there is none (unfinished) or it is unreadable."""
    try:
        run = json.loads((Path(run_dir) / RUN_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return run if isinstance(run, dict) else None
