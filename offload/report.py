"""Results of a sweep: a rich table, JSON ``{"results": [...]}`` and matplotlib PNG plots."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

SWEPT = ("policy", "prefetch", "capacity", "hardware", "phase", "cache", "lookahead", "admission", "miss", "routing")


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _ms(v: float | None, digits: int) -> str:
    return _fmt(None if v is None else v * 1e3, digits)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def print_table(results: list[dict[str, Any]], console: Any = None) -> None:
    """One row per configuration, grouped by setting; each setting ends with its physical limit.

    Latency is what a user decides on: TTFT/TPOT with the share of the gap closed between LRU without
    prefetch (0 %) and Belady + oracle prefetch (100 %), and the bytes moved / wasted per token next to
    the hit rate (see :mod:`offload.latency`).
    """
    from rich.console import Console
    from rich.table import Table

    from offload.latency import setting_key

    console = console or Console(width=None if Console().is_terminal else 240)
    varying = [k for k in SWEPT if len({str(r.get(k)) for r in results}) > 1] or ["policy"]
    if "policy" not in varying:
        varying.insert(0, "policy")
    counted = {r.get("passes", "all") for r in results}
    title = "expert-cache simulation" + ("" if counted == {"all"} else
                                         f" (counted: {', '.join(sorted(counted))} passes of the split)")
    table = Table(title=title, show_lines=False, caption=(
        "gap: share of the TTFT/TPOT gap closed between LRU without prefetch (0%) and Belady + oracle prefetch "
        "(100%); physical limit: Belady's bytes / bandwidth or the pure compute, whichever is longer; "
        "MB/tok: bytes moved per token (wasted: prefetched, never used)"))
    for k in varying:
        table.add_column(k)
    for col in ("slots", "hit rate", "coll. rate", "pf used/issued", "MB/tok", "wasted MB/tok", "stall s",
                "TTFT ms", "TTFT gap", "TPOT ms", "TPOT gap", "prec/rec"):
        table.add_column(col, justify="right")
    order = {"least_stale": 0, "belady": 1}

    def sort_key(r: dict[str, Any]) -> tuple:
        rest = tuple(str(r.get(k)) for k in varying if k not in ("policy", "capacity", "prefetch", "lookahead",
                                                                   "admission"))
        return rest + (r.get("capacity_slots", 0), bool(r.get("reference")), order.get(r["policy"], 2), r["policy"],
                       str(r.get("prefetch")), str(r.get("lookahead")), str(r.get("admission")))

    rows = sorted(results, key=sort_key)
    for i, r in enumerate(rows):
        pr = "-" if r.get("precision") is None else f"{r['precision']:.2f}/{r['recall']:.2f}"
        style = "dim" if r.get("reference") else None
        table.add_row(
            *[_fmt(r.get(k)) for k in varying],
            str(r["capacity_slots"]),
            _fmt(r["hit_rate"]),
            _fmt(r["collision_rate"], 4),
            f"{r['prefetch_used']}/{r['prefetch_issued']}",
            _fmt(r.get("bytes_per_token", 0.0) / 1e6, 2),
            _fmt(r.get("wasted_bytes_per_token", 0.0) / 1e6, 2),
            _fmt(r["stall_time_s"]),
            _ms(r["ttft_s"], 1), _pct(r.get("ttft_gap_closed")),
            _ms(r["tpot_s"], 2), _pct(r.get("tpot_gap_closed")),
            pr, style=style,
        )
        last = i + 1 == len(rows) or setting_key(rows[i + 1]) != setting_key(r)
        if last and (r.get("limit_ttft_s") is not None or r.get("limit_tpot_s") is not None):
            cells = ["physical limit" if k == "policy" else "" for k in varying]
            table.add_row(*cells, str(r["capacity_slots"]), *[""] * 6, _ms(r.get("limit_ttft_s"), 1), "",
                          _ms(r.get("limit_tpot_s"), 2), "", "", style="bold", end_section=True)
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
