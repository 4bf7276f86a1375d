"""What to do when a chosen expert is not resident.

- ``fetch``: block until it is copied in (exact outputs).
- ``drop``: skip a missed expert of low rank: rank 3 and below in the token's top-k (0-based rank
  >= ``drop_from_rank`` = 2); the top ranks are always fetched. In a prefill pass an expert's rank is
  the best rank any prompt token gave it.
- ``substitute`` (Zhu et al.): run a resident expert of the same layer instead, when its router
  probability is within ``tolerance`` of the missed one's (the best such candidate); otherwise
  fetch. Needs router logits; in a prefill pass probabilities are averaged over the prompt's tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from data_pipeline.errors import UserError

MISS_MODES = ("fetch", "drop", "substitute")


@dataclass(frozen=True)
class MissHandling:
    mode: str = "fetch"
    drop_from_rank: int = 2
    tolerance: float = 0.05

    def __post_init__(self) -> None:
        if self.mode not in MISS_MODES:
            raise UserError(f"unknown miss handling {self.mode!r}; valid: {', '.join(MISS_MODES)}")
        if self.drop_from_rank < 1:
            raise UserError("drop must always fetch at least the top-ranked expert (drop_from_rank >= 1)")

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
