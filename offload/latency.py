"""Latency against its references: the gap closed, and the physical limit.

Every result is judged inside its *setting* (capacity, hardware, phase, cache layout, miss handling,
routing, counted passes): what differs inside a setting is how experts are chosen, kept and
fetched. Per setting:

- **0 %**: LRU without prefetch (``lru`` + ``none``);
- **100 %**: Belady with oracle prefetch (``belady`` + ``oracle``, greedy): a reference
  configuration, not a bound -- its scheduling is greedy, so a configuration can beat it;
- **physical limit**: the latency no schedule with exact outputs can beat. Belady moves the fewest
  bytes any eviction can (prefetching cannot lower the number of fetches a cache of this size
  needs), the link moves them one after another, and the compute cannot go faster than with every
  expert resident: per phase, ``max(compute, Belady's bytes / bandwidth)`` per pass. It is a bound
  on the phase's total; as a per-pass mean it is exact when every pass of the phase is counted.

``gap closed = (T(LRU, none) - T(config)) / (T(LRU, none) - T(Belady, oracle))`` for TTFT and TPOT;
none when the gap is under 5 % of T(LRU, none).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

#: what defines a setting (everything but the choice of policy, prefetcher and their knobs)
SETTING = ("capacity", "hardware", "phase", "cache", "miss", "routing", "passes", "split", "split_seed", "copy_bytes")
#: the configurations every setting is measured against: (policy, prefetch, role)
REFERENCES = (("lru", "none", "0% (LRU, no prefetch)"), ("belady", "none", "physical limit (Belady's bytes)"),
              ("belady", "oracle", "100% (Belady + oracle prefetch)"))


def setting_key(result: dict[str, Any]) -> tuple:
    return tuple(str(result.get(k)) for k in SETTING)


def is_reference(result: dict[str, Any], policy: str, prefetch: str) -> bool:
    return (result.get("policy") == policy and result.get("prefetch") == prefetch and not result.get("policy_params")
            and (prefetch == "none" or result.get("admission", "greedy") == "greedy"))


#: a gap narrower than this share of the 0 % latency is noise, not something to close (a copy-bound
#: prefill that needs nearly every expert whatever the policy): no share is reported
MIN_GAP = 0.05


def gap_closed(value: float | None, zero: float | None, full: float | None) -> float | None:
    """Share of the gap closed; None without a gap worth the name (under MIN_GAP, or the 100 %
    reference no faster than the 0 % one)."""
    if value is None or zero is None or full is None or zero - full <= MIN_GAP * abs(zero):
        return None
    return (zero - value) / (zero - full)


def physical_limit(belady_none: dict[str, Any]) -> dict[str, float | None]:
    """TTFT / TPOT below which no exact schedule can go, from the Belady-without-prefetch replay."""
    bw = belady_none["hardware_profile"]["link_gbps"] * 1e9
    out: dict[str, float | None] = {}
    for phase, key in (("prefill", "ttft_s"), ("decode", "tpot_s")):
        n = belady_none.get(f"{phase}_passes") or 0
        compute = belady_none.get(f"compute_{key}")
        if not n or compute is None:
            out[key] = None
            continue
        out[key] = max(compute, belady_none[f"{phase}_bytes"] / bw / n)
    return out


def annotate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add ``ttft_gap_closed`` / ``tpot_gap_closed`` and the setting's ``limit_ttft_s`` / ``limit_tpot_s``
    to every result whose setting holds the references; returns the results."""
    by_setting: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in results:
        refs = by_setting.setdefault(setting_key(r), {})
        for policy, prefetch, _ in REFERENCES:
            if is_reference(r, policy, prefetch) and f"{policy}+{prefetch}" not in refs:
                refs[f"{policy}+{prefetch}"] = r
    for r in results:
        refs = by_setting[setting_key(r)]
        zero, full, limit = refs.get("lru+none"), refs.get("belady+oracle"), refs.get("belady+none")
        for key in ("ttft_s", "tpot_s"):
            name = key.split("_")[0]
            r[f"{name}_gap_closed"] = gap_closed(r.get(key), zero and zero.get(key), full and full.get(key))
        bound = physical_limit(limit) if limit is not None else {"ttft_s": None, "tpot_s": None}
        r["limit_ttft_s"], r["limit_tpot_s"] = bound["ttft_s"], bound["tpot_s"]
    return results


def reference_configs(configs: list[Any]) -> list[Any]:
    """The reference configurations each setting of ``configs`` lacks (SimConfig objects), to run too.

    Belady + oracle prefetches as far ahead as the farthest lookahead of the sweep.
    """
    have = {(setting_key(vars(c)), c.policy, c.prefetch) for c in configs
            if is_reference(vars(c), c.policy, c.prefetch)}
    depth: dict[tuple, int] = {}
    first: dict[tuple, Any] = {}
    for c in configs:
        key = setting_key(vars(c))
        depth[key] = max(depth.get(key, 1), c.lookahead)
        first.setdefault(key, c)
    extra = []
    for key, c in first.items():
        for policy, prefetch, _ in REFERENCES:
            if (key, policy, prefetch) in have:
                continue
            extra.append(replace(c, policy=policy, prefetch=prefetch, policy_params={}, admission="greedy",
                                 lookahead=depth[key] if prefetch == "oracle" else 1, predictor_us=None))
    return extra
