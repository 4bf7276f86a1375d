"""Simulation mode of ``evaluate.py``: run the sweep, print/write the results.

The flags are parsed and checked by :mod:`offload.evaluate_cli`; every swept setting arrives as a list
and the sweep is their cross product.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from data_pipeline.trace_store import TraceStore
from offload.evaluate_cli import SweepArgs
from offload.simulator import SimConfig, simulate_configs

FORECAST_POLICIES = ("forecast", "least_stale_forecast")  # take --predictor as their reuse forecaster


def build_configs(args: SweepArgs) -> list[SimConfig]:
    """One configuration per point of the cross product (a lookahead or an admission without a prefetcher
    means nothing, so ``none`` gets the first of each only)."""
    configs = []
    for pf, d, adm, hw, ph, cache, miss, routing, cap, pol in itertools.product(
        args.prefetch, args.lookahead, args.admission, args.hardware, args.phase, args.cache, args.miss,
        args.routing, args.capacity, args.policy,
    ):
        if pf == "none" and (d != args.lookahead[0] or adm != args.admission[0]):
            continue
        params = {"forecaster": args.predictor} if args.predictor and pol in FORECAST_POLICIES else {}
        configs.append(SimConfig(policy=pol, capacity=cap.text, prefetch=pf, lookahead=d, overfetch=args.overfetch,
                                 admission=adm, passes=args.passes, predictor_us=args.predictor_us,
                                 copy_bytes=None if args.copy_bytes is None else float(args.copy_bytes),
                                 copy_dtype=args.copy_dtype,
                                 precisions=",".join(args.precisions),
                                 hardware=hw, phase=ph, cache=cache, miss=miss, routing=routing,
                                 routing_lambda=args.routing_lambda, backend=args.backend, policy_params=params))
    return configs


def run(args: SweepArgs) -> list[dict[str, Any]]:
    """Run the sweep, print the table, write what was asked (JSON, PNG, HTML)."""
    from offload import report
    from offload.latency import annotate, reference_configs
    from reporting import html
    from reporting.figures import notes, save_pngs
    from reporting.provenance import command_line

    store = TraceStore(args.trace)
    if args.predictor and set(args.policy) & set(FORECAST_POLICIES):
        # predictors.reuse imports torch (~1 s): only with --predictor. Refuse another model's forecaster
        # (or a run folder without one) in one line here, before any worker starts
        from predictors.reuse import load_reuse_forecaster

        load_reuse_forecaster(args.predictor, store.model)
    configs = build_configs(args)
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
    page = html.report_path(args.report, args.json, f"sweep-{Path(args.trace).name}")
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
                                     command=command_line("evaluate.py", args.argv))
            print(f"HTML report: {html.write(doc, page).resolve()}")
    return results
