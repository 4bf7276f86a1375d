"""The comparison table: every family x distance, on the same held-out tokens, same metric."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.table import Table

from predictors.training import FamilyResult


def comparison(results: list[FamilyResult]) -> tuple[list[str], list[list[Any]]]:
    """(columns, rows): one row per (family, distance) the family covers."""
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


def print_comparison(results: list[FamilyResult], title: str, console: Console | None = None) -> None:
    columns, rows = comparison(results)
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="left" if c == "family" else "right")
    best: dict[int, float] = {}
    for row in rows:
        best[row[1]] = max(best.get(row[1], 0.0), row[3])
    for row in rows:
        cells = [str(x) for x in row]
        if row[3] == best[row[1]]:
            cells[3] = f"[bold green]{cells[3]}[/]"
        table.add_row(*cells)
    if console is None:
        console = Console()
        console.width = max(console.width, 112)  # a pipe or a CI log reports 80 columns: keep rows whole
    console.print(table)


def pair_comparison(results: list[FamilyResult], pairs: list[tuple[int, int]]) -> tuple[list[str], list[list[Any]]]:
    """(columns, rows): recall@k of every family at single layer pairs (l, d), e.g. the sklearn pairs,
    so a family fitted for one pair is compared with the others on exactly that pair."""
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
    if console is None:
        console = Console()
        console.width = max(console.width, 112)
    console.print(table)
