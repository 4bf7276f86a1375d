"""The evaluation report: one rich table, JSON, PNG plots and W&B logging of the same numbers."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

COLUMNS = ("precision", "recall", "hit_rate", "collision_rate", "mb_per_token", "stall_ms", "ttft_ms", "sim_ttft_ms",
           "ttft_gap", "tpot_ms", "sim_tpot_ms", "tpot_gap", "agreement")


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000.0 * seconds


def _engine_tokens(entry: dict[str, Any]) -> int:
    """Tokens the engine's passes processed: each prompt, then one per decode step."""
    return sum(p["prompt_tokens"] + max(p["new_tokens"] - 1, 0) for p in entry["prompts"])


def table_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat dict per table line: the plain model, then every configuration, then the physical limit.

    Engine rows show what the engine measured and, in ``sim_*``, what the simulator predicts for the
    same recorded run. Simulator-only rows (the references, everything in ``--mode sim``) show the
    simulator's numbers. ``*_gap``: share of the gap closed between LRU without prefetch (0 %) and
    Belady + oracle prefetch (100 %).
    """
    out: list[dict[str, Any]] = []
    plain = report.get("plain")
    if plain is not None:
        out.append({"label": "plain model (all experts resident)", "source": "engine", "hit_rate": 1.0,
                    "collision_rate": 0.0, "stall_ms": 0.0, "mb_per_token": 0.0, "ttft_ms": _ms(plain["ttft_s"]),
                    "tpot_ms": _ms(plain["tpot_s"]), "agreement": 1.0})
    for row in report["rows"]:
        sim = row.get("sim") or {}
        eng = (row.get("engine") or {}).get("summary")
        if row.get("role") == "limit":
            bound = row.get("limit") or {}
            out.append({"label": "physical limit (Belady's bytes / bandwidth, or compute)", "source": "sim",
                        "ttft_ms": _ms(bound.get("ttft_s")), "tpot_ms": _ms(bound.get("tpot_s")),
                        "mb_per_token": sim.get("bytes_per_token", 0.0) / 1e6})
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
                stall_ms=_ms(eng["stall_s_per_prompt"]), ttft_ms=_ms(eng["ttft_s"]), tpot_ms=_ms(eng["tpot_s"]),
                agreement=eng.get("token_agreement"), exact_match=eng.get("exact_match"),
            )
        else:
            prompts = max(1, int(report.get("prompts") or 1))
            line.update(
                source="sim", precision=sim.get("precision"), recall=sim.get("recall"),
                hit_rate=sim.get("hit_rate"), collision_rate=sim.get("collision_rate"),
                mb_per_token=sim.get("bytes_per_token", 0.0) / 1e6,
                stall_ms=_ms(sim["stall_time_s"] / prompts) if sim.get("stall_time_s") is not None else None,
                ttft_ms=_ms(sim.get("ttft_s")), tpot_ms=_ms(sim.get("tpot_s")),
            )
        out.append(line)
    return out


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key in ("ttft_gap", "tpot_gap"):
        return f"{100 * value:.0f}%"
    if key in ("precision", "recall", "hit_rate", "collision_rate", "agreement", "exact_match"):
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
    fit = report.get("calibration")
    if fit:
        lines.append(f"simulator: this machine's compute fitted to the plain engine run (R^2 {fit['r2']:.3f}; prefill "
                     f"{100 * fit['prefill_error']:+.1f}%, decode {100 * fit['decode_error']:+.1f}%)")
    else:
        lines.append(f"simulator: profile {report['hardware']}")
    return lines


def print_table(report: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    if console is None:
        import shutil

        # a pipe or CI log is 80 columns by default, which wraps every cell: use a readable width
        console = Console(width=max(shutil.get_terminal_size((200, 40)).columns, 200))
    setup = describe_setup(report)
    table = Table(title=setup[0], caption=(
        "precision/recall: forecast experts vs experts used at the target layer; collision: a miss on an expert "
        "evicted earlier in the same pass; MB/tok: bytes over the link per token processed; stall: time waiting "
        "for copies; gap: share of the gap closed between LRU without prefetch (0%) and Belady + oracle prefetch "
        "(100%), measured for engine rows; sim: the simulator replaying the same recorded run"))
    heads = {"label": "configuration", "source": "measured by", "precision": "precision", "recall": "recall",
             "hit_rate": "hit rate", "collision_rate": "collisions", "mb_per_token": "MB/tok",
             "stall_ms": "stall ms/prompt", "ttft_ms": "TTFT ms", "sim_ttft_ms": "sim TTFT", "ttft_gap": "TTFT gap",
             "tpot_ms": "TPOT ms", "sim_tpot_ms": "sim TPOT", "tpot_gap": "TPOT gap", "agreement": "token agreement"}
    for key, head in heads.items():
        table.add_column(head, justify="left" if key in ("label", "source") else "right")
    for line in table_rows(report):
        table.add_row(*[str(line.get(k, "")) if k in ("label", "source") else _fmt(k, line.get(k)) for k in heads])
    for extra in setup[1:]:
        console.print(extra)
    console.print(table)


def write_json(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {**report, "table": table_rows(report)}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)


def write_plots(report: dict[str, Any], folder: str | os.PathLike[str]) -> list[Path]:
    """hit/collision rates and measured vs simulated TTFT per configuration, per-prompt TTFT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [r for r in table_rows(report) if not r["label"].startswith("plain")]
    labels = [r["label"] for r in lines]
    x = range(len(lines))
    written = []

    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(lines)), 4))
    ax.bar([i - 0.2 for i in x], [100 * (r.get("hit_rate") or 0) for r in lines], 0.4, label="hit rate")
    ax.bar([i + 0.2 for i in x], [100 * (r.get("collision_rate") or 0) for r in lines], 0.4, label="collision rate")
    ax.set_xticks(list(x), labels, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("% of accesses")
    ax.legend()
    ax.set_title(f"{report['model']}, cache {report['capacity']}")
    fig.tight_layout()
    written.append(folder / "hit_collision.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(lines)), 4))
    ax.bar([i - 0.2 for i in x], [r.get("ttft_ms") or 0 for r in lines], 0.4, label="TTFT (engine or sim)")
    ax.bar([i + 0.2 for i in x], [r.get("sim_ttft_ms") or 0 for r in lines], 0.4, label="simulated TTFT")
    ax.set_xticks(list(x), labels, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("ms")
    ax.legend()
    fig.tight_layout()
    written.append(folder / "ttft.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    engine_rows = [r for r in report["rows"] if r.get("engine")]
    if engine_rows:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in engine_rows:
            ax.plot([1000 * p["ttft_s"] for p in r["engine"]["prompts"]], marker="o", label=r["label"])
        ax.set_xlabel("prompt")
        ax.set_ylabel("TTFT ms")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(folder / "ttft_per_prompt.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def log_wandb(report: dict[str, Any], project: str, plots: str | None = None) -> None:
    """Log the table, the summary numbers and the plots; offline unless an API key is configured."""
    import wandb

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
        if plots:
            for png in sorted(Path(plots).glob("*.png")):
                run.log({png.stem: wandb.Image(str(png))})
    finally:
        run.finish()
