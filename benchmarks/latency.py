"""Do forecasts buy latency? TPOT on held-out decode steps of a real trace, against the references.

On every (hardware profile, capacity): the best policy without prefetch, Least-Stale with the learned
predictor prefetching by expected value, the best configuration that uses the learned predictor, and
Belady + oracle prefetch (100 % of the gap, starting from LRU without prefetch at 0 %), with the
physical limit (Belady's bytes / bandwidth, or the pure compute). Only the held-out decode steps are
counted (the test part of train.py's position split); the cache warms up on the earlier ones. It also
prints Least-Stale's stall time with oracle prefetch against Belady's.

    python benchmarks/latency.py                                   # the gemma-4 trace in ../shared/traces
    python benchmarks/latency.py --trace traces/NAME --checkpoint checkpoints/RUN/trajectory.safetensors

Without ``--trace`` it imports ``../shared/traces/gemma4-26b-a4b.route.csv`` and trains the trajectory
predictor with ``configs/gemma.yaml`` when they are not there yet.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.errors import UserError, run_cli  # noqa: E402
from data_pipeline.trace_store import TraceStore  # noqa: E402
from offload.latency import annotate, physical_limit  # noqa: E402
from offload.simulator import SimConfig, simulate_configs  # noqa: E402

GEMMA_CSV = REPO.parent / "shared" / "traces" / "gemma4-26b-a4b.route.csv"
NO_PREFETCH = ("lru", "fifo", "lfu", "fld", "score", "least_stale", "forecast", "least_stale_forecast")
WITH_LEARNED = ("least_stale", "forecast", "least_stale_forecast", "lru")


def _prepare(args: argparse.Namespace) -> tuple[str, str]:
    trace, ckpt = Path(args.trace), Path(args.checkpoint)
    if not (trace / "manifest.json").exists():
        if trace != REPO / "traces" / "gemma" or not GEMMA_CSV.exists():
            raise UserError(f"no trace store at {trace}")
        subprocess.run([sys.executable, "-m", "data_pipeline.import_routes", str(GEMMA_CSV), "--out", str(trace)],
                       cwd=REPO, check=True)
    if not ckpt.exists():
        if ckpt != REPO / "checkpoints" / "gemma" / "trajectory.safetensors":
            raise UserError(f"no checkpoint at {ckpt}")
        subprocess.run([sys.executable, "train.py", "--config", "configs/gemma.yaml", "--run", "gemma",
                        "--wandb.mode", "disabled"], cwd=REPO, check=True)
    return str(trace), str(ckpt)


def configs(args: argparse.Namespace, ckpt: str) -> list[SimConfig]:
    base = dict(phase="decode", passes="held-out", split=args.split)
    out = []
    for hw in args.hardware:
        for cap in args.capacity:
            common = dict(base, hardware=hw, capacity=cap)
            out += [SimConfig(policy=p, **common) for p in NO_PREFETCH]
            out += [SimConfig(policy="belady", **common),
                    SimConfig(policy="belady", prefetch="oracle", lookahead=args.lookahead, **common),
                    SimConfig(policy="least_stale", prefetch="oracle", lookahead=args.lookahead, **common)]
            for policy in WITH_LEARNED:
                for d in range(1, args.lookahead + 1):
                    for admission in ("value", "greedy"):
                        out.append(SimConfig(policy=policy, prefetch=f"ckpt:{ckpt}", lookahead=d,
                                             admission=admission, **common))
    return out


def _name(r: dict) -> str:
    if r["prefetch"] == "none":
        return r["policy"]
    pf = "learned" if r["prefetch"].startswith("ckpt:") else r["prefetch"]
    return f"{r['policy']} + {pf} d={r['lookahead']} {r['admission']}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=str(REPO / "traces" / "gemma"))
    ap.add_argument("--checkpoint", default=str(REPO / "checkpoints" / "gemma" / "trajectory.safetensors"))
    ap.add_argument("--capacity", nargs="+", default=["1%", "5%", "10%", "25%"])
    ap.add_argument("--hardware", nargs="+", default=["a100-5gbs", "pcie5"])
    ap.add_argument("--lookahead", type=int, default=3)
    ap.add_argument("--split", default="auto", help="the split train.py made (auto: position for one prompt)")
    args = ap.parse_args(argv)

    trace, ckpt = _prepare(args)
    results = annotate(simulate_configs(TraceStore(trace), configs(args, ckpt), progress=True))
    console = Console(width=220)
    table = Table(title=f"TPOT on the held-out decode steps of {trace} (ms; gap closed between LRU without "
                        f"prefetch = 0% and Belady + oracle = 100%)")
    for col in ("hardware", "capacity", "LRU", "best without prefetch", "LS + learned (value)", "best learned",
                "Belady + oracle", "physical limit", "LS stall / Belady stall (oracle prefetch)"):
        table.add_column(col, justify="left" if col in ("hardware", "capacity") else "right")
    verdicts = []
    for hw in args.hardware:
        for cap in args.capacity:
            rows = [r for r in results if r["hardware"] == hw and r["capacity"] == cap]
            get = {(_name(r)): r for r in rows}
            none = [r for r in rows if r["prefetch"] == "none" and r["policy"] != "belady"]
            best_none = min(none, key=lambda r: r["tpot_s"])
            learned = [r for r in rows if r["prefetch"].startswith("ckpt:")]
            ls_value = min((r for r in learned if r["policy"] == "least_stale" and r["admission"] == "value"),
                           key=lambda r: r["tpot_s"])
            best = min(learned, key=lambda r: r["tpot_s"])
            ref = get[f"belady + oracle d={args.lookahead} greedy"]
            ls_oracle = get[f"least_stale + oracle d={args.lookahead} greedy"]
            limit = physical_limit(get["belady"])["tpot_s"]

            def cell(r: dict) -> str:
                gap = r.get("tpot_gap_closed")
                return f"{1e3 * r['tpot_s']:.2f} ({'-' if gap is None else f'{100 * gap:.0f}%'})"

            ratio = ls_oracle["stall_time_s"] / ref["stall_time_s"] if ref["stall_time_s"] else float("nan")
            table.add_row(hw, cap, cell(get["lru"]), f"{_name(best_none)}: {cell(best_none)}",
                          f"d={ls_value['lookahead']}: {cell(ls_value)}", f"{_name(best)}: {cell(best)}", cell(ref),
                          f"{1e3 * limit:.2f}", f"{ratio:.2f}x")
            verdicts.append((hw, cap, ls_value["tpot_s"] <= best_none["tpot_s"] * (1 + 1e-9),
                             best.get("tpot_gap_closed"), ratio))
    console.print(table)
    for hw, cap, not_slower, gap, ratio in verdicts:
        console.print(f"{hw} {cap}: LS + learned {'not slower' if not_slower else 'SLOWER'} than the best policy "
                      f"without prefetch; best learned closes {'-' if gap is None else f'{100 * gap:.0f}%'} of the "
                      f"TPOT gap; LS / Belady stall with oracle prefetch {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
