"""Event counters of the per-layer step, the same fields for the simulator and the engine.

Counters are plain numbers the step bumps while it runs; the numbers of a prompt (engine) or of a
part of a replay (simulator: train / val / test passes) are the difference of two snapshots, so one
run serves many prompts or parts without being rebuilt.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from offload.precision import PRECISIONS


@dataclass
class Counters:
    """Cumulative event counts (see DESIGN.md for access / hit / collision miss)."""

    passes: int = 0
    accesses: int = 0  # (layer, expert) needed in a pass
    hits: int = 0  # resident when needed (a prefetch still on the link counts, see late_prefetch)
    misses: int = 0
    late_prefetch: int = 0  # hits on a prefetch that had not arrived yet (its rest is stall)
    collision_misses: int = 0  # misses on an expert evicted earlier in the same pass
    dropped: int = 0  # missed experts skipped by the drop miss handler
    substituted: int = 0  # missed experts replaced by a cached one
    evictions: int = 0
    prefetch_considered: int = 0  # candidates the admission looked at (not resident, in time)
    prefetch_issued: int = 0  # admitted: inserted into the cache, copy queued
    prefetch_used: int = 0  # of those, demand-accessed before being evicted
    prefetch_cancelled: int = 0  # dropped before reaching the link (their layer began without them)
    prefetch_late_refused: int = 0  # candidates that could not arrive before their layer started
    demand_bytes: float = 0.0  # bytes of demand copies
    prefetch_bytes: float = 0.0  # bytes of prefetch copies that reached the link
    prefetch_used_bytes: float = 0.0  # bytes of prefetches later used
    stall_s: float = 0.0  # time the layers waited for copies
    predictor_calls: int = 0
    predictor_s: float = 0.0  # time the forecasts took on the device timeline
    forecast_predicted: int = 0  # experts forecast (one per (source layer, distance, selected expert))
    forecast_correct: int = 0  # of those, really needed at the target layer
    forecast_relevant: int = 0  # experts needed at target layers that had a forecast
    # precision (offload.miss_handling's lower-bit modes): hits by the resident copy's precision, and every
    # expert computation (hits, fetched misses, substitutes) by the precision it ran at
    hits_native: int = 0
    hits_int8: int = 0
    hits_int4: int = 0
    hits_int2: int = 0
    served_native: int = 0
    served_int8: int = 0
    served_int4: int = 0
    served_int2: int = 0
    dequantized: int = 0  # low-bit copies dequantized into their slot (once each, at their first run)
    upgrades_issued: int = 0  # cascade: full-precision copies queued behind a low-bit miss
    upgrades: int = 0  # ... that replaced their low-bit copy
    upgrades_cancelled: int = 0  # ... withdrawn before reaching the link (their expert was evicted)
    upgrade_bytes: float = 0.0  # bytes of upgrades that reached the link

    @property
    def bytes_moved(self) -> float:
        return self.demand_bytes + self.prefetch_bytes + self.upgrade_bytes

    def hit_at(self, precision: str) -> None:
        """A hit on a resident copy at ``precision``."""
        field = f"hits_{precision}"
        setattr(self, field, getattr(self, field) + 1)

    def served_at(self, precision: str) -> None:
        """An expert computation at ``precision``."""
        field = f"served_{precision}"
        setattr(self, field, getattr(self, field) + 1)

    def by_precision(self, what: str) -> dict[str, int]:
        """``hits`` or ``served`` per precision (offload.precision.PRECISIONS order)."""
        return {p: getattr(self, f"{what}_{p}") for p in PRECISIONS}

    @property
    def wasted_bytes(self) -> float:
        """Bytes of prefetches that reached the link and were never used."""
        return self.prefetch_bytes - self.prefetch_used_bytes

    @property
    def prefetch_wasted(self) -> int:
        """Admitted prefetches never used (cancelled ones moved no bytes but still took a slot)."""
        return self.prefetch_issued - self.prefetch_used

    def snapshot(self) -> Counters:
        return Counters(**asdict(self))

    def minus(self, earlier: Counters) -> Counters:
        return Counters(**{f.name: getattr(self, f.name) - getattr(earlier, f.name) for f in fields(self)})

    def plus(self, other: Counters) -> Counters:
        return Counters(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def as_dict(self) -> dict[str, float]:
        d: dict[str, float] = asdict(self)
        d.update(bytes_moved=self.bytes_moved, wasted_bytes=self.wasted_bytes, prefetch_wasted=self.prefetch_wasted,
                 hits_by_precision=self.by_precision("hits"), served_by_precision=self.by_precision("served"))
        return d
