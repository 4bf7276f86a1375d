"""``evaluate.py --trace ... --workers N``: the configurations run on N spawned processes that open the store by path;
the results equal a serial run field by field and come in the same order; every configuration is checked first."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import evaluate
from core.errors import UserError
from core.model_info import ModelInfo
from core.passes import build_passes
from data_pipeline.trace_store import TraceStoreWriter
from offload import simulator
from offload.simulator import SimConfig, simulate_configs

L, E, K, H = 4, 16, 2, 8


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Three sequences of correlated routing with logits, hidden states and router weights (every prefetcher runs)."""
    rng = np.random.default_rng(3)
    W = rng.normal(size=(L, E, H)).astype(np.float32)
    model = ModelInfo("synthetic", "test", L, E, K, hidden_size=H, expert_bytes=1_000_000, dtype="bfloat16")
    w = TraceStoreWriter(tmp_path_factory.mktemp("sweep") / "store", model, hidden_layers=range(L),
                         store_router_logits=True)
    n, per_seq = 90, 30
    hidden = np.cumsum(rng.normal(size=(n, H)), axis=0).astype(np.float16)  # drifting: repeats between tokens
    logits = np.einsum("th,leh->tle", hidden.astype(np.float32), W).astype(np.float16).astype(np.float32)
    ids = np.argsort(-logits, axis=2, kind="stable")[:, :, :K]
    probs = np.exp(logits - logits.max(axis=2, keepdims=True))
    probs /= probs.sum(axis=2, keepdims=True)
    pos = np.tile(np.arange(per_seq), n // per_seq)
    w.write_shard(seq_id=np.repeat(np.arange(n // per_seq), per_seq), position=pos, token_id=np.zeros(n),
                  phase=(pos >= 6).astype(np.int8), topk_ids=ids, topk_weights=np.take_along_axis(probs, ids, axis=2),
                  router_logits=logits, hidden={i: hidden for i in range(L)})
    w.save_router_weights({i: W[i] for i in range(L)})
    return w.finalize()


def same(a, b) -> bool:
    """Equal as results are: floats bit for bit (NaN equals NaN), containers element by element."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple, np.ndarray)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


SWEEP = ["--policy", "lru,least_stale,lfu,belady,forecast,random", "--capacity", "15%,40%", "--prefetch",
         "none,oracle,gate,topk", "--phase", "both", "--admission", "greedy,value"]


@pytest.mark.slow
def test_two_workers_equal_serial_field_by_field(store, tmp_path, capsys):
    serial, parallel = tmp_path / "serial.json", tmp_path / "parallel.json"
    def table() -> list[str]:
        return [line for line in capsys.readouterr().out.splitlines() if "│" in line]  # rows, not file paths

    assert evaluate.main(["--trace", str(store.path), *SWEEP, "--json", str(serial)]) == 0
    rows = table()
    assert evaluate.main(["--trace", str(store.path), *SWEEP, "--json", str(parallel), "--workers", "2"]) == 0
    assert table() == rows and len(rows) >= 6 * 2 * 4  # the same table, row for row
    a, b = json.loads(serial.read_text())["results"], json.loads(parallel.read_text())["results"]
    assert len(a) == len(b) >= 6 * 2 * 4
    assert {r["backend"] for r in a} == {"fast", "reference"}  # both simulators ran in the workers (value admission: the step)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x.keys() == y.keys(), i
        for key in x:
            assert same(x[key], y[key]), (i, x["policy"], x["prefetch"], x["capacity"], key, x[key], y[key])


@pytest.mark.slow
def test_hand_built_passes_and_more_workers_than_configurations(store):
    configs = [SimConfig(policy=p, capacity="25%", phase="decode") for p in ("lru", "belady")]
    passes = build_passes(store, "decode")
    serial = simulate_configs(None, configs, passes=passes)
    assert same(simulate_configs(None, configs, passes=passes, workers=8), serial)


def test_every_configuration_is_checked_before_any_worker_starts(store, monkeypatch):
    monkeypatch.setattr(simulator, "_simulate_in_workers", lambda *a, **k: pytest.fail("workers started"))
    configs = [SimConfig(policy="lru", capacity="25%"), SimConfig(policy="lru", capacity="25%", routing="nope")]
    with pytest.raises(UserError, match="unknown routing 'nope'"):
        simulate_configs(store, configs, workers=2)
    with pytest.raises(UserError, match="--workers must be at least 1"):
        simulate_configs(store, configs[:1], workers=0)


def test_the_percentile_threshold_reaches_the_replay(store):
    """The engine passes its --percentile to the simulator's replay of the same run: a higher threshold
    selects fewer experts per token, so fewer prefetches (the forecast cache is keyed by it too)."""
    low, high = simulate_configs(store, [
        SimConfig(policy="lru", capacity="40%", prefetch="percentile", percentile=q, phase="decode") for q in (0.5, 0.95)])
    assert high["prefetch"] == low["prefetch"] == "percentile"
    assert 0 < high["prefetch_issued"] < low["prefetch_issued"]
