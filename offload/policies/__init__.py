"""Eviction policies, one per file, and the registry the CLI and the engine build them from."""

from __future__ import annotations

from typing import Any

from core.errors import UserError
from offload.policies.base import EvictionPolicy, Key
from offload.policies.belady import Belady
from offload.policies.fifo import FIFO
from offload.policies.fld import FLD
from offload.policies.forecast import Forecast, LeastStaleForecast
from offload.policies.least_stale import LeastStale
from offload.policies.lfu import LFU
from offload.policies.lhu import LHU
from offload.policies.lru import LRU
from offload.policies.random_policy import RandomEviction
from offload.policies.score import ScoreBased

POLICIES: dict[str, type[EvictionPolicy]] = {
    cls.name: cls
    for cls in (LeastStale, LRU, FIFO, LFU, LHU, FLD, ScoreBased, Belady, RandomEviction, Forecast, LeastStaleForecast)
}


def policy_names() -> list[str]:
    return list(POLICIES)


def make_policy(name: str, **params: Any) -> EvictionPolicy:
    """Build a policy by its command-line name; unknown names list the valid ones."""
    cls = POLICIES.get(name)
    if cls is None:
        raise UserError(f"unknown eviction policy {name!r}; valid: {', '.join(POLICIES)}")
    return cls(**params)


__all__ = ["POLICIES", "EvictionPolicy", "Key", "make_policy", "policy_names"] + [
    c.__name__ for c in POLICIES.values()
]
