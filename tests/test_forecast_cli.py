"""``evaluate.py --policy ...,forecast --predictor CKPT`` and ``python -m predictors.reuse_training``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_reuse_forecasters import _sticky_store

from core.model_info import ModelInfo
from predictors.reuse import CountedReuse, load_reuse_forecaster, save_reuse_forecaster


@pytest.mark.slow
def test_train_then_evaluate_with_the_reuse_checkpoint(tmp_path):
    store = _sticky_store(tmp_path / "store")
    out = tmp_path / "ck"
    r = subprocess.run([sys.executable, "-m", "predictors.reuse_training", "--trace", str(store.path), "--out", str(out),
                        "--family", "reuse_counted"], capture_output=True, text=True, check=True)
    assert "reuse_counted: split by sequence" in r.stdout
    ckpt = out / "reuse_counted.safetensors"
    assert load_reuse_forecaster(ckpt, store.model).trials.sum() > 0
    res = tmp_path / "res.json"
    subprocess.run([sys.executable, "evaluate.py", "--trace", str(store.path), "--policy", "lru,forecast,belady",
                    "--capacity", "4", "--predictor", str(ckpt), "--json", str(res)],
                   capture_output=True, text=True, check=True)
    rows = {row["policy"]: row for row in json.loads(res.read_text())["results"] if not row["reference"]}
    assert rows["forecast"]["policy_params"] == {"forecaster": str(ckpt)}
    assert rows["lru"]["policy_params"] == {}
    assert rows["lru"]["hit_rate"] < rows["forecast"]["hit_rate"] <= rows["belady"]["hit_rate"]


@pytest.mark.slow
def test_a_missing_or_foreign_checkpoint_is_one_line(tmp_path):
    store = _sticky_store(tmp_path / "store", n_seq=3, decode=10)
    foreign = save_reuse_forecaster(CountedReuse(5, 7, 2), tmp_path / "foreign", model=ModelInfo("x", "t", 5, 7, 2))
    for ckpt, why in ((tmp_path / "nope.safetensors", "does not exist"), (foreign, "trained for x (5 layers x 7 experts")):
        r = subprocess.run([sys.executable, "evaluate.py", "--trace", str(store.path), "--policy", "forecast",
                            "--capacity", "4", "--predictor", str(ckpt)], capture_output=True, text=True)
        err = r.stderr.strip()
        assert r.returncode == 2 and err.startswith("error:") and len(err.splitlines()) == 1, err
        assert why in err
