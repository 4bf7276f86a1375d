"""Token-aware forecasts: the token family learns a token -> experts rule; fallbacks without tokens."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from core.errors import UserError, run_cli
from core.model_info import DECODE, ModelInfo
from data_pipeline import inspect_store
from data_pipeline.datamodule import TokenDataset
from data_pipeline.token_routing import token_explained
from data_pipeline.trace_store import TraceStoreWriter
from predictors.base import PredictContext
from predictors.checkpoint import load_predictor, read_checkpoint, save_predictor
from predictors.mlp_lookahead import MLPLookahead
from predictors.token_lookahead import TokenLookahead, TokenPrior
from predictors.trajectory import TrajectoryPredictor

QUIET = ["--wandb.mode", "disabled", "--trainer.enable_progress_bar", "false", "--threads", "1"]
L, E, K, H, VOCAB = 5, 16, 2, 8, 40


def make_token_store(path: Path, *, tokens: bool = True, num_sequences: int = 40, seq_len: int = 30, seed: int = 0):
    """Every token id always routes to the same (random) experts at each layer: the token decides.

    Hidden states are noise (they say nothing), so the ids of the experts chosen at a layer are
    all that the token-free families have; token ids are random, so the previous token says nothing.
    """
    rng = np.random.default_rng(seed)
    table = np.stack([[rng.choice(E, K, replace=False) for _ in range(L)] for _ in range(VOCAB)])  # (V, L, K)
    info = ModelInfo(model_id="token-moe", family="olmoe", num_layers=L, num_experts=E, top_k=K, hidden_size=H,
                     expert_bytes=100, dtype="float32")
    writer = TraceStoreWriter(path, info, hidden_layers=list(range(L)))
    n = num_sequences * seq_len
    tok = rng.integers(0, VOCAB, n)
    writer.write_shard(seq_id=np.repeat(np.arange(num_sequences), seq_len), position=np.tile(np.arange(seq_len), num_sequences),
                       token_id=tok if tokens else np.full(n, -1), phase=np.full(n, DECODE),
                       topk_ids=table[tok], topk_weights=np.full((n, L, K), 0.5, np.float32),
                       hidden={layer: rng.normal(size=(n, H)).astype(np.float16) for layer in range(L)})
    writer.save_router_weights({layer: rng.normal(size=(E, H)).astype(np.float32) for layer in range(L)})
    return writer.finalize()


@pytest.fixture(scope="module")
def token_store(tmp_path_factory: pytest.TempPathFactory):
    return make_token_store(tmp_path_factory.mktemp("tok") / "s")


@pytest.fixture(scope="module")
def bare_store(tmp_path_factory: pytest.TempPathFactory):
    return make_token_store(tmp_path_factory.mktemp("bare") / "s", tokens=False)


def _recall(run_dir: Path, family: str) -> list[float]:
    return read_checkpoint(run_dir / f"{family}.safetensors")[0]["test"]["recall@k"]


def test_token_family_learns_the_rule_through_train_py(token_store, tmp_path: Path) -> None:
    argv = ["--data.store", str(token_store.path), "--checkpoints", str(tmp_path), "--run", "t", "--lookahead", "2",
            "--families", "[conditional_frequency, token, trajectory, mlp_lookahead]", "--trainer.max_epochs", "3",
            "--data.batch_size", "128", *QUIET]
    assert train.main(argv) == 0
    run = tmp_path / "t"
    cond, tok, traj, mlp = (_recall(run, f) for f in ("conditional_frequency", "token", "trajectory", "mlp_lookahead"))
    assert min(tok) > 0.97, tok  # every held-out token was seen in training: the rule is known
    assert tok[0] > cond[0] + 0.3, (tok, cond)  # the experts at l say little about l+1 here
    assert min(traj) > 0.9 and min(mlp) > 0.8, (traj, mlp)  # the token as an extra input (without: ~0.2)
    pred = load_predictor(run / "token.safetensors", token_store.model)
    assert isinstance(pred, TokenLookahead) and pred.needs == {"token"}


def test_the_token_forecast_covers_the_whole_pass(token_store) -> None:
    rows = np.arange(100)
    prior = TokenPrior.fit(token_store.token_ids[rows], token_store.topk_ids()[rows], E)
    model = TokenLookahead(prior, K, lookahead=2, dim=8)  # untrained: the counts alone
    tok = torch.from_numpy(token_store.token_ids[rows].astype(np.int64))
    whole = model.forecast_pass(tok)  # (T, L, E) before layer 0
    truth = token_store.topk_ids()[rows]
    top = whole.topk(K, dim=-1).indices.numpy()
    assert whole.shape == (100, L, E) and all(set(top[i, j]) == set(truth[i, j]) for i in range(100) for j in range(L))
    at1 = model.predict(PredictContext(layer=1, token=tok))  # through the common interface: layers 2, 3
    torch.testing.assert_close(at1, whole[:, 2:4])


def test_leave_one_out_counts(token_store) -> None:
    tokens, ids = np.array([7, 7, 9]), token_store.topk_ids()[:3]
    prior = TokenPrior.fit(tokens, ids, E, smoothing=1.0)
    idx = prior.index(torch.tensor([9, 7, 123, -1]), 4)
    assert idx.tolist() == [1, 0, 2, 2]  # 123 and -1 are unknown
    layers = torch.arange(L)
    p = prior.probs(idx, layers)
    pop = prior.popularity
    torch.testing.assert_close(p[2], pop)  # unknown: popularity
    own = torch.from_numpy(ids[[2]].astype(np.int64))
    torch.testing.assert_close(prior.probs(idx[:1], layers, future_ids=own)[0], pop)  # seen once, left out


def test_no_tokens_fall_back(bare_store, tmp_path: Path, capsys) -> None:
    assert token_explained(bare_store.token_ids, bare_store.topk_ids(), bare_store.seq_ids, E) is None
    with pytest.raises(UserError, match="no token ids"):
        TokenLookahead.from_store(bare_store, 2)
    mlp = MLPLookahead.from_store(bare_store, 2, width=8)
    traj = TrajectoryPredictor.from_store(bare_store, 2, dim=8)
    assert mlp.tokens is None and mlp.needs == {"hidden"} and mlp.hparams()["token_vocab"] == 0
    assert traj.tokens is None and traj.needs == {"chosen", "previous"} and traj.mix.shape[-1] == traj.window + 1
    assert not any("tok" in k for k in [*mlp.state(), *traj.state()])  # the same tensors as before tokens
    with pytest.raises(SystemExit):
        run_cli(train.main, ["--data.store", str(bare_store.path), "--families", "[token]", "--checkpoints",
                             str(tmp_path), *QUIET])
    assert "has no token ids" in capsys.readouterr().err


def test_context_without_tokens_is_unknown_tokens_with_a_warning(token_store, tmp_path: Path) -> None:
    rows = np.arange(60)
    mlp = MLPLookahead.from_store(token_store, 2, rows=rows, width=8)
    traj = TrajectoryPredictor.from_store(token_store, 2, rows=rows, dim=8)
    assert "token" in mlp.needs and "token" in traj.needs
    with torch.no_grad():
        mlp.token_weight.fill_(1.0)
        traj.mix[..., -1] = 1.0
    b = TokenDataset(token_store, rows, hidden=True).__getitems__(list(range(60)))
    for model in (mlp, traj):
        ctx = PredictContext(layer=1, hidden=b["hidden"][:, 1], chosen=b["topk_ids"][:, :2], previous=b["previous"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            missing = model.predict(ctx)
        assert any("the context has none" in str(w.message) for w in caught)
        ctx.token = torch.full((60,), -1)
        torch.testing.assert_close(missing, model.predict(ctx))
        ctx.token = b["token"]
        assert not torch.equal(missing, model.predict(ctx))  # the token changes the forecast
        path = save_predictor(model, tmp_path / model.family, model=token_store.model)
        again = load_predictor(path, token_store.model)
        torch.testing.assert_close(again.predict(ctx), model.predict(ctx))
        assert again.tokens is not None and again.tokens.size == model.tokens.size


def test_token_explained_on_the_rule(token_store) -> None:
    s = token_explained(token_store.token_ids, token_store.topk_ids(), token_store.seq_ids, E)
    assert s is not None and s["seen_share"] == 1.0 and s["test_rows"] == 8 * 30
    for r in s["per_layer"]:
        assert r["token_recall"] == 1.0 and r["conditional_entropy_bits"] == pytest.approx(1.0)  # K=2 equal picks
        assert r["popularity_recall"] < 0.5 and r["explained"] > 0.7
        assert r["explained"] == pytest.approx(1 - 1 / r["entropy_bits"])


def test_inspect_reports_the_token_share(token_store, bare_store, capsys) -> None:
    inspect_store.main([str(token_store.path), "--json"])
    tok = json.loads(capsys.readouterr().out)["token"]
    assert [r["token_recall"] for r in tok["per_layer"]] == [1.0] * L
    inspect_store.main([str(bare_store.path)])
    assert "no token ids in this store" in capsys.readouterr().out
