"""The comparison of every family x distance on the same held-out tokens: table, figures, HTML report.

Reuse forecasters (``reuse_*``) answer another question -- will an expert be chosen at its next
opportunity? -- so they get their own table (held-out AUROC and BCE, :func:`reuse_comparison`) and
stay out of the recall@k table, the pair table and the recall figures.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import matplotlib
import numpy as np
from rich.console import Console
from rich.table import Table

from predictors.training import FamilyResult
from predictors.wandb_setup import resolve_mode_of
from reporting import html
from reporting.figures import Plot, checked, new_figure, wandb_images
from reporting.provenance import versions


def lookahead_results(results: list[FamilyResult]) -> list[FamilyResult]:
    """The lookahead families of a run (scored by recall@k), without its reuse forecasters."""
    return [r for r in results if not r.is_reuse]


def comparison(results: list[FamilyResult]) -> tuple[list[str], list[list[Any]]]:
    """(columns, rows): one row per (lookahead family, distance) the family covers."""
    results = lookahead_results(results)
    if not results:
        return [], []
    k_over = results[0].metrics.k_over
    columns = ["family", "d", "precision@k", "recall@k", f"precision@{k_over}", f"recall@{k_over}", "exact-set",
               "layers"]
    rows: list[list[Any]] = []
    for r in results:
        per_d = r.metrics.per_distance()
        layers_counted = (r.metrics.tokens > 0).sum(dim=0).tolist()
        for d in range(r.metrics.lookahead):
            recall = float(per_d["recall@k"][d])
            if math.isnan(recall):
                continue
            rows.append([r.family, d + 1, round(float(per_d["precision@k"][d]), 4), round(recall, 4),
                         round(float(per_d[f"precision@{k_over}"][d]), 4),
                         round(float(per_d[f"recall@{k_over}"][d]), 4), round(float(per_d["exact"][d]), 4),
                         int(layers_counted[d])])
    return columns, rows


def reuse_comparison(results: list[FamilyResult]) -> tuple[list[str], list[list[Any]]]:
    """(columns, rows): one row per reuse forecaster, its AUROC and BCE on the held-out rows."""
    columns = ["family", "test AUROC", "test BCE", "val AUROC", "val BCE", "training rows", "test rows"]
    rows: list[list[Any]] = []
    for r in results:
        if r.reuse is None:
            continue
        m = r.reuse["metrics"]
        rows.append([r.family, *[round(m[k], 4) if k in m else None
                                 for k in ("test_auroc", "test_bce", "val_auroc", "val_bce")],
                     r.reuse["rows"]["train"], r.reuse["rows"]["test"]])
    return columns, rows


def _console(console: Console | None) -> Console:
    if console is None:
        console = Console()
        console.width = max(console.width, 112)  # a pipe or a CI log reports 80 columns: keep rows whole
    return console


def _print_table(title: str, columns: list[str], rows: list[list[Any]], best_cell: Callable[[list[Any]], int | None],
                 console: Console | None) -> None:
    """``rows`` as a rich table; ``best_cell(row)`` names the cell of the row to print in bold green, if any."""
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="left" if c == "family" else "right")
    for row in rows:
        cells = ["-" if x is None else str(x) for x in row]
        col = best_cell(row)
        if col is not None:
            cells[col] = f"[bold green]{cells[col]}[/]"
        table.add_row(*cells)
    _console(console).print(table)


def print_reuse_comparison(results: list[FamilyResult], title: str, console: Console | None = None) -> None:
    """The reuse forecasters' table (nothing when the run trained none); the best test AUROC in bold."""
    columns, rows = reuse_comparison(results)
    if not rows:
        return
    best = max((row[1] for row in rows if row[1] is not None), default=None)
    _print_table(title, columns, rows, lambda row: 1 if best is not None and row[1] == best else None, console)


def print_comparison(results: list[FamilyResult], title: str, console: Console | None = None) -> None:
    """The recall@k table of the lookahead families (nothing when the run trained none); the best
    family at each distance in bold."""
    columns, rows = comparison(results)
    if not columns:
        return
    best: dict[int, float] = {}
    for row in rows:
        best[row[1]] = max(best.get(row[1], 0.0), row[3])
    _print_table(title, columns, rows, lambda row: 3 if row[3] == best[row[1]] else None, console)


def pair_comparison(results: list[FamilyResult], pairs: list[tuple[int, int]]) -> tuple[list[str], list[list[Any]]]:
    """(columns, rows): recall@k of every family at single layer pairs (l, d), e.g. the sklearn pairs,
    so a family fitted for one pair is compared with the others on exactly that pair."""
    results = lookahead_results(results)
    columns = ["layer l", "d", *[r.family for r in results]]
    rows: list[list[Any]] = []
    for layer, d in pairs:
        row: list[Any] = [layer, d]
        for r in results:
            value = float(r.metrics.compute()["recall@k"][layer, d - 1])
            row.append(None if math.isnan(value) else round(value, 4))
        rows.append(row)
    return columns, rows


def print_pairs(results: list[FamilyResult], pairs: list[tuple[int, int]], console: Console | None = None) -> None:
    columns, rows = pair_comparison(results, pairs)
    table = Table(title="recall@k at single layer pairs (forecast of layer l+d made at layer l)")
    for c in columns:
        table.add_column(c, justify="right")
    for row in rows:
        table.add_row(*["-" if x is None else str(x) for x in row])
    _console(console).print(table)


# ---------------------------------------------------------------------- figures
def _recall_grid(r: FamilyResult) -> np.ndarray:
    """(layers, distances) held-out recall@k; NaN where the family made no forecast."""
    return r.metrics.compute()["recall@k"].double().cpu().numpy()


def recall_per_distance_plot(results: list[FamilyResult]) -> Plot:
    """The headline of train.py: recall@k of every family against the lookahead distance."""
    title = "Recall@k per lookahead distance"
    caption = ("Held-out tokens; recall@k: share of the experts layer l+d used that are among the k a forecast made "
               "at layer l ranks highest (k = the model's top-k), averaged over the layers each family covers.")
    fig, (ax,) = new_figure(6, 4, 1)
    skipped = []
    for r in results:
        recall = r.metrics.per_distance()["recall@k"].double().cpu().numpy()
        d = np.arange(1, len(recall) + 1)
        ok = np.isfinite(recall)
        if not ok.any():
            skipped.append(r.family)
            continue
        ax.plot(d[ok], recall[ok], marker="o", label=r.family)
    ax.set_xlabel("lookahead distance d (forecast of layer l+d made at layer l)")
    ax.set_ylabel("recall@k")
    ax.set_ylim(0, 1)
    ax.set_xticks(range(1, max((r.metrics.lookahead for r in results), default=1) + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    note = f"no held-out forecast from {', '.join(skipped)}" if skipped else ""
    return Plot("recall_per_distance", title, fig, note=note, caption=caption)


def recall_heatmap_plot(results: list[FamilyResult]) -> Plot:
    """Recall@k per (layer, distance), one panel per family: where in the model forecasts get hard."""
    title = "Recall@k per layer and distance"
    caption = ("One panel per family: row = layer l the forecast is made at, column = distance d; grey = no forecast "
               "there (past the last layer, or a family fitted for single layer pairs). Same colour scale in every "
               "panel.")
    grids = [(r.family, _recall_grid(r)) for r in results]
    drawn = [(f, g) for f, g in grids if np.isfinite(g).any()]
    skipped = [f for f, g in grids if not np.isfinite(g).any()]
    note = f"no held-out forecast from {', '.join(skipped)}" if skipped else ""
    if not drawn:
        return Plot("recall_heatmap", title, None, note=note or "no family was evaluated", caption=caption)
    layers, distances = drawn[0][1].shape
    fig, axes = new_figure(max(2.6, 0.55 * distances + 1.8), max(2.6, 0.22 * layers + 1.2), len(drawn), columns=4)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.85")
    image = None
    for ax, (family, grid) in zip(axes, drawn, strict=True):
        image = ax.imshow(np.ma.masked_invalid(grid), vmin=0.0, vmax=1.0, cmap=cmap, aspect="auto",
                          interpolation="nearest")
        ax.set_title(family, fontsize=9)
        ax.set_xticks(range(distances), [str(d + 1) for d in range(distances)])
        ax.set_xlabel("distance d")
        ax.set_ylabel("layer l")
        if layers * distances <= 120:  # small grids: the numbers themselves
            for (li, di), v in np.ndenumerate(grid):
                if np.isfinite(v):
                    ax.text(di, li, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if v > 0.6 else "white")
    fig.colorbar(image, ax=axes, label="recall@k", shrink=0.9)
    return Plot("recall_heatmap", title, fig, note=note, caption=caption)


def plots(results: list[FamilyResult]) -> list[Plot]:
    """Every figure of a training run, each checked to hold data (else a note)."""
    results = lookahead_results(results)
    return [checked(recall_per_distance_plot(results)), checked(recall_heatmap_plot(results))]


def log_figures(logger: Any, figures: list[Plot]) -> None:
    """The report's figures as W&B images in the training run (a disabled run logs nothing)."""
    run = logger.experiment
    if getattr(run, "disabled", False) or resolve_mode_of(run) == "disabled":
        return

    run.log(wandb_images(figures))


def html_report(results: list[FamilyResult], figures: list[Plot], *, command: str, title: str, setup: list[str],
                split: str, pairs: list[tuple[int, int]] | None = None, reuse_title: str = "reuse forecasters"):
    """The training run as one :class:`reporting.html.Report`: comparison tables, heatmaps, the split."""
    def cells(row: list[Any]) -> list[str]:
        return ["-" if v is None else str(v) for v in row]

    tables = []
    columns, rows = comparison(results)
    if columns:
        tables.append(html.Table(title, columns, [cells(r) for r in rows],
                                 caption="precision/recall at k = the model's top-k and at the over-fetch k; exact-set: "
                                         "the top-k forecast is exactly the set used; layers: layers counted at that "
                                         "distance"))
    reuse_columns, reuse_rows = reuse_comparison(results)
    if reuse_rows:
        tables.append(html.Table(reuse_title, reuse_columns, [cells(r) for r in reuse_rows],
                                 caption="one row per (pass, layer, expert used before): will the expert be chosen at "
                                         "its next opportunity? AUROC of the forecast probability and its binary "
                                         "cross-entropy on the held-out passes (what the forecast eviction policy "
                                         "ranks by)"))
    if pairs:
        pc, pr = pair_comparison(results, pairs)
        tables.append(html.Table("recall@k at single layer pairs (forecast of layer l+d made at layer l)", pc,
                                 [cells(r) for r in pr], left=0))
    tables.append(html.Table("training", ["family", "weights selected on validation", "seconds", "samples/s"],
                             [[r.family, "yes" if r.trained else "no (never picked as best)", f"{r.seconds:.1f}",
                               "-" if not r.samples_per_s else f"{r.samples_per_s:,.0f}"] for r in results], left=2))
    return html.Report(title=f"Predictor comparison: {title}", command=command, versions=versions(), setup=setup,
                       split=split, tables=tables, plots=figures)
