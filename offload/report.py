"""Results of a sweep: a rich table, JSON ``{"results": [...]}`` and matplotlib PNG plots."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

SWEPT = ("policy", "prefetch", "capacity", "hardware", "phase", "cache", "lookahead", "miss", "routing")


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def print_table(results: list[dict[str, Any]], console: Any = None) -> None:
    """One row per configuration; rows of the same setting sit together with least_stale and belady side by side."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if Console().is_terminal else 200)
    varying = [k for k in SWEPT if len({str(r.get(k)) for r in results}) > 1] or ["policy"]
    if "policy" not in varying:
        varying.insert(0, "policy")
    table = Table(title="expert-cache simulation", show_lines=False)
    for k in varying:
        table.add_column(k)
    for col in ("slots", "hit rate", "misses", "collisions", "coll. rate", "pf used/issued", "stall s",
                "TTFT ms", "TPOT ms", "prec/rec"):
        table.add_column(col, justify="right")
    order = {"least_stale": 0, "belady": 1}

    def sort_key(r: dict[str, Any]) -> tuple:
        rest = tuple(str(r.get(k)) for k in varying if k not in ("policy", "capacity"))
        return rest + (r.get("capacity_slots", 0), order.get(r["policy"], 2), r["policy"])

    for r in sorted(results, key=sort_key):
        pr = "-" if r.get("precision") is None else f"{r['precision']:.2f}/{r['recall']:.2f}"
        table.add_row(
            *[_fmt(r.get(k)) for k in varying],
            str(r["capacity_slots"]),
            _fmt(r["hit_rate"]),
            str(r["misses"]),
            str(r["collision_misses"]),
            _fmt(r["collision_rate"], 4),
            f"{r['prefetch_used']}/{r['prefetch_issued']}",
            _fmt(r["stall_time_s"]),
            _fmt(None if r["ttft_s"] is None else r["ttft_s"] * 1e3, 1),
            _fmt(None if r["tpot_s"] is None else r["tpot_s"] * 1e3, 2),
            pr,
        )
    console.print(table)


def write_json(results: list[dict[str, Any]], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": results}, indent=2))


def _label(r: dict[str, Any], keys: list[str]) -> str:
    return " ".join(str(r.get(k)) for k in keys)


def write_plots(results: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """hit rate vs capacity per policy; collision rate per layer per policy (SpecMD Fig. 5); TTFT per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    others = [k for k in SWEPT if k not in ("policy", "capacity") and len({str(r.get(k)) for r in results}) > 1]
    series_keys = ["policy", *others]

    # 1. hit rate vs capacity
    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in results:
        series[_label(r, series_keys)].append((100 * r["capacity_fraction"], r["hit_rate"]))
    for name, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("cache capacity (% of all experts)")
    ax.set_ylabel("hit rate")
    ax.set_title("hit rate vs capacity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out / "hit_rate_vs_capacity.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    # 2. collision rate per layer, one panel per capacity
    caps = sorted({r["capacity_slots"] for r in results})
    fig, axes = plt.subplots(1, len(caps), figsize=(5 * len(caps), 3.8), squeeze=False)
    for ax, cap in zip(axes[0], caps, strict=True):
        for r in results:
            if r["capacity_slots"] != cap:
                continue
            per_layer = r["collision_misses_per_layer"]
            per_access = r["accesses"] / max(1, len(per_layer))
            ax.plot(range(len(per_layer)), [c / per_access for c in per_layer], marker=".", label=_label(r, series_keys))
        ax.set_title(f"capacity {cap} slots")
        ax.set_xlabel("layer")
        ax.set_ylabel("collision rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out / "collision_rate_per_layer.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    # 3. TTFT (and TPOT) per configuration
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(results)), 4))
    labels = [_label(r, series_keys + ["capacity"]) for r in results]
    ttft = [1e3 * (r["ttft_s"] or 0.0) for r in results]
    ax.bar(range(len(results)), ttft)
    ax.set_xticks(range(len(results)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("simulated TTFT (ms)")
    ax.set_title("TTFT per policy")
    fig.tight_layout()
    written.append(out / "ttft_per_policy.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written
