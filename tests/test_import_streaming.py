"""The streaming importer: a file read in small blocks and checked in small groups imports exactly as read whole;
faults in late blocks keep their line numbers and leave no store change and no temporary file; an import stopped
while committing is finished by a rerun."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest
from reliability_helpers import assert_same, no_partial_files, snapshot

from core.errors import UserError
from data_pipeline import import_routes as imp
from data_pipeline.trace_store import TraceStore, TraceStoreWriter

SMALL = {"block_bytes": 200, "group_rows": 20, "shard_rows": 30}  # many blocks, groups (whole sequences), shards


def generic_rows(n_seq: int = 6, steps: int = 5, layers: int = 3, k: int = 2, seed: int = 0) -> list[str]:
    """Rows of several sequences, interleaved as a serving log writes them (request by request, step by step)."""
    rng = random.Random(seed)
    rows = []
    for step in range(steps):
        for seq in rng.sample(range(n_seq), n_seq):
            for layer in range(layers):
                for expert in rng.sample(range(16), k):
                    phase = "prefill" if step < 2 else "decode"
                    rows.append(f"{seq * 7},{step},{phase},{layer},{expert},{rng.random():.4f},w{(seq + step) % 5}\n")
    return rows


def write_csv(path: Path, rows: list[str]) -> Path:
    path.write_text("seq,step,phase,layer,expert,weight,token\n" + "".join(rows))
    return path


def no_spill(out: Path) -> None:
    assert not list(out.rglob("*.spill")), "a spill folder was left behind"
    no_partial_files(out)


@pytest.mark.parametrize("open_runs", [64, 2], ids=["chained", "merged"])
def test_small_blocks_and_groups_import_as_the_whole_file(tmp_path, monkeypatch, open_runs):
    """``merged``: at most 2 runs open, so the overlapping runs of the interleaved log are merged first."""
    monkeypatch.setattr(imp, "MAX_OPEN_RUNS", open_runs)
    rows = generic_rows()
    csv = write_csv(tmp_path / "r.csv", rows)
    whole = imp.import_routes(csv, tmp_path / "whole")
    merges = []
    real = imp._fewer_runs

    def counted(spill, group_rows):
        chains = real(spill, group_rows)
        merges.append(spill.merges)
        return chains

    monkeypatch.setattr(imp, "_fewer_runs", counted)
    streamed = imp.import_routes(csv, tmp_path / "streamed", **SMALL)
    assert (merges[0] > 0) == (open_runs == 2)
    assert len(whole.manifest["shards"]) == 1 and len(streamed.manifest["shards"]) > 3
    assert streamed.content_digest() == whole.content_digest()
    first_seen = list(dict.fromkeys(r.strip().split(",")[-1] for r in rows))
    assert streamed.vocab() == whole.vocab() == first_seen
    assert streamed.sequence_bounds()[:, 0].tolist() == [0, 7, 14, 21, 28, 35]  # stored in sequence order
    no_spill(tmp_path / "streamed")
    gz = tmp_path / "r.csv.gz"
    gz.write_bytes(gzip.compress(csv.read_bytes()))
    assert imp.import_routes(gz, tmp_path / "gz", model_id="r", **SMALL).content_digest() == whole.content_digest()


def test_jsonl_small_blocks_and_a_key_seen_late(tmp_path):
    rows = [dict(zip(["seq", "step", "phase", "layer", "expert", "weight"], r.split(",")[:6], strict=True))
            for r in generic_rows(n_seq=3)]
    text = "".join(json.dumps({**r, "weight": float(r["weight"])}) + "\n" for r in rows)
    path = tmp_path / "r.jsonl"
    path.write_text(text)
    whole = imp.import_routes(path, tmp_path / "whole")
    assert imp.import_routes(path, tmp_path / "streamed", **SMALL).content_digest() == whole.content_digest()
    # "weight" first appears after the first block: the rows before lack it, named at the first row
    late = "".join(json.dumps({k: v for k, v in r.items() if k != "weight"}) + "\n" for r in rows[:10]) + text
    path.write_text(late)
    for kw in ({}, SMALL):
        with pytest.raises(UserError, match=r"line 1: weight '' is not a finite number"):
            imp.import_routes(path, tmp_path / "late", **kw)
    assert not (tmp_path / "late").exists()


def test_route_trace_small_blocks_keep_pruning(gemma_csv, gemma_store, tmp_path):
    lines = gemma_csv.read_text().splitlines(keepends=True)
    pruned = tmp_path / "pruned.csv"  # prefill steps 0..27 without their last-layer rows, as llama.cpp logs them
    pruned.write_text("".join(ln for ln in lines if not (ln[0].isdigit() and ln.split(",")[1] == "0"
                                                          and ln.split(",")[3] == "29" and int(ln.split(",")[2]) < 28)))
    whole = imp.import_routes(pruned, tmp_path / "whole")
    streamed = imp.import_routes(pruned, tmp_path / "streamed", block_bytes=4096, group_rows=100)
    assert streamed.content_digest() == whole.content_digest()
    assert streamed.manifest["skipped_routes"] == whole.manifest["skipped_routes"] == {
        "reason": imp.PRUNED_REASON, "layers": [29], "rows": 28}
    assert np.array_equal(imp.import_routes(gemma_csv, tmp_path / "full", block_bytes=4096).topk_ids(),
                          gemma_store.topk_ids())


@pytest.mark.parametrize("fault,needle", [
    ("value", "line {n}: expert 'x' is not a whole number"),
    ("repeat", r"line {n}: seq \d+ step 4 layer 2 repeats expert \d+ \(first at line {m}\)"),
    ("missing", r"has 1 expert\(s\) at layer 2, not 2"),
])
def test_a_fault_in_a_late_block_or_group_changes_nothing(tmp_path, fault, needle):
    rows = generic_rows()
    good = write_csv(tmp_path / "good.csv", rows[:36])  # step 0 of every sequence
    store = imp.import_routes(good, tmp_path / "store", model_id="r", **SMALL)  # an existing store the bad file resumes
    before = snapshot(tmp_path / "store")
    last = len(rows) + 1  # the file line of the last row
    if fault == "value":
        rows[-1] = rows[-1].replace(f",{rows[-1].split(',')[4]},", ",x,", 1)
    elif fault == "repeat":
        rows.append(rows[-1])
        last += 1
    else:
        rows.pop()
    bad = write_csv(tmp_path / "bad.csv", rows)
    for out in (tmp_path / "store", tmp_path / "new"):
        with pytest.raises(UserError, match=needle.format(n=last, m=last - 1)):
            imp.import_routes(bad, out, model_id="r", **SMALL)
    assert not (tmp_path / "new").exists()
    assert_same(snapshot(tmp_path / "store"), before)
    assert TraceStore(tmp_path / "store").manifest["shards"] == store.manifest["shards"]
    no_spill(tmp_path / "store")


def test_import_stopped_while_committing_then_rerun(tmp_path, monkeypatch):
    csv = write_csv(tmp_path / "r.csv", generic_rows())
    want = imp.import_routes(csv, tmp_path / "ref", **SMALL)
    real, calls = TraceStoreWriter.adopt, {"n": 0}

    def stopped(self, staged, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, staged, **kw)

    monkeypatch.setattr(TraceStoreWriter, "adopt", stopped)
    with pytest.raises(KeyboardInterrupt):
        imp.import_routes(csv, tmp_path / "s", **SMALL)
    partial = TraceStore(tmp_path / "s")
    assert len(partial.manifest["shards"]) == 2 and not partial.manifest["complete"]
    no_spill(tmp_path / "s")
    monkeypatch.undo()
    (tmp_path / "s" / "shards" / "import-999999-0badcafe.spill").mkdir()  # left by an import that was killed
    again = imp.import_routes(csv, tmp_path / "s", **SMALL)
    assert again.content_digest() == want.content_digest() and again.manifest["complete"]
    no_spill(tmp_path / "s")
