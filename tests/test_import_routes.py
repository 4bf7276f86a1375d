"""Route importers: the real gemma-4 route_trace log, generic CSV/JSONL, and bad files."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.errors import UserError
from data_pipeline.import_routes import import_routes

REPO = Path(__file__).resolve().parents[1]


def test_gemma_route_csv_counts(gemma_store):
    s = gemma_store
    assert (s.num_layers, s.num_experts, s.top_k) == (30, 128, 6)
    assert int((s.phases == 1).sum()) == 128 and int((s.phases == 0).sum()) == 29
    assert s.num_sequences == 1 and s.num_tokens == 157
    # first data row of the file: prefill step 0, layer 0, slot 0 -> expert 79, weight 0.425
    assert int(s.topk_ids()[0, 0, 0]) == 79
    assert s.topk_weights()[0, 0, 0] == pytest.approx(0.425, abs=1e-3)
    assert s.model.layer_expert_bytes[0] == 4336640 and s.model.expert_bytes == 3593216  # most common size
    assert s.model.family == "gemma4"


def test_generic_csv_and_jsonl_keep_rank_order(tmp_path):
    rows = [(0, 0, "prefill", 0, 5, 0.6), (0, 0, "prefill", 0, 2, 0.4), (0, 0, "prefill", 1, 7, 0.9),
            (0, 0, "prefill", 1, 1, 0.1), (0, 1, "decode", 0, 3, 0.5), (0, 1, "decode", 0, 4, 0.5),
            (0, 1, "decode", 1, 0, 0.7), (0, 1, "decode", 1, 6, 0.3)]
    csv = tmp_path / "r.csv"
    csv.write_text("seq,step,phase,layer,expert,weight\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text("\n".join(
        f'{{"seq": {a}, "step": {b}, "phase": "{c}", "layer": {d}, "expert": {e}, "weight": {f}}}'
        for a, b, c, d, e, f in rows))
    for path in (csv, jsonl):
        s = import_routes(path, tmp_path / f"out-{path.suffix}", num_experts=8)
        assert (s.num_layers, s.num_experts, s.top_k, s.num_tokens) == (2, 8, 2, 2)
        assert s.topk_ids().tolist() == [[[5, 2], [7, 1]], [[3, 4], [0, 6]]]
        assert s.phases.tolist() == [0, 1]
        np.testing.assert_allclose(s.topk_weights()[0, 1], [0.9, 0.1])


def test_missing_columns_cli_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("seq,step,layer,expert\n0,0,0,1\n")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "data_pipeline.import_routes", str(bad), "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "lacks column(s) phase" in lines[0]
    assert not out.exists()


def test_bad_input_leaves_existing_store_intact(gemma_csv, tmp_path):
    out = tmp_path / "store"
    import_routes(gemma_csv, out)
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file()}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"seq": 0, "step": 0, "phase": "warmup", "layer": 0, "expert": 1}\n')
    with pytest.raises(UserError, match="neither prefill nor decode"):
        import_routes(bad, tmp_path / "x")
    other = tmp_path / "other.csv"
    other.write_text("seq,step,phase,layer,expert\n0,0,0,0,1\n")
    with pytest.raises(UserError, match="already holds traces"):
        import_routes(other, out)
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file()} == before
