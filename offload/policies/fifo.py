"""FIFO: evict the expert that entered the cache first; hits do not refresh it."""

from __future__ import annotations

from typing import Any

from offload.policies.base import Eligible, EvictionPolicy, Key


class FIFO(EvictionPolicy):
    name = "fifo"

    def on_access(self, key: Key, *, score: float = 0.0, hint: Any = None) -> None:
        pass  # the order is insertion order only

    def victim(self, eligible: Eligible, *, for_prefetch: bool = False) -> Key | None:
        return self._oldest(eligible)
