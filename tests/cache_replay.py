"""Feed hand-built passes to an ExpertCache, the way the simulator and engine drive it (shared by tests)."""

from __future__ import annotations

from offload.cache import ExpertCache


def replay(cache: ExpertCache, passes, scores=None, hints=None) -> list[tuple]:
    """passes[p][layer] = expert ids in rank order; returns (pass, key, hit, evicted, collision) per access."""
    events = []
    i = 0
    for p, layers in enumerate(passes):
        cache.begin_pass()
        for layer, experts in enumerate(layers):
            keys = [(layer, e) for e in experts]
            cache.begin_layer(layer, keys)
            for key in keys:
                score = scores[i] if scores else 1.0
                hint = hints[i] if hints else None
                r = cache.access(key, score, hint=hint)
                events.append((p, key, r.hit, r.evicted, r.collision))
                i += 1
    return events
