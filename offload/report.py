"""Results of a sweep: a rich table, JSON ``{"results": [...]}``, figures (PNG, HTML report).

Every figure is made only from metrics the run has: a decode-only trace has no TTFT, so its latency
figures show TPOT and say in one line why TTFT is missing (see :mod:`reporting.figures`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from offload.latency import SETTING, is_reference, setting_key
from offload.miss_handling import LOWER_BIT_MODES
from reporting import html
from reporting.figures import Plot, checked, new_figure, save_pngs
from reporting.provenance import versions

SWEPT = ("policy", "prefetch", "capacity", "hardware", "phase", "cache", "lookahead", "admission", "miss", "routing")
#: the two latencies, as (result key, physical-limit key, label, the passes it needs)
LATENCIES = (("ttft_s", "limit_ttft_s", "TTFT", "prefill"), ("tpot_s", "limit_tpot_s", "TPOT", "decode"))
CAPTION = ("gap: share of the TTFT/TPOT gap closed between LRU without prefetch (0%) and Belady + oracle prefetch "
           "(100%); physical limit: Belady's bytes / bandwidth or the pure compute, whichever is longer; "
           "MB/tok: bytes moved per token (wasted: prefetched, never used)")


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


def _by_precision(rates: dict[str, float] | None) -> str:
    """Hit rate per precision of the copy hit, the precisions that were hit only."""
    hit = [f"{p} {v:.3f}" for p, v in (rates or {}).items() if v > 0]
    return ", ".join(hit) if hit else "-"


def _varying(results: list[dict[str, Any]]) -> list[str]:
    varying = [k for k in SWEPT if len({str(r.get(k)) for r in results}) > 1] or ["policy"]
    if "policy" not in varying:
        varying.insert(0, "policy")
    return varying


@dataclass
class SweepTable:
    """The sweep's table as formatted cells: what the terminal and the HTML report both show."""

    title: str
    columns: list[str]
    labels: int  # the first ``labels`` columns name the configuration
    rows: list[list[str]]
    kinds: list[str]  # per row: "" | "reference" (rows the sweep added) | "limit" (the setting's physical limit)


def sweep_table(results: list[dict[str, Any]]) -> SweepTable:
    """One row per configuration, grouped by setting; each setting ends with its physical limit."""
    varying = _varying(results)
    counted = {r.get("passes", "all") for r in results}
    title = "expert-cache simulation" + ("" if counted == {"all"} else
                                         f" (counted: {', '.join(sorted(counted))} passes of the split)")

    lower_bit = any(r.get("miss") in LOWER_BIT_MODES for r in results)  # then: hits per precision
    columns = [*varying, "slots", "hit rate", *(["hits by precision"] if lower_bit else []), "coll. rate",
               "pf used/issued", "MB/tok", "wasted MB/tok", "stall s", "TTFT ms", "TTFT gap", "TPOT ms", "TPOT gap",
               "prec/rec"]
    order = {"least_stale": 0, "belady": 1}

    def sort_key(r: dict[str, Any]) -> tuple:
        rest = tuple(str(r.get(k)) for k in varying if k not in ("policy", "capacity", "prefetch", "lookahead",
                                                                   "admission"))
        return rest + (r.get("capacity_slots", 0), bool(r.get("reference")), order.get(r["policy"], 2), r["policy"],
                       str(r.get("prefetch")), str(r.get("lookahead")), str(r.get("admission")))

    ordered = sorted(results, key=sort_key)
    rows: list[list[str]] = []
    kinds: list[str] = []
    for i, r in enumerate(ordered):
        pr = "-" if r.get("precision") is None else f"{r['precision']:.2f}/{r['recall']:.2f}"
        rows.append([
            *[_fmt(r.get(k)) for k in varying],
            str(r["capacity_slots"]),
            _fmt(r["hit_rate"]),
            *([_by_precision(r.get("hit_rate_by_precision"))] if lower_bit else []),
            _fmt(r["collision_rate"], 4),
            f"{r['prefetch_used']}/{r['prefetch_issued']}",
            _fmt(r.get("bytes_per_token", 0.0) / 1e6, 2),
            _fmt(r.get("wasted_bytes_per_token", 0.0) / 1e6, 2),
            _fmt(r["stall_time_s"]),
            _ms(r["ttft_s"], 1), _pct(r.get("ttft_gap_closed")),
            _ms(r["tpot_s"], 2), _pct(r.get("tpot_gap_closed")),
            pr,
        ])
        kinds.append("reference" if r.get("reference") else "")
        last = i + 1 == len(ordered) or setting_key(ordered[i + 1]) != setting_key(r)
        if last and (r.get("limit_ttft_s") is not None or r.get("limit_tpot_s") is not None):
            cells = ["physical limit" if k == "policy" else "" for k in varying]
            rows.append([*cells, str(r["capacity_slots"]), *[""] * (7 if lower_bit else 6), _ms(r.get("limit_ttft_s"), 1), "",
                         _ms(r.get("limit_tpot_s"), 2), "", ""])
            kinds.append("limit")
    return SweepTable(title, columns, len(varying), rows, kinds)


def print_table(results: list[dict[str, Any]], console: Any = None) -> None:
    """Latency is what a user decides on: TTFT/TPOT with the share of the gap closed between LRU without
    prefetch (0 %) and Belady + oracle prefetch (100 %), and the bytes moved / wasted per token next to
    the hit rate (see :mod:`offload.latency`).
    """
    console = console or Console(width=None if Console().is_terminal else 240)
    t = sweep_table(results)
    table = Table(title=t.title, show_lines=False, caption=CAPTION)
    for i, col in enumerate(t.columns):
        table.add_column(col, justify=None if i < t.labels else "right")
    for cells, kind in zip(t.rows, t.kinds, strict=True):
        style = {"reference": "dim", "limit": "bold"}.get(kind)
        table.add_row(*cells, style=style, end_section=kind == "limit")
    console.print(table)


def write_json(results: list[dict[str, Any]], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": results}, indent=2))


def _label(r: dict[str, Any], keys: list[str]) -> str:
    return " ".join(str(r.get(k)) for k in keys)


# ---------------------------------------------------------------------- figures
def _role(r: dict[str, Any]) -> str:
    """full: the 100 % reference line; limit-source: Belady without prefetch that the sweep only added to
    compute the physical limit (drawn as the limit, not as a configuration); config: everything else."""
    if is_reference(r, "belady", "oracle"):
        return "full"
    if r.get("reference") and is_reference(r, "belady", "none"):
        return "limit-source"
    return "config"


def _series_keys(results: list[dict[str, Any]]) -> list[str]:
    """What names a configuration in a legend: the policy and every other knob the sweep varied, but
    not the capacity (the x axis) nor the setting (one panel each)."""
    knobs = [k for k in ("prefetch", "lookahead", "admission") if len({str(r.get(k)) for r in results}) > 1]
    return ["policy", *knobs]


def _group_keys(results: list[dict[str, Any]]) -> list[str]:
    """The setting keys (capacity aside) that differ between results: hardware, phase, cache, ..."""
    return [k for k in SETTING if k != "capacity" and len({str(r.get(k)) for r in results}) > 1]


def _groups(results: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Results by setting without the capacity: references and the physical limit are per setting, so a
    latency panel holds one setting. Named by what varies between the groups ('' when there is one)."""
    keys = _group_keys(results)
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        groups[", ".join(f"{k} {r.get(k)}" for k in keys)].append(r)
    return sorted(groups.items())


def _missing_latency(results: list[dict[str, Any]], name: str, phase: str) -> str:
    """Why a latency is not drawn: the phase it measures was not replayed."""
    phases = sorted({str(r.get("phase")) for r in results})
    return f"no {name}: the run has no {phase} passes (--phase {', '.join(phases)})"


def latency_vs_capacity(results: list[dict[str, Any]]) -> Plot:
    """TTFT and TPOT against capacity, one line per configuration, with the Belady + oracle reference
    (dashed) and the physical limit (shaded: no exact schedule is faster) drawn in."""
    title = "Latency vs capacity, against its bounds"
    caption = ("Each line is one configuration. Dashed black: Belady + oracle prefetch (the 100 % reference of the "
               "gap closed). Grey band: below the physical limit (Belady's bytes / bandwidth, or pure compute): "
               "no schedule with exact outputs gets there.")
    if len({r["capacity_slots"] for r in results}) < 2:
        caps = sorted({str(r.get("capacity")) for r in results})
        return Plot("latency_vs_capacity", title, None, caption=caption,
                    note=f"one capacity in this run ({', '.join(caps)}): sweep --capacity 1%,5%,25% to draw latency "
                         "against capacity; the per-configuration chart below shows this capacity")
    panels, missing = [], []
    for group, rows in _groups(results):
        for key, limit_key, name, phase in LATENCIES:
            if any(r.get(key) is not None for r in rows):
                panels.append((group, rows, key, limit_key, name))
            else:
                missing.append(_missing_latency(rows, name, phase) + (f" in {group}" if group else ""))
    if not panels:
        return Plot("latency_vs_capacity", title, None, note="; ".join(missing), caption=caption)
    fig, axes = new_figure(5.4, 3.8, len(panels))
    keys = _series_keys(results)
    for ax, (group, rows, key, limit_key, name) in zip(axes, panels, strict=True):
        series: dict[str, list[tuple[float, float]]] = defaultdict(list)
        full: list[tuple[float, float]] = []
        limit: dict[float, float] = {}
        for r in rows:
            x = 100 * r["capacity_fraction"]
            if r.get(limit_key) is not None:
                limit[x] = 1e3 * r[limit_key]
            if r.get(key) is None:
                continue
            role = _role(r)
            if role == "full":
                full.append((x, 1e3 * r[key]))
            elif role == "config":
                series[_label(r, keys) + (" (0% reference)" if r.get("reference") else "")].append((x, 1e3 * r[key]))
        for label, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        if full:
            full.sort()
            ax.plot([p[0] for p in full], [p[1] for p in full], "k--", marker="D", ms=4,
                    label="Belady + oracle prefetch (100%)")
        if limit:
            xs = sorted(limit)
            ax.fill_between(xs, 0, [limit[x] for x in xs], color="0.85", zorder=0)
            ax.plot(xs, [limit[x] for x in xs], color="0.45", lw=1.2, label="physical limit")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("cache capacity (% of all experts)")
        ax.set_ylabel(f"{name} (ms)")
        ax.set_title(f"{name}" + (f" - {group}" if group else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return Plot("latency_vs_capacity", title, fig, note="; ".join(missing), caption=caption)


def _bar_label(r: dict[str, Any], keys: list[str], group_keys: list[str]) -> str:
    """``policy prefetch @ capacity (role) | setting``: one line names a bar."""
    tag = {"full": " (100% ref.)", "limit-source": " (fewest bytes)"}.get(_role(r), "")
    if not tag and r.get("reference"):
        tag = " (0% ref.)"
    setting = " | " + ", ".join(str(r.get(k)) for k in group_keys) if group_keys else ""
    return f"{_label(r, keys)} @ {r.get('capacity')}{tag}{setting}"


def _bar_order(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(results, key=lambda r: (setting_key({**r, "capacity": ""}), r["capacity_slots"],
                                          {"config": 0, "full": 1, "limit-source": 2}[_role(r)],
                                          bool(r.get("reference")), _label(r, ["policy", "prefetch"])))


def latency_per_configuration(results: list[dict[str, Any]]) -> Plot:
    """A bar per configuration for each latency the run has; each bar carries its setting's physical
    limit (black tick) and the share of the gap it closes."""
    title = "Latency per configuration"
    caption = ("Bars: simulated mean latency per configuration. Black tick: the physical limit of that bar's "
               "setting. Right of each bar: the share of the gap closed between LRU without prefetch (0%) and "
               "Belady + oracle prefetch (100%), where the gap is wide enough to measure.")
    keys, group_keys = _series_keys(results), _group_keys(results)
    rows = [r for r in _bar_order(results) if _role(r) != "limit-source"]
    panels = [(key, limit_key, name) for key, limit_key, name, _ in LATENCIES if any(r.get(key) is not None for r in rows)]
    missing = [_missing_latency(rows, name, phase) for key, _, name, phase in LATENCIES
               if all(r.get(key) is None for r in rows)]
    if not panels:
        return Plot("latency_per_configuration", title, None, note="; ".join(missing), caption=caption)
    fig, axes = new_figure(6.2, 1.2 + 0.32 * len(rows), len(panels))
    for ax, (key, limit_key, name) in zip(axes, panels, strict=True):
        drawn = [r for r in rows if r.get(key) is not None]
        y = list(range(len(drawn)))[::-1]
        colors = ["0.2" if _role(r) == "full" else ("0.65" if r.get("reference") else "tab:blue") for r in drawn]
        ax.barh(y, [1e3 * r[key] for r in drawn], color=colors)
        ticks = [(yi, 1e3 * r[limit_key]) for yi, r in zip(y, drawn, strict=True) if r.get(limit_key) is not None]
        if ticks:
            ax.scatter([t[1] for t in ticks], [t[0] for t in ticks], marker="|", s=260, color="black", zorder=3,
                       label="physical limit")
            ax.legend(fontsize=7, loc="lower right")
        gap_key = f"{name.lower()}_gap_closed"
        for yi, r in zip(y, drawn, strict=True):
            if r.get(gap_key) is not None:
                ax.annotate(f" {100 * r[gap_key]:.0f}%", (1e3 * r[key], yi), va="center", fontsize=7)
        labels = [_bar_label(r, keys, group_keys) for r in drawn]
        ax.set_yticks(y, labels, fontsize=7)
        ax.set_xlabel(f"simulated {name} (ms)")
        ax.set_title(name)
        ax.grid(axis="x", alpha=0.3)
        ax.margins(x=0.12)
    return Plot("latency_per_configuration", title, fig, note="; ".join(missing), caption=caption)


def bytes_per_token(results: list[dict[str, Any]]) -> Plot:
    """Bytes over the link per token, split into used and wasted (prefetched, never used): the link is the
    bottleneck, so every wasted byte is time another copy could not use."""
    title = "Bytes moved per token"
    caption = ("Blue: bytes copied per token that were used; orange: wasted (prefetched, evicted unused). Belady "
               "without prefetch moves the fewest bytes any eviction can: the numerator of the physical limit.")
    rows = _bar_order(results)
    if not any((r.get("bytes_per_token") or 0) > 0 for r in rows):
        return Plot("bytes_per_token", title, None, caption=caption,
                    note="no bytes crossed the link in any configuration (the cache held every expert used)")
    keys, group_keys = _series_keys(results), _group_keys(results)
    fig, (ax,) = new_figure(7.5, 1.2 + 0.3 * len(rows), 1)
    y = list(range(len(rows)))[::-1]
    wasted = [(r.get("wasted_bytes_per_token") or 0.0) / 1e6 for r in rows]
    used = [(r.get("bytes_per_token") or 0.0) / 1e6 - w for r, w in zip(rows, wasted, strict=True)]
    ax.barh(y, used, color="tab:blue", label="used")
    ax.barh(y, wasted, left=used, color="tab:orange", label="wasted")
    ax.set_xlim(0, 1.04 * max(u + w for u, w in zip(used, wasted, strict=True)))
    labels = [_bar_label(r, keys, group_keys) for r in rows]
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xlabel("MB over the link per token")
    ax.set_title("bytes moved per token")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    return Plot("bytes_per_token", title, fig, caption=caption)


def hit_rate_vs_capacity(results: list[dict[str, Any]]) -> Plot:
    others = [k for k in SWEPT if k not in ("policy", "capacity") and len({str(r.get(k)) for r in results}) > 1]
    fig, (ax,) = new_figure(6, 4, 1)
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in results:
        series[_label(r, ["policy", *others])].append((100 * r["capacity_fraction"], r["hit_rate"]))
    for name, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("cache capacity (% of all experts)")
    ax.set_ylabel("hit rate")
    ax.set_title("hit rate vs capacity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return Plot("hit_rate_vs_capacity", "Hit rate vs capacity", fig,
                caption="A symptom, not the goal: a configuration can hit more and still be slower (wasted copies).")


def collision_rate_per_layer(results: list[dict[str, Any]]) -> Plot:
    """Collision rate per layer per configuration, one panel per capacity (SpecMD Fig. 5)."""
    others = [k for k in SWEPT if k not in ("policy", "capacity") and len({str(r.get(k)) for r in results}) > 1]
    caps = sorted({r["capacity_slots"] for r in results})
    fig, axes = new_figure(5, 3.8, len(caps), columns=3)
    for ax, cap in zip(axes, caps, strict=True):
        for r in results:
            if r["capacity_slots"] != cap:
                continue
            per_layer = r["collision_misses_per_layer"]
            per_access = r["accesses"] / max(1, len(per_layer))
            ax.plot(range(len(per_layer)), [c / per_access for c in per_layer], marker=".",
                    label=_label(r, ["policy", *others]))
        ax.set_title(f"capacity {cap} slots")
        ax.set_xlabel("layer")
        ax.set_ylabel("collision rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return Plot("collision_rate_per_layer", "Collision rate per layer", fig,
                caption="A collision miss is a miss on an expert evicted earlier in the same pass (SpecMD Fig. 5).")


def plots(results: list[dict[str, Any]]) -> list[Plot]:
    """Every figure of a sweep, latency first; each checked to hold data (else a note)."""
    return [checked(p) for p in (latency_vs_capacity(results), latency_per_configuration(results),
                                 bytes_per_token(results), hit_rate_vs_capacity(results),
                                 collision_rate_per_layer(results))]


def write_plots(results: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """The sweep's figures as PNG files (plots that cannot be drawn write nothing: see their notes)."""
    return save_pngs(plots(results), out_dir)


# ---------------------------------------------------------------------- HTML report
def split_statement(results: list[dict[str, Any]]) -> str:
    """What the numbers count, in the words of ``--passes``: every pass, or one part of train.py's split."""
    learned = sorted({str(r.get("prefetch")) for r in results if str(r.get("prefetch")).startswith("ckpt:")}
                     | {str(r["policy_params"]["forecaster"]) for r in results
                        if (r.get("policy_params") or {}).get("forecaster")})
    parts = []
    for passes in sorted({str(r.get("passes", "all")) for r in results}):
        rows = [r for r in results if str(r.get("passes", "all")) == passes]
        if passes == "all":
            counted = f"--passes all: every replayed pass is counted ({rows[0]['passes_counted']} passes)"
            if learned:
                counted += (f"; the learned parts ({', '.join(learned)}) may have trained on some of them: "
                            "--passes held-out counts only the test part of train.py's split")
            else:
                counted += "; no part of this sweep was trained, so there is nothing to hold out"
        else:
            part = "test (held-out)" if passes in ("held-out", "test") else passes
            counted = (f"--passes {passes}: the cache replays every pass in order, and only the {part} passes of "
                       f"train.py's split (split {rows[0].get('split')}, seed {rows[0].get('split_seed')}) are "
                       f"counted ({rows[0]['passes_counted']} of {rows[0]['passes_replayed']} passes)")
            if learned:
                counted += f"; learned parts: {', '.join(learned)}"
        parts.append(counted)
    return ". ".join(parts)


def _profile_line(r: dict[str, Any]) -> str:
    hw = r.get("hardware_profile") or {}
    if not hw:
        return f"hardware {r.get('hardware')}"
    return (f"hardware {r.get('hardware')}: link {hw['link_gbps']:g} GB/s, {hw['tflops']:g} TFLOP/s, "
            f"HBM {hw['hbm_gbps']:g} GB/s")


def html_report(results: list[dict[str, Any]], figures: list[Plot], *, command: str, setup: list[str],
                subject: str = ""):
    """The sweep as one :class:`reporting.html.Report`: figures, the table, the split, provenance;
    ``subject`` (the trace) completes the title."""
    t = sweep_table(results)
    profiles = sorted({_profile_line(r) for r in results})
    lines = [*setup, f"phase: {', '.join(sorted({str(r.get('phase')) for r in results}))}; capacity: "
             f"{', '.join(sorted({str(r.get('capacity')) for r in results}))}", *profiles]
    return html.Report(title=f"{t.title}: {subject}" if subject else t.title, command=command, versions=versions(),
                       setup=lines, split=split_statement(results),
                       tables=[html.Table(t.title, t.columns, t.rows, caption=CAPTION, row_kinds=t.kinds, left=t.labels)],
                       plots=figures)
