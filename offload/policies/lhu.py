"""LHU (HOBBIT): least *high-precision* used; an LFU that counts only uses at high precision.

HOBBIT keeps experts at mixed precision: a miss may be served by a low-bit copy (offload.miss_handling:
``precision-cascade``, ``fetch-lowest-bit``, ``fetch-priority``). An expert that keeps being run at
low precision is cheap to fetch again at that precision, so what is worth keeping is what has been
needed at full precision: LHU counts a use only when it ran at ``high`` or above (``native`` by default:
full precision; ``int8`` also counts int8 uses). The cache reports every use's precision
(``EvictionPolicy.on_served``); ties go to the least recently used, and counts persist across
evictions (``scope="run"``, as LFU's).

Without a lower-bit miss handler every use runs at full precision, so LHU counts every use and is
exactly LFU (the numba simulator runs it as LFU: it only covers full-precision configurations).
"""

from __future__ import annotations

from typing import Any

from core.errors import UserError
from offload.policies.base import EvictionPolicy, Key
from offload.policies.lfu import LFU
from offload.precision import PRECISIONS, as_precision


class LHU(LFU):
    name = "lhu"

    def __init__(self, high: str = "native", scope: str = "run"):
        try:
            self.high = as_precision(high)
        except UserError:
            raise UserError(f"LHU's high precision must be one of {', '.join(PRECISIONS)}, got {high!r}") from None
        self._counted = set(PRECISIONS[: PRECISIONS.index(self.high) + 1])
        super().__init__(scope=scope)

    def on_access(self, key: Key, *, score: float = 0.0, hint: Any = None) -> None:
        EvictionPolicy.on_access(self, key, score=score, hint=hint)  # a touch; the use counts in on_served

    def on_served(self, key: Key, precision: str) -> None:
        if precision in self._counted:
            self.count[key] = self.count.get(key, 0) + 1

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, "high": self.high, "scope": self.scope}
