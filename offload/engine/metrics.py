"""What the engine measures, per prompt and in total.

The counters are the per-layer step's (:class:`offload.counters.Counters`, the simulator's too); a
prompt's numbers are the difference of two snapshots, so one engine serves many prompts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from statistics import mean
from typing import Any

from offload.counters import Counters


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
        d.pop("counters")
        d.update(self.counters.as_dict())
        return d


def _rate(num: float, den: float) -> float:
    return num / den if den else 0.0


def summarize(prompts: list[PromptMetrics]) -> dict[str, float]:
    """Totals and rates over prompts (times are means per prompt; rates are over all accesses)."""
    total = Counters()
    for p in prompts:
        total = total.plus(p.counters)
    out: dict[str, float] = total.as_dict()
    out.update(
        prompts=len(prompts),
        hit_rate=_rate(total.hits, total.accesses),
        miss_rate=_rate(total.misses, total.accesses),
        collision_rate=_rate(total.collision_misses, total.accesses),
        prefetch_accuracy=_rate(total.prefetch_used, total.prefetch_issued),
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
