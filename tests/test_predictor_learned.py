"""Learned families: where they start (the baseline they correct), leave-one-out counts, training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_predictor_synthetic import make_synthetic_store

from core.errors import UserError
from data_pipeline.datamodule import TokenDataset
from data_pipeline.splits import split_rows
from predictors.base import PredictContext
from predictors.evaluation import evaluate_predictor
from predictors.frequency import ConditionalFrequency
from predictors.gate_lookahead import GateLookahead
from predictors.lightning_module import LookaheadModule
from predictors.mlp_lookahead import MLPLookahead
from predictors.trajectory import PROB_FLOOR, TrajectoryPredictor


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    return make_synthetic_store(tmp_path_factory.mktemp("learned") / "s", num_sequences=30, seq_len=24)


def _ctx(store, layer: int, rows: np.ndarray) -> PredictContext:
    ds = TokenDataset(store, rows, hidden=True)
    b = ds.__getitems__(list(range(len(rows))))
    return PredictContext(layer=layer, hidden=b["hidden"][:, layer], chosen=b["topk_ids"][:, : layer + 1],
                          previous=b["previous"])


def test_untrained_mlp_ranks_like_the_gate(store) -> None:
    gate = GateLookahead.from_store(store, lookahead=3)
    mlp = MLPLookahead.from_store(store, lookahead=3, width=16, use_tokens=False)
    ctx = _ctx(store, 1, np.arange(40))
    g, m = gate.predict(ctx), mlp.predict(ctx)
    assert torch.equal(g.topk(2, dim=-1).indices, m.topk(2, dim=-1).indices)
    past = mlp.predict(_ctx(store, 4, np.arange(5)))
    assert (past[:, 1:] == 0).all() and (past[:, 0] > 0).all()  # layer 6, 7 do not exist


def test_untrained_trajectory_is_conditional_frequency(store) -> None:
    ids = store.topk_ids()
    traj = TrajectoryPredictor.fit(ids, store.num_experts, lookahead=2, window=3, dim=8)
    cond = ConditionalFrequency.fit(ids, store.num_experts, lookahead=2)
    ctx = _ctx(store, 2, np.arange(30))
    want = cond.predict(ctx).clamp(min=PROB_FLOOR)
    assert torch.allclose(traj.logits(ctx).exp(), want, rtol=1e-5)
    ctx.previous = None  # a prompt's first token: no previous token is fine
    assert traj.predict(ctx).shape == (30, 2, store.num_experts)


def test_training_logits_leave_the_token_out() -> None:
    # 3 tokens, 2 layers, top-1, 3 experts: expert 2 at layer 0 is seen once (token 2, then expert 1)
    routes = np.array([[[0], [1]], [[0], [2]], [[2], [1]]])
    traj = TrajectoryPredictor.fit(routes, 3, lookahead=1, window=1, dim=0, smoothing=1.0)
    ctx = PredictContext(layer=0, chosen=torch.tensor([[[2]]]), previous=torch.tensor([[[3], [3]]]))
    future = torch.tensor(routes[2:])
    pop = torch.tensor([0.0, 2 / 3, 1 / 3])  # popularity of layer 1
    # counted: (1 * [0,1,0] + pop) / (1 + 1); left out: (0 + pop) / (0 + 1) = pop
    counted = ((torch.tensor([0.0, 1, 0]) + pop) / 2).clamp(min=PROB_FLOOR)
    assert torch.allclose(traj.logits(ctx).exp()[0, 0], counted)
    assert torch.allclose(traj.training_logits(ctx, future).exp()[0, 0], pop.clamp(min=PROB_FLOOR))


def test_hidden_families_refuse_stores_without_hidden_states(tmp_path: Path) -> None:
    bare = make_synthetic_store(tmp_path / "bare", num_sequences=3, seq_len=4, hidden=False)
    with pytest.raises(UserError, match="no hidden states.*frequency, conditional_frequency, trajectory"):
        MLPLookahead.from_store(bare, lookahead=1)
    assert TrajectoryPredictor.from_store(bare, lookahead=2).family == "trajectory"


def test_a_few_training_steps_improve_the_mlp_on_gate_at_distance_two(store) -> None:
    torch.manual_seed(0)
    split = split_rows(store, seed=0)
    mlp = MLPLookahead.from_store(store, lookahead=2, width=32)
    module = LookaheadModule(mlp, store.hidden_layers, lr=1e-2)
    train, test = TokenDataset(store, split.train, hidden=True), TokenDataset(store, split.test, hidden=True)
    opt = module.configure_optimizers()
    for step in range(60):
        idx = torch.randint(0, len(train), (128,), generator=torch.Generator().manual_seed(step))
        loss = module._loss(train.__getitems__(idx.tolist()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    batches = [test.__getitems__(list(range(len(test))))]

    def recall(p):
        return evaluate_predictor(p, batches, num_experts=store.num_experts, hidden_layers=store.hidden_layers,
                                  desc="").per_distance()["recall@k"]

    gate = recall(GateLookahead.from_store(store, lookahead=2))
    trained = recall(mlp)
    assert trained[1] > gate[1] + 0.02, (trained, gate)
