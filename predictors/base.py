"""The one predictor interface every family implements, and the context it reads.

A predictor sits at layer ``l`` of a pass and forecasts which experts layers ``l+1 .. l+D`` will
pick. It may read the MoE-input hidden state of layer ``l`` (when the trace store or the running
engine has it), the experts already chosen at layers ``<= l`` of the same tokens, and the experts
the previous token chose at every layer (the trajectory families use these on traces without
hidden states), and the token ids (the token-aware families; -1 = unknown, as on imported traces
without tokens). It returns scores over the experts: higher means more likely to be needed. Scores
for a distance that runs past the last layer are meaningless and callers ignore them.

The simulator and the engine both call :meth:`Predictor.predict`; training code calls the same
method, so a family's forecast is written once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch


@dataclass
class PredictContext:
    """What is known at layer ``layer`` for a batch of T tokens."""

    layer: int
    hidden: torch.Tensor | None = None  # (T, H) MoE input of ``layer``
    chosen: torch.Tensor | None = None  # (T, layer+1, K) long: expert ids at layers 0..layer, rank order
    previous: torch.Tensor | None = None  # (T, L, K) long: the previous token's experts at every layer
    token: torch.Tensor | None = None  # (T,) long: the tokens' ids (-1: unknown, e.g. an imported trace)


class Predictor(ABC):
    """Forecast the experts of the next ``lookahead`` layers from layer ``l``."""

    #: family name used on the command line and in checkpoints
    family: ClassVar[str]
    #: which context fields the family needs: a subset of {"hidden", "chosen", "previous", "token"}
    #: (token-aware families built with a token table add "token" on the instance)
    needs: ClassVar[frozenset[str]] = frozenset()
    #: kernel launches of one forecast on a GPU (the fixed part of its cost, see :meth:`work`)
    kernels: ClassVar[int] = 4

    def __init__(self, num_layers: int, num_experts: int, top_k: int, lookahead: int):
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.top_k = top_k
        self.lookahead = lookahead

    @abstractmethod
    def predict(self, ctx: PredictContext) -> torch.Tensor:
        """Scores (T, D, E) for layers ``ctx.layer + 1 .. ctx.layer + D``."""

    def describe(self) -> dict[str, Any]:
        """Hyper-parameters recorded in checkpoints and reports."""
        return {"family": self.family, "lookahead": self.lookahead}

    def work(self, tokens: int) -> tuple[float, float, int]:
        """(FLOPs, bytes read, kernel launches) of one :meth:`predict` call for ``tokens`` tokens.

        The simulator turns it into time on the device (``Hardware.kernel_time``): the forecast runs
        on the same device as the model, between a layer's routing and its experts. The default
        shares the family's tensors (:meth:`state`) out over its layers -- each element read once
        and used in one multiply-add per token -- with :attr:`kernels` launches; a family whose cost
        is far from that overrides it.
        """
        state = getattr(self, "state", None)
        elements = nbytes = 0
        if callable(state):
            for t in state().values():
                elements += t.numel()
                nbytes += t.numel() * t.element_size()
        share = max(1, self.num_layers)
        return 2.0 * tokens * elements / share, nbytes / share, self.kernels

    def covers(self, layer: int, distance: int) -> bool:
        """Whether the forecast of layer ``layer + distance`` made at ``layer`` means anything.

        False past the last layer; families fitted for some layers only (the scikit-learn
        baseline, hidden-state families on a store with hidden states at a few layers) narrow it.
        """
        return 1 <= distance <= self.lookahead and 0 <= layer and layer + distance < self.num_layers
