"""train.py end to end: the comparison on demo and gemma traces, W&B offline, bad input."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from browser import check_report
from test_predictor_synthetic import make_synthetic_store

import predictors.training as training
import train
from core.errors import run_cli
from predictors.checkpoint import latest_checkpoint, load_predictor, read_checkpoint

QUIET = ["--wandb.mode", "disabled", "--trainer.enable_progress_bar", "false", "--threads", "1"]
REPO = Path(__file__).resolve().parents[1]


def _recall(run_dir: Path, family: str) -> list[float]:
    meta, _ = read_checkpoint(run_dir / f"{family}.safetensors")
    return meta["test"]["recall@k"]


def _fail(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        run_cli(train.main, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory):
    return make_synthetic_store(tmp_path_factory.mktemp("train") / "s", num_sequences=12, seq_len=20)


def test_cli_fits_compares_and_saves_every_family(synthetic, tmp_path: Path, capsys) -> None:
    argv = ["--data.store", str(synthetic.path), "--checkpoints", str(tmp_path), "--run", "r", "--lookahead", "2",
            "--trainer.max_epochs", "2", "--data.batch_size", "64", "--sklearn.pairs", "[[1, 1]]",
            "--sklearn.n_components", "8", *QUIET]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    families = ["frequency", "conditional_frequency", "gate_lookahead", "sklearn_logreg", "mlp_lookahead",
                "trajectory", "token"]
    for family in families:
        assert family in out
    assert "recall@k at single layer pairs" in out  # sklearn's pair, every family on it
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert sorted(run["predictors"]) == sorted(families) and run["split"] == "sequence"
    best = latest_checkpoint(tmp_path)
    assert best is not None and best.name == f"{run['best']}.safetensors"
    assert latest_checkpoint(tmp_path, family="trajectory") == tmp_path / "r" / "trajectory.safetensors"
    pred = load_predictor(best, synthetic.model)
    assert pred.family == run["best"] and pred.lookahead == 2
    meta, _ = read_checkpoint(tmp_path / "r" / "lightning" / "mlp_lookahead" / "best.ckpt")
    assert meta["store_fingerprint"] == synthetic.fingerprint() and meta["model_key"] == synthetic.model.key()
    # the HTML report lands beside run.json: recall figures, the comparison, the pair table, the split
    assert f"HTML report: {(tmp_path / 'r' / 'report.html').resolve()}" in out
    check_report(tmp_path / "r" / "report.html", tmp_path, tables=3, figures=2, screenshot=tmp_path / "train.png",
                 texts=("Recall@k per layer and distance", "split by sequence", "never trained on",
                        "python train.py --data.store", *families))


def test_the_same_seed_trains_the_same_weights(synthetic, tmp_path: Path) -> None:
    """A learned family's initial weights are seeded by --data.seed: the same command gives the same
    predictor whatever ran before it in the process (or in another process: torch's own start-up seed
    is not fixed), and another seed another one."""
    from safetensors.torch import load_file

    def weights(run: str, seed: int) -> dict:
        argv = ["--data.store", str(synthetic.path), "--checkpoints", str(tmp_path), "--run", run, "--lookahead", "2",
                "--families", "[frequency, mlp_lookahead]", "--trainer.max_epochs", "1", "--data.batch_size", "64",
                "--data.seed", str(seed), *QUIET]
        assert train.main(argv) == 0
        return load_file(str(tmp_path / run / "mlp_lookahead.safetensors"))

    import torch

    first = weights("a", 0)
    torch.rand(17)  # whatever else the process draws in between
    again, other = weights("b", 0), weights("c", 1)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first if first[k].dtype.is_floating_point)


def test_wandb_offline_by_default_without_a_key(synthetic, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    argv = ["--data.store", str(synthetic.path), "--checkpoints", str(tmp_path / "ck"), "--run", "w",
            "--families", "[frequency, trajectory]", "--trainer.max_epochs", "1",
            "--trainer.enable_progress_bar", "false"]
    assert train.main(argv) == 0
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # W&B's service process writes the offline record asynchronously: on a loaded machine its last
    # records can land a moment after finish() returned, so give it a few seconds before judging
    def written() -> tuple[bytes, list, list[str]]:
        media = runs[0] / "files" / "media"
        return (next(runs[0].glob("*.wandb")).read_bytes(), list((media / "table").glob("comparison_*.table.json")),
                [p.name for p in (media / "images").glob("*.png")])

    deadline = time.monotonic() + 30
    record, tables, images = written()
    while not (b"predictor-w" in record and tables and len(images) >= 2) and time.monotonic() < deadline:
        time.sleep(0.5)
        record, tables, images = written()
    assert b"predictor-w" in record  # the best checkpoint, logged as a model artifact
    assert tables
    for figure in ("recall_per_distance_", "recall_heatmap_"):  # the report's figures, as W&B images
        assert any(name.startswith(figure) for name in images), images


def test_hidden_state_family_on_a_store_without_hidden_states(tmp_path: Path, capsys) -> None:
    bare = make_synthetic_store(tmp_path / "bare", num_sequences=4, seq_len=6, hidden=False)
    line = _fail(["--data.store", str(bare.path), "--checkpoints", str(tmp_path / "ck"), *QUIET], capsys)
    assert "has no hidden states" in line and "mlp_lookahead" in line
    assert "families that work on it: frequency, conditional_frequency, trajectory" in line
    assert not (tmp_path / "ck").exists()


def test_distance_beyond_the_last_layer(synthetic, tmp_path: Path, capsys) -> None:
    line = _fail(["--data.store", str(synthetic.path), "--lookahead", "6", "--checkpoints", str(tmp_path), *QUIET],
                 capsys)
    assert "D=6 runs past the last layer" in line and "at most 5" in line


def test_too_small_and_missing_stores(tmp_path: Path, capsys) -> None:
    two = make_synthetic_store(tmp_path / "two", num_sequences=2, seq_len=5)
    line = _fail(["--data.store", str(two.path), "--data.split", "sequence", "--checkpoints", str(tmp_path / "ck"),
                  *QUIET], capsys)
    assert "has 2 sequence(s)" in line and not (tmp_path / "ck").exists()
    line = _fail(["--data.store", str(tmp_path / "nope"), "--collect.enabled", "false", *QUIET], capsys)
    assert "does not exist" in line


def test_a_failed_run_leaves_no_checkpoint_behind(synthetic, tmp_path: Path, monkeypatch) -> None:
    def crash(*args, **kwargs):
        raise RuntimeError("killed mid-training")

    monkeypatch.setattr(training, "train_learned", crash)
    argv = ["--data.store", str(synthetic.path), "--checkpoints", str(tmp_path), "--run", "x",
            "--families", "[frequency, mlp_lookahead]", *QUIET]
    with pytest.raises(RuntimeError, match="killed"):
        train.main(argv)
    assert not (tmp_path / "x").exists() and latest_checkpoint(tmp_path) is None


@pytest.mark.slow
def test_demo_mlp_beats_gate_which_beats_frequency(tmp_path: Path) -> None:
    """Done-means on demo traces (tiny-olmoe, 12k tokens collected here, seed 0)."""
    argv = ["--data.store", str(tmp_path / "demo"), "--collect.model", "tiny-olmoe", "--collect.dataset", "demo",
            "--collect.max_tokens", "12000", "--checkpoints",
            str(tmp_path / "ck"), "--run", "demo", "--families", "[frequency, gate_lookahead, mlp_lookahead]",
            "--trainer.max_epochs", "8", "--data.batch_size", "256", *QUIET]
    assert train.main(argv) == 0
    run = tmp_path / "ck" / "demo"
    freq, gate, mlp = (_recall(run, f) for f in ("frequency", "gate_lookahead", "mlp_lookahead"))
    assert mlp[0] >= gate[0] and mlp[1] > gate[1] and mlp[2] > gate[2], (mlp, gate)
    assert all(g > f and m > f for g, m, f in zip(gate, mlp, freq, strict=True)), (gate, mlp, freq)


@pytest.mark.slow
def test_gemma_trajectory_beats_conditional_frequency_on_held_out_steps(gemma_store, tmp_path: Path) -> None:
    argv = ["--config", str(REPO / "configs" / "gemma.yaml"), "--data.store", str(gemma_store.path),
            "--checkpoints", str(tmp_path), "--run", "g", *QUIET]
    assert train.main(argv) == 0
    run = json.loads((tmp_path / "g" / "run.json").read_text())
    assert run["split"] == "position"
    cond, traj = _recall(tmp_path / "g", "conditional_frequency"), _recall(tmp_path / "g", "trajectory")
    assert traj[0] > cond[0], (traj, cond)
