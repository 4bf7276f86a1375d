"""The trace store: round trip, reader API, atomic shards and recovery, validation naming the bad file."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from core.model_info import ModelInfo
from data_pipeline.store_lock import StoreBusyError
from data_pipeline.trace_store import (
    MANIFEST_NAME,
    ShardFormat,
    TraceStore,
    TraceStoreError,
    TraceStoreWriter,
    open_store,
)

L, E, K, H = 3, 8, 2, 4
INFO = ModelInfo(model_id="toy", family="olmoe", num_layers=L, num_experts=E, top_k=K, hidden_size=H)


def make_rows(seq_ids, lengths, seed=0):
    """Deterministic per-token arrays for the given sequences (ids distinct within a token's top-k)."""
    rng = np.random.default_rng(seed)
    sid = np.repeat(np.asarray(seq_ids, dtype=np.int64), lengths)
    pos = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)
    n = len(sid)
    ids = np.stack([rng.permutation(E)[:K] for _ in range(n * L)]).reshape(n, L, K)
    w = np.sort(rng.random((n, L, K)).astype(np.float32), axis=-1)[..., ::-1].copy()
    return dict(
        seq_id=sid, position=pos, token_id=(sid * 100 + pos).astype(np.int32), phase=(pos >= 2).astype(np.int8),
        topk_ids=ids, topk_weights=w, router_logits=rng.standard_normal((n, L, E)).astype(np.float16),
        hidden={0: rng.standard_normal((n, H)).astype(np.float16), 2: rng.standard_normal((n, H)).astype(np.float16)},
    )


def write_store(path: Path, shards: list[tuple[list[int], list[int]]], finalize: bool = True):
    w = TraceStoreWriter(path, INFO, hidden_layers=[0, 2], store_router_logits=True, dataset={"name": "t"})
    all_rows = []
    for i, (sids, lens) in enumerate(shards):
        rows = make_rows(sids, lens, seed=i)
        w.write_shard(**rows)
        all_rows.append(rows)
    return (w.finalize() if finalize else w), all_rows


def digest(folder: Path) -> dict[str, str]:
    """Content of a store folder (the writer lock's pid aside): equal before and after a refused write."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "writer.lock"}


def edit_manifest(path: Path, change) -> dict:
    """Edit a manifest by hand, as a user would: without its checksum entry, which would refuse the edit."""
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    manifest.pop("checksum", None)
    change(manifest)
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    return manifest


def test_round_trip_and_reader_api(tmp_path):
    store, rows = write_store(tmp_path / "s", [([0, 1], [4, 3]), ([5], [2])])
    assert store.num_tokens == 9 and store.num_sequences == 3 and len(store) == 9
    assert store.manifest["complete"] and store.manifest["num_tokens"] == 9 and store.manifest["num_sequences"] == 3
    cat = {k: np.concatenate([r[k] for r in rows]) for k in ("seq_id", "topk_ids", "topk_weights", "router_logits")}
    assert np.array_equal(store.seq_ids, cat["seq_id"])
    assert np.array_equal(store.topk_ids(), cat["topk_ids"])
    assert np.array_equal(store.topk_weights([2]), cat["topk_weights"][:, [2]])
    assert np.array_equal(store.router_logits([0, 1]), cat["router_logits"][:, :2])
    assert np.array_equal(store.hidden(2), np.concatenate([r["hidden"][2] for r in rows]))
    assert store.sequence_bounds().tolist() == [[0, 0, 4], [1, 4, 7], [5, 7, 9]]
    seq = store.sequence(1, layers=[1])
    assert seq.seq_id == 1 and len(seq) == 3 and seq.topk_ids.shape == (3, 1, K)
    assert np.array_equal(seq.topk_ids[:, 0], cat["topk_ids"][4:7, 1])
    assert np.array_equal(seq.hidden[0], rows[0]["hidden"][0][4:7])
    last = store.sequence(2)  # lives in the second shard
    assert np.array_equal(last.token_ids, [500, 501]) and np.array_equal(last.router_logits, cat["router_logits"][7:9])
    assert [s.seq_id for s in store.iter_sequences(hidden=False)] == [0, 1, 5]
    tok = store.token(8)
    assert tok["seq_id"] == 5 and tok["position"] == 1 and tok["phase"] == 0
    assert np.array_equal(tok["topk_ids"], cat["topk_ids"][8]) and tok["hidden_2"].shape == (H,)
    with pytest.raises(IndexError):
        store.token(9)
    with pytest.raises(TraceStoreError, match="layer 3 is out of range"):
        store.topk_ids([3])
    with pytest.raises(TraceStoreError, match="no hidden states for layer 1"):
        store.hidden(1)
    assert open_store(tmp_path / "s", verify_checksums=True).fingerprint() == store.fingerprint()


def test_rank_order_and_dtypes_kept(tmp_path):
    store, rows = write_store(tmp_path / "s", [([0], [3])])
    assert store.topk_ids().dtype == np.int16 and store.topk_weights().dtype == np.float32
    assert store.router_logits().dtype == np.float16 and store.hidden(0).dtype == np.float16
    assert (np.diff(store.topk_weights(), axis=-1) <= 0).all()  # written highest first, read back so


def test_rows_sorted_by_sequence_and_position(tmp_path):
    w = TraceStoreWriter(tmp_path / "s", INFO)
    rows = make_rows([3, 1], [2, 2])
    perm = np.array([3, 0, 2, 1])
    w.write_shard(**{k: v[perm] for k, v in rows.items() if k not in ("hidden", "router_logits")})
    store = w.finalize()
    assert store.seq_ids.tolist() == [1, 1, 3, 3] and store.positions.tolist() == [0, 1, 0, 1]


def test_duplicate_sequence_refused(tmp_path):
    w, _ = write_store(tmp_path / "s", [([0, 1], [2, 2])], finalize=False)
    with pytest.raises(TraceStoreError, match="already stored"):
        w.write_shard(**make_rows([1], [2]))


def test_resume_skips_done_and_recovers_shards(tmp_path):
    path = tmp_path / "s"
    write_store(path, [([0, 1], [2, 2]), ([2], [3])], finalize=False)
    shard_dir = path / "shards"
    # a run killed mid-write leaves a .tmp, and one killed between rename and manifest leaves the pending shard
    (shard_dir / "shard-00009.arrow.123-abcd.tmp").write_bytes(b"half a shard")
    good = shard_dir / "shard-00001.arrow"

    def killed_after_rename(m):
        m["pending"] = m["shards"].pop(1)

    edit_manifest(path, killed_after_rename)
    (shard_dir / "shard-00007.arrow").write_bytes(good.read_bytes()[:100])  # truncated, never listed
    w = TraceStoreWriter(path, INFO, hidden_layers=[0, 2], store_router_logits=True)
    assert w.done_sequences == {0, 1, 2}  # the pending whole shard is adopted
    assert not (shard_dir / "shard-00009.arrow.123-abcd.tmp").exists() and not (shard_dir / "shard-00007.arrow").exists()
    assert "pending" not in w.manifest
    w.write_shard(**make_rows([3], [1]))
    store = w.finalize()
    assert sorted(store.sequence_bounds()[:, 0].tolist()) == [0, 1, 2, 3] and store.num_tokens == 8


def test_unlisted_shard_not_pending_is_dropped_not_adopted(tmp_path, capsys):
    """A shard the manifest does not name as pending (another writer's) never joins: no sequence twice."""
    path = tmp_path / "s"
    write_store(path, [([0, 1], [2, 2])])
    rogue = path / "shards" / "shard-00005.arrow"
    rogue.write_bytes((path / "shards" / "shard-00000.arrow").read_bytes())  # the same sequences again
    w = TraceStoreWriter(path, INFO, hidden_layers=[0, 2], store_router_logits=True)
    assert not rogue.exists() and w.done_sequences == {0, 1}
    assert "dropped unlisted shard shards/shard-00005.arrow" in capsys.readouterr().err
    store = w.finalize()
    assert store.num_sequences == 2 and store.num_tokens == 4


@pytest.mark.parametrize("spoil", ["checksum", "already_stored"])
def test_pending_shard_adopted_only_when_it_agrees(tmp_path, spoil):
    path = tmp_path / "s"
    write_store(path, [([0], [2]), ([1], [2])], finalize=False)

    def killed_after_rename(m):
        m["pending"] = m["shards"].pop(1)
        if spoil == "checksum":
            m["pending"]["sha256"] = "0" * 64
        else:  # its sequence is already listed in another shard
            m["shards"][0]["file"], m["pending"]["file"] = m["pending"]["file"], m["shards"][0]["file"]
            m["shards"][0].update({k: m["pending"][k] for k in ("rows", "sha256", "seq_ids_sha256")})

    edit_manifest(path, killed_after_rename)
    if spoil == "already_stored":  # make shard 0 hold what the pending one holds
        (path / "shards" / "shard-00000.arrow").write_bytes((path / "shards" / "shard-00001.arrow").read_bytes())
    w = TraceStoreWriter(path, INFO, hidden_layers=[0, 2], store_router_logits=True)
    assert len(w.manifest["shards"]) == 1 and len(w.done_sequences) == 1
    assert len(list((path / "shards").glob("*.arrow"))) == 1


def test_writer_lock_refuses_a_second_writer_naming_the_pid(tmp_path):
    path = tmp_path / "s"
    w, _ = write_store(path, [([0], [2])], finalize=False)
    before = digest(path)
    with pytest.raises(StoreBusyError, match=f"being written by another process \\(pid {os.getpid()}\\)"):
        TraceStoreWriter(path, INFO, hidden_layers=[0, 2], store_router_logits=True)
    assert digest(path) == before
    w.finalize()  # releases the lock: the next writer resumes
    TraceStoreWriter(path, INFO, hidden_layers=[0, 2], store_router_logits=True).close()


def test_other_model_refused_and_untouched(tmp_path):
    path = tmp_path / "s"
    write_store(path, [([0], [2])])
    before = digest(path)
    other = ModelInfo(model_id="other", family="mixtral", num_layers=L, num_experts=E, top_k=K, hidden_size=H)
    with pytest.raises(TraceStoreError, match="already holds traces of toy"):
        TraceStoreWriter(path, other)
    with pytest.raises(TraceStoreError, match="other --hidden-layers"):
        TraceStoreWriter(path, INFO, hidden_layers=[1], store_router_logits=True)
    assert digest(path) == before


def test_non_store_folder_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(TraceStoreError, match="not empty and is not a trace store"):
        TraceStoreWriter(tmp_path, INFO)
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / "shards").exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete"])
def test_bad_shard_names_the_file(tmp_path, damage):
    path = tmp_path / "s"
    write_store(path, [([0], [2]), ([1], [2])])
    shard = path / "shards" / "shard-00001.arrow"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "garbage":
        shard.write_bytes(b"\x00" * 64)
    else:
        shard.unlink()
    before = digest(path)
    with pytest.raises(TraceStoreError) as e:
        TraceStore(path)
    msg = str(e.value)
    assert "shard-00001.arrow" in msg and "\n" not in msg
    with pytest.raises(TraceStoreError):  # resuming refuses too, and damages nothing
        TraceStoreWriter(path, INFO, hidden_layers=[0, 2], store_router_logits=True)
    assert digest(path) == before


def test_checksum_and_row_count_checks(tmp_path):
    path = tmp_path / "s"
    write_store(path, [([0], [2])])
    edit_manifest(path, lambda m: m["shards"][0].update(sha256="0" * 64))
    store = TraceStore(path)  # opening reads only the schema; the first data read checks the checksum
    with pytest.raises(TraceStoreError, match="does not match its checksum"):
        store.topk_ids()
    assert TraceStore(path, verify_on_read=False).topk_ids().shape == (2, L, K)
    with pytest.raises(TraceStoreError, match="does not match its checksum"):
        TraceStore(path, verify_checksums=True)
    edit_manifest(path, lambda m: m["shards"][0].update(rows=5))
    with pytest.raises(TraceStoreError, match="holds 2 rows but the manifest says 5"):
        TraceStore(path)


def test_bad_manifest(tmp_path):
    with pytest.raises(TraceStoreError, match="does not exist"):
        TraceStore(tmp_path / "nope")
    tmp_path.joinpath("m").mkdir()
    with pytest.raises(TraceStoreError, match="manifest.json is missing"):
        TraceStore(tmp_path / "m")
    (tmp_path / "m" / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(TraceStoreError, match="not valid JSON"):
        TraceStore(tmp_path / "m")
    (tmp_path / "m" / MANIFEST_NAME).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(TraceStoreError, match="format_version 99"):
        TraceStore(tmp_path / "m")


def test_schema_mismatch_named(tmp_path):
    path = tmp_path / "s"
    write_store(path, [([0], [2])])
    edit_manifest(path, lambda m: m["model"].update(num_experts=16))  # router_logits width no longer matches
    with pytest.raises(TraceStoreError, match="shard-00000.arrow column 'router_logits'"):
        TraceStore(path)


def test_router_weights_round_trip(tmp_path):
    w = TraceStoreWriter(tmp_path / "s", INFO)
    assert not TraceStore(tmp_path / "s").has_router_weights
    mats = {i: np.full((E, H), i, dtype=np.float32) for i in range(L)}
    w.save_router_weights(mats)
    store = w.finalize()
    with pytest.raises(TraceStoreError, match="closed"):  # the lock is gone: no more writes through it
        w.save_router_weights(mats)
    got = store.router_weights()
    assert sorted(got) == [0, 1, 2] and np.array_equal(got[2], mats[2])
    (tmp_path / "s" / "router_weights.safetensors").write_bytes(b"junk")
    with pytest.raises(TraceStoreError, match="router_weights.safetensors does not match its checksum"):
        store.router_weights()
    edit_manifest(tmp_path / "s", lambda m: m.pop("router_weights_sha256"))  # an older store: no checksum
    with pytest.raises(TraceStoreError, match="router_weights.safetensors is corrupt"):
        TraceStore(tmp_path / "s").router_weights()


def test_empty_store(tmp_path):
    store = TraceStoreWriter(tmp_path / "s", INFO).finalize()
    assert store.num_tokens == 0 and store.num_sequences == 0 and list(store.iter_sequences()) == []


# ---------------------------------------------------------------------------------- staged shards (distributed writers)
def _format(path: Path, **kw) -> ShardFormat:
    return ShardFormat(path, INFO, hidden_layers=kw.pop("hidden_layers", [0, 2]), store_router_logits=True, **kw)


def test_staged_shard_is_adopted_only_by_the_lock_holder_and_reads_as_written(tmp_path):
    path = tmp_path / "s"
    w = TraceStoreWriter(path, INFO, hidden_layers=[0, 2], store_router_logits=True)
    rows = make_rows([5, 3], [2, 3], seed=1)
    staged = _format(path).stage(**rows, index=7)  # another process: no lock, no manifest change
    assert (path / "shards" / staged.tmp_name).exists() and staged.tmp_name.endswith(".tmp")
    assert TraceStore(path).num_tokens == 0
    final = w.adopt(staged)
    assert final.name == "shard-00007.arrow" and not (path / "shards" / staged.tmp_name).exists()
    store = w.finalize()
    assert store.num_tokens == 5 and sorted(store.manifest["shards"][0]) == sorted(
        ["file", "rows", "sequences", "sha256", "seq_ids_sha256"])
    order = np.lexsort((rows["position"], rows["seq_id"]))
    assert np.array_equal(store.topk_ids().reshape(5, -1), rows["topk_ids"].reshape(5, -1)[order])
    assert np.array_equal(store.hidden(2), rows["hidden"][2][order])


def _flip_last_byte(p: Path) -> None:
    raw = bytearray(p.read_bytes())
    raw[-20] ^= 0xFF
    p.write_bytes(bytes(raw))


@pytest.mark.parametrize("spoil,needle", [
    ("bytes", "does not match the checksum its writer reported"),
    ("claims", "holds other sequences than its writer reported"),
    ("stored", "is already stored"),
    ("columns", "does not hold this store's columns"),
    ("name", "is not the name of a staged shard"),
    ("gone", "is missing"),
])
def test_adopt_refuses_a_staged_shard_that_is_not_what_it_claims(tmp_path, spoil, needle):
    path = tmp_path / "s"
    w = TraceStoreWriter(path, INFO, hidden_layers=[0, 2], store_router_logits=True)
    w.write_shard(**make_rows([0], [2]))
    before = digest(path)
    rows = make_rows([1, 2], [2, 2], seed=3)
    if spoil == "columns":
        rows["hidden"] = {0: rows["hidden"][0]}
        staged = _format(path, hidden_layers=[0]).stage(**rows)
    else:
        staged = _format(path).stage(**({**make_rows([0], [2], seed=4)} if spoil == "stored" else rows))
    tmp = path / "shards" / staged.tmp_name
    if spoil == "bytes":
        _flip_last_byte(tmp)
    elif spoil == "claims":
        staged = dataclasses.replace(staged, seq_ids=[1, 9])
    elif spoil == "name":
        staged = dataclasses.replace(staged, tmp_name="../manifest.json")
    elif spoil == "gone":
        tmp.unlink()
    with pytest.raises(TraceStoreError, match=needle):
        w.adopt(staged)
    if spoil == "name":  # the claim named another file: that one is untouched, the staged one is the caller's
        assert (path / MANIFEST_NAME).exists()
        tmp.unlink()
    assert digest(path) == before  # nothing joined, and the refused file is gone
    assert w.finalize().num_sequences == 1


def test_content_digest_depends_on_rows_not_on_shard_layout(tmp_path):
    rows = make_rows([0, 1, 2, 3], [2, 3, 1, 2], seed=5)

    def part(sids):
        keep = np.isin(rows["seq_id"], sids)
        return {k: ({i: h[keep] for i, h in v.items()} if k == "hidden" else v[keep]) for k, v in rows.items()}

    def store(name, layout, index=None):
        w = TraceStoreWriter(tmp_path / name, INFO, hidden_layers=[0, 2], store_router_logits=True)
        for i, sids in enumerate(layout):
            w.write_shard(**part(sids), index=None if index is None else index[i])
        return w.finalize()

    one = store("one", [[0, 1, 2, 3]])
    split = store("split", [[2, 3], [0], [1]], index=[5, 0, 3])  # written out of order, other names
    assert [e["file"] for e in split.manifest["shards"]] == ["shards/shard-00000.arrow", "shards/shard-00003.arrow",
                                                             "shards/shard-00005.arrow"]  # listed by sequence
    assert one.content_digest() == split.content_digest()
    rows["topk_weights"][3, 1, 0] += 1e-3  # one value of one row
    assert store("changed", [[0, 1, 2, 3]]).content_digest() != one.content_digest()


def test_content_digest_reads_a_store_listed_out_of_sequence_order(tmp_path):
    """A store whose listing is not by sequence (edited by hand, or written before listings were sorted)."""
    s, _ = write_store(tmp_path / "s", [([2, 3], [1, 2]), ([0, 1], [2, 1])])
    want = s.content_digest()
    edit_manifest(tmp_path / "s", lambda m: m["shards"].reverse())
    shuffled = TraceStore(tmp_path / "s")
    assert shuffled.sequence_bounds()[0, 0] == 2 and shuffled.content_digest() == want
