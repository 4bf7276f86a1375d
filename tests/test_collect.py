"""Collection: hooks reproduce the model's own router_logits, pads never stored, kill-and-resume exact."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import UserError
from data_pipeline.collect import collect_traces, encode_batch, parse_hidden_layers
from data_pipeline.import_routes import import_routes
from data_pipeline.models import load_model
from data_pipeline.trace_store import TraceStore, TraceStoreError, TraceStoreWriter

REPO = Path(__file__).resolve().parents[1]

# texts of very different lengths, so every batch is padded
TEXTS = [
    "Janet's ducks lay 16 eggs per day.",
    "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?",
    "Hi",
    "Josh decides to try flipping a house. He buys a house for $80,000 and then puts in $50,000 in repairs. "
    "This increased the value of the house by 150%. How much profit did he make?",
    "James decides to run 3 sprints 3 times a week. He runs 60 meters each sprint.",
    "Every day, Wendi feeds each of her chickens three cups of mixed chicken feed.",
    "Kylar went to the store to buy glasses for his new apartment.",
] * 3


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-olmoe")


def _spec():
    return {"name": "test-texts", "n": len(TEXTS)}


def test_hooked_logits_equal_model_router_logits(tiny, tmp_path):
    seq_len, bs = 40, 4
    store = collect_traces(tiny, TEXTS, tmp_path / "s", max_tokens=None, seq_len=seq_len, batch_size=bs,
                           hidden_layers="all", prefill_tokens=8, dataset_spec=_spec(), shard_sequences=5,
                           progress=False)
    L, E, K = 6, 32, 4
    logits_all, ids_all, w_all, tok_all, n_pads = [], [], [], [], 0
    for b in range(0, len(TEXTS), bs):
        enc = encode_batch(tiny.tokenizer, TEXTS[b:b + bs], seq_len)
        mask = enc["attention_mask"].bool()
        n_pads += int((~mask).sum())
        with torch.no_grad():
            out = tiny.model(**enc, output_router_logits=True)
        assert len(out.router_logits) == L and out.router_logits[0].shape == (mask.numel(), E)  # pads included
        rl = torch.stack(out.router_logits, 1)[mask.reshape(-1)]  # (n, L, E) non-pad rows only
        probs = torch.softmax(rl, -1)
        w, ids = torch.topk(probs, K, dim=-1)
        logits_all.append(rl)
        ids_all.append(ids)
        w_all.append(w)
        tok_all.append(enc["input_ids"][mask])
    assert n_pads > 0, "the test must exercise padding"
    want_logits = torch.cat(logits_all)
    assert store.num_tokens == len(want_logits)  # no pad row stored
    assert store.num_sequences == len(TEXTS)
    # storage order is by sequence id then position, which is also the order above
    assert np.array_equal(store.seq_ids, np.repeat(np.arange(len(TEXTS)), [len(t) for t in tok_all_split(tok_all, store)]))
    assert np.array_equal(store.token_ids, torch.cat(tok_all).numpy())
    assert np.array_equal(store.router_logits(), want_logits.half().numpy())
    assert np.array_equal(store.topk_ids(), torch.cat(ids_all).numpy())
    np.testing.assert_array_equal(store.topk_weights(), torch.cat(w_all).numpy())
    assert not np.isin(store.token_ids, [tiny.tokenizer.pad_token_id]).any()
    # phases and positions
    assert np.array_equal(store.phases, (store.positions >= 8).astype(np.int8))
    for seq in store.iter_sequences(hidden=False):
        assert np.array_equal(seq.positions, np.arange(len(seq)))
    # the stored fp16 MoE input routes (almost always) to the stored experts
    for layer in (0, 3, 5):
        h = torch.from_numpy(store.hidden(layer).astype(np.float32))
        ids = tiny.adapter.route(layer, h).ids.numpy()
        assert (np.sort(ids, 1) == np.sort(store.topk_ids([layer])[:, 0], 1)).all(1).mean() > 0.95
    # router weights beside the shards
    rw = store.router_weights()
    assert sorted(rw) == list(range(L))
    assert np.array_equal(rw[2], tiny.adapter.router_weight(2).numpy())
    assert store.manifest["dataset"] == _spec()
    assert store.manifest["collection"]["seq_len"] == seq_len


def tok_all_split(tok_all, store):
    """Per-sequence token arrays in order (helper for the seq_id check)."""
    flat = torch.cat(tok_all).numpy()
    b = store.sequence_bounds()
    return [flat[s:e] for _, s, e in b]


def test_max_tokens_stops_after_reaching_budget(tiny, tmp_path):
    store = collect_traces(tiny, TEXTS, tmp_path / "s", max_tokens=100, seq_len=32, batch_size=3,
                           hidden_layers="none", router_logits=False, dataset_spec=_spec(), progress=False)
    lens = [len(tiny.tokenizer(t)["input_ids"][:32]) for t in TEXTS]
    n_seq = int(np.searchsorted(np.cumsum(lens), 100) + 1)
    assert store.num_sequences == n_seq and store.num_tokens == sum(lens[:n_seq]) >= 100
    assert store.hidden_layers == [] and not store.has_router_logits
    with pytest.raises(TraceStoreError):
        store.router_logits()


class _Boom(RuntimeError):
    pass


def test_exception_after_k_shards_then_resume(tiny, tmp_path, monkeypatch):
    kw = dict(max_tokens=None, seq_len=32, batch_size=2, hidden_layers=[1, 4], dataset_spec=_spec(),
              shard_sequences=2, progress=False)
    ref = collect_traces(tiny, TEXTS, tmp_path / "ref", **kw)
    real = TraceStoreWriter.write_shard
    calls = {"n": 0}

    def failing(self, **arrays):
        calls["n"] += 1
        if calls["n"] == 4:
            raise _Boom("killed")
        return real(self, **arrays)

    monkeypatch.setattr(TraceStoreWriter, "write_shard", failing)
    with pytest.raises(_Boom):
        collect_traces(tiny, TEXTS, tmp_path / "s", **kw)
    partial = TraceStore(tmp_path / "s")
    assert partial.num_sequences == 6 and not partial.manifest["complete"]
    monkeypatch.setattr(TraceStoreWriter, "write_shard", real)
    store = collect_traces(tiny, TEXTS, tmp_path / "s", **kw)
    _assert_same_content(store, ref)
    assert len(store.manifest["runs"]) == 1 and store.manifest["complete"]  # the failed run recorded none
    # the resumed run forms the planned batches, not new ones from what is left: the very same bytes
    assert store.content_digest() == ref.content_digest()
    assert [e["sha256"] for e in store.manifest["shards"]] == [e["sha256"] for e in ref.manifest["shards"]]


def _assert_same_content(store: TraceStore, ref: TraceStore) -> None:
    sids = [int(s) for s, _, _ in store.sequence_bounds()]
    assert len(sids) == len(set(sids)), "a sequence is stored twice"
    assert sorted(sids) == sorted(int(s) for s, _, _ in ref.sequence_bounds()), "a sequence is missing"
    assert store.num_tokens == ref.num_tokens
    order = np.argsort(store.seq_ids, kind="stable")
    ref_order = np.argsort(ref.seq_ids, kind="stable")
    assert np.array_equal(store.seq_ids[order], ref.seq_ids[ref_order])
    assert np.array_equal(store.positions[order], ref.positions[ref_order])
    assert np.array_equal(store.token_ids[order], ref.token_ids[ref_order])
    # batches differ after a resume (other padding), so allow kernel rounding in values
    assert (store.topk_ids()[order] == ref.topk_ids()[ref_order]).mean() > 0.999
    np.testing.assert_allclose(store.topk_weights()[order], ref.topk_weights()[ref_order], atol=1e-4)
    for layer in ref.hidden_layers:
        np.testing.assert_allclose(store.hidden(layer)[order].astype(np.float32),
                                   ref.hidden(layer)[ref_order].astype(np.float32), atol=2e-2)


@pytest.mark.slow
def test_cli_killed_mid_run_then_resumed(tmp_path):
    """SIGKILL the CLI after it wrote some shards, rerun it: every sequence exactly once."""
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "data_pipeline.collect", "--out", str(out), "--max-tokens", "6000",
           "--seq-len", "64", "--batch-size", "4", "--shard-sequences", "4", "--hidden-layers", "0,2",
           "--no-progress"]
    # one intra-op thread: with 2 OpenMP threads on a loaded 2-core box a forward can stall for minutes
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            shards = list((out / "shards").glob("shard-*.arrow")) if (out / "shards").exists() else []
            if len(shards) >= 3 or p.poll() is not None:
                break
            time.sleep(0.01)
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed; make it longer"
    partial = TraceStore(out)  # whatever is listed reads as whole
    assert 0 < partial.num_sequences and not partial.manifest["complete"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    store = TraceStore(out, verify_checksums=True)
    sids = [int(s) for s, _, _ in store.sequence_bounds()]
    assert len(sids) == len(set(sids)), "a sequence is stored twice"
    assert sorted(sids) == list(range(len(sids))), "a sequence is missing"
    assert store.num_tokens >= 6000 and store.manifest["complete"]
    assert not list((out / "shards").glob("*.tmp"))


def test_parse_hidden_layers():
    assert parse_hidden_layers("all", 3) == [0, 1, 2]
    assert parse_hidden_layers("none", 3) == []
    assert parse_hidden_layers("2, 0", 3) == [0, 2]
    for bad in ("5", "x"):
        with pytest.raises(UserError):
            parse_hidden_layers(bad, 3)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_out_folder_of_another_model_refused_untouched(tiny, tmp_path, gemma_csv):
    out = tmp_path / "gemma"
    import_routes(gemma_csv, out)
    before = _digest(out)
    with pytest.raises(TraceStoreError, match="already holds traces of google_gemma"):
        collect_traces(tiny, TEXTS, out, seq_len=16, batch_size=4, hidden_layers="none", progress=False)
    assert _digest(out) == before


def test_other_dataset_refused_untouched(tiny, tmp_path):
    out = tmp_path / "s"
    collect_traces(tiny, TEXTS[:3], out, seq_len=16, batch_size=4, hidden_layers="none", dataset_spec=_spec(),
                   progress=False)
    before = _digest(out)
    with pytest.raises(UserError, match="another dataset"):
        collect_traces(tiny, TEXTS, out, seq_len=16, batch_size=4, hidden_layers="none",
                       dataset_spec={"name": "other"}, progress=False)
    assert _digest(out) == before


@pytest.mark.parametrize("args,needle", [
    (["--model", "nobody-here/no-such-moe-xyz"], "no-such-moe-xyz"),
    (["--dataset", "nobody/no-such-dataset-xyz"], "no-such-dataset-xyz"),
])
def test_cli_bad_input_one_line_exit_2(tmp_path, args, needle):
    out = tmp_path / "t"
    r = subprocess.run([sys.executable, "-m", "data_pipeline.collect", "--out", str(out), *args],
                       cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0]
    assert not out.exists()
