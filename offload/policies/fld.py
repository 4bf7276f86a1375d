"""FLD (HOBBIT, Farthest Layer Distance): evict the expert whose layer is farthest from the layer now running.

``cyclic=True`` (default) measures the distance forward in execution order, wrapping into the next
pass: from execution point ``l`` the layer ``j`` runs again after ``(j - l) mod L`` layers, so the
expert of layer ``l-1`` goes first. ``cyclic=False`` uses ``|j - l|``. Ties: least recently used.
"""

from __future__ import annotations

from typing import Any

from offload.policies.base import Eligible, EvictionPolicy, Key


class FLD(EvictionPolicy):
    name = "fld"

    def __init__(self, cyclic: bool = True):
        self.cyclic = cyclic
        super().__init__()

    def distance(self, layer: int) -> int:
        if self.cyclic:
            return (layer - self.layer) % self.num_layers
        return abs(layer - self.layer)

    def victim(self, eligible: Eligible, *, for_prefetch: bool = False) -> Key | None:
        return self._min_by(lambda k: -self.distance(k[0]), eligible)

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, "cyclic": self.cyclic}
