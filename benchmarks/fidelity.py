"""Simulator fidelity: for every row ``evaluate.py`` runs in the engine, the simulator's TTFT/TPOT and
counts for the same recorded run (goal: TTFT and TPOT within 15 %).

Each capacity is one ``evaluate.py`` engine run (offload/engine/cli.py): the plain model, a recording
engine holding every expert (this machine's compute is fitted to its pass times,
offload/engine/calibrate.py), then each configuration in the engine, replayed by the simulator on
the routing the engine recorded, with the same emulated copy size and the engine's measured
forecast time. The decisions are the same code (offload/step.py); only the clock differs, so the
residual is what the compute model and a busy CPU do not capture. Run by hand:

    python benchmarks/fidelity.py                       # the demo model, 5 % and 25 %
    python benchmarks/fidelity.py --capacity 5% 10% --model olmoe-mini --prompts 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.errors import run_cli  # noqa: E402
from offload.engine.cli import evaluate  # noqa: E402
from offload.evaluate_cli import parse_args  # noqa: E402


def _err(measured: float | None, simulated: float | None) -> str:
    if not measured or simulated is None:
        return "-"
    return f"{100 * (simulated / measured - 1):+.1f}%"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--capacity", nargs="+", default=["5%", "25%"])
    ap.add_argument("--prompts", default="8")
    ap.add_argument("--max-new-tokens", default="16")
    ap.add_argument("rest", nargs=argparse.REMAINDER, help="more evaluate.py flags (after --)")
    args = ap.parse_args(argv)
    console = Console(width=200)
    table = Table(title="engine (measured) vs simulator (same recorded run, this machine's calibrated profile)")
    for col in ("capacity", "configuration", "TTFT ms", "sim", "error", "TPOT ms", "sim", "error", "hits engine",
                "hits sim", "prefetches engine", "prefetches sim"):
        table.add_column(col, justify="left" if col in ("capacity", "configuration") else "right")
    within = total = 0
    for capacity in args.capacity:
        extra = [a for a in args.rest if a != "--"]
        report = evaluate(parse_args(["--capacity", capacity, "--prompts", args.prompts,
                                      "--max-new-tokens", args.max_new_tokens, "--no-wandb", *extra]))
        for row in report["rows"]:
            eng = (row.get("engine") or {}).get("summary")
            if eng is None:
                continue
            sim = row["sim"]
            errors = [abs(sim[k] / eng[k] - 1) for k in ("ttft_s", "tpot_s") if eng.get(k) and sim.get(k) is not None]
            within += sum(e <= 0.15 for e in errors)
            total += len(errors)
            table.add_row(capacity, row["label"], f"{1e3 * eng['ttft_s']:.2f}", f"{1e3 * sim['ttft_s']:.2f}",
                          _err(eng["ttft_s"], sim["ttft_s"]), f"{1e3 * eng['tpot_s']:.2f}",
                          f"{1e3 * (sim['tpot_s'] or 0):.2f}", _err(eng["tpot_s"], sim["tpot_s"]), str(eng["hits"]),
                          str(sim["hits"]), str(eng["prefetch_issued"]), str(sim["prefetch_issued"]))
    console.print(table)
    console.print(f"TTFT and TPOT within 15 %: {within} of {total}")
    return 0


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
