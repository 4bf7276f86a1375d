"""The reuse forecasters as train.py families: one run, one split, one run folder, one Lightning path."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_forecast_policy import TRAINING_MODULES
from test_predictor_synthetic import make_synthetic_store
from test_reuse_forecasters import _sticky_store

import evaluate
import predictors.training as training
import train
from core.errors import UserError, run_cli
from core.model_info import ModelInfo
from data_pipeline.splits import split_rows
from offload.policies import make_policy
from predictors.checkpoint import latest_checkpoint, load_predictor, read_checkpoint
from predictors.reuse import LogisticReuse, MLPReuse, load_reuse_forecaster

QUIET = ["--wandb.mode", "disabled", "--trainer.enable_progress_bar", "false", "--threads", "1"]
REPO = Path(__file__).resolve().parents[1]
REUSE = ["reuse_counted", "reuse_logistic", "reuse_mlp"]


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory: pytest.TempPathFactory):
    """One train.py run of a lookahead family and every reuse family on the synthetic store: (store, run folder, stdout)."""
    root = tmp_path_factory.mktemp("mixed")
    store = make_synthetic_store(root / "s", num_sequences=12, seq_len=20)
    argv = ["--data.store", str(store.path), "--checkpoints", str(root / "ck"), "--run", "m", "--lookahead", "2",
            "--families", f"[mlp_lookahead, {', '.join(REUSE)}]", "--trainer.max_epochs", "3",
            "--data.batch_size", "64", "--reuse.hidden", "8", "--reuse.batch_size", "256", *QUIET]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert train.main(argv) == 0
    return store, root / "ck" / "m", out.getvalue()


def test_reuse_families_land_in_the_run_folder_on_the_run_split(mixed_run) -> None:
    store, run_dir, _ = mixed_run
    run = json.loads((run_dir / "run.json").read_text())
    assert sorted(run["predictors"]) == sorted(["mlp_lookahead", *REUSE])
    assert run["reuse_forecasters"] == REUSE and run["untrained"] == []
    assert run["best"] == "mlp_lookahead"  # a reuse forecaster never becomes the engine's predictor
    assert latest_checkpoint(run_dir.parent) == run_dir / "mlp_lookahead.safetensors"
    split = split_rows(store)  # train.py's default fractions and seed
    for family in REUSE:
        meta, _ = read_checkpoint(run_dir / f"{family}.safetensors")
        assert meta["family"] == family and meta["model_key"] == store.model.key()
        assert meta["store_fingerprint"] == store.fingerprint() and meta["split"] == run["split"] == "sequence"
        assert meta["reuse"]["split"] == split.describe()  # the lookahead families' split, not one of its own
        assert meta["reuse"]["rows"]["train"] > 0 and 0.5 < meta["reuse"]["metrics"]["test_auroc"] <= 1.0
        assert load_reuse_forecaster(run_dir / f"{family}.safetensors", store.model).family == family
    # a lookahead loader refuses a reuse file in one line that says what reads it
    with pytest.raises(UserError, match="reuse forecaster reuse_mlp, which the forecast eviction policies read"):
        load_predictor(run_dir / "reuse_mlp.safetensors", store.model)


def test_reuse_mlp_trains_through_the_shared_lightning_path(mixed_run) -> None:
    store, run_dir, _ = mixed_run
    best = run_dir / "lightning" / "reuse_mlp" / "best.ckpt"  # train_learned's ModelCheckpoint, on val/auroc
    meta, best_state = read_checkpoint(best)
    assert meta["family"] == "reuse_mlp" and meta["model_key"] == store.model.key()
    assert meta["hparams"] == {"hidden": 8}
    ckpt = torch.load(best, map_location="cpu", weights_only=False)
    monitored = [v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint")]
    assert monitored[0]["monitor"] == "val/auroc"
    # the saved forecaster holds the best epoch's weights (restored after the fit), and serves them
    saved = load_reuse_forecaster(run_dir / "reuse_mlp.safetensors", store.model)
    assert isinstance(saved, MLPReuse)
    for k, v in saved.state().items():
        assert torch.equal(v, best_state[k]), k
    assert isinstance(load_reuse_forecaster(best, store.model), MLPReuse)


def test_the_report_scores_reuse_forecasters_by_auroc_not_recall(mixed_run) -> None:
    _, run_dir, out = mixed_run
    recall_table, reuse_table = out.split("reuse forecasters on held-out", 1)
    assert "mlp_lookahead" in recall_table and not any(f in recall_table for f in REUSE)
    assert "test AUROC" in reuse_table and all(f in reuse_table for f in REUSE)
    assert "reuse_mlp: trained in" in out  # the throughput line of every gradient-trained family
    page = (run_dir / "report.html").read_text()
    assert "test AUROC" in page and "chosen at the next opportunity" in page


def test_the_policy_serves_a_run_folder_without_importing_training_code(mixed_run) -> None:
    """A fresh interpreter gives the forecast policy the run folder: it serves the run's reuse_logistic
    (the preferred family) and imports neither Lightning, torchmetrics nor a training module."""
    store, run_dir, _ = mixed_run
    code = (f"import sys\nfrom offload.policies import make_policy\nfrom predictors.reuse import load_reuse_forecaster\n"
            f"make_policy('forecast', forecaster={str(run_dir)!r}).bind({store.num_layers}, {store.num_experts})\n"
            f"print(type(load_reuse_forecaster({str(run_dir)!r})).__name__)\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'torchmetrics') "
            f"or m in {TRAINING_MODULES!r}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert r.stdout.split() == ["LogisticReuse", "[]"], r.stdout
    policy = make_policy("forecast", forecaster=str(run_dir))
    policy.bind(store.num_layers, store.num_experts)
    assert isinstance(policy.forecaster, LogisticReuse)


def test_another_models_run_is_refused_in_one_line(mixed_run, tmp_path: Path, capsys) -> None:
    _, run_dir, _ = mixed_run
    with pytest.raises(UserError, match="was trained for synthetic-moe .* not for other"):
        load_reuse_forecaster(run_dir, ModelInfo("other", "olmoe", 6, 16, 2, hidden_size=32))
    sticky = _sticky_store(tmp_path / "sticky", n_seq=3, decode=10)
    for predictor, why in ((run_dir, "was trained for synthetic-moe"),
                           (run_dir.parent, "folder without a readable run.json")):
        with pytest.raises(SystemExit) as exc:
            run_cli(evaluate.main, ["--trace", str(sticky.path), "--policy", "forecast", "--capacity", "4",
                                    "--predictor", str(predictor)])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and why in err[0], err


def test_a_run_without_reuse_forecasters_says_how_to_train_one(tmp_path: Path) -> None:
    store = make_synthetic_store(tmp_path / "s", num_sequences=4, seq_len=6)
    training.run_training(families=["frequency"], data=training.DataConfig(store=str(store.path)), lookahead=1,
                          overfetch=1.5, run_dir=tmp_path / "r", trainer_kwargs={})
    with pytest.raises(UserError, match=r"holds no trained reuse forecaster \(it holds frequency\).*--families"):
        load_reuse_forecaster(tmp_path / "r")


def test_reuse_only_runs_use_the_logger_factory_and_skip_lookahead_checks(tmp_path: Path) -> None:
    """A store too shallow for the default lookahead still trains reuse forecasters; the logger factory is
    asked for the gradient-trained one only (the numpy families log nothing of their own)."""
    store = _sticky_store(tmp_path / "s", n_seq=4, decode=20)  # 3 layers, no hidden states
    asked: list[str] = []

    def factory(family: str) -> bool:
        asked.append(family)
        return False

    result = training.run_training(
        families=REUSE, data=training.DataConfig(store=str(store.path)), lookahead=3, overfetch=1.5,
        run_dir=tmp_path / "r", logger_factory=factory, reuse=training.ReuseConfig(hidden=4, phase="decode"),
        trainer_kwargs={"max_epochs": 1, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                        "enable_model_summary": False})
    assert asked == ["reuse_mlp"]
    assert [r.family for r in result.results] == REUSE and result.best is None
    assert all(r.reuse["phase"] == "decode" for r in result.results)
    assert (tmp_path / "r" / "lightning" / "reuse_mlp" / "best.ckpt").is_file()


def test_reuse_refusals_are_one_line(tmp_path: Path, capsys) -> None:
    synthetic = make_synthetic_store(tmp_path / "s", num_sequences=4, seq_len=6)
    base = ["--data.store", str(synthetic.path), "--checkpoints", str(tmp_path / "ck"), *QUIET]
    for args, needle in ((["--families", "[reuse_nope]"], "unknown predictor family 'reuse_nope'"),
                         (["--families", "[reuse_mlp]", "--trainer.max_epochs", "0"],
                          "--trainer.max_epochs 0 would save untrained reuse_mlp"),
                         (["--families", "[reuse_counted]", "--reuse.phase", "both_ways"],
                          "--reuse.phase must be one of prefill, decode, both")):
        with pytest.raises(SystemExit) as exc:
            run_cli(train.main, base + args)
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "ck").exists()
