"""Parse a cache capacity given as a fraction (``5%``), bytes (``0.6GB``, ``600MiB``) or slots (``512``)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from core.errors import UserError
from core.model_info import ModelInfo

_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def mean_expert_bytes(model: ModelInfo) -> float | None:
    """Bytes of one expert; the mean over layers when they differ (imported traces)."""
    if model.layer_expert_bytes:
        return sum(model.layer_expert_bytes) / len(model.layer_expert_bytes)
    return float(model.expert_bytes) if model.expert_bytes else None


def layer_expert_bytes(model: ModelInfo) -> list[float] | None:
    if model.layer_expert_bytes:
        return [float(b) for b in model.layer_expert_bytes]
    if model.expert_bytes:
        return [float(model.expert_bytes)] * model.num_layers
    return None


@dataclass(frozen=True)
class Capacity:
    """A cache size as the user gave it, checked for what it can be checked without a model.

    ``kind`` is ``fraction`` (``value`` of all L*E experts), ``bytes`` or ``slots``; :meth:`slots`
    resolves it for a model. ``text`` is what reports show (``5%``).
    """

    text: str
    kind: str
    value: float

    @classmethod
    def parse(cls, text: str) -> Capacity:
        """``5%``, ``0.6GB``/``600MiB`` or a slot count (``512``); refuses what no model could hold (empty,
        NaN, infinite, above 100 %, a fractional or non-positive slot count)."""
        s = str(text).strip().lower().replace(" ", "")
        if not s:
            raise UserError("capacity is empty; give a percentage (5%), a size (0.6GB) or a slot count (512)")
        if s.endswith("%"):
            try:
                frac = float(s[:-1]) / 100.0
            except ValueError:
                raise UserError(f"capacity {text!r} is not a percentage") from None
            if not math.isfinite(frac):
                raise UserError(f"capacity {text!r} is not a finite percentage")
            if frac > 1.0:
                raise UserError(f"capacity {text!r} is more than every expert of the model (100%)")
            if frac <= 0:
                raise UserError(f"capacity {text!r} is no expert slot; it must be positive")
            return cls(str(text).strip(), "fraction", frac)
        if m := re.fullmatch(r"([0-9.]+(?:e[+-]?[0-9]+)?)([kmgt]i?b|b)", s):
            try:
                size = float(m.group(1)) * _UNITS[m.group(2)]
            except ValueError:
                raise UserError(f"capacity {text!r} is not a size like 0.6GB") from None
            return cls(str(text).strip(), "bytes", size)
        try:
            value = float(s)
        except ValueError:
            raise UserError(f"capacity {text!r} is neither a percentage, a size (0.6GB) nor a slot count") from None
        if not math.isfinite(value):
            raise UserError(f"capacity {text!r} is not a finite slot count")
        if value != int(value):
            raise UserError(f"capacity {text!r}: a slot count must be a whole number")
        if value <= 0:
            raise UserError(f"capacity {text!r} is {int(value)} expert slots; it must be positive")
        return cls(str(text).strip(), "slots", value)

    def slots(self, model: ModelInfo, partition: str = "global") -> int:
        """Capacity in expert slots of ``model``. Bytes divide by the (mean) expert size; fractions are of all
        L*E experts. Refuses capacities that cannot run a single layer: below top-k (global), or below top-k
        per layer for a per-layer partitioned cache, and more slots than the model has experts."""
        text = self.text
        total = model.num_layers * model.num_experts
        if self.kind == "fraction":
            slots = round(self.value * total)
        elif self.kind == "bytes":
            ebytes = mean_expert_bytes(model)
            if ebytes is None:
                raise UserError(f"capacity {text!r} is in bytes but the store does not record expert bytes; give "
                                "slots or %")
            slots = int(self.value // ebytes)
        else:
            slots = int(self.value)
        if slots <= 0:
            raise UserError(f"capacity {text!r} is {slots} expert slots; it must be positive")
        need = model.top_k * (model.num_layers if partition == "per-layer" else 1)
        if slots < need:
            where = (f"{model.top_k} per layer x {model.num_layers} layers" if partition == "per-layer"
                     else f"top-k {model.top_k}")
            raise UserError(f"capacity {text!r} is {slots} expert slots, below one layer's need ({where} = {need})")
        if slots > total:
            raise UserError(f"capacity {text!r} is {slots} expert slots, more than the model's {total} experts "
                            f"(100% = {total})")
        return slots


def parse_capacities(text: str) -> list[Capacity]:
    """``--capacity``: a comma list of capacities, each checked (:meth:`Capacity.parse`); the one parser both
    modes of ``evaluate.py`` use."""
    items = [s.strip() for s in str(text).split(",") if s.strip()]
    if not items:
        raise UserError("--capacity is empty; give at least one value (5%, 0.6GB or a slot count)")
    return [Capacity.parse(s) for s in items]


def parse_capacity(text: str, model: ModelInfo, partition: str = "global") -> int:
    """Capacity in expert slots: :meth:`Capacity.parse` then :meth:`Capacity.slots`."""
    return Capacity.parse(text).slots(model, partition)
