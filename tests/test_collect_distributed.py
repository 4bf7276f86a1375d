"""Distributed collection under torchrun (gloo, CPU): 2 and 4 ranks write the single-process store byte for
byte; a rank killed with SIGKILL and a rerun (2 ranks, or one process) give that store again; a job refused by
rank 0 says one line. Every rank runs with one intra-op thread, as torchrun sets by default, and so does the
single-process reference: kernels with other thread counts round differently in the last bit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from core.errors import run_cli
from data_pipeline import collect
from data_pipeline.collect import Plan
from data_pipeline.store_lock import StoreLock
from data_pipeline.trace_store import MANIFEST_NAME, TraceStore

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--max-tokens", "6000", "--seq-len", "48", "--batch-size", "4", "--shard-sequences", "4",
        "--hidden-layers", "0,3", "--no-progress"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": str(REPO)}


def torchrun(n: int, out: Path, **popen) -> subprocess.Popen[str]:
    """``torchrun --standalone --nproc-per-node n -m data_pipeline.collect --out out ARGS`` (a free port each)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
           "-m", "data_pipeline.collect", "--out", str(out), *ARGS]
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


def finish(p: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str]:
    _, err = p.communicate(timeout=timeout)
    return p.returncode, err


def single_process(out: Path) -> None:
    """The CLI in this process, with one intra-op thread like every torchrun rank."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_cli(collect.main, ["--out", str(out), *ARGS])
    finally:
        torch.set_num_threads(threads)


def shards(out: Path) -> list[tuple[str, str]]:
    """(file, sha256 of its bytes) of every listed shard, in listing order."""
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    return [(e["file"], hashlib.sha256((out / e["file"]).read_bytes()).hexdigest()) for e in manifest["shards"]]


def assert_same_store(got: Path, ref: Path) -> None:
    assert shards(got) == shards(ref)  # the same files, byte for byte, listed in the same order
    store = TraceStore(got, verify_checksums=True)
    assert store.manifest["complete"]
    assert store.content_digest() == TraceStore(ref).content_digest()
    assert not list(got.rglob("*.tmp")), "a staged shard was left behind"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "store"
    single_process(out)
    assert len(shards(out)) >= 8
    return out


def test_plan_does_not_depend_on_ranks_and_resumes_exactly_the_missing():
    plan = Plan(num_sequences=10, batch_size=3, unit_batches=2)
    assert plan.num_units == 2
    assert plan.batches(0) == [range(0, 3), range(3, 6)] and plan.batches(1) == [range(6, 9), range(9, 10)]
    assert plan.todo(set()) == [(0, []), (1, [])]
    assert plan.todo(set(range(6))) == [(1, [])]
    assert plan.todo({0, 1, 7}) == [(0, [0, 1]), (1, [7])]  # a partly stored unit runs whole, minus what is stored
    assert plan.todo(set(range(10))) == []


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 4])
def test_torchrun_ranks_write_the_single_process_store(reference, tmp_path, ranks):
    out = tmp_path / "store"
    code, err = finish(torchrun(ranks, out))
    assert code == 0, err
    assert_same_store(out, reference)
    assert TraceStore(out).manifest["runs"][-1]["ranks"] == ranks


@pytest.mark.slow
def test_rank_killed_mid_run_then_rerun_gives_the_same_store(reference, tmp_path):
    out = tmp_path / "store"
    p = torchrun(2, out)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and p.poll() is None:
            if (out / "shards").exists() and len(list((out / "shards").glob("shard-*.arrow"))) >= 3:
                break
            time.sleep(0.01)
        victim = next(c for c in psutil.Process(p.pid).children(recursive=True) if c.environ().get("RANK") == "1")
        os.kill(victim.pid, signal.SIGKILL)
        code, err = finish(p)
    finally:
        if p.poll() is None:
            p.kill()
    assert code != 0, "the job finished before rank 1 was killed; make it longer"
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rerun to resume" in errors[0], err  # rank 0 says it, once
    partial = TraceStore(out)  # whatever is listed reads as whole
    assert 0 < partial.num_sequences < TraceStore(reference).num_sequences and not partial.manifest["complete"]
    again = tmp_path / "again"
    shutil.copytree(out, again)
    code, err = finish(torchrun(2, out))  # the same job again
    assert code == 0, err
    assert_same_store(out, reference)
    single_process(again)  # or one process: the plan does not depend on the number of ranks
    assert_same_store(again, reference)


@pytest.mark.slow
def test_job_refused_by_rank_0_says_one_line(tmp_path):
    out = tmp_path / "store"
    with StoreLock(out):
        code, err = finish(torchrun(2, out))
    assert code != 0
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"being written by another process (pid {os.getpid()})" in errors[0], err
    assert "/data_pipeline/" not in err  # no traceback from a rank (torchrun prints its own failure report)
    assert not out.exists()
