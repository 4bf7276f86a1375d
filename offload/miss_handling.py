"""What to do when a chosen expert is not resident.

Exact outputs:

- ``fetch``: block until it is copied in at full precision.

Outputs that change (quality is reported next to speed: ``evaluate.py``'s perplexity column):

- ``drop``: skip a missed expert of low rank: rank 3 and below in the token's top-k (0-based rank
  >= ``drop_from_rank`` = 2); the top ranks are always fetched. In a prefill pass an expert's rank is
  the best rank any prompt token gave it.
- ``substitute`` (Zhu et al.): run a resident expert of the same layer instead, when its router
  probability is within ``tolerance`` of the missed one's (the best such candidate); otherwise
  fetch. Needs router logits; in a prefill pass probabilities are averaged over the prompt's tokens.

Lower-bit copies (the host tier holds every expert at each precision of ``precisions``, highest
first; offload.quantization). A low-bit copy moves fewer bytes over the link and is dequantized into
its slot when it first runs; the cached expert keeps that precision until it is evicted or upgraded:

- ``fetch-lowest-bit``: fetch at the lowest precision held.
- ``fetch-priority``: the expert's importance decides. Importance is its position in the layer's
  accesses, which come in router-weight order: ``(i + 0.5) / n`` for the i-th of n (0 = the most
  important). In a decode step that is exactly its rank in the token's top-k; in a prefill pass the
  percentile of its router weight summed over the prompt. The top 40 % are fetched at full
  precision; the bottom 60 % fall back in three equal bands to int8, int4, int2 (SpecMD's "highest
  precision, fall back int8 -> int4 -> int2 for the bottom 60th percentile"). A band whose precision
  is not held takes the highest held one below it (or, with none below, the lowest held).
- ``precision-cascade`` (HOBBIT): serve the miss now at the lowest precision held; the
  full-precision copy follows as an *upgrade*: a copy through the same link that runs only when the
  link has room (after every demand copy and prefetch: offload.link) and replaces the low-bit copy
  exactly once when it has arrived (the step applies arrived upgrades at the start of each layer).

Prefetches always copy at full precision: a prefetch that arrives in time costs no stall, so the
precision variants only change what a *miss* waits for. A hit runs at the resident copy's precision.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from core.errors import UserError
from offload.precision import PRECISIONS, precision_ladder, rank

MISS_MODES = ("fetch", "drop", "substitute", "fetch-lowest-bit", "fetch-priority", "precision-cascade")
#: the modes that fetch lower-bit copies (they need a quantized host tier)
LOWER_BIT_MODES = ("fetch-lowest-bit", "fetch-priority", "precision-cascade")
#: fetch-priority: the most important share of a layer's accesses, fetched at full precision
PRIORITY_NATIVE_SHARE = 0.4
#: fetch-priority: the precision of each band of the bottom 60 %, upper band edge first
PRIORITY_BANDS: tuple[tuple[float, str], ...] = ((0.6, "int8"), (0.8, "int4"), (1.0, "int2"))


@dataclass(frozen=True)
class MissHandling:
    mode: str = "fetch"
    drop_from_rank: int = 2
    tolerance: float = 0.05
    precisions: Sequence[str] = PRECISIONS  # the precisions the host tier holds (lower-bit modes)

    def __post_init__(self) -> None:
        if self.mode not in MISS_MODES:
            raise UserError(f"unknown miss handling {self.mode!r}; valid: {', '.join(MISS_MODES)}")
        if self.drop_from_rank < 1:
            raise UserError("drop must always fetch at least the top-ranked expert (drop_from_rank >= 1)")
        object.__setattr__(self, "precisions", precision_ladder(self.precisions))
        if self.lower_bit and len(self.precisions) < 2:
            raise UserError(f"{self.mode} needs a lower-bit precision beside native; hold one with "
                            f"--precisions native,int4 (choose from {', '.join(PRECISIONS[1:])})")

    # ------------------------------------------------------------------ what the mode needs
    @property
    def lower_bit(self) -> bool:
        """Whether misses may be fetched below full precision (a quantized host tier is needed)."""
        return self.mode in LOWER_BIT_MODES

    @property
    def upgrades(self) -> bool:
        """Whether a low-bit copy is followed by its full-precision upgrade (the cascade)."""
        return self.mode == "precision-cascade"

    @property
    def low_precisions(self) -> tuple[str, ...]:
        """The lower-bit precisions this mode can fetch (what the host tier must hold besides native)."""
        if self.mode == "fetch-priority":
            return tuple(self.precisions[1:])
        if self.mode in ("fetch-lowest-bit", "precision-cascade"):
            return (self.precisions[-1],)
        return ()

    # ------------------------------------------------------------------ fetch, drop, substitute
    def drops(self, best_rank: int) -> bool:
        return self.mode == "drop" and best_rank >= self.drop_from_rank

    def substitute(self, missed: int, probs: np.ndarray, candidates: Iterable[int]) -> int | None:
        """The resident expert to run instead of ``missed``, or None (then fetch)."""
        if self.mode != "substitute":
            return None
        floor = float(probs[missed]) - self.tolerance
        best, best_p = None, -1.0
        for e in candidates:
            pe = float(probs[e])
            if pe >= floor and pe > best_p:
                best, best_p = e, pe
        return best

    # ------------------------------------------------------------------ lower-bit copies
    def precision(self, importance: float | None = None) -> str:
        """The precision a missed expert is fetched at. ``importance``: its position in the layer's
        accesses, ``(i + 0.5) / n`` (0 = most important); None when unknown (a refetch cost estimate)."""
        if self.mode in ("fetch-lowest-bit", "precision-cascade"):
            return self.lowest_bit()
        if self.mode == "fetch-priority":
            return "native" if importance is None else self.by_priority(importance)
        return "native"

    def lowest_bit(self) -> str:
        """fetch-lowest-bit, and the cascade's first copy: the lowest precision held."""
        return self.precisions[-1]

    def by_priority(self, importance: float) -> str:
        """fetch-priority: full precision for the top 40 %, then int8 / int4 / int2 bands (module doc)."""
        if importance < PRIORITY_NATIVE_SHARE:
            return "native"
        band = next(p for edge, p in PRIORITY_BANDS if importance < edge or edge == 1.0)
        held = [p for p in self.precisions if rank(p) >= rank(band)]
        return held[0] if held else self.precisions[-1]


def importance(index: int, count: int) -> float:
    """Position of the ``index``-th of ``count`` accesses of a layer (router-weight order): 0 = most important."""
    return (index + 0.5) / count
