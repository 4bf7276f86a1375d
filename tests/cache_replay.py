"""Feed hand-built passes through the one per-layer step (offload/step.py), as the simulator and the
engine do, and return what happened at every demand access (shared by the cache and policy tests)."""

from __future__ import annotations

import numpy as np

from core.passes import passes_from_lists
from offload.cache import ExpertCache
from offload.hardware import get_hardware
from offload.policies.base import DECODE
from offload.simulator import Replay, SimBackend
from offload.step import Access, LayerStep


def replay(cache: ExpertCache, passes, scores=None, hints=None) -> list[tuple]:
    """passes[p][layer] = expert ids in rank order; returns (pass, key, hit, evicted, collision) per access."""
    ps = passes_from_lists(passes, cache.num_experts)
    backend = SimBackend(Replay(None, ps, None, get_hardware("a100-5gbs"), cache.capacity,
                                np.ones(cache.num_layers), 2.0))
    step = LayerStep(cache, backend, record_events=True)
    i = 0
    for layers in passes:
        step.begin_pass(DECODE)
        for layer, experts in enumerate(layers):
            accesses = [Access(int(e), scores[i + j] if scores else 1.0, j, 1, hints[i + j] if hints else None)
                        for j, e in enumerate(experts)]
            i += len(experts)
            step.run_layer(layer, accesses, 1)
    assert step.events is not None
    return step.events
