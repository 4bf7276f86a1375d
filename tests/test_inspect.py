"""Inspection statistics on hand-computed tiny cases, the gemma log, and the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from data_pipeline.import_routes import import_routes
from data_pipeline.inspect_store import (
    cross_layer_repeat,
    expert_usage,
    next_token_repeat,
    summarize,
    usage_entropy,
)

REPO = Path(__file__).resolve().parents[1]


def test_hand_computed():
    ids = np.array([[[0, 1], [1, 2]], [[0, 2], [3, 2]], [[0, 1], [1, 0]]])  # (N=3, L=2, K=2)
    counts = expert_usage(ids, 4)
    assert counts.tolist() == [[3, 2, 1, 0], [1, 2, 2, 1]]
    ent = usage_entropy(counts)
    p = np.array([3, 2, 1]) / 6
    assert np.isclose(ent[0], -(p * np.log2(p)).sum())
    assert np.isclose(usage_entropy(np.array([[5, 5, 5, 5]]))[0], 2.0)
    assert np.allclose(cross_layer_repeat(ids), [(0.5 + 0.5 + 1.0) / 3])
    # tokens 0,1 in seq 0 (consecutive), token 2 starts seq 1
    rep = next_token_repeat(ids, np.array([0, 0, 1]), np.array([0, 1, 0]))
    assert np.allclose(rep, [0.5, 0.5])


def test_gemma_summary_and_cli_png(gemma_store, tmp_path):
    s = summarize(gemma_store)
    assert (s["tokens"], s["layers"], s["experts"], s["top_k"]) == (157, 30, 128, 6)
    assert all(0 < r["entropy_fraction"] <= 1 for r in s["per_layer"])
    png = tmp_path / "u.png"
    r = subprocess.run([sys.executable, "-m", "data_pipeline.inspect_store", str(gemma_store.path), "--png", str(png)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "157" in r.stdout and png.read_bytes()[:4] == b"\x89PNG"


def test_corrupt_shard_cli_names_file(gemma_csv, tmp_path):
    import_routes(gemma_csv, tmp_path / "s")
    shard = next((tmp_path / "s" / "shards").glob("*.arrow"))
    shard.write_bytes(shard.read_bytes()[:200])
    r = subprocess.run([sys.executable, "-m", "data_pipeline.inspect_store", str(tmp_path / "s")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and shard.name in lines[0]
