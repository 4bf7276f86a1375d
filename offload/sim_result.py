"""What a replay adds up to, and the result dict both simulators return.

The reference simulator (:func:`offload.simulator.simulate_reference`) and the numba kernel
(:func:`offload.simulator_fast.simulate_fast`) fill one :class:`Tally` each and turn it into the
same dict here, so their numbers cannot drift apart in the reporting. ``replay`` and ``cfg`` are an
:class:`offload.simulator.Replay` and a :class:`offload.simulator.SimConfig` (duck-typed: this
module sits below both simulators).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.errors import UserError
from offload.counters import Counters

PARTS = ("train", "val", "test")  # the parts of the store's split, in the order of Replay.pass_part


@dataclass
class Tally:
    """What the counted passes of one replay add up to."""

    counters: Counters = field(default_factory=Counters)
    collisions: np.ndarray | None = None
    prefill_times: list[float] = field(default_factory=list)
    decode_times: list[float] = field(default_factory=list)
    prefill_compute: list[float] = field(default_factory=list)
    decode_compute: list[float] = field(default_factory=list)
    prefill_bytes: float = 0.0
    decode_bytes: float = 0.0


def counted_passes(replay: Any, cfg: Any) -> np.ndarray:
    """(P,) bool: whether each replayed pass is counted (``cfg.passes``: all, or one part of the split)."""
    P = replay.passes.num_passes
    if cfg.passes == "all":
        return np.ones(P, dtype=bool)
    if replay.pass_part is None:
        raise UserError(f"--passes {cfg.passes} needs a trace store to split")
    counted = replay.pass_part == PARTS.index(cfg.counted_part)
    if not counted.any():
        raise UserError(f"the {cfg.counted_part} part of the split holds none of the replayed ({cfg.phase}) passes")
    return counted


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def result(replay: Any, cfg: Any, tally: Tally, counted: np.ndarray) -> dict[str, Any]:
    """The result dict of one configuration: its settings, the counted passes' counters and times."""
    c = tally.counters
    collisions = tally.collisions if tally.collisions is not None else np.zeros(replay.passes.num_layers)
    out: dict[str, Any] = cfg.settings()
    out.pop("policy_params")
    tokens = int(replay.passes.pass_tokens[counted].sum())
    out.update(
        policy_params=dict(cfg.policy_params),
        capacity_slots=replay.capacity_slots,
        capacity_fraction=replay.capacity_slots / (replay.passes.num_layers * replay.passes.num_experts),
        passes_replayed=replay.passes.num_passes,
        passes_counted=int(counted.sum()),
        tokens_counted=tokens,
        accesses=c.accesses,
        hits=c.hits,
        misses=c.misses,
        hit_rate=c.hits / c.accesses if c.accesses else 0.0,
        hits_by_precision=c.by_precision("hits"),
        hit_rate_by_precision={p: n / c.accesses if c.accesses else 0.0 for p, n in c.by_precision("hits").items()},
        served_by_precision=c.by_precision("served"),
        dequantized=c.dequantized,
        upgrades_issued=c.upgrades_issued,
        upgrades=c.upgrades,
        upgrades_cancelled=c.upgrades_cancelled,
        upgrade_bytes=c.upgrade_bytes,
        collision_misses=c.collision_misses,
        collision_misses_per_layer=[int(x) for x in collisions],
        collision_rate=c.collision_misses / c.accesses if c.accesses else 0.0,
        evictions=c.evictions,
        dropped=c.dropped,
        substituted=c.substituted,
        prefetch_issued=c.prefetch_issued,
        prefetch_used=c.prefetch_used,
        prefetch_wasted=c.prefetch_wasted,
        prefetch_cancelled=c.prefetch_cancelled,
        prefetch_late_refused=c.prefetch_late_refused,
        prefetch_bytes=c.prefetch_bytes,
        demand_bytes=c.demand_bytes,
        bytes_moved=c.bytes_moved,
        wasted_bytes=c.wasted_bytes,
        bytes_per_token=c.bytes_moved / tokens if tokens else 0.0,
        wasted_bytes_per_token=c.wasted_bytes / tokens if tokens else 0.0,
        late_prefetch_hits=c.late_prefetch,
        stall_time_s=c.stall_s,
        predictor_time_s=c.predictor_s,
        ttft_s=_mean(tally.prefill_times),
        tpot_s=_mean(tally.decode_times),
        compute_ttft_s=_mean(tally.prefill_compute),
        compute_tpot_s=_mean(tally.decode_compute),
        prefill_bytes=tally.prefill_bytes,
        decode_bytes=tally.decode_bytes,
        prefill_passes=len(tally.prefill_times),
        decode_passes=len(tally.decode_times),
        total_time_s=float(np.sum(tally.prefill_times) + np.sum(tally.decode_times)),
        precision=c.forecast_correct / c.forecast_predicted if c.forecast_predicted else None,
        recall=c.forecast_correct / c.forecast_relevant if c.forecast_relevant else None,
        hardware_profile=replay.hardware.describe(),
    )
    if replay.forecast is None:
        out["precision"] = out["recall"] = None
    return out
