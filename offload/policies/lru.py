"""LRU: evict the least recently used expert (touch = insert or demand access)."""

from __future__ import annotations

from offload.policies.base import Eligible, EvictionPolicy, Key


class LRU(EvictionPolicy):
    name = "lru"

    def victim(self, eligible: Eligible, *, for_prefetch: bool = False) -> Key | None:
        return self._oldest(eligible)
