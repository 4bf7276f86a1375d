"""Engine mode of ``evaluate.py`` (``python evaluate.py --policy least_stale``): run the offloaded engine and
report it next to its references. The flags are parsed and checked by :mod:`offload.evaluate_cli`.

With no other arguments it evaluates the demo model on demo prompts the predictor never trained on
(texts after those its trace store holds), with the newest learned predictor in ``checkpoints/``
prefetching by expected value, and prints one table:

- the chosen policy with the predictor, LRU with the same predictor, and LRU without prefetch (the
  0 % reference): engine runs, measured;
- Belady + oracle prefetch (the 100 % reference) and the physical limit (Belady's bytes over the
  link, or the pure compute): simulated on the plain model's routing of the same prompts;

with hit rate, collisions, bytes moved per token, stall, TTFT and TPOT with the share of the gap
closed, the simulator's TTFT/TPOT for the same recorded run, and token agreement with the plain
model. Copies are **copy-bound** by default: each holds the emulated link as long as one
OLMoE-1B-7B expert would (12.6 MB at 5 GB/s = 2.5 ms; ``--expert-bytes``), while the real, small
weights are copied, so outputs are unchanged. The simulator rows use a profile of this machine
fitted to the plain engine run (``--hardware calibrated``), so engine and simulator can be compared
row by row. ``--system`` reproduces one of the paper's four systems instead, next to the same
system with Least-Stale as a drop-in eviction policy.

``--miss`` takes a comma list (one row per miss handler). The lower-bit handlers (fetch-lowest-bit,
fetch-priority, precision-cascade; HOBBIT's system) copy experts from a quantized host tier holding
``--precisions`` (HQQ, built once per run and shared by every engine); an emulated copy shrinks by the
precision's byte ratio in the emulated model's dtype (bf16 for the paper's models). Every engine row
whose outputs can change, and every fetch row as its check, reports held-out perplexity and
next-token agreement with the plain model, teacher-forced on the prompts' reference continuations
(:mod:`offload.engine.quality`; ``--quality-tokens 0`` turns it off).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import UserError
from data_pipeline.demo_text import same_documents
from data_pipeline.models import load_model
from data_pipeline.text_sources import load_texts
from data_pipeline.trace_store import TraceStore
from offload.engine.calibrate import fit_compute_profile, fit_dequant_kernel_us
from offload.engine.generate import check_fits
from offload.engine.metrics import summarize
from offload.engine.prompts import load_prompts
from offload.engine.quality import continuations, score_engine, score_plain, summarize_quality
from offload.engine.report import html_report, log_wandb, plots, print_table, write_json
from offload.engine.run import encode, run_prompts
from offload.evaluate_cli import MINI, TINY, EngineArgs
from offload.latency import gap_closed, physical_limit
from offload.miss_handling import LOWER_BIT_MODES, MissHandling
from offload.precision import (
    PRECISIONS,
    byte_ratios,
    itemsize,
    moe_expert_shapes,
    precision_ladder,
    with_itemsize,
)
from offload.simulator import SimConfig, simulate_configs
from offload.systems import SYSTEMS
from predictors.checkpoint import load_predictor
from predictors.gate_lookahead import GateLookahead
from reporting import html
from reporting.figures import notes, save_pngs
from reporting.provenance import command_line


# ---------------------------------------------------------------------- one configuration
@dataclass
class RowSpec:
    """One row of the table: an engine run (and its simulation) or a simulation only."""

    label: str
    policy: str
    prefetch: str
    miss: str = "fetch"
    routing: str = "standard"
    engine: bool = True
    admission: str = "value"
    role: str = ""  # "zero" (0 % reference), "full" (100 % reference), "limit" (physical limit)


def _rows(args: EngineArgs) -> list[RowSpec]:
    if args.system is not None:
        s = SYSTEMS[args.system]
        base = RowSpec(args.system, s["policy"], s["prefetch"], s["miss"], s["routing"], admission="greedy")
        rows = [base]
        if s["policy"] != "least_stale":
            rows.append(replace(base, label=f"{args.system} + LS", policy="least_stale"))
    else:
        misses = args.miss
        rows = [RowSpec(f"{args.policy} + {args.prefetch}" + _miss_suffix(miss), args.policy, args.prefetch, miss,
                        args.routing, admission=args.admission) for miss in misses]
        if args.policy != "lru" and args.prefetch != "none":
            rows.insert(1, replace(rows[0], label=f"lru + {args.prefetch}" + _miss_suffix(misses[0]), policy="lru"))
    zero = RowSpec("lru + none (0% reference)", "lru", "none", role="zero")
    same = [r for r in rows if (r.policy, r.prefetch, r.miss, r.routing) == ("lru", "none", "fetch", "standard")]
    if same:
        same[0].role = "zero"
    else:
        rows.append(zero)
    rows.append(RowSpec("belady + oracle (100% reference)", "belady", "oracle", engine=False, admission="greedy",
                        role="full"))
    rows.append(RowSpec("physical limit", "belady", "none", engine=False, role="limit"))
    return rows


def _miss_suffix(miss: str) -> str:
    return "" if miss == "fetch" else f", {miss}"


# ---------------------------------------------------------------------- predictor
def _predictor(args: EngineArgs, loaded: Any, prefetch: str):
    """The Predictor the engine prefetches with, or None."""

    if prefetch == "none":
        return None
    if prefetch == "learned":

        path = args.checkpoint_file
        predictor = load_predictor(path, loaded.info)
        predictor.source = str(path)
        return predictor
    a = loaded.adapter
    weights = torch.stack([a.router_weight(i).detach().float().cpu() for i in range(a.num_layers)])
    weights = weights.to(args.device)  # the engine calls it on device-resident hidden states
    lookahead = 1 if prefetch in ("topk", "percentile") else (args.lookahead or 1)
    return GateLookahead(weights, a.top_k, lookahead)


def _lookahead(args: EngineArgs, predictor: Any) -> int:
    if predictor is None:
        return 1
    if args.lookahead is not None:
        if args.lookahead > predictor.lookahead:
            raise UserError(f"the predictor forecasts {predictor.lookahead} layer(s) ahead, not --lookahead "
                            f"{args.lookahead}")
        return args.lookahead
    return predictor.lookahead


def _sim_prefetch(row: RowSpec, predictor: Any, lookahead: int) -> str:
    """The simulator's name for the prefetcher the engine row used."""
    if row.prefetch == "learned":
        return f"ckpt:{predictor.source}"
    if row.prefetch == "gate" and lookahead == 1:
        return "topk"
    return row.prefetch


# ---------------------------------------------------------------------- running
def _load(args: EngineArgs):

    dtype = args.dtype
    if dtype == "auto" and str(args.device).startswith("cuda") and args.model not in (TINY, MINI):
        dtype = "bfloat16"  # load on the host in the dtype the device will run
    return load_model(args.model, dtype=dtype, device="cpu", seed=args.seed)


def _hardware_spec(name: str, bandwidth: float | None) -> str:
    """The profile (checked by the front end) with the emulated link's bandwidth."""
    if bandwidth is None:
        return name
    sep = "," if ":" in name else ":"
    return f"{name}{sep}link_gbps={bandwidth / 1e9:g}"


@dataclass
class _Shared:
    """What every engine row of one run shares: the quality reference and the quantized host tier."""

    continuations: list = field(default_factory=list)  # held-out contexts and their reference continuations
    plain_scored: list = field(default_factory=list)  # the plain model on them (the quality reference)
    tier: Any = None  # the quantized host tier, built by the first lower-bit engine and lent to the rest


def _engine_row(args, row: RowSpec, loaded, prompts, predictor, lookahead: int, slots: int,
                bandwidth: float | None, expert_bytes: int | None, reference: list[list[int]],
                workdir: Path, shared: _Shared) -> tuple[dict, Any]:
    from offload.engine.engine import EngineConfig, OffloadEngine, clone_loaded

    config = EngineConfig(
        capacity_slots=slots, policy=row.policy, bandwidth=bandwidth, routing=row.routing,
        routing_lambda=args.routing_lambda, miss=row.miss,
        prefetch="percentile" if row.prefetch == "percentile" else "topk",
        prefetch_params={"overfetch": args.overfetch, "percentile": args.percentile, "lookahead": lookahead},
        admission=row.admission, expert_bytes=expert_bytes, expert_dtype=args.copy_dtype,
        precisions=precision_ladder(args.precisions), device=str(args.device),
    )
    tier = shared.tier if row.miss in LOWER_BIT_MODES else None
    with OffloadEngine(clone_loaded(loaded), config, predictor=predictor if row.prefetch != "none" else None,
                       tier=tier) as eng:
        shared.tier = shared.tier or eng.tier
        recorder = eng.record(hidden=True)
        metrics, _ = run_prompts(loaded, prompts, args.max_new_tokens, engine=eng, reference=reference,
                                 progress=f"engine: {row.label}")
        quality = (summarize_quality(score_engine(eng, shared.continuations), shared.plain_scored)
                   if shared.continuations else None)
    a = loaded.adapter
    store = recorder.write(
        workdir / re.sub(r"[^a-z0-9]+", "-", row.label.lower()), loaded.info,
        router_weights={i: a.router_weight(i).detach().float().cpu().numpy() for i in range(a.num_layers)},
    )
    return {"summary": summarize(metrics), "prompts": [m.as_dict() for m in metrics], "quality": quality}, store


def _simulate(args, row: RowSpec, store, predictor, lookahead: int, hardware: str, expert_bytes: int | None,
              predictor_us: float | None = None) -> dict[str, Any]:

    prefetch = row.prefetch if not row.engine else _sim_prefetch(row, predictor, lookahead)
    cfg = SimConfig(
        policy=row.policy, capacity=args.capacity.text, prefetch=prefetch, lookahead=lookahead,
        overfetch=args.overfetch, percentile=args.percentile, admission=row.admission, hardware=hardware,
        miss=row.miss, routing=row.routing,
        routing_lambda=args.routing_lambda, copy_bytes=expert_bytes, predictor_us=predictor_us,
        copy_dtype=args.copy_dtype if expert_bytes is not None else None,
        precisions=",".join(precision_ladder(args.precisions)),
    )
    if row.engine and row.routing == "cache-aware":
        # the recording holds the engine's re-routed choices: replay them as they are
        cfg = replace(cfg, routing="standard")
    return simulate_configs(store, [cfg])[0]


def _measured_predictor_us(summary: dict[str, Any]) -> float | None:
    """The engine's own per-forecast time (what the simulator charges for the same row)."""
    calls = summary.get("predictor_calls") or 0
    return 1e6 * summary["predictor_s"] / calls if calls else None


def _prompts(args: EngineArgs, dataset: str, predictor: Any) -> tuple[list, str]:
    """Prompts the predictor never trained on: the texts after every text its trace store holds."""

    skip, note = 0, "training-free prefetch: nothing to hold out"
    source = getattr(predictor, "source", None)
    if source is not None:
        store_path = _trained_on(Path(source))
        if store_path is None:
            note = f"could not tell which texts {source} trained on: prompts are the first of {dataset}"
        else:

            held = TraceStore(store_path)
            name = (held.manifest.get("dataset") or {}).get("name")
            if same_documents(name, load_texts(dataset, limit=1).spec.get("name")):
                skip = int(held.seq_ids.max()) + 1 if held.num_tokens else 0
                note = (f"held out: texts {skip}-{skip + args.prompts - 1} of {dataset}; the predictor trained on "
                        f"{store_path}, which holds texts 0-{skip - 1}")
            else:
                note = f"held out: the predictor trained on {name!r} ({store_path}), the prompts are {dataset}"
    return load_prompts(dataset, args.prompts, skip=skip), note


def _trained_on(checkpoint: Path) -> Path | None:
    """The trace store a train.py checkpoint was fitted on (its run.json), if it still exists."""

    run = checkpoint.parent / "run.json"
    try:
        store = Path(json.loads(run.read_text())["store"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return store if (store / "manifest.json").is_file() else None


def evaluate(args: EngineArgs) -> dict[str, Any]:
    """Run every row; returns the report dict (also what --json writes)."""
    bandwidth, expert_bytes = args.bandwidth, args.copy_bytes
    if str(args.device) == "cpu":
        torch.set_num_threads(args.threads)
    rows = _rows(args)


    loaded = _load(args)
    slots = args.capacity.slots(loaded.info)
    dataset = args.dataset or {MINI: "demo:heldout-prompts", TINY: "demo"}.get(args.model, "gsm8k")
    predictors = {r.prefetch: _predictor(args, loaded, r.prefetch) for r in rows
                  if r.prefetch not in ("oracle", "none")}
    main_predictor = predictors.get(rows[0].prefetch)
    lookahead = _lookahead(args, main_predictor)
    prompts, prompt_note = _prompts(args, dataset, main_predictor)
    for prompt in prompts:
        check_fits(loaded.model, encode(loaded.tokenizer, prompt).shape[1], args.max_new_tokens)

    plain_metrics, _ = run_prompts(loaded, prompts, args.max_new_tokens, progress="plain model")
    reference = [m.generated for m in plain_metrics]
    shared = _Shared()
    if args.quality_tokens:  # quality is measured on engine rows only

        shared.continuations = continuations(loaded.tokenizer, prompts, args.quality_tokens, loaded.model)
        shared.plain_scored = score_plain(loaded.model, shared.continuations)
    with tempfile.TemporaryDirectory(prefix="engine-traces-") as tmp:
        workdir = Path(tmp)
        plain_store, plain_times = _record(args, loaded, prompts, workdir)
        hardware, fit = _hardware(args, loaded, plain_store, plain_times, bandwidth, rows)
        report = _header(args, loaded.info, slots, bandwidth, hardware, lookahead, main_predictor, expert_bytes)
        report.update(dataset=dataset, prompts=len(prompts), prompt_note=prompt_note, calibration=fit,
                      plain=summarize(plain_metrics))
        if shared.continuations:
            report["plain_quality"] = summarize_quality(shared.plain_scored, shared.plain_scored)
        for row in rows:
            entry = _entry(row)
            store = plain_store
            predictor_us = None
            if row.engine:
                entry["engine"], store = _engine_row(args, row, loaded, prompts, predictors.get(row.prefetch),
                                                     lookahead, slots, bandwidth, expert_bytes, reference, workdir,
                                                     shared)
                predictor_us = _measured_predictor_us(entry["engine"]["summary"])
            entry["sim"] = _simulate(args, row, store, predictors.get(row.prefetch), lookahead, hardware,
                                     expert_bytes, predictor_us)
            report["rows"].append(entry)
    _gaps(report)
    return report


def _hardware(args, loaded, plain_store, plain_times: list[float], bandwidth: float | None, rows: list[RowSpec]):
    """The simulator's profile: this machine's compute fitted to the plain engine run, or a named one."""
    if args.hardware != "calibrated":
        return _hardware_spec(args.hardware, bandwidth), None

    params = loaded.info.expert_bytes / loaded.model.dtype.itemsize
    spec, fit = fit_compute_profile(plain_store, np.asarray(plain_times), link_bytes_per_s=bandwidth,
                                    expert_params=params)
    low = sorted({p for r in rows if r.miss in LOWER_BIT_MODES for p in _low_precisions(args, r.miss)},
                 key=PRECISIONS.index)
    if low:  # what dequantizing a low-bit copy costs here: the simulator's per-precision compute cost

        dequant = fit_dequant_kernel_us(loaded.adapter.expert_params(0, 0), low, str(args.device))
        fit.update(dequant)
        spec += f",kernel_us={dequant['kernel_us']:.6g}"
    return spec, fit


def _low_precisions(args: EngineArgs, miss: str) -> tuple[str, ...]:

    return MissHandling(miss, precisions=precision_ladder(args.precisions)).low_precisions


def _gaps(report: dict[str, Any]) -> None:
    """Gap closed per row (measured for engine rows, simulated otherwise) and the physical limit."""

    rows = report["rows"]
    zero = next((r for r in rows if r["role"] == "zero"), None)
    full = next((r for r in rows if r["role"] == "full"), None)
    limit = next((r for r in rows if r["role"] == "limit"), None)
    if limit is not None:
        bound = physical_limit(limit["sim"])
        limit["limit"] = bound
        report["physical_limit"] = bound
    for r in rows:
        for key in ("ttft_s", "tpot_s"):
            name = key.split("_")[0]
            full_v = full["sim"].get(key) if full else None
            if r.get("engine") and zero and zero.get("engine"):
                r[f"{name}_gap_closed"] = gap_closed(r["engine"]["summary"][key], zero["engine"]["summary"][key],
                                                     full_v)
            elif zero:
                r[f"{name}_gap_closed"] = gap_closed(r["sim"].get(key), zero["sim"].get(key), full_v)


def _header(args, info, slots: int, bandwidth, hardware: str, lookahead: int, predictor,
            expert_bytes: int | None) -> dict[str, Any]:
    real = info.expert_bytes
    link_bytes = expert_bytes if expert_bytes is not None else real
    return {
        "model": info.model_id, "capacity": args.capacity.text, "capacity_slots": slots,
        "capacity_fraction": slots / (info.num_layers * info.num_experts),
        "bandwidth_bytes_per_s": bandwidth, "hardware": hardware, "device": str(args.device), "mode": "engine",
        "system": args.system, "lookahead": lookahead, "max_new_tokens": args.max_new_tokens,
        "admission": args.admission if args.system is None else "greedy",
        "expert_bytes": real, "copy_bytes": link_bytes, "emulated": args.expert_bytes if expert_bytes else None,
        "copy_ms": None if bandwidth is None or link_bytes is None else 1e3 * link_bytes / bandwidth,
        "predictor": getattr(predictor, "source", None) or (predictor.describe() if predictor else None),
        "precisions": list(precision_ladder(args.precisions)), "copy_bytes_by_precision": _precision_bytes(
            args, info, link_bytes, emulated=expert_bytes is not None), "quality_tokens": args.quality_tokens,
        "rows": [],
    }


def _precision_bytes(args: EngineArgs, info: Any, link_bytes: float | None,
                     emulated: bool) -> dict[str, float] | None:
    """Bytes one copy moves at each precision held (the real or emulated size times the byte ratio)."""

    if link_bytes is None or not (info.hidden_size and info.moe_intermediate_size):
        return None
    shapes = moe_expert_shapes(info.hidden_size, info.moe_intermediate_size, info.dtype)
    dtype = args.copy_dtype if emulated else None
    ratios = byte_ratios(with_itemsize(shapes, itemsize(dtype)) if dtype else shapes, precision_ladder(args.precisions))
    return {p: link_bytes * r for p, r in ratios.items()}


def _entry(row: RowSpec) -> dict[str, Any]:
    return {"label": row.label, "policy": row.policy, "prefetch": row.prefetch, "miss": row.miss,
            "routing": row.routing, "admission": row.admission, "role": row.role}


def _record(args, loaded, prompts, workdir: Path):
    """The plain model's routing on the prompts and the time of every pass, recorded by an engine
    that holds every expert (no copy): what the reference rows replay and the calibration fits."""
    from offload.engine.engine import EngineConfig, OffloadEngine, clone_loaded

    a = loaded.adapter
    config = EngineConfig(capacity_slots=a.num_layers * a.num_experts, policy="lru", bandwidth=None,
                          device=str(args.device))
    with OffloadEngine(clone_loaded(loaded), config) as eng:
        run_prompts(loaded, prompts[:1], args.max_new_tokens, engine=eng)  # warm: load every expert once
        recorder = eng.record(hidden=True)
        _, generations = run_prompts(loaded, prompts, args.max_new_tokens, engine=eng, progress="recording routing")
    store = recorder.write(workdir / "plain", loaded.info, router_weights={
        i: a.router_weight(i).detach().float().cpu().numpy() for i in range(a.num_layers)})
    return store, [t for g in generations for t in g.pass_s]


def run(args: EngineArgs) -> int:
    """Engine mode: evaluate, print the table, write what was asked (JSON, PNG, HTML, W&B)."""

    report = evaluate(args)
    print_table(report)
    if args.json:
        write_json(report, args.json)
    wandb_on = args.wandb and os.environ.get("WANDB_MODE", "").lower() != "disabled"
    page = html.report_path(args.report, args.json, f"evaluate-{Path(str(args.model)).name}")
    figures = plots(report) if (args.plots or page or wandb_on) else []
    for line in notes(figures):
        print(f"plot note: {line}")
    if args.plots:
        save_pngs(figures, args.plots)
    if wandb_on:
        log_wandb(report, args.wandb_project, figures)
    if page:
        doc = html_report(report, figures, command_line("evaluate.py", args.argv))
        print(f"HTML report: {html.write(doc, page).resolve()}")
    return 0
