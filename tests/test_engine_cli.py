"""``evaluate.py`` engine mode end to end on tiny OLMoE, and its one-line refusals."""

from __future__ import annotations

import json

import pytest
import torch
from browser import check_report

from core.errors import run_cli
from core.model_info import ModelInfo
from data_pipeline.models import load_model
from evaluate import main
from offload.engine.report import plots
from offload.evaluate_cli import parse_bandwidth
from predictors.checkpoint import save_predictor
from predictors.mlp_lookahead import MLPLookahead
from reporting.figures import empty_panels

FAST = ["--model", "tiny-olmoe", "--prompts", "1", "--max-new-tokens", "3", "--no-wandb"]


def _fails(capsys, argv: list[str], *needles: str) -> str:
    with pytest.raises(SystemExit) as exc:
        run_cli(main, argv)
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def _save_checkpoint(folder, info, lookahead: int = 2):
    """A learned-family predictor file in train.py's layout (run.json names the best family)."""
    a = load_model("tiny-olmoe").adapter
    weights = torch.stack([a.router_weight(i).detach().float() for i in range(a.num_layers)])
    run = folder / "run-0"
    save_predictor(MLPLookahead(weights, a.top_k, lookahead, width=16), run / "mlp_lookahead", model=info)
    (run / "run.json").write_text(json.dumps({"best": "mlp", "predictors": {"mlp": "mlp_lookahead.safetensors"}}))
    return run / "mlp_lookahead.safetensors"


def test_parse_bandwidth():
    assert parse_bandwidth("5GB/s") == 5e9
    assert parse_bandwidth("500MB/s") == 5e8
    assert parse_bandwidth("1GiB/s") == 2**30
    assert parse_bandwidth("2.5e9") == 2.5e9
    assert parse_bandwidth("inf") is None


def test_bad_input_is_one_line(capsys, tmp_path):
    _fails(capsys, ["--checkpoints", str(tmp_path / "none"), *FAST], "python train.py")
    _fails(capsys, ["--bandwidth", "0GB/s", *FAST], "bandwidth")
    _fails(capsys, ["--bandwidth=-5GB/s", *FAST], "bandwidth")
    _fails(capsys, ["--policy-typo", "lru"], "unrecognized arguments")
    # refused before any model loads (issue 11): an unknown policy, a lookahead the prefetcher cannot make
    _fails(capsys, ["--policy", "nope", *FAST], "valid: least_stale")
    _fails(capsys, ["--prefetch", "topk", "--lookahead", "3", *FAST], "next layer only")
    _fails(capsys, ["--prefetch", "score", *FAST], "is now called 'percentile'")  # the eviction policy keeps 'score'
    _fails(capsys, ["--checkpoint", str(tmp_path), *FAST], "without a finished train.py run")
    for bad in ("nan", "", "150%"):
        _fails(capsys, ["--prefetch", "none", "--capacity", bad, *FAST], "capacity")
    _fails(capsys, ["--miss", "fetch,fetch-highest-bit", *FAST], "unknown miss handling 'fetch-highest-bit'")
    _fails(capsys, ["--precisions", "native,int3", *FAST], "unknown precision 'int3'")
    _fails(capsys, ["--quality-tokens", "-1", *FAST], "--quality-tokens")
    if not torch.cuda.is_available():
        _fails(capsys, ["--device", "cuda", *FAST], "GPU")


@pytest.mark.slow
def test_refusals_that_need_the_model(capsys, tmp_path):
    _fails(capsys, ["--prefetch", "none", "--capacity", "3", *FAST], "capacity")  # top-k is 4
    other = ModelInfo("another-moe", "olmoe", 6, 32, 4, hidden_size=128)
    ckpt = _save_checkpoint(tmp_path / "ckpt", other)
    _fails(capsys, ["--checkpoint", str(ckpt), *FAST], "trained for another-moe")
    _fails(capsys, ["--checkpoint", str(ckpt.parent), *FAST], "trained for another-moe")  # its run folder

    mine = _save_checkpoint(tmp_path / "mine", load_model("tiny-olmoe").info)
    _fails(capsys, ["--checkpoint", str(mine), "--lookahead", "5", *FAST], "forecasts 2 layer(s) ahead")
    long_text = tmp_path / "long.txt"
    long_text.write_text(" ".join(["word"] * 2000))
    _fails(capsys, ["--prefetch", "none", "--dataset", str(long_text), *FAST], "context")


@pytest.mark.slow
def test_default_run_with_a_checkpoint_prints_the_table_and_writes_json(capsys, tmp_path):
    _save_checkpoint(tmp_path / "checkpoints", load_model("tiny-olmoe").info)
    out = tmp_path / "report.json"
    main(["--policy", "least_stale", "--model", "tiny-olmoe", "--checkpoints", str(tmp_path / "checkpoints"), "--prompts", "2",
          "--max-new-tokens", "4", "--no-wandb", "--json", str(out), "--plots", str(tmp_path / "plots")])
    printed = capsys.readouterr().out
    for label in ("plain model", "least_stale + learned", "lru + learned", "lru + none (0% reference)",
                  "belady + oracle (100%", "physical limit", "copy-bound"):
        assert label in printed
    report = json.loads(out.read_text())
    assert report["lookahead"] == 2 and report["capacity_slots"] == 10  # 5 % of 6 x 32
    # by default every copy costs what an OLMoE-1B-7B expert would on the 5 GB/s link
    assert report["emulated"] == "olmoe-1b-7b" and report["copy_bytes"] == 3 * 2048 * 1024 * 2
    assert report["copy_ms"] == pytest.approx(12582912 / 5e9 * 1e3)
    ls, lru, zero, oracle, limit = report["rows"]
    assert zero["role"] == "zero" and zero["engine"]["summary"]["prefetch_issued"] == 0
    assert zero["tpot_gap_closed"] in (0.0, None) and oracle["tpot_gap_closed"] in (1.0, None)
    assert report["physical_limit"]["tpot_s"] <= oracle["sim"]["tpot_s"]
    assert report["physical_limit"]["ttft_s"] <= oracle["sim"]["ttft_s"]
    for row in (ls, lru):
        s = row["engine"]["summary"]
        assert s["hits"] + s["misses"] == s["accesses"] > 0
        assert s["token_agreement"] == 1.0  # fetch mode: exact
        assert s["forecast_predicted"] > 0 and 0 < s["precision"] <= 1
        assert row["sim"]["accesses"] == s["accesses"]  # the simulator replayed this very run
        assert row["sim"]["copy_bytes"] == report["copy_bytes"]  # ... with the same emulated copies
        assert s["bytes_moved"] == (s["misses"] + s["prefetch_issued"] - s["prefetch_cancelled"]) * 12582912
    assert oracle["sim"]["policy"] == "belady" and oracle["sim"]["prefetch"] == "oracle"
    assert oracle["sim"]["hit_rate"] >= max(ls["engine"]["summary"]["hit_rate"], lru["engine"]["summary"]["hit_rate"])
    assert {p.name for p in (tmp_path / "plots").glob("*.png")} == {
        "latency.png", "bytes_per_token.png", "hit_collision.png", "latency_per_prompt.png", "quality.png"}
    figures = _all_drawn(report)
    assert [ax.get_title() for ax in figures["latency"].figure.axes] == ["TTFT per configuration",
                                                                          "TPOT per configuration"]
    # the HTML report lands beside the JSON and renders offline, headline figure first
    # quality: fetch at full precision is the plain model's, to the last bit
    plain_q = report["plain_quality"]
    assert plain_q["agreement"] == 1.0 and plain_q["tokens"] == 2 * 32
    for row in (ls, lru, zero):
        assert row["engine"]["quality"]["perplexity"] == plain_q["perplexity"]
        assert row["engine"]["quality"]["agreement"] == 1.0
    assert "quality" not in oracle  # simulated rows have no outputs
    page = check_report(tmp_path / "report.html", tmp_path, tables=2, figures=5, screenshot=tmp_path / "engine.png",
                        texts=("Latency per configuration, against its bounds", "least_stale + learned",
                               "physical limit", "Training / held-out split", "python evaluate.py --policy least_stale"))
    assert page.dom.index('id="latency"') < page.dom.index('id="hit_collision"')
    assert f"HTML report: {(tmp_path / 'report.html').resolve()}" in printed


def _all_drawn(report: dict) -> dict:
    """Every figure of an evaluation report, asserted drawn with data in every panel."""
    out = {}
    for p in plots(report):
        assert p.figure is not None, f"{p.name}: {p.note}"
        assert empty_panels(p.figure) == [], p.name
        out[p.name] = p
    return out


@pytest.mark.slow
@pytest.mark.parametrize("system", ["mixturecache", "zhu", "eliseev_mazur"])
def test_paper_systems_run_next_to_least_stale(capsys, tmp_path, system):
    out = tmp_path / "r.json"
    main(["--system", system, *FAST, "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["label"] for r in rows[:2]] == [system, f"{system} + LS"]
    assert all(r["admission"] == "greedy" for r in rows[:2])  # the paper's prefetchers
    assert rows[1]["policy"] == "least_stale"
    for r in rows[:2]:
        s = r["engine"]["summary"]
        assert s["accesses"] > 0
        if system == "eliseev_mazur":
            assert s["token_agreement"] == 1.0  # fetch: exact outputs


@pytest.mark.slow
def test_a_run_without_decode_steps_draws_ttft_and_says_why_there_is_no_tpot(tmp_path):
    out = tmp_path / "r.json"
    main(["--model", "tiny-olmoe", "--prefetch", "gate", "--prompts", "1", "--max-new-tokens", "1", "--no-wandb",
          "--quality-tokens", "0", "--json", str(out), "--report", "none"])
    report = json.loads(out.read_text())
    assert all(r["sim"]["tpot_s"] is None for r in report["rows"])  # the premise: prefill only
    figures = {p.name: p for p in _plots_with_data(report)}
    latency = figures["latency"]
    assert [ax.get_title() for ax in latency.figure.axes] == ["TTFT per configuration"]
    assert "no TPOT" in latency.note
    assert not (tmp_path / "r.html").exists()  # --report none


def _plots_with_data(report: dict) -> list:
    """The report's figures; every one that was drawn has data in every panel."""
    out = plots(report)
    for p in out:
        assert p.figure is None or empty_panels(p.figure) == [], p.name
    return out


@pytest.mark.slow
def test_hobbit_runs_with_its_cascade_next_to_least_stale(tmp_path, capsys):
    """HOBBIT: top-k prefetch + LHU + precision cascade on a copy-bound link, and the same with Least-Stale:
    copies at int2 shrink by the emulated bf16 expert's ratio, upgrades follow, and perplexity shows the cost."""
    out = tmp_path / "r.json"
    main(["--system", "hobbit", "--model", "tiny-olmoe", "--prompts", "2", "--max-new-tokens", "4", "--quality-tokens", "8", "--no-wandb",
          "--json", str(out)])
    printed = capsys.readouterr().out
    assert "Speed against output quality" in printed and "hits by precision" in printed
    report = json.loads(out.read_text())
    hobbit, hobbit_ls = report["rows"][:2]
    assert (hobbit["label"], hobbit_ls["label"]) == ("hobbit", "hobbit + LS")
    assert (hobbit["policy"], hobbit["miss"], hobbit_ls["policy"]) == ("lhu", "precision-cascade", "least_stale")
    sizes = report["copy_bytes_by_precision"]  # an OLMoE-1B-7B expert (bf16, 12 MiB) at each precision
    n = 3 * 2048 * 1024
    assert sizes == {"native": 2 * n, "int8": n + 4 * n / 64, "int4": n / 2 + 4 * n / 64, "int2": n / 4 + 4 * n / 64}
    for row in (hobbit, hobbit_ls):
        s, sim = row["engine"]["summary"], row["sim"]
        assert s["served_by_precision"]["int2"] > 0 and s["upgrades_issued"] > 0 and s["dequantized"] > 0
        assert sum(s["hits_by_precision"].values()) == s["hits"]
        assert s["demand_bytes"] == pytest.approx(s["misses"] * sizes["int2"])  # every miss at int2
        assert s["upgrade_bytes"] > 0 and s["bytes_moved"] == pytest.approx(
            s["demand_bytes"] + s["prefetch_bytes"] + s["upgrade_bytes"])
        # the simulator replays the same routing on its own clock: when an upgrade lands (hence what LHU counts)
        # may differ by a copy's jitter, so decisions agree closely, not exactly (exactly: tests/test_engine.py)
        assert sim["accesses"] == s["accesses"] and sim["upgrades_issued"] > 0
        assert sim["misses"] == pytest.approx(s["misses"], rel=0.05)
        assert row["engine"]["quality"]["tokens"] == 2 * 8
    assert report["calibration"]["kernel_us"] > 0  # the simulator's dequantization cost, measured here
    fetch_rows = [r for r in report["rows"] if r.get("engine") and r["miss"] == "fetch"]
    assert fetch_rows and all(r["engine"]["quality"]["perplexity"] == report["plain_quality"]["perplexity"]
                              for r in fetch_rows)


@pytest.mark.slow
def test_a_miss_list_gives_one_row_each(tmp_path):
    out = tmp_path / "r.json"
    main(["--prefetch", "gate", "--miss", "fetch,fetch-lowest-bit,fetch-priority", "--precisions", "native,int4",
          *FAST, "--quality-tokens", "4", "--json", str(out), "--report", "none"])
    rows = json.loads(out.read_text())["rows"]
    assert [r["label"] for r in rows[:4]] == ["least_stale + gate", "lru + gate", "least_stale + gate, fetch-lowest-bit",
                                             "least_stale + gate, fetch-priority"]
    low, priority = rows[2]["engine"]["summary"], rows[3]["engine"]["summary"]
    assert low["served_by_precision"]["int4"] > 0 and low["served_by_precision"]["int2"] == 0
    assert set(k for k, v in priority["served_by_precision"].items() if v) <= {"native", "int4"}
