"""The report a user reads: no empty chart on decode-only or prefill-only runs, one HTML page that a real
browser renders offline without console errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from browser import check_report, open_page

import evaluate
from offload import report as sweep_report
from reporting import html
from reporting.figures import Plot, checked, empty_panels, new_figure

SWEEP_FIGURES = ["latency_vs_capacity", "latency_per_configuration", "bytes_per_token", "hit_rate_vs_capacity",
                 "collision_rate_per_layer"]


def _drawn(plots: list[Plot]) -> dict[str, Plot]:
    """Every plot, asserted to have a figure whose every panel holds data."""
    out = {}
    for p in plots:
        assert p.figure is not None, f"{p.name} was not drawn: {p.note}"
        assert empty_panels(p.figure) == [], p.name
        out[p.name] = p
    return out


def _panel_titles(plot: Plot) -> list[str]:
    return [ax.get_title() for ax in plot.figure.axes if ax.get_label() != "<colorbar>"]


def test_an_empty_chart_is_caught_and_becomes_a_note():
    # what ttft_per_policy.png used to be on a decode-only trace: a bar per policy, every one of height 0
    fig, (ax,) = new_figure(4, 3, 1)
    ax.bar(range(3), [0.0, 0.0, 0.0])
    ax.set_title("TTFT")
    assert empty_panels(fig) == ["TTFT"]
    plot = checked(Plot("ttft", "TTFT per policy", fig))
    assert plot.figure is None and "nothing to draw in TTFT" in plot.note
    # an all-NaN heatmap and a NaN line are empty too; one finite point is data
    fig, (a, b) = new_figure(4, 3, 2)
    a.imshow(torch.full((3, 2), float("nan")).numpy())
    b.plot([1, 2], [float("nan"), float("nan")])
    assert len(empty_panels(fig)) == 2
    b.plot([1], [0.5], marker="o")
    assert len(empty_panels(fig)) == 1


@pytest.fixture(scope="module")
def decode_only(gemma_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("decode")
    evaluate.main(["--trace", str(gemma_store.path), "--phase", "decode", "--policy", "lru,least_stale",
                   "--capacity", "1%,5%", "--json", str(out / "r.json"), "--plots", str(out / "plots")])
    return out, json.loads((out / "r.json").read_text())["results"]


@pytest.fixture(scope="module")
def prefill_only(gemma_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("prefill")
    evaluate.main(["--trace", str(gemma_store.path), "--phase", "prefill", "--policy", "lru,least_stale",
                   "--capacity", "1%,5%", "--prefetch", "none,oracle", "--json", str(out / "r.json"),
                   "--plots", str(out / "plots"), "--report", str(out / "page.html")])
    return out, json.loads((out / "r.json").read_text())["results"]


def test_every_plot_of_a_decode_only_sweep_has_data(decode_only):
    out, results = decode_only
    assert all(r["ttft_s"] is None and r["tpot_s"] > 0 for r in results)  # the premise: no prefill at all
    plots = sweep_report.plots(results)
    drawn = _drawn(plots)
    assert list(drawn) == SWEEP_FIGURES
    # latency shows what the run has (TPOT), says why TTFT is missing, and draws both bounds
    for name in ("latency_vs_capacity", "latency_per_configuration"):
        assert _panel_titles(drawn[name]) == ["TPOT"] and "no TTFT" in drawn[name].note
    labels = [line.get_label() for line in drawn["latency_vs_capacity"].figure.axes[0].get_lines()]
    assert "Belady + oracle prefetch (100%)" in labels and "physical limit" in labels
    assert sorted(p.name for p in (out / "plots").iterdir()) == sorted(f"{n}.png" for n in SWEEP_FIGURES)


def test_every_plot_of_a_prefill_only_sweep_has_data(prefill_only):
    out, results = prefill_only
    assert all(r["tpot_s"] is None and r["ttft_s"] > 0 for r in results)
    drawn = _drawn(sweep_report.plots(results))
    assert list(drawn) == SWEEP_FIGURES
    for name in ("latency_vs_capacity", "latency_per_configuration"):
        assert _panel_titles(drawn[name]) == ["TTFT"] and "no TPOT" in drawn[name].note
    assert any(r["bytes_per_token"] > 0 for r in results)
    assert (out / "page.html").exists() and not (out / "r.html").exists()  # --report overrides the default


def test_one_capacity_says_so_instead_of_a_one_point_line(decode_only):
    _, results = decode_only
    one = [r for r in results if r["capacity"] == "5%"]
    plots = {p.name: p for p in sweep_report.plots(one)}
    assert plots["latency_vs_capacity"].figure is None and "one capacity" in plots["latency_vs_capacity"].note
    assert plots["latency_per_configuration"].figure is not None


def test_sweep_report_opens_offline_in_a_browser(decode_only, tmp_path):
    out, results = decode_only
    page = out / "r.html"  # the default: beside the JSON
    check_report(page, tmp_path, tables=1, figures=len(SWEEP_FIGURES), screenshot=tmp_path / "sweep.png",
                 texts=("--passes all: every replayed pass is counted", "python evaluate.py --trace",
                        "physical limit", "no TTFT: the run has no prefill passes", "git commit"))


def test_the_browser_check_can_fail(tmp_path):
    """The same page passes whole, and is caught with a figure that does not decode, a console error and a
    resource from the network."""
    fig, (ax,) = new_figure(3, 2, 1)
    ax.plot([0, 1], [0, 1])
    good = tmp_path / "good.html"
    html.write(html.Report("t", "python x", {"python": "3"}, ["setup"], "split", [], [Plot("p", "P", fig)]), good)
    check_report(good, tmp_path, tables=0, figures=1)
    bad = tmp_path / "bad.html"
    bad.write_text(good.read_text().replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1).replace(
        "</body>", '<script>console.error("boom");</script></body>'))
    page = open_page(bad, tmp_path)
    assert any("boom" in line for line in page.console), page.console
    assert page.figures_rendered == (0, 1) and 'class="broken"' in page.dom
    with pytest.raises(AssertionError):
        check_report(bad, tmp_path, tables=0, figures=1)
    online = tmp_path / "online.html"
    online.write_text(good.read_text().replace("</body>", '<img src="https://example.com/x.png"></body>'))
    with pytest.raises(AssertionError, match="network"):
        check_report(online, tmp_path, tables=0, figures=1)


def test_default_report_path(tmp_path, monkeypatch):
    monkeypatch.setenv(html.REPORTS_DIR_ENV, str(tmp_path / "r"))
    assert html.report_path(None, "out/x.json", "sweep") == Path("out/x.html")
    assert html.report_path("none", "out/x.json", "sweep") is None
    assert html.report_path("a.html", "out/x.json", "sweep") == Path("a.html")
    default = html.report_path(None, None, "sweep-gemma")
    assert default.parent == tmp_path / "r" and default.name.startswith("sweep-gemma-")


def _family(name: str, pairs: list[tuple[int, int]]):
    """A FamilyResult scored on fixed forecasts at the given (layer, distance) pairs only."""
    # torchmetrics (~2 s to import): only these tests
    from predictors.metrics import LookaheadMetrics
    from predictors.training import FamilyResult

    metrics = LookaheadMetrics(num_layers=4, lookahead=2, num_experts=8, top_k=2)
    g = torch.Generator().manual_seed(0)
    future = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(4 * 16)]).view(16, 4, 2)
    for layer, d in pairs:
        metrics.update(torch.rand(16, 2, 8, generator=g), future, layer, [d])
    return FamilyResult(name, None, metrics)


@pytest.mark.filterwarnings("ignore:The ``compute`` method:UserWarning")  # never_scored: on purpose
def test_recall_figures_have_data_and_name_a_family_without_forecasts():
    from predictors.report import plots  # torchmetrics (~2 s to import): only this test

    results = [_family("dense", [(layer, d) for layer in range(3) for d in (1, 2) if layer + d < 4]),
               _family("one_pair", [(1, 1)]), _family("never_scored", [])]
    figures = _drawn(plots(results))
    assert list(figures) == ["recall_per_distance", "recall_heatmap"]
    assert _panel_titles(figures["recall_heatmap"]) == ["dense", "one_pair"]
    for p in figures.values():
        assert "no held-out forecast from never_scored" in p.note
