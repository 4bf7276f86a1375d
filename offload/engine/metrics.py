"""What the engine measures, per prompt and in total.

Counters are plain integers the engine bumps while it runs; a prompt's numbers are the difference
of two snapshots, so one engine can serve many prompts without being rebuilt.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from statistics import mean
from typing import Any


@dataclass
class Counters:
    """Cumulative event counts of one engine (see DESIGN.md for access / hit / collision)."""

    accesses: int = 0  # (layer, expert) needed in a pass
    hits: int = 0  # resident and ready when needed
    misses: int = 0  # had to wait for a copy (demand fetch or a prefetch still on the link)
    late_prefetch: int = 0  # misses whose expert a prefetch had already put on its way
    collision_misses: int = 0  # misses on an expert evicted earlier in the same pass
    dropped: int = 0  # missed experts skipped by the drop miss-handler
    substituted: int = 0  # missed experts replaced by a cached one
    prefetch_issued: int = 0
    prefetch_used: int = 0  # prefetched expert accessed before being evicted
    prefetch_wasted: int = 0  # prefetched expert evicted (or cancelled) without an access
    evictions: int = 0
    bytes_copied: int = 0
    stall_s: float = 0.0  # time the main loop waited for copies
    forecast_predicted: int = 0  # experts forecast (one per (source layer, distance, expert))
    forecast_correct: int = 0  # of those, really needed at the target layer
    forecast_relevant: int = 0  # experts needed at target layers that had a forecast

    def snapshot(self) -> Counters:
        return Counters(**asdict(self))

    def minus(self, earlier: Counters) -> Counters:
        return Counters(**{f.name: getattr(self, f.name) - getattr(earlier, f.name) for f in fields(self)})


@dataclass
class PromptMetrics:
    """One prompt: its timings and the cache events it caused."""

    index: int
    prompt_tokens: int
    new_tokens: int
    ttft_s: float  # prompt in -> first generated token out (prefill pass)
    tpot_s: float  # mean time per decode step after the first token (0 when only one token)
    tokens_per_s: float  # generated tokens / total generation time
    counters: Counters = field(default_factory=Counters)
    generated: list[int] = field(default_factory=list)
    agreement: float | None = None  # fraction of generated tokens equal to the plain model's
    exact_match: bool | None = None  # GSM8K-style answer check, where the dataset has answers

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("generated")
        d.update(d.pop("counters"))
        return d


def _rate(num: float, den: float) -> float:
    return num / den if den else 0.0


def summarize(prompts: list[PromptMetrics]) -> dict[str, float]:
    """Totals and rates over prompts (times are means per prompt; rates are over all accesses)."""
    total = Counters()
    for p in prompts:
        for f in fields(total):
            setattr(total, f.name, getattr(total, f.name) + getattr(p.counters, f.name))
    out: dict[str, float] = {k: v for k, v in asdict(total).items()}
    out.update(
        prompts=len(prompts),
        hit_rate=_rate(total.hits, total.accesses),
        miss_rate=_rate(total.misses, total.accesses),
        collision_rate=_rate(total.collision_misses, total.accesses),
        prefetch_accuracy=_rate(total.prefetch_used, total.prefetch_used + total.prefetch_wasted),
        precision=_rate(total.forecast_correct, total.forecast_predicted),
        recall=_rate(total.forecast_correct, total.forecast_relevant),
        ttft_s=mean(p.ttft_s for p in prompts) if prompts else 0.0,
        tpot_s=mean(p.tpot_s for p in prompts) if prompts else 0.0,
        tokens_per_s=mean(p.tokens_per_s for p in prompts) if prompts else 0.0,
        stall_s_per_prompt=_rate(total.stall_s, len(prompts)),
    )
    agreements = [p.agreement for p in prompts if p.agreement is not None]
    if agreements:
        out["token_agreement"] = mean(agreements)
    matches = [p.exact_match for p in prompts if p.exact_match is not None]
    if matches:
        out["exact_match"] = _rate(sum(matches), len(matches))
    return out
