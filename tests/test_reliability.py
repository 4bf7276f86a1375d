"""Issue 11, "nothing lost, nothing silently wrong": one test per row of the issue's table that lives in
data_pipeline/, predictors/, train.py and the shared CLI runner (the offload/ rows are tested there).

Every failing case asserts exit code 2, one ``error:`` line without a traceback, and that the store
reads back equal to before (and no partial file is left).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from reliability_helpers import (
    assert_same,
    cli_error,
    disk_full_on_save_file,
    disk_full_on_shard_write,
    no_partial_files,
    poke,
    read_only,
    snapshot,
)
from test_collect import _assert_same_content

import evaluate
import train
from core.errors import run_cli
from data_pipeline import collect, import_routes, inspect_store
from data_pipeline.models import load_model
from data_pipeline.store_lock import StoreLock
from data_pipeline.text_sources import load_texts
from data_pipeline.trace_store import MANIFEST_NAME, TraceStore, TraceStoreError
from predictors import reuse_training
from predictors.checkpoint import latest_checkpoint
from predictors.frequency import FrequencyPredictor

REPO = Path(__file__).resolve().parents[1]
QUIET = ["--wandb.mode", "disabled", "--trainer.enable_progress_bar", "false", "--threads", "1"]
COLLECT = ["--max-tokens", "400", "--seq-len", "32", "--batch-size", "4", "--shard-sequences", "4",
           "--hidden-layers", "0", "--no-progress"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-olmoe")


@pytest.fixture
def model_loaded(monkeypatch, tiny):
    """The collect CLI in-process, with the model loaded once for the module."""
    monkeypatch.setattr("data_pipeline.models.load_model", lambda *args, **kwargs: tiny)


@pytest.fixture(scope="module")
def template(tiny, tmp_path_factory) -> Path:
    """A small store collected by the collect CLI (3 shards, hidden states of layer 0)."""
    out = tmp_path_factory.mktemp("template") / "store"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("data_pipeline.models.load_model", lambda *args, **kwargs: tiny)
        run_cli(collect.main, ["--out", str(out), *COLLECT])
    assert len(TraceStore(out).manifest["shards"]) >= 3
    return out


@pytest.fixture
def store(template, tmp_path) -> Path:
    out = tmp_path / "store"
    shutil.copytree(template, out)
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "writer.lock"}


# ---------------------------------------------------------------------------------- two writers
@pytest.mark.slow
def test_two_collects_into_one_out_one_refuses_at_once(tiny, tmp_path):
    """Started together: one runs, the other refuses at once naming its pid; the store equals an uninterrupted run."""
    out = tmp_path / "demo"
    args = ["--max-tokens", "600", "--seq-len", "32", "--batch-size", "4", "--shard-sequences", "4",
            "--hidden-layers", "0", "--no-progress"]
    cmd = [sys.executable, "-m", "data_pipeline.collect", "--out", str(out), *args]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        first = None
        deadline = time.time() + 300
        while first is None and time.time() < deadline:
            first = next((p for p in procs if p.poll() is not None), None)
            time.sleep(0.02)
        assert first is not None, "neither collect finished"
        other = procs[1 - procs.index(first)]
        still_running = other.poll() is None
        outs = {p.pid: p.communicate(timeout=300) for p in procs}
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
    # the refused one finished first, while the winner was still collecting
    assert first.returncode == 2 and still_running and other.returncode == 0, outs
    err = [line for line in outs[first.pid][1].splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and f"(pid {other.pid})" in err[0], err
    ref = collect.collect_traces(tiny, load_texts("demo"), tmp_path / "ref", max_tokens=600, seq_len=32,
                                 batch_size=4, hidden_layers=[0], shard_sequences=4, progress=False)
    got = TraceStore(out, verify_checksums=True)
    _assert_same_content(got, ref)
    assert got.manifest["complete"] and len(got.manifest["runs"]) == 1
    no_partial_files(out)


def test_leftover_shards_of_another_writer_are_not_adopted_on_rerun(store, model_loaded, capsys):
    """Shards another writer left (duplicates of stored sequences, or unknown to the manifest) never join."""
    before = snapshot(store)
    shards = sorted((store / "shards").glob("shard-*.arrow"))
    for i, shard in enumerate(shards):  # leftovers holding sequences that are already stored
        shutil.copy(shard, store / "shards" / f"shard-{90 + i:05d}.arrow")
    run_cli(collect.main, ["--out", str(store), *COLLECT])  # an ordinary rerun: nothing left to do
    err = capsys.readouterr().err
    assert err.count("dropped unlisted shard") == len(shards)
    assert_same(snapshot(store), before)
    run_cli(inspect_store.main, [str(store), "--verify", "--json"])  # passes, and holds every sequence once
    assert sorted((store / "shards").glob("shard-*.arrow")) == shards


def test_a_second_writer_refused_while_the_first_holds_the_lock(store, tiny, capsys):
    before = _files(store)
    with StoreLock(store):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("data_pipeline.models.load_model", lambda *a, **k: pytest.fail("loaded the model first"))
            line = cli_error(collect.main, ["--out", str(store), *COLLECT], capsys)
        assert f"being written by another process (pid {os.getpid()})" in line
        good = store.parent / "good.csv"
        good.write_text("seq,step,phase,layer,expert\n0,0,0,0,1\n")
        assert "being written by another process" in cli_error(import_routes.main, [str(good), "--out", str(store)],
                                                                capsys)
    assert _files(store) == before


# ---------------------------------------------------------------------------------- strict imports
GOOD = ("seq,step,phase,layer,expert,weight\n"
        "0,0,prefill,0,5,0.6\n0,0,prefill,0,2,0.4\n0,0,prefill,1,7,0.9\n0,0,prefill,1,1,0.1\n"
        "0,1,decode,0,3,0.5\n0,1,decode,0,4,0.5\n0,1,decode,1,0,0.7\n0,1,decode,1,6,0.3\n")
ROUTE_TRACE = ("# route_trace v1\n# model=/m/toy.gguf arch=toy n_layer=2 n_expert=8 n_expert_used=2\n"
               "turn,phase,step,layer,slot,expert,weight,residency,expert_bytes\n"
               "0,0,0,0,0,5,0.6,0,1\n0,0,0,0,1,2,0.4,0,1\n0,0,0,1,0,7,0.9,0,1\n0,0,0,1,1,1,0.1,0,1\n")


def _jsonl(csv_text: str) -> str:
    lines = csv_text.splitlines()
    keys = lines[0].split(",")
    rows = [dict(zip(keys, line.split(","), strict=True)) for line in lines[1:]]
    for r in rows:
        for k in ("seq", "step", "layer", "expert"):
            r[k] = int(r[k])
        r["weight"] = float(r["weight"])
    return "".join(json.dumps(r) + "\n" for r in rows)


BAD_IMPORTS = {
    "every row twice": ("r.csv", GOOD + GOOD.split("\n", 1)[1], "line 10: seq 0 step 0 layer 0 repeats expert 5"),
    "expert id 70001": ("r.csv", GOOD.replace(",0,5,0.6", ",0,70001,0.6"), "line 2: expert 70001 is outside 0..32766"),
    "expert 3.7": ("r.csv", GOOD.replace(",0,5,0.6", ",0,3.7,0.6"), "line 2: expert '3.7' is not a whole number"),
    "expert abc (CSV)": ("r.csv", GOOD.replace(",1,7,0.9", ",1,abc,0.9"), "line 4: expert 'abc' is not a whole number"),
    "expert abc (JSONL)": ("r.jsonl", _jsonl(GOOD).replace('"expert": 7', '"expert": "abc"'),
                           "line 3: expert 'abc' is not a whole number"),
    "expert abc (route_trace)": ("r.csv", ROUTE_TRACE.replace(",0,1,2,0.4", ",0,1,x2,0.4"),
                                 "line 5: expert 'x2' is not a whole number"),
    "JSONL line holding a list": ("r.jsonl", _jsonl(GOOD) + "[0, 0, 0, 0, 1]\n",
                                  "line 9 holds a JSON list, not an object"),
    "weight nan": ("r.csv", GOOD.replace("0.9\n", "nan\n"), "line 4: weight 'nan' is not a finite number"),
    "negative weight": ("r.csv", GOOD.replace("0.9\n", "-0.9\n"), "line 4: weight '-0.9' is negative"),
    "last line cut inside the weight": ("r.csv", GOOD[:-3], "line 9 does not end with a newline"),
    "last route_trace line cut": ("r.csv", ROUTE_TRACE[:-8], "line 7 does not end with a newline"),
    "route_trace line cut, newline kept": ("r.csv", ROUTE_TRACE[:-8] + "\n", "line 7 has 7 fields, not 9"),
    "JSONL last line cut": ("r.jsonl", _jsonl(GOOD)[:-12], "line 8 is not valid JSON"),
    "a token's rows disagree on the phase": ("r.csv", GOOD.replace("0,0,prefill,1,1,0.1", "0,0,decode,1,1,0.1"),
                                             "seq 0 step 0 is marked both prefill and decode"),
    "an expert missing": ("r.csv", GOOD.replace("0,1,decode,1,6,0.3\n", ""), "has 1 expert(s) at layer 1, not 2"),
}


@pytest.fixture
def imported(tmp_path) -> Path:
    good = tmp_path / "good.csv"
    good.write_text(GOOD)
    out = tmp_path / "imported"
    import_routes.import_routes(good, out, model_id="r", num_experts=8)
    return out


@pytest.mark.parametrize("case", list(BAD_IMPORTS))
def test_bad_import_one_line_with_the_line_number(case, tmp_path, imported, capsys):
    name, text, needle = BAD_IMPORTS[case]
    bad = tmp_path / name
    bad.write_text(text)
    line = cli_error(import_routes.main, [str(bad), "--out", str(tmp_path / "new")], capsys)
    assert needle in line and str(bad) in line, line
    assert not (tmp_path / "new").exists()  # nothing left behind, not even a lock file
    before = snapshot(imported)  # an existing store is left as it was
    line = cli_error(import_routes.main, [str(bad), "--out", str(imported), "--model-id", "r"], capsys)
    assert needle in line
    assert_same(snapshot(imported), before)


def test_import_options_refused_out_of_range(tmp_path, capsys):
    good = tmp_path / "good.csv"
    good.write_text(GOOD)
    for args, needle in ((["--num-experts", "4"], "line 2: expert 5 is outside 0..3 (--num-experts 4)"),
                         (["--num-experts", "40000"], "outside 1..32767"),
                         (["--expert-bytes", "abc"], "not a size"), (["--expert-bytes", "0"], "positive")):
        assert needle in cli_error(import_routes.main, [str(good), "--out", str(tmp_path / "o"), *args], capsys)
        assert not (tmp_path / "o").exists()
    rt = tmp_path / "rt.csv"
    rt.write_text(ROUTE_TRACE)
    assert "disagrees with the header" in cli_error(
        import_routes.main, [str(rt), "--out", str(tmp_path / "o"), "--num-experts", "16"], capsys)


def test_expert_bytes_let_a_generic_store_be_simulated_in_bytes(tmp_path, capsys):
    good = tmp_path / "good.csv"
    good.write_text(GOOD)
    run_cli(import_routes.main, [str(good), "--out", str(tmp_path / "s"), "--num-experts", "8",
                                 "--expert-bytes", "12MiB"])
    store = TraceStore(tmp_path / "s")
    assert store.model.expert_bytes == 12 * 2**20 and store.model.layer_expert_bytes is None
    capsys.readouterr()
    assert evaluate.main(["--trace", str(tmp_path / "s"), "--policy", "lru", "--capacity", "48MiB"]) == 0
    assert "lru" in capsys.readouterr().out


def test_token_column_ids_strings_and_conflicts(tmp_path, capsys):
    ids = tmp_path / "ids.csv"
    ids.write_text(GOOD.replace("seq,step,phase,layer,expert,weight", "seq,step,phase,layer,expert,weight,token")
                   .replace("0.6\n", "0.6,17\n").replace("0.4\n", "0.4,17\n").replace("0.9\n", "0.9,17\n")
                   .replace("0.1\n", "0.1,17\n").replace("0.5\n", "0.5,4\n").replace("0.7\n", "0.7,4\n")
                   .replace("0.3\n", "0.3,4\n"))
    s = import_routes.import_routes(ids, tmp_path / "a")
    assert s.token_ids.tolist() == [17, 4] and not s.has_vocab
    words = tmp_path / "words.jsonl"
    words.write_text("".join(json.dumps({**json.loads(r), "token": ["Hi", " there"][json.loads(r)["step"]]}) + "\n"
                             for r in _jsonl(GOOD).splitlines()))
    s = import_routes.import_routes(words, tmp_path / "b")
    assert s.token_ids.tolist() == [0, 1] and s.vocab() == ["Hi", " there"] and s.manifest["vocab"] == "vocab.json"
    assert TraceStore(tmp_path / "a").token_ids.tolist() == [17, 4]
    bad = tmp_path / "bad.csv"
    bad.write_text(ids.read_text().replace("0.1,17\n", "0.1,18\n"))
    assert "line 5: this row's token differs" in cli_error(import_routes.main, [str(bad), "--out", str(tmp_path / "c")],
                                                             capsys)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(words.read_text().replace('"token": "Hi"', '"token": 3', 1))
    assert "mixes integer ids and strings" in cli_error(import_routes.main, [str(mixed), "--out", str(tmp_path / "c")],
                                                        capsys)
    no_token = import_routes.import_routes(_write(tmp_path / "plain.csv", GOOD), tmp_path / "d")
    assert no_token.token_ids.tolist() == [-1, -1]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------- llama.cpp pruning
def _pruned(gemma_csv: Path, drop) -> str:
    """The gemma log with the rows ``drop(phase, step, layer)`` selects removed."""
    out = []
    for line in gemma_csv.read_text().splitlines(keepends=True):
        if line[0].isdigit():
            _, phase, step, layer = (int(x) for x in line.split(",")[:4])
            if drop(phase, step, layer):
                continue
        out.append(line)
    return "".join(out)


def test_llama_cpp_output_layer_pruning_is_imported_as_not_run(gemma_csv, gemma_store, tmp_path, capsys):
    """Prefill logs layer 29 for the final prompt token only: those routes are stored as not run, nothing invented."""
    pruned = _write(tmp_path / "pruned.csv", _pruned(gemma_csv, lambda ph, st, la: ph == 0 and la == 29 and st < 28))
    run_cli(import_routes.main, [str(pruned), "--out", str(tmp_path / "p")])
    assert "28 prefill route(s) of layer(s) [29] not run" in capsys.readouterr().out
    s, full = TraceStore(tmp_path / "p"), gemma_store
    ids, want = s.topk_ids(), full.topk_ids().copy()
    skipped = np.zeros(want.shape[:2], dtype=bool)
    skipped[:28, 29] = True  # rows 0..27 are prefill steps 0..27 (storage order = step)
    want[skipped] = -1
    assert np.array_equal(ids, want) and s.num_tokens == full.num_tokens
    assert (s.topk_weights()[skipped] == 0).all()
    assert np.array_equal(s.topk_weights()[~skipped], full.topk_weights()[~skipped])
    assert s.manifest["skipped_routes"]["layers"] == [29] and s.manifest["skipped_routes"]["rows"] == 28
    run_cli(inspect_store.main, [str(tmp_path / "p"), "--json"])  # reads it (usage counts only routes that ran)
    assert json.loads(capsys.readouterr().out)["per_layer"][29]["experts_used"] > 0
    # the predictors train and score on it (a skipped route is no target, never expert -1)
    assert train.main(["--data.store", str(tmp_path / "p"), "--checkpoints", str(tmp_path / "ck"), "--run", "p",
                       "--families", "[frequency, trajectory]", "--trainer.max_epochs", "1", *QUIET]) == 0

    pop = FrequencyPredictor.fit(ids, s.num_experts, 1).popularity
    assert np.allclose(pop.sum(dim=1).numpy(), 6)  # per layer, over the tokens that ran it


@pytest.mark.parametrize("drop,needle", [
    (lambda ph, st, la: ph == 1 and st == 40 and la == 29, "step 40 (starting here) has 0 expert(s) at layer 29"),
    (lambda ph, st, la: ph == 0 and st == 3 and la == 5, "step 3 (starting here) has 0 expert(s) at layer 5"),
    (lambda ph, st, la: ph == 0 and la == 29, "step 28 (starting here) has 0 expert(s) at layer 29"),
])
def test_other_missing_routes_are_refused(gemma_csv, tmp_path, capsys, drop, needle):
    bad = _write(tmp_path / "bad.csv", _pruned(gemma_csv, drop))
    assert needle in cli_error(import_routes.main, [str(bad), "--out", str(tmp_path / "o")], capsys)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------- damaged stores
def test_bytes_changed_inside_a_shard_one_line_everywhere(store, tmp_path, capsys):
    """Expert id 32767 poked into a shard that still parses: every CLI says so in one line."""
    shard = store / "shards" / "shard-00000.arrow"
    poke(shard, "topk_ids", 5, 32767)
    before = _files(store)
    for main, argv in (
        (inspect_store.main, [str(store)]),
        (train.main, ["--data.store", str(store), "--checkpoints", str(tmp_path / "ck"),
                      "--families", "[frequency]", *QUIET]),
        (reuse_training.main, ["--trace", str(store), "--out", str(tmp_path / "reuse"), "--family", "reuse_counted"]),
        (evaluate.main, ["--trace", str(store), "--policy", "lru", "--capacity", "10%"]),
    ):
        line = cli_error(main, argv, capsys)
        assert "shard-00000.arrow does not match its checksum" in line, line
    assert _files(store) == before and not (tmp_path / "ck").exists()
    # without the checksum (an older store, or verification off) the range check still catches it
    with pytest.raises(TraceStoreError, match="holds expert id 32767, outside 0..31"):
        TraceStore(store, verify_on_read=False).topk_ids()


@pytest.mark.parametrize("damage,needle", [
    ("first seq id huge", "sequence ids are negative or out of order"),
    ("last sequence renamed to the next shard's first", "is stored twice"),
    ("phase 7", "holds a phase other than 0"),
    ("negative weight", "NaN, infinite or negative routing weight"),
])
def test_changed_ids_caught_even_without_checksums(store, damage, needle):
    s = TraceStore(store)
    shard0 = store / "shards" / "shard-00000.arrow"
    first0 = s._shards[0].column("seq_id")
    if damage == "first seq id huge":
        poke(shard0, "seq_id", 0, 10**6)
    elif damage == "last sequence renamed to the next shard's first":
        last = np.flatnonzero(first0 == first0[-1])
        for row in last:
            poke(shard0, "seq_id", int(row), int(s._shards[1].column("seq_id")[0]))
    elif damage == "phase 7":
        poke(shard0, "phase", 2, 7)
    else:
        poke(shard0, "topk_weights", 3, int(np.array([-0.5], np.float32).view(np.int32)[0]))
    with pytest.raises(TraceStoreError, match=needle):
        damaged = TraceStore(store, verify_on_read=False)
        damaged.column({"phase 7": "phase", "negative weight": "topk_weights"}.get(damage, "seq_id"))
        damaged.sequence_bounds()


@pytest.mark.parametrize("text,needle", [
    ("[1, 2, 3]", "holds a JSON list, not an object"),
    ('{"format_version": 1, "model": {}, "shards": []}', "model.model_id is missing"),
    ('{"format_version": 1, "model": {"model_id": "m", "num_layers": "6", "num_experts": 32, "top_k": 4}, '
     '"shards": []}', "model.num_layers is '6', not a positive integer"),
    ('{"format_version": 1, "model": {"model_id": "m", "num_layers": 6, "num_experts": 32, "top_k": 4}, '
     '"shards": {}}', "'shards' is not a list"),
    ('{"format_version": 1, "model": {"model_id": "m", "num_layers": 6, "num_experts": 32, "top_k": 4}, '
     '"shards": [{"file": "../../etc/passwd", "rows": 1, "sha256": "x"}]}', "no file name of the form"),
    ('{"format_version": 1, "model": {"model_id": "m", "num_layers": 6, "num_experts": 32, "top_k": 4}, '
     '"shards": [], "hidden_layers": [9]}', "'hidden_layers' is not a list of distinct layer indices"),
    ("\udcff", "is not UTF-8 text"),
])
def test_manifest_of_the_wrong_shape_one_line(store, tmp_path, capsys, text, needle):
    (store / MANIFEST_NAME).write_bytes(text.encode("utf-8", "surrogateescape"))
    for main, argv in ((inspect_store.main, [str(store)]),
                       (train.main, ["--data.store", str(store), "--checkpoints", str(tmp_path / "ck"), *QUIET]),
                       (collect.main, ["--out", str(store), *COLLECT])):
        assert needle in cli_error(main, argv, capsys)
    assert not (tmp_path / "ck").exists()


def test_a_manifest_edited_or_flipped_is_refused_not_misread(store, capsys):
    text = (store / MANIFEST_NAME).read_text()
    (store / MANIFEST_NAME).write_text(text.replace('"num_experts": 32', '"num_experts": 33'))
    assert "manifest.json does not match its checksum" in cli_error(inspect_store.main, [str(store)], capsys)


# ---------------------------------------------------------------------------------- disk full, read-only
def test_collect_disk_full_keeps_the_store_and_no_partial_shard(store, model_loaded, monkeypatch, capsys):
    before = snapshot(store)
    disk_full_on_shard_write(monkeypatch)
    more = [a if a != "400" else "900" for a in COLLECT]  # a resume that has shards left to write
    line = cli_error(collect.main, ["--out", str(store), *more], capsys)
    assert "no space left on the device" in line
    no_partial_files(store)
    monkeypatch.undo()
    assert_same(snapshot(store), before)


def test_collect_read_only_folder_even_with_nothing_to_do(store, model_loaded, monkeypatch, capsys):
    before = snapshot(store)
    read_only(monkeypatch, store)
    line = cli_error(collect.main, ["--out", str(store), *COLLECT], capsys)
    assert "read-only file system" in line and str(store) in line
    monkeypatch.undo()
    assert_same(snapshot(store), before)


def test_import_disk_full_and_read_only(tmp_path, imported, monkeypatch, capsys):
    good = _write(tmp_path / "more.csv", GOOD.replace("0,", "1,", 1).replace("\n0,", "\n1,"))
    before = snapshot(imported)
    disk_full_on_shard_write(monkeypatch)
    assert "no space left" in cli_error(import_routes.main, [str(good), "--out", str(tmp_path / "new")], capsys)
    assert not (tmp_path / "new").exists()  # the half-made store is removed with its partial shard
    assert "no space left" in cli_error(import_routes.main, [str(good), "--out", str(imported), "--model-id", "r"],
                                        capsys)
    no_partial_files(imported)
    monkeypatch.undo()
    assert_same(snapshot(imported), before)
    read_only(monkeypatch, imported)
    assert "read-only file system" in cli_error(
        import_routes.main, [str(good), "--out", str(imported), "--model-id", "r"], capsys)
    monkeypatch.undo()
    assert_same(snapshot(imported), before)


def test_train_and_reuse_disk_full_and_read_only(store, tmp_path, monkeypatch, capsys):
    before = snapshot(store)
    ck = tmp_path / "ck"
    train_argv = ["--data.store", str(store), "--checkpoints", str(ck), "--run", "r", "--families", "[frequency]",
                  *QUIET]
    reuse_argv = ["--trace", str(store), "--out", str(tmp_path / "reuse"), "--family", "reuse_counted"]
    with monkeypatch.context() as mp:
        disk_full_on_save_file(mp)
        assert "no space left" in cli_error(train.main, train_argv, capsys)
        assert not (ck / "r").exists() and latest_checkpoint(ck) is None
        assert "no space left" in cli_error(reuse_training.main, reuse_argv, capsys)
        no_partial_files(tmp_path)
    ck.mkdir(exist_ok=True)  # the run folder went; its parent may stay
    (tmp_path / "reuse").mkdir(exist_ok=True)
    with monkeypatch.context() as mp:
        read_only(mp, ck)
        read_only(mp, tmp_path / "reuse")
        assert "read-only file system" in cli_error(train.main, train_argv, capsys)
        assert "read-only file system" in cli_error(reuse_training.main, reuse_argv, capsys)
    assert list(ck.iterdir()) == [] and list((tmp_path / "reuse").iterdir()) == []
    assert_same(snapshot(store), before)


def test_evaluate_json_into_a_read_only_folder(store, tmp_path, monkeypatch, capsys):
    (tmp_path / "ro").mkdir()
    read_only(monkeypatch, tmp_path / "ro")
    line = cli_error(evaluate.main, ["--trace", str(store), "--policy", "lru", "--capacity", "10%", "--json",
                                     str(tmp_path / "ro" / "out.json")], capsys)
    assert "read-only file system" in line


@pytest.fixture
def tmpfs(tmp_path):
    """A 2 MB tmpfs (a real full disk, and read-only after remount); skipped where mounting is not allowed."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'not permitted'}); the mocked tests cover it")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.slow
def test_real_full_disk_then_read_only_folder(tmpfs, gemma_csv):
    """A real 2 MB tmpfs: collect and import fill it, then it is remounted read-only."""
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)

    r = run("-m", "data_pipeline.collect", "--out", str(tmpfs / "demo"), "--max-tokens", "3000", "--seq-len", "64",
            "--shard-sequences", "8", "--no-progress")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "no space left on the device" in lines[0], r.stderr
    no_partial_files(tmpfs)
    stored = snapshot(tmpfs / "demo")
    r = run("-m", "data_pipeline.import_routes", str(gemma_csv), "--out", str(tmpfs / "gemma"))
    assert r.returncode in (0, 2) and "Traceback" not in r.stderr
    no_partial_files(tmpfs)
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    for args in (("-m", "data_pipeline.collect", "--out", str(tmpfs / "demo"), "--max-tokens", "3000", "--seq-len",
                  "64", "--shard-sequences", "8", "--no-progress"),
                 ("-m", "data_pipeline.import_routes", str(gemma_csv), "--out", str(tmpfs / "g2"))):
        r = run(*args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and "read-only file system" in lines[0], r.stderr
    assert_same(snapshot(tmpfs / "demo"), stored)


# ---------------------------------------------------------------------------------- train.py
@pytest.mark.parametrize("args,needle", [
    (["--trainer.accelerator", "gpu"], "the --trainer options do not work here"),
    (["--data.batch_size", "0"], "--data.batch_size must be >= 1, got 0"),
    (["--trainer.max_epochs", "0"], "--trainer.max_epochs 0 would save untrained trajectory"),
    (["--overfetch", "0.5"], "--overfetch must be >= 1"),
    (["--data.val_fraction", "0.9"], "must be in (0, 1) and sum to less than 1"),
])
def test_train_arguments_refused_before_any_work(tmp_path, capsys, monkeypatch, args, needle):
    if args[0] == "--trainer.accelerator":
        if torch.cuda.is_available():
            pytest.skip("a GPU is present, so --trainer.accelerator gpu is valid here")
    monkeypatch.setattr("data_pipeline.models.load_model", lambda *a, **k: pytest.fail("collected before checking"))
    line = cli_error(train.main, ["--data.store", str(tmp_path / "missing"), "--checkpoints", str(tmp_path / "ck"),
                                  "--families", "[frequency, trajectory]", *args, *QUIET], capsys)
    assert needle in line
    assert not (tmp_path / "missing").exists() and not (tmp_path / "ck").exists()


def test_an_unvalidated_learned_predictor_is_never_the_best(store, tmp_path, capsys):
    """fast_dev_run trains one step and validates nothing: saved, flagged, never served as the newest best."""
    ck = tmp_path / "ck"
    assert train.main(["--data.store", str(store), "--checkpoints", str(ck), "--run", "fast", "--families",
                       "[frequency, trajectory]", "--trainer.fast_dev_run", "true", *QUIET]) == 0
    run = json.loads((ck / "fast" / "run.json").read_text())
    assert run["untrained"] == ["trajectory"] and run["best"] == "frequency"
    assert latest_checkpoint(ck) == ck / "fast" / "frequency.safetensors"
    assert latest_checkpoint(ck, family="trajectory") is None
    assert "trajectory: no validation epoch finished" in capsys.readouterr().out


def test_collect_and_reuse_arguments_refused_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("data_pipeline.models.load_model", lambda *a, **k: pytest.fail("loaded before checking"))
    out = tmp_path / "o"
    for args, needle in ((["--limit", "0"], "--limit must be positive"),
                         (["--max-tokens", "-5"], "--max-tokens must be >= 0"),
                         (["--hidden-layers", "-1"], "--hidden-layers [-1] out of range"),
                         (["--seq-len", "0"], "must be positive")):
        assert needle in cli_error(collect.main, ["--out", str(out), *args], capsys)
        assert not out.exists()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("x")
    assert "is not empty and is not a trace store" in cli_error(collect.main, ["--out", str(tmp_path / "notes")],
                                                                capsys)
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["mine.txt"]
    for args, needle in ((["--family", "nope"], "unknown reuse family 'nope'"),
                         (["--epochs", "0"], "--epochs 0 would save an untrained reuse_mlp"),
                         (["--val-fraction", "1.5"], "must be in (0, 1)")):
        assert needle in cli_error(reuse_training.main, ["--trace", str(tmp_path / "none"), *args], capsys)


def test_run_cli_os_errors_and_misconfiguration_are_one_line(capsys):
    def raises(exc: BaseException):
        def main(argv):
            raise exc
        return main

    for exc, needle in ((OSError(errno.ENOSPC, "No space left on device", "/x/y"), "no space left on the device (/x/y)"),
                        (OSError(errno.EROFS, "Read-only file system", "/x"), "read-only file system (/x)"),
                        (PermissionError(errno.EACCES, "Permission denied", "/x"), "permission denied (/x)"),
                        (MisconfigurationException("No supported gpu backend found!\nmore"), "No supported gpu backend")):
        assert needle in cli_error(raises(exc), [], capsys)
    with pytest.raises(ValueError):  # a bug stays a traceback: only bad input and the environment are one line
        run_cli(raises(ValueError("bug")), [])
