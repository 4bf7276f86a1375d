"""Simulation mode of ``evaluate.py``: parse the sweep, run it, print/write the results.

Every option that names a setting takes a comma list; the sweep is their cross product.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Any

from core.errors import UserError
from core.passes import PHASES
from data_pipeline.trace_store import TraceStore
from offload.hardware import get_hardware, hardware_names
from offload.latency import annotate, reference_configs
from offload.miss_handling import MISS_MODES
from offload.policies import POLICIES
from offload.prefetch import PREFETCHERS, refuse_renamed_prefetcher
from offload.routing import ROUTINGS
from offload.simulator import SimConfig, simulate_configs
from reporting.provenance import command_line

ALL_POLICIES = [p for p in POLICIES if p != "random"] + ["random"]
FORECAST_POLICIES = ("forecast", "least_stale_forecast")  # take --predictor as their reuse forecaster


def add_sim_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", help="trace store folder (traces/NAME); selects simulation mode")
    p.add_argument("--policy", default="least_stale,lru,belady",
                   help=f"eviction policies, comma list or 'all' ({', '.join(POLICIES)})")
    p.add_argument("--prefetch", default="none", help=f"prefetchers, comma list ({', '.join(PREFETCHERS)}, ckpt:PATH)")
    p.add_argument("--capacity", default="5%", help="cache sizes, comma list: 5%%, 0.6GB, 512 (slots)")
    p.add_argument("--hardware", default="a100-5gbs",
                   help=f"hardware profiles, comma list ({', '.join(hardware_names())}; name:field=value overrides)")
    p.add_argument("--phase", default="both", help=f"passes to replay ({', '.join(PHASES)})")
    p.add_argument("--cache", default="global", help="cache layout, comma list (global, per-layer)")
    p.add_argument("--lookahead", default="1", help="prefetch lookahead distance(s) D >= 1, comma list")
    p.add_argument("--overfetch", type=float, default=1.0, help="top-k prefetch overfetch factor (k * factor)")
    p.add_argument("--admission", default="greedy", help="prefetch admission, comma list: greedy (every selected "
                   "expert, the paper's) or value (only what arrives in time and is worth its copy)")
    p.add_argument("--passes", default="all", help="passes counted: all, or the held-out part of train.py's split "
                   "(held-out = test; train, val)")
    p.add_argument("--predictor-us", type=float, default=None,
                   help="device time of one forecast call (default: the predictor's roofline cost)")
    p.add_argument("--miss", default="fetch", help=f"miss handling, comma list ({', '.join(MISS_MODES)})")
    p.add_argument("--routing", default="standard", help=f"routing, comma list ({', '.join(ROUTINGS)})")
    p.add_argument("--routing-lambda", type=float, default=0.3, help="cache-aware routing lambda")
    p.add_argument("--backend", default="auto", choices=["auto", "fast", "reference"], help="simulator implementation")
    p.add_argument("--workers", type=int, default=1,
                   help="processes to spread the configurations over (each opens the store by path, memory-mapped)")
    p.add_argument("--predictor", help="reuse-forecaster checkpoint (python -m predictors.reuse_training) for the forecast "
                   "policies (forecast, least_stale_forecast); without it they count reuse online from the run")
    p.add_argument("--copy-bytes", type=float, default=None,
                   help="bytes one expert copy moves over the link (default: the store's expert size)")
    p.add_argument("--no-references", action="store_true",
                   help="do not add the reference rows (LRU without prefetch = 0%%, Belady + oracle = 100%%, the "
                        "physical limit) to each setting")
    p.add_argument("--json", help="write {\"results\": [...]} here")
    p.add_argument("--plots", help="write PNG plots into this folder")
    p.add_argument("--report", help="write the self-contained HTML report here (default: beside --json, else "
                   "reports/sweep-<trace>-<time>.html; 'none': no report)")


def _split(text: str) -> list[str]:
    return [s.strip() for s in str(text).split(",") if s.strip()]


def _split_hardware(text: str) -> list[str]:
    """Comma list of profiles where a profile may carry overrides: ``a100-5gbs,rtx4090:link_gbps=12,tflops=60``
    (a piece with ``=`` but no ``:`` continues the previous profile's overrides)."""
    out: list[str] = []
    for piece in _split(text):
        if "=" in piece and ":" not in piece and out:
            out[-1] += "," + piece
        else:
            out.append(piece)
    return out


def build_configs(args: argparse.Namespace) -> list[SimConfig]:
    for flag in ("policy", "prefetch", "capacity", "hardware", "phase", "cache", "lookahead", "miss", "routing",
                 "admission"):
        if not _split(getattr(args, flag)):
            raise UserError(f"--{flag} is empty; give at least one value")
    policies = ALL_POLICIES if args.policy.strip() == "all" else _split(args.policy)
    for pol in policies:
        if pol not in POLICIES:
            raise UserError(f"unknown eviction policy {pol!r}; valid: {', '.join(POLICIES)}, all")
    prefetchers = _split(args.prefetch)
    for pf in prefetchers:
        refuse_renamed_prefetcher(pf)
        if pf not in PREFETCHERS and not pf.startswith("ckpt:"):
            raise UserError(f"unknown prefetcher {pf!r}; valid: {', '.join(PREFETCHERS)}, ckpt:PATH")
    hardware = _split_hardware(args.hardware)
    for hw in hardware:
        get_hardware(hw)
    phases = _split(args.phase)
    for ph in phases:
        if ph not in PHASES:
            raise UserError(f"unknown phase {ph!r}; valid: {', '.join(PHASES)}")
    try:
        lookaheads = [int(x) for x in _split(args.lookahead)]
    except ValueError:
        raise UserError(f"--lookahead {args.lookahead!r} must be whole numbers") from None
    if any(d < 1 for d in lookaheads):
        raise UserError("--lookahead must be at least 1")
    for pf in prefetchers:
        if pf in ("topk", "percentile") and any(d != 1 for d in lookaheads):
            raise UserError(f"--prefetch {pf} forecasts the next layer only (the paper's prefetcher); use gate, oracle "
                            f"or ckpt:PATH for --lookahead {','.join(map(str, lookaheads))}")
    for m in _split(args.miss):
        if m not in MISS_MODES:
            raise UserError(f"unknown miss handling {m!r}; valid: {', '.join(MISS_MODES)}")
    for r in _split(args.routing):
        if r not in ROUTINGS:
            raise UserError(f"unknown routing {r!r}; valid: {', '.join(ROUTINGS)}")
    for c in _split(args.cache):
        if c not in ("global", "per-layer"):
            raise UserError(f"unknown cache layout {c!r}; valid: global, per-layer")
    configs = []
    for pf, d, adm, hw, ph, cache, miss, routing, cap, pol in itertools.product(
        prefetchers, lookaheads, _split(args.admission), hardware, phases, _split(args.cache), _split(args.miss),
        _split(args.routing), _split(args.capacity), policies,
    ):
        if pf == "none" and (d != lookaheads[0] or adm != _split(args.admission)[0]):
            continue  # the lookahead and the admission mean nothing without a prefetcher
        params = {"forecaster": args.predictor} if getattr(args, "predictor", None) and pol in FORECAST_POLICIES else {}
        configs.append(SimConfig(policy=pol, capacity=cap, prefetch=pf, lookahead=d, overfetch=args.overfetch,
                                 admission=adm, passes=args.passes, predictor_us=args.predictor_us,
                                 copy_bytes=args.copy_bytes,
                                 hardware=hw, phase=ph, cache=cache, miss=miss, routing=routing,
                                 routing_lambda=args.routing_lambda, backend=args.backend, policy_params=params))
    return configs


def run(args: argparse.Namespace, argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the sweep, print the table, write what was asked (JSON, PNG, HTML); ``argv`` is the command
    line the HTML report records."""
    store = TraceStore(args.trace)
    configs = build_configs(args)
    # matplotlib (the reports): ~0.5 s to import; bad arguments are refused before it loads
    from offload import report
    from reporting import html
    from reporting.figures import notes, save_pngs

    references = reference_configs(configs) if not args.no_references else []
    configs = configs + references
    if "belady" in [c.policy for c in configs] and "cache-aware" in [c.routing for c in configs]:
        configs = [c for c in configs if not (c.policy == "belady" and c.routing == "cache-aware")]
    results = simulate_configs(store, configs, progress=len(configs) > 4, workers=args.workers)
    for r, c in zip(results, configs, strict=True):
        r["reference"] = c in references
    annotate(results)
    report.print_table(results)
    if args.json:
        report.write_json(results, args.json)
    page = html.report_path(getattr(args, "report", None), args.json, f"sweep-{Path(args.trace).name}")
    if args.plots or page:
        figures = report.plots(results)
        for line in notes(figures):
            print(f"plot note: {line}")
        if args.plots:
            save_pngs(figures, args.plots)
        if page:
            setup = [f"trace {args.trace}: {store.model.model_id}, {store.num_layers} layers x {store.num_experts} "
                     f"experts, top-{store.top_k}; {store.num_tokens} tokens in {store.num_sequences} sequences"]
            doc = report.html_report(results, figures, setup=setup, subject=f"{store.model.model_id} ({args.trace})",
                                     command=command_line("evaluate.py", sys.argv[1:] if argv is None else argv))
            print(f"HTML report: {html.write(doc, page).resolve()}")
    return results
