"""Splits by sequence (never by token), the position split of single-prompt traces, batches."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from test_predictor_synthetic import make_synthetic_store

from core.errors import UserError
from core.model_info import ModelInfo
from data_pipeline.datamodule import TokenDataset, TraceDataModule, previous_rows
from data_pipeline.splits import split_rows
from data_pipeline.trace_store import TraceStoreWriter


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    return make_synthetic_store(tmp_path_factory.mktemp("dm") / "s", num_sequences=10, seq_len=8)


def test_split_by_sequence_is_disjoint_complete_and_seeded(store) -> None:
    split = split_rows(store, seed=3, val_fraction=0.2, test_fraction=0.2)
    assert split.how == "sequence"
    seq = store.seq_ids
    parts = [set(seq[split.train]), set(seq[split.val]), set(seq[split.test])]
    assert [len(p) for p in parts] == [6, 2, 2]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])  # no sequence straddles
    assert sorted(np.concatenate([split.train, split.val, split.test])) == list(range(store.num_tokens))
    again = split_rows(store, seed=3, val_fraction=0.2, test_fraction=0.2)
    assert np.array_equal(again.val, split.val)
    other = split_rows(store, seed=4, val_fraction=0.2, test_fraction=0.2)
    assert set(seq[other.val]) != parts[1] or set(seq[other.test]) != parts[2]


def test_split_by_position_for_one_sequence(tmp_path: Path) -> None:
    one = make_synthetic_store(tmp_path / "one", num_sequences=1, seq_len=40)  # 10 prefill + 30 decode
    split = split_rows(one, val_fraction=0.2, test_fraction=0.2)
    assert split.how == "position" and "train on the first part" in split.describe()
    pos = one.positions
    # prefill (10) + first 18 decode steps train, the next 6 validate, the last 6 test
    assert list(pos[split.train]) == list(range(28))
    assert list(pos[split.val]) == list(range(28, 34)) and list(pos[split.test]) == list(range(34, 40))


def test_too_small_and_empty_stores_are_refused(tmp_path: Path) -> None:
    two = make_synthetic_store(tmp_path / "two", num_sequences=2, seq_len=4)
    with pytest.raises(UserError, match="has 2 sequence.*needs at least 3"):
        split_rows(two, split="sequence")
    tiny = make_synthetic_store(tmp_path / "tiny", num_sequences=1, seq_len=2)
    with pytest.raises(UserError, match="too small to split: 2 token"):
        split_rows(tiny)
    info = ModelInfo(model_id="m", family="olmoe", num_layers=2, num_experts=4, top_k=1)
    empty = TraceStoreWriter(tmp_path / "empty", info).finalize()
    with pytest.raises(UserError, match="is empty"):
        split_rows(empty)


def test_batches_carry_routes_previous_token_and_hidden(store) -> None:
    ds = TokenDataset(store, np.arange(store.num_tokens), hidden=True)
    batch = ds.__getitems__([0, 1, 9])  # token 0 and 1 of sequence 0, token 1 of sequence 1
    ids = torch.from_numpy(store.topk_ids().astype(np.int64))
    assert torch.equal(batch["topk_ids"], ids[[0, 1, 9]])
    assert (batch["previous"][0] == store.num_experts).all()  # first token: no previous one
    assert torch.equal(batch["previous"][1], ids[0]) and torch.equal(batch["previous"][2], ids[8])
    assert batch["hidden"].shape == (3, store.num_layers, 32) and batch["hidden"].dtype == torch.float32
    assert list(previous_rows(store)[:9]) == [-1, 0, 1, 2, 3, 4, 5, 6, -1]
    clone = pickle.loads(pickle.dumps(ds))  # what a DataLoader worker receives
    assert torch.equal(clone.__getitems__([9])["topk_ids"], batch["topk_ids"][2:])


def test_datamodule_loaders(store) -> None:
    dm = TraceDataModule(store.path, hidden=False, batch_size=16, seed=0)
    batches = list(dm.val_dataloader())
    assert sum(len(b["row"]) for b in batches) == len(dm.split.val) and "hidden" not in batches[0]
    first = next(iter(dm.train_dataloader()))["row"]
    assert torch.equal(first, next(iter(dm.train_dataloader()))["row"])  # seeded shuffle


def test_multi_shard_batches_gather_from_each_shard(tmp_path: Path) -> None:
    one = make_synthetic_store(tmp_path / "one", num_sequences=4, seq_len=5)
    writer = TraceStoreWriter(tmp_path / "two", one.model, hidden_layers=one.hidden_layers, store_router_logits=True)
    for lo, hi in ((0, 10), (10, 20)):  # two shards of two sequences each
        sl = slice(lo, hi)
        writer.write_shard(seq_id=one.seq_ids[sl], position=one.positions[sl], token_id=one.token_ids[sl],
                           phase=one.phases[sl], topk_ids=one.topk_ids()[sl], topk_weights=one.topk_weights()[sl],
                           router_logits=one.router_logits()[sl],
                           hidden={layer: one.hidden(layer)[sl] for layer in one.hidden_layers})
    two = writer.finalize()
    rows = [3, 12, 0, 19]
    a = TokenDataset(one, np.arange(20), hidden=True).__getitems__(rows)
    b = TokenDataset(two, np.arange(20), hidden=True).__getitems__(rows)
    for key in ("topk_ids", "previous", "hidden"):
        assert torch.equal(a[key], b[key]), key
