"""evaluate.py in simulation mode: sweeps, JSON, plots, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import evaluate
from offload.evaluate_cli import split_hardware

REPO = Path(__file__).resolve().parents[1]


def test_sweep_writes_json_table_and_plots(gemma_store, tmp_path, capsys):
    out = tmp_path / "out.json"
    evaluate.main(["--trace", str(gemma_store.path), "--policy", "lru,least_stale,belady", "--capacity", "1%,5%",
                   "--prefetch", "none,oracle", "--json", str(out), "--plots", str(tmp_path / "plots")])
    results = json.loads(out.read_text())["results"]
    assert len(results) == 3 * 2 * 2
    r = results[0]
    for key in ("policy", "prefetch", "capacity_slots", "capacity", "hardware", "phase", "cache", "lookahead",
                "miss", "routing", "accesses", "hits", "misses", "collision_misses", "collision_misses_per_layer",
                "hit_rate", "collision_rate", "prefetch_issued", "prefetch_used", "prefetch_wasted",
                "prefetch_bytes", "stall_time_s", "ttft_s", "tpot_s", "precision", "recall"):
        assert key in r, key
    assert all(x["accesses"] == 24578 for x in results)
    assert {x["capacity_slots"] for x in results} == {38, 192}
    by = {(x["policy"], x["capacity"], x["prefetch"]): x for x in results}
    assert by[("belady", "5%", "none")]["hits"] >= by[("least_stale", "5%", "none")]["hits"]
    assert by[("lru", "5%", "oracle")]["precision"] == 1.0
    # every row is placed between its setting's references: LRU without prefetch (0 %) and Belady + oracle (100 %)
    assert not any(x["reference"] for x in results)  # the sweep already held them
    for cap in ("1%", "5%"):
        assert by[("lru", cap, "none")]["tpot_gap_closed"] == 0.0
        assert by[("belady", cap, "oracle")]["tpot_gap_closed"] == 1.0
        assert by[("least_stale", cap, "oracle")]["limit_tpot_s"] <= by[("belady", cap, "oracle")]["tpot_s"]
    assert len(r["collision_misses_per_layer"]) == 30
    table = capsys.readouterr().out
    assert "least_stale" in table and "belady" in table
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "bytes_per_token.png", "collision_rate_per_layer.png", "hit_rate_vs_capacity.png",
        "latency_per_configuration.png", "latency_vs_capacity.png"]
    assert (tmp_path / "out.html").exists()  # the HTML report, beside the JSON


@pytest.mark.parametrize("args,message", [
    (["--policy", "nope"], "valid: least_stale"),
    (["--prefetch", "nope"], "valid: none"),
    (["--prefetch", "none,score"], "is now called 'percentile'"),  # 'score' is the eviction policy's name
    (["--hardware", "nope"], "valid: a100-5gbs"),
    (["--capacity", "0"], "positive"),
    (["--capacity", "3"], "below one layer"),
    (["--routing", "cache-aware"], "router logits"),
    (["--prefetch", "gate"], "hidden states"),
    # out-of-range values are refused, never clamped or ignored (issue 11)
    (["--capacity", "nan"], "finite"),
    (["--capacity", "inf%"], "finite"),
    (["--capacity", ""], "--capacity is empty"),
    (["--capacity", "150%"], "more than every expert"),
    (["--capacity", "99999"], "more than the model's 3840 experts"),
    (["--prefetch", "topk", "--lookahead", "99"], "next layer only"),
    (["--prefetch", "oracle", "--lookahead", "99"], "runs past the last layer"),
])
def test_bad_input_is_one_line_and_exit_2(gemma_store, args, message):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--trace", str(gemma_store.path), *args],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr


def test_a_store_without_expert_sizes_needs_copy_bytes(tmp_path):
    """A generic import records no expert size: the timing model asks for one, and --copy-bytes gives it."""
    csv = tmp_path / "routes.csv"
    rows = ["seq,step,phase,layer,expert,weight"] + [f"0,{t},1,{layer},{(t + e + layer) % 8},0.5"
                                                     for t in range(12) for layer in range(2) for e in range(2)]
    csv.write_text("\n".join(rows) + "\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "data_pipeline.import_routes", str(csv), "--out", str(tmp_path / "s")],
                   cwd=REPO, env=env, check=True, capture_output=True)
    run = [sys.executable, str(REPO / "evaluate.py"), "--trace", str(tmp_path / "s"), "--capacity", "4"]
    proc = subprocess.run(run, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "--copy-bytes" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    out = tmp_path / "r.json"
    subprocess.run([*run, "--copy-bytes", "1e6", "--json", str(out)], env=env, check=True, capture_output=True)
    results = json.loads(out.read_text())["results"]
    assert all(r["bytes_moved"] == 1e6 * (r["misses"] + r["prefetch_issued"] - r["prefetch_cancelled"])
               for r in results)


def test_missing_trace_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--trace", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and len(proc.stderr.strip().splitlines()) == 1


def test_hardware_list_with_overrides():
    assert split_hardware("a100-5gbs,rtx4090:link_gbps=12,tflops=60,pcie5") == [
        "a100-5gbs", "rtx4090:link_gbps=12,tflops=60", "pcie5"]


def test_hardware_override_changes_timing(gemma_store, tmp_path):
    out = tmp_path / "hw.json"
    evaluate.main(["--trace", str(gemma_store.path), "--policy", "lru", "--hardware",
                   "a100-5gbs,a100-5gbs:link_gbps=10", "--json", str(out)])
    slow, fast = [r for r in json.loads(out.read_text())["results"] if not r["reference"]]
    assert slow["misses"] == fast["misses"] and fast["stall_time_s"] < slow["stall_time_s"]
    assert fast["hardware_profile"]["link_gbps"] == 10.0
