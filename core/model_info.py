"""The numbers of a model that every layer checks, and the phase code of a token.

A trace store records them (:mod:`data_pipeline.trace_store`), a predictor or reuse-forecaster
file carries them (:mod:`predictors.checkpoint`), and the cache is sized from them
(:mod:`offload.capacity`): one definition here, below all of them. So is
:func:`check_lookahead`, the refusal of a forecast distance the model's layers cannot hold, which
the predictors and the simulator both apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.errors import UserError

#: phase of a token (the store's ``phase`` column, a pass's phase): the prompt, then one token at a time
PREFILL, DECODE = 0, 1


@dataclass
class ModelInfo:
    """The numbers of the model a store was collected from; everything downstream checks them."""

    model_id: str
    family: str
    num_layers: int
    num_experts: int
    top_k: int
    hidden_size: int | None = None
    expert_bytes: int | None = None  # bytes of one expert in ``dtype``
    dtype: str | None = None
    revision: str | None = None
    moe_intermediate_size: int | None = None
    norm_topk_prob: bool | None = None
    layer_expert_bytes: list[int] | None = None  # per-layer sizes where they differ (imported traces)

    def key(self) -> dict[str, Any]:
        """The identity that decides whether two stores/checkpoints talk about the same model."""
        return {
            "model_id": self.model_id,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "hidden_size": self.hidden_size,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelInfo:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def check_lookahead(lookahead: int, num_layers: int) -> None:
    """Refuse a distance D that no layer can use: from layer 0 the farthest target is L-1."""
    if lookahead < 1:
        raise UserError(f"lookahead distance D must be at least 1 (got {lookahead})")
    if lookahead > num_layers - 1:
        raise UserError(
            f"lookahead distance D={lookahead} runs past the last layer: the model has {num_layers} "
            f"MoE layers, so D can be at most {num_layers - 1}"
        )
