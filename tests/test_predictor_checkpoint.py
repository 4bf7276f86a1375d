"""Predictor files: every family round-trips; another model's checkpoint is refused in one line."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_predictor_synthetic import make_synthetic_store

from core.errors import UserError
from data_pipeline.datamodule import TokenDataset
from predictors.base import PredictContext
from predictors.checkpoint import latest_checkpoint, load_predictor, read_checkpoint, save_predictor
from predictors.frequency import ConditionalFrequency, FrequencyPredictor
from predictors.gate_lookahead import GateLookahead
from predictors.mlp_lookahead import MLPLookahead
from predictors.sklearn_baseline import SklearnLogReg
from predictors.trajectory import TrajectoryPredictor


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    return make_synthetic_store(tmp_path_factory.mktemp("ck") / "s", num_sequences=6, seq_len=10)


def _families(store):
    ids = store.topk_ids()
    hidden = {1: store.hidden(1)}
    mlp = MLPLookahead.from_store(store, 2, width=8)
    torch.nn.init.normal_(mlp.head_w)  # trained-looking weights, so a lost tensor would show
    traj = TrajectoryPredictor.fit(ids, store.num_experts, 2, dim=8)
    torch.nn.init.normal_(traj.head_w)
    return [
        FrequencyPredictor.fit(ids, store.num_experts, 2),
        ConditionalFrequency.fit(ids, store.num_experts, 2, smoothing=0.5),
        GateLookahead.from_store(store, 2),
        SklearnLogReg.fit(hidden, ids, [(1, 1)], num_experts=store.num_experts, lookahead=2, n_components=4),
        mlp,
        traj,
    ]


def test_every_family_round_trips(store, tmp_path: Path) -> None:
    b = TokenDataset(store, np.arange(12), hidden=True).__getitems__(list(range(12)))
    ctx = PredictContext(layer=1, hidden=b["hidden"][:, 1], chosen=b["topk_ids"][:, :2], previous=b["previous"])
    for pred in _families(store):
        path = save_predictor(pred, tmp_path / pred.family, model=store.model, store_fingerprint=store.fingerprint(),
                              extra={"note": "x"})
        assert path.suffix == ".safetensors" and not list(tmp_path.glob("*.tmp"))
        back = load_predictor(path, store.model)
        assert type(back) is type(pred) and back.lookahead == 2
        assert torch.allclose(back.predict(ctx), pred.predict(ctx)), pred.family
        meta, _ = read_checkpoint(path)
        assert meta["store_fingerprint"] == store.fingerprint() and meta["model_key"]["model_id"] == "synthetic-moe"
        assert meta["family"] == pred.family and meta["note"] == "x"


def test_a_checkpoint_for_another_model_is_refused(store, tmp_path: Path) -> None:
    path = save_predictor(FrequencyPredictor.fit(store.topk_ids(), store.num_experts, 1), tmp_path / "f",
                          model=store.model)
    other = replace(store.model, model_id="allenai/OLMoE-1B-7B-0924", num_layers=16, num_experts=64, top_k=8)
    with pytest.raises(UserError) as e:
        load_predictor(path, other)
    msg = str(e.value)
    assert "\n" not in msg and "synthetic-moe (6 layers x 16 experts" in msg and "not for allenai/OLMoE-1B-7B-0924" in msg


def test_missing_corrupt_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_predictor(tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="corrupt"):
        load_predictor(bad)

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(UserError, match="without predictor metadata"):
        load_predictor(tmp_path / "plain.safetensors")


def test_latest_checkpoint_picks_the_newest_finished_run(store, tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path / "nothing") is None
    freq = FrequencyPredictor.fit(store.topk_ids(), store.num_experts, 1)
    for run in ("old", "new", "unfinished"):
        save_predictor(freq, tmp_path / run / "frequency", model=store.model)
    for run in ("old", "new"):
        (tmp_path / run / "run.json").write_text(json.dumps(
            {"best": "frequency", "predictors": {"frequency": "frequency.safetensors"}}))
    os.utime(tmp_path / "old" / "run.json", (1, 1))
    assert latest_checkpoint(tmp_path) == tmp_path / "new" / "frequency.safetensors"
    assert latest_checkpoint(tmp_path, family="trajectory") is None
    other = replace(store.model, model_id="gemma", num_layers=30)
    (tmp_path / "new" / "run.json").write_text(json.dumps(
        {"best": "frequency", "predictors": {"frequency": "frequency.safetensors"}, "model_key": other.key()}))
    assert latest_checkpoint(tmp_path, model_info=store.model) == tmp_path / "old" / "frequency.safetensors"
