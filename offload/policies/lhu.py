"""LHU (HOBBIT): least *high-precision* used; an LFU that counts only uses at full precision.

Without a precision cascade every expert runs at full precision, so LHU counts every use and
behaves exactly like LFU (``scope="run"``). A caller with mixed precisions says how an access ran
through the side-information channel: ``hint={"precision_bits": 4}``; uses below
``high_bits`` are not counted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from offload.policies.lfu import LFU


class LHU(LFU):
    name = "lhu"

    def __init__(self, high_bits: int = 8, scope: str = "run"):
        self.high_bits = high_bits
        super().__init__(scope=scope)

    def _counts(self, hint: Any) -> bool:
        if isinstance(hint, Mapping) and "precision_bits" in hint:
            return int(hint["precision_bits"]) >= self.high_bits
        return True

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, "high_bits": self.high_bits, "scope": self.scope}
