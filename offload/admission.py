"""Prefetch admission: which forecast experts are worth a copy, given the link and the cache.

A predictor's scores are rankings, not probabilities (a softmax over experts, a frequency, a
logit). What admission needs is P(use): the chance a candidate is really needed at its target
layer. :class:`Calibration` learns it online, per phase, lookahead distance and rank of the
candidate in the forecast, from the forecasts the run itself made and what the target layers then
used. It only ever looks at the past, so held-out numbers stay held out, and it works for every
predictor family, the paper's gate prefetchers and the oracle alike.

Two modes (``--admission``):

- ``greedy``: the paper's prefetchers: every selected candidate (top ``k * overfetch``, or above the
  score percentile) is fetched, best first, whatever the link is doing.
- ``value``: a candidate is fetched only when it can arrive before its layer starts (given the
  bytes already queued and the compute of the layers in between) and its expected saving exceeds
  its expected cost (:func:`prefetch_value`). On a saturated link little qualifies; on a fast one,
  much does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.errors import UserError

ADMISSIONS = ("greedy", "value")


class Calibration:
    """P(use) of the r-th forecast candidate at distance d, per phase: a Beta-smoothed hit rate.

    Ranks past ``depth`` and experts the forecast did not list share one "rest" bucket: the chance
    that an unlisted expert of the target layer is used anyway (the recall the list misses).
    """

    def __init__(self, lookahead: int, depth: int, prior: tuple[float, float] = (1.0, 1.0)):
        self.depth = depth
        shape = (2, lookahead, depth + 1)  # phase (0 prefill, 1 decode), distance - 1, rank (+ rest)
        self.used = np.full(shape, prior[0])
        self.seen = np.full(shape, prior[0] + prior[1])

    def probs(self, phase: int, distance: int, n: int) -> np.ndarray:
        """P(use) of ranks 0..n-1."""
        d = distance - 1
        r = np.minimum(np.arange(n), self.depth)
        return self.used[phase, d, r] / self.seen[phase, d, r]

    def rest(self, phase: int, distance: int) -> float:
        d = distance - 1
        return float(self.used[phase, d, self.depth] / self.seen[phase, d, self.depth])

    def observe(self, phase: int, distance: int, listed: np.ndarray, used_mask: np.ndarray) -> None:
        """A target layer ran: ``listed`` were forecast (best first), ``used_mask`` (E,) what it used."""
        d = distance - 1
        n = min(len(listed), self.depth)
        hit = used_mask[listed[:n]]
        self.used[phase, d, :n] += hit
        self.seen[phase, d, :n] += 1.0
        unlisted = len(used_mask) - n
        if unlisted > 0:
            self.used[phase, d, self.depth] += int(used_mask.sum()) - int(hit.sum())
            self.seen[phase, d, self.depth] += unlisted


class RunningRate:
    """An exponentially weighted rate of a yes/no event, starting from a prior."""

    def __init__(self, prior: float, weight: float = 0.02):
        self.value = prior
        self.weight = weight

    def update(self, event: bool | float) -> None:
        self.value += self.weight * (float(event) - self.value)


@dataclass(frozen=True)
class PrefetchValue:
    """The terms of one admission decision (seconds), kept for tests and traces."""

    saving: float
    victim_cost: float
    link_cost: float

    @property
    def net(self) -> float:
        return self.saving - self.victim_cost - self.link_cost

    @property
    def admit(self) -> bool:
        return self.net > 0.0


def prefetch_value(*, p_use: float, copy_s: float, victim_copy_s: float, p_victim_before: float,
                   p_victim_later: float, start: float, demand_starts: list[float], p_demand: float) -> PrefetchValue:
    """Expected value of prefetching one candidate that arrives before its layer starts.

    - saving: with probability ``p_use`` the target layer would have missed it and waited a full
      copy (on a busy link at least that long);
    - victim cost: the victim the eviction policy would give up is refetched if it is needed before
      the target layer (``p_victim_before``), or later when the prefetch turns out useless (then its
      eviction bought nothing: ``(1 - p_use) * p_victim_later``);
    - link cost: a copy on the link cannot be interrupted, so a demand miss at one of the layers
      starting while it is in flight (``demand_starts``, each with probability ``p_demand``) waits
      for the rest of it. Only the first such demand waits on the prefetch itself.
    """
    saving = p_use * copy_s
    victim_cost = (p_victim_before + (1.0 - p_use) * p_victim_later) * victim_copy_s
    end = start + copy_s
    link_cost = 0.0
    none_yet = 1.0
    for t in demand_starts:
        if t >= end:
            break
        if t > start:
            link_cost += none_yet * p_demand * (end - t)
            none_yet *= 1.0 - p_demand
    return PrefetchValue(saving, victim_cost, link_cost)


def check_admission(mode: str) -> str:
    if mode not in ADMISSIONS:
        raise UserError(f"unknown prefetch admission {mode!r}; valid: {', '.join(ADMISSIONS)}")
    return mode
