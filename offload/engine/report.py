"""The evaluation report: one rich table, JSON, PNG plots and W&B logging of the same numbers."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from offload.miss_handling import LOWER_BIT_MODES
from reporting import html
from reporting.figures import Plot, checked, new_figure, save_pngs, wandb_images
from reporting.provenance import versions

COLUMNS = ("precision", "recall", "hit_rate", "collision_rate", "mb_per_token", "wasted_mb_per_token", "stall_ms",
           "ttft_ms", "sim_ttft_ms", "ttft_gap", "tpot_ms", "sim_tpot_ms", "tpot_gap", "agreement", "perplexity",
           "next_agreement", "low_bit_runs")


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000.0 * seconds


def _engine_tokens(entry: dict[str, Any]) -> int:
    """Tokens the engine's passes processed: each prompt, then one per decode step."""
    return sum(p["prompt_tokens"] + max(p["new_tokens"] - 1, 0) for p in entry["prompts"])


def table_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat dict per table line: the plain model, then every configuration, then the physical limit.

    Engine rows show what the engine measured and, in ``sim_*``, what the simulator predicts for the
    same recorded run. Simulator-only rows (the references) show the simulator's numbers. ``*_gap``:
    share of the gap closed between LRU without prefetch (0 %) and Belady + oracle prefetch (100 %).
    """
    out: list[dict[str, Any]] = []
    plain = report.get("plain")
    if plain is not None:
        quality = report.get("plain_quality") or {}
        out.append({"label": "plain model (all experts resident)", "source": "engine", "hit_rate": 1.0,
                    "collision_rate": 0.0, "stall_ms": 0.0, "mb_per_token": 0.0, "ttft_ms": _ms(plain["ttft_s"]),
                    "tpot_ms": _ms(plain["tpot_s"]), "agreement": 1.0, "perplexity": quality.get("perplexity"),
                    "next_agreement": quality.get("agreement")})
    for row in report["rows"]:
        sim = row.get("sim") or {}
        eng = (row.get("engine") or {}).get("summary")
        if row.get("role") == "limit":
            bound = row.get("limit") or {}
            out.append({"label": "physical limit (Belady's bytes / bandwidth, or compute)", "source": "sim",
                        "ttft_ms": _ms(bound.get("ttft_s")), "tpot_ms": _ms(bound.get("tpot_s")),
                        "mb_per_token": sim.get("bytes_per_token", 0.0) / 1e6,
                        "wasted_mb_per_token": sim.get("wasted_bytes_per_token", 0.0) / 1e6})
            continue
        line: dict[str, Any] = {"label": row["label"], "sim_ttft_ms": _ms(sim.get("ttft_s")),
                                "sim_tpot_ms": _ms(sim.get("tpot_s")), "ttft_gap": row.get("ttft_gap_closed"),
                                "tpot_gap": row.get("tpot_gap_closed")}
        if eng is not None:
            predicted = eng.get("forecast_predicted", 0)
            line.update(
                source="engine",
                precision=eng["precision"] if predicted else None,
                recall=eng["recall"] if predicted else None,
                hit_rate=eng["hit_rate"], collision_rate=eng["collision_rate"],
                mb_per_token=eng["bytes_moved"] / max(_engine_tokens(row["engine"]), 1) / 1e6,
                wasted_mb_per_token=eng["wasted_bytes"] / max(_engine_tokens(row["engine"]), 1) / 1e6,
                stall_ms=_ms(eng["stall_s_per_prompt"]), ttft_ms=_ms(eng["ttft_s"]), tpot_ms=_ms(eng["tpot_s"]),
                agreement=eng.get("token_agreement"), exact_match=eng.get("exact_match"),
                hit_rate_by_precision={p: n / eng["accesses"] if eng["accesses"] else 0.0
                                       for p, n in (eng.get("hits_by_precision") or {}).items()},
                low_bit_runs=_low_bit_share(eng.get("served_by_precision")),
            )
            quality = row["engine"].get("quality") or {}
            line.update(perplexity=quality.get("perplexity"), next_agreement=quality.get("agreement"))
        else:
            prompts = max(1, int(report.get("prompts") or 1))
            line.update(
                source="sim", precision=sim.get("precision"), recall=sim.get("recall"),
                hit_rate=sim.get("hit_rate"), collision_rate=sim.get("collision_rate"),
                mb_per_token=sim.get("bytes_per_token", 0.0) / 1e6,
                wasted_mb_per_token=sim.get("wasted_bytes_per_token", 0.0) / 1e6,
                stall_ms=_ms(sim["stall_time_s"] / prompts) if sim.get("stall_time_s") is not None else None,
                ttft_ms=_ms(sim.get("ttft_s")), tpot_ms=_ms(sim.get("tpot_s")),
                hit_rate_by_precision=sim.get("hit_rate_by_precision"),
                low_bit_runs=_low_bit_share(sim.get("served_by_precision")),
            )
        out.append(line)
    return out


def _low_bit_share(served: dict[str, int] | None) -> float | None:
    """Share of expert computations that ran on a low-bit copy."""
    if not served or not sum(served.values()):
        return None
    return 1.0 - served.get("native", 0) / sum(served.values())


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "hit_rate_by_precision":  # only the precisions that were hit
        hit = [f"{p} {100 * v:.1f}%" if v >= 5e-4 else f"{p} <0.1%" for p, v in value.items() if v > 0]
        return ", ".join(hit) if hit else "-"
    if key == "perplexity":
        return f"{value:.5g}"
    if key in ("ttft_gap", "tpot_gap"):
        return f"{100 * value:.0f}%"
    if key in ("precision", "recall", "hit_rate", "collision_rate", "agreement", "exact_match", "next_agreement",
               "low_bit_runs"):
        return f"{100 * value:.1f}%"
    return f"{value:.2f}"


def describe_setup(report: dict[str, Any]) -> list[str]:
    """The lines above the table: what was run, on which prompts, and how copies were made to cost."""
    bw = report.get("bandwidth_bytes_per_s")
    lines = [f"{report['model']}: {report.get('prompts')} prompts of {report.get('dataset')}, cache "
             f"{report['capacity']} ({report['capacity_slots']} slots), link "
             f"{'unthrottled' if bw is None else f'{bw / 1e9:g} GB/s'}, device {report['device']}, prefetch admission "
             f"{report.get('admission')}"]
    if report.get("emulated"):
        lines.append(f"copy-bound: each copy holds the link as long as a {report['emulated']} expert would "
                     f"({report['copy_bytes'] / 1e6:.1f} MB = {report['copy_ms']:.2f} ms at this link); the weights "
                     f"copied are the model's own ({report['expert_bytes'] / 1e3:.0f} kB), outputs are unchanged")
    if report.get("prompt_note"):
        lines.append(f"prompts: {report['prompt_note']}")
    sizes = report.get("copy_bytes_by_precision")
    if sizes and _lower_bit(report):
        lines.append("lower-bit copies (HQQ, groups of 64): " + ", ".join(f"{p} {b / 1e6:.2f} MB" for p, b in sizes.items())
                     + " per copy; a low-bit copy is dequantized into its slot at its first run")
    if report.get("plain_quality"):
        q = report["plain_quality"]
        lines.append(f"quality: perplexity and next-token agreement with the plain model, teacher-forced on "
                     f"{q['tokens']:.0f} tokens of the prompts' reference continuations "
                     f"(up to {report.get('quality_tokens')} each)")
    fit = report.get("calibration")
    if fit:
        lines.append(f"simulator: this machine's compute fitted to the plain engine run (R^2 {fit['r2']:.3f}; prefill "
                     f"{100 * fit['prefill_error']:+.1f}%, decode {100 * fit['decode_error']:+.1f}%)")
    else:
        lines.append(f"simulator: profile {report['hardware']}")
    return lines


CAPTION = ("precision/recall: forecast experts vs experts used at the target layer; collision: a miss on an expert "
           "evicted earlier in the same pass; MB/tok: bytes over the link per token processed (wasted: prefetched, "
           "never used); stall: time waiting for copies; gap: share of the gap closed between LRU without prefetch "
           "(0%) and Belady + oracle prefetch (100%), measured for engine rows; sim: the simulator replaying the "
           "same recorded run")
QUALITY_TITLE = "Speed against output quality"
QUALITY_CAPTION = ("hits by precision: share of accesses that hit a copy at each precision (the rest missed); runs at "
                   "low bit: share of expert computations on a low-bit copy; MB/tok: bytes over the link per token, "
                   "upgrades included; perplexity and next-token agreement (the most likely next token is the plain "
                   "model's): teacher-forced on the prompts' held-out reference continuations; token agreement: "
                   "greedy generations position by position")


def _lower_bit(report: dict[str, Any]) -> bool:
    return any(r.get("miss") in LOWER_BIT_MODES for r in report.get("rows", []))


def _heads(wasted: bool = True) -> dict[str, str]:
    """Table column keys (of :func:`table_rows`) and their headings, in order. The terminal leaves out the
    wasted bytes (the figure and the HTML table show them) so that a 200-column table keeps its labels whole."""
    heads = {"label": "configuration", "source": "measured by", "precision": "precision", "recall": "recall",
             "hit_rate": "hit rate", "collision_rate": "collisions", "mb_per_token": "MB/tok",
             "wasted_mb_per_token": "wasted MB/tok", "stall_ms": "stall ms/prompt", "ttft_ms": "TTFT ms",
             "sim_ttft_ms": "sim TTFT", "ttft_gap": "TTFT gap", "tpot_ms": "TPOT ms", "sim_tpot_ms": "sim TPOT",
             "tpot_gap": "TPOT gap", "agreement": "token agreement"}
    if not wasted:
        heads.pop("wasted_mb_per_token")
    return heads


def _quality_heads(report: dict[str, Any]) -> dict[str, str] | None:
    """The second table's columns: speed next to output quality and the precisions copies ran at (None when
    the run measured no quality and copied nothing below full precision)."""
    lower, quality = _lower_bit(report), bool(report.get("plain_quality"))
    if not (lower or quality):
        return None
    heads = {"label": "configuration", "hit_rate": "hit rate", "hit_rate_by_precision": "hits by precision",
             "low_bit_runs": "runs at low bit", "mb_per_token": "MB/tok", "ttft_ms": "TTFT ms", "tpot_ms": "TPOT ms",
             "perplexity": "perplexity", "next_agreement": "next-token agreement", "agreement": "token agreement"}
    if not lower:
        for key in ("hit_rate_by_precision", "low_bit_runs"):
            heads.pop(key)
    if not quality:
        heads.pop("perplexity")
        heads.pop("next_agreement")
    return heads


def quality_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The table lines of the second table: engine-measured configurations and the plain model."""
    return [line for line in table_rows(report) if line.get("source") == "engine"]


def _cells(heads: dict[str, str], line: dict[str, Any]) -> list[str]:
    return [str(line.get(k, "")) if k in ("label", "source") else _fmt(k, line.get(k)) for k in heads]


def print_table(report: dict[str, Any], console: Any = None) -> None:
    if console is None:
        # a pipe or CI log is 80 columns by default, which wraps every cell: use a readable width
        console = Console(width=max(shutil.get_terminal_size((200, 40)).columns, 200))
    setup = describe_setup(report)
    table = Table(title=setup[0], caption=CAPTION.replace(" (wasted: prefetched, never used)", ""))
    heads = _heads(wasted=False)
    for key, head in heads.items():
        table.add_column(head, justify="left" if key in ("label", "source") else "right")
    for line in table_rows(report):
        table.add_row(*_cells(heads, line))
    for extra in setup[1:]:
        console.print(extra)
    console.print(table)
    qheads = _quality_heads(report)
    if qheads is not None:
        second = Table(title=QUALITY_TITLE, caption=QUALITY_CAPTION)
        for key, head in qheads.items():
            second.add_column(head, justify="left" if key == "label" else "right")
        for line in quality_rows(report):
            second.add_row(*_cells(qheads, line))
        console.print(second)


def write_json(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {**report, "table": table_rows(report)}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)


def _drawn_rows(report: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any] | None, dict[str, Any] | None]:
    """(configuration rows, the plain model's row, the physical limit's row) of the table."""
    lines = table_rows(report)
    plain = next((r for r in lines if r["label"].startswith("plain")), None)
    limit = next((r for r in lines if r["label"].startswith("physical limit")), None)
    return [r for r in lines if r is not plain and r is not limit], plain, limit


def _positive(v: float | None) -> bool:
    """A latency worth drawing: measured or simulated, and not the 0 a run without that phase reports."""
    return v is not None and v > 0


def latency_plot(report: dict[str, Any]) -> Plot:
    """The headline: TTFT and TPOT per configuration, measured and simulated, with the references and
    the physical limit drawn in (only the latencies the run has)."""
    title = "Latency per configuration, against its bounds"
    caption = ("Dark bars: what the engine measured (simulated for rows without an engine run: the Belady + oracle "
               "reference); light bars: the simulator replaying the same recorded run. Grey band: below the physical "
               "limit (Belady's bytes / bandwidth, or pure compute): no schedule with exact outputs gets there. "
               "Dotted green: the plain model with every expert resident. Above each bar: the share of the gap "
               "closed between LRU without prefetch (0%) and Belady + oracle prefetch (100%).")
    lines, plain, limit = _drawn_rows(report)
    panels, missing = [], []
    for key, name in (("ttft", "TTFT"), ("tpot", "TPOT")):
        if any(_positive(r.get(f"{key}_ms")) or _positive(r.get(f"sim_{key}_ms")) for r in lines):
            panels.append((key, name))
        else:
            missing.append(f"no {name}: no configuration of this run has "
                           + ("a prefill pass" if key == "ttft" else "a decode step (--max-new-tokens 1)"))
    if not panels:
        return Plot("latency", title, None, note="; ".join(missing), caption=caption)
    fig, axes = new_figure(max(4.5, 1.5 * len(lines)), 4.6, len(panels))
    x = list(range(len(lines)))
    engine = [i for i, r in enumerate(lines) if r.get("source") == "engine"]
    sim_only = [i for i, r in enumerate(lines) if r.get("source") != "engine"]
    for ax, (key, name) in zip(axes, panels, strict=True):
        value = [r.get(f"{key}_ms") if _positive(r.get(f"{key}_ms")) else 0.0 for r in lines]
        replay = [r.get(f"sim_{key}_ms") if _positive(r.get(f"sim_{key}_ms")) else 0.0 for r in lines]
        if engine:
            ax.bar([i - 0.2 for i in engine], [value[i] for i in engine], 0.4, color="tab:blue",
                   label="engine, measured")
            ax.bar([i + 0.2 for i in engine], [replay[i] for i in engine], 0.4, color="lightsteelblue",
                   label="simulator, same recorded run")
        if sim_only:
            ax.bar(sim_only, [value[i] for i in sim_only], 0.5, color="0.3", label="simulated (no engine run)")
        bound = limit.get(f"{key}_ms") if limit else None
        if _positive(bound):
            ax.axhspan(0, bound, color="0.9", zorder=0)
            ax.axhline(bound, color="0.4", lw=1.2, label=f"physical limit {bound:.2f} ms")
        resident = plain.get(f"{key}_ms") if plain else None
        if _positive(resident):
            ax.axhline(resident, color="tab:green", ls=":", lw=1.5, label=f"all experts resident {resident:.2f} ms")
        for i, r in enumerate(lines):
            gap = r.get(f"{key}_gap")
            if gap is not None:
                ax.annotate(f"{100 * gap:.0f}%", (i - 0.2 if i in engine else i, value[i]), ha="center",
                            va="bottom", fontsize=7)
        ax.set_xticks(x, [r["label"] for r in lines], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(f"{name} (ms)")
        ax.set_title(f"{name} per configuration")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.32), ncol=2, frameon=False)
        ax.margins(y=0.12)
    return Plot("latency", title, fig, note="; ".join(missing), caption=caption)


def hit_collision_plot(report: dict[str, Any]) -> Plot:
    lines, _, _ = _drawn_rows(report)
    x = list(range(len(lines)))
    fig, (ax,) = new_figure(max(6, 1.8 * len(lines)), 4, 1)
    ax.bar([i - 0.2 for i in x], [100 * (r.get("hit_rate") or 0) for r in lines], 0.4, label="hit rate")
    ax.bar([i + 0.2 for i in x], [100 * (r.get("collision_rate") or 0) for r in lines], 0.4, label="collision rate")
    ax.set_xticks(x, [r["label"] for r in lines], rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("% of accesses")
    ax.legend()
    ax.set_title(f"{report['model']}, cache {report['capacity']}")
    return Plot("hit_collision", "Hit and collision rates", fig,
                caption="Symptoms, not the goal: a collision miss is a miss on an expert evicted earlier in the same "
                        "pass.")


def bytes_plot(report: dict[str, Any]) -> Plot:
    """Bytes over the link per token, used and wasted, per configuration and for the physical limit."""
    title = "Bytes moved per token"
    caption = ("Blue: bytes over the link per token that were used; orange: wasted (prefetched, never used). The "
               "physical limit's row is Belady without prefetch: the fewest bytes any eviction can move.")
    lines, _, limit = _drawn_rows(report)
    lines = lines + ([limit] if limit else [])
    if not any((r.get("mb_per_token") or 0) > 0 for r in lines):
        return Plot("bytes_per_token", title, None, caption=caption,
                    note="no bytes crossed the link in any configuration (the cache held every expert used)")
    fig, (ax,) = new_figure(7.5, 1.2 + 0.45 * len(lines), 1)
    y = list(range(len(lines)))[::-1]
    wasted = [r.get("wasted_mb_per_token") or 0.0 for r in lines]
    used = [(r.get("mb_per_token") or 0.0) - w for r, w in zip(lines, wasted, strict=True)]
    ax.barh(y, used, color="tab:blue", label="used")
    ax.barh(y, wasted, left=used, color="tab:orange", label="wasted")
    ax.set_xlim(0, 1.04 * max(u + w for u, w in zip(used, wasted, strict=True)))
    ax.set_yticks(y, [f"{r['label']} ({r.get('source')})" for r in lines], fontsize=8)
    ax.set_xlabel("MB over the link per token processed")
    ax.set_title("bytes moved per token")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    return Plot("bytes_per_token", title, fig, caption=caption)


def per_prompt_plot(report: dict[str, Any]) -> Plot:
    """Measured TTFT (and TPOT) of every prompt per engine configuration: the spread behind the means."""
    title = "Latency per prompt (engine)"
    engine_rows = [r for r in report["rows"] if r.get("engine")]
    if not engine_rows:
        return Plot("latency_per_prompt", title, None,
                    note="no engine run: every number is simulated, there is no per-prompt measurement")
    panels = [(k, n) for k, n in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"))
              if any(p[k] > 0 for r in engine_rows for p in r["engine"]["prompts"])]
    missing = [] if len(panels) == 2 else ["no TPOT: every prompt generated one token (--max-new-tokens 1)"]
    if not panels:
        return Plot("latency_per_prompt", title, None, note="no prompt has a measured latency")
    fig, axes = new_figure(5.5, 3.8, len(panels))
    for ax, (key, name) in zip(axes, panels, strict=True):
        for r in engine_rows:
            ax.plot([1000 * p[key] for p in r["engine"]["prompts"]], marker="o", label=r["label"])
        ax.set_xlabel("prompt")
        ax.set_ylabel(f"{name} (ms)")
        ax.set_title(f"{name} per prompt")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return Plot("latency_per_prompt", title, fig, note="; ".join(missing))


def quality_plot(report: dict[str, Any]) -> Plot:
    """What each configuration's speed costs in output quality: TPOT against next-token agreement and against
    perplexity, one point per engine configuration, the plain model as the reference."""
    title = "Speed against output quality"
    caption = ("One point per configuration the engine ran: its measured TPOT (TTFT when no decode step ran) "
               "against the share of next tokens it predicts as the plain model does, and against held-out "
               "perplexity, both teacher-forced on the prompts' reference continuations. Exact configurations "
               "(fetch at full precision) sit on the plain model's level; drop, substitute, cache-aware routing and "
               "lower-bit copies trade quality for speed.")
    if not report.get("plain_quality"):
        return Plot("quality", title, None, caption=caption,
                    note="no quality measured (--quality-tokens 0, or no engine ran)")
    lines = [r for r in quality_rows(report) if r.get("perplexity") is not None]
    key = "tpot_ms" if all(_positive(r.get("tpot_ms")) for r in lines) else "ttft_ms"
    fig, axes = new_figure(5.5, 4.2, 2)
    for ax, (metric, name, scale) in zip(axes, (("next_agreement", "next-token agreement (%)", 100.0),
                                                  ("perplexity", "perplexity", 1.0)), strict=True):
        for i, r in enumerate(lines):  # a marker and colour each (exact rows overlap at the plain level)
            plain = r["label"].startswith("plain")
            ax.scatter(r[key], scale * r[metric], marker="*" if plain else "osD^vP"[i % 6], s=140 if plain else 45,
                       color="tab:green" if plain else f"C{i % 10}", zorder=3, alpha=0.85,
                       label="plain model" if plain else r["label"])
        ax.set_xlabel(f"{'TPOT' if key == 'tpot_ms' else 'TTFT'} (ms)")
        ax.set_ylabel(name)
        ax.set_title(f"{name.split(' (')[0]} against {'TPOT' if key == 'tpot_ms' else 'TTFT'}")
        ax.grid(alpha=0.3)
        ax.margins(0.15)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=3, fontsize=7, frameon=False)
    return Plot("quality", title, fig, caption=caption)


def plots(report: dict[str, Any]) -> list[Plot]:
    """Every figure of an evaluation, the headline (latency against its bounds) first."""
    return [checked(p) for p in (latency_plot(report), bytes_plot(report), hit_collision_plot(report),
                                 per_prompt_plot(report), quality_plot(report))]


def write_plots(report: dict[str, Any], folder: str | os.PathLike[str]) -> list[Path]:
    """The figures as PNG files (plots that cannot be drawn write nothing: see their notes)."""
    return save_pngs(plots(report), folder)


def html_report(report: dict[str, Any], figures: list[Plot], command: str):
    """The evaluation as one :class:`reporting.html.Report`: setup, the held-out prompts, figures, table."""
    setup = describe_setup(report)
    lines = table_rows(report)
    heads = _heads()
    table = html.Table(setup[0], list(heads.values()), [_cells(heads, line) for line in lines], caption=CAPTION,
                       row_kinds=["limit" if line["label"].startswith("physical limit") else
                                  "reference" if line["label"].startswith("plain") or "reference" in line["label"]
                                  else "" for line in lines], left=2)
    split = report.get("prompt_note") or "the prompts are not held out from anything: no learned part was used"
    if report.get("predictor"):
        split = f"{split} (predictor: {report['predictor']})"
    return html.Report(title=f"Offloaded inference: {setup[0]}", command=command, versions=versions(),
                       setup=[line for line in setup[1:] if not line.startswith("prompts: ")]
                       + [f"mode: {report.get('mode')}, lookahead {report.get('lookahead')}, "
                          f"{report.get('max_new_tokens')} new tokens per prompt"],
                       split=split, tables=[table] + _quality_table(report), plots=figures)


def _quality_table(report: dict[str, Any]) -> list:
    heads = _quality_heads(report)
    if heads is None:
        return []
    lines = quality_rows(report)
    return [html.Table(QUALITY_TITLE, list(heads.values()), [_cells(heads, line) for line in lines],
                       caption=QUALITY_CAPTION, row_kinds=["reference" if line["label"].startswith("plain") else "" for line in lines], left=1)]


def log_wandb(report: dict[str, Any], project: str, figures: list[Plot] | None = None) -> None:
    """Log the table, the summary numbers and the report's figures as images; offline unless an API key
    is configured."""
    import wandb  # wandb: ~0.5 s to import; only when the run logs to W&B

    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    config = {k: v for k, v in report.items() if k not in ("rows", "plain")}
    run = wandb.init(project=project, mode=mode, config=config, job_type="evaluate")
    try:
        lines = table_rows(report)
        cols = ["label", "source", *COLUMNS]
        run.log({"results": wandb.Table(columns=cols, data=[[line.get(c) for c in cols] for line in lines])})
        for line in lines:
            for c in COLUMNS:
                if line.get(c) is not None:
                    run.summary[f"{line['label']}/{c}"] = line[c]
        if figures:
            run.log(wandb_images(figures))
    finally:
        run.finish()
