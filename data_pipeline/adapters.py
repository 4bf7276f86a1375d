"""Per-family MoE adapters: where the router and the experts are, and how top-k is normalised.

Later code (collection, predictors, the offload engine) talks to an :class:`MoEAdapter` and never
special-cases a model family. Supported (transformers 5.x, fused-expert layout):

============  ==========================================  ==========================================
family        routing                                     experts
============  ==========================================  ==========================================
olmoe         softmax(fp32) -> top-k; renormalise only    ``mlp.experts.gate_up_proj`` (E, 2I, H),
              when ``norm_topk_prob``; weights cast back  ``down_proj`` (E, H, I); SiLU-GLU
              to the logits dtype
mixtral       softmax(fp32) -> top-k -> always            same fused layout
              renormalised; weights stay fp32
qwen2_moe     as olmoe; plus a shared expert gated by     same fused layout (``moe_intermediate_size``),
              ``sigmoid(shared_expert_gate(x))``; some    dense ``Qwen2MoeMLP`` in ``mlp_only_layers``
              decoder layers may be dense                 or off the ``decoder_sparse_step``
============  ==========================================  ==========================================

"MoE layer i" always means the i-th *sparse* decoder layer; :attr:`MoEAdapter.moe_layer_indices`
maps it to the decoder-layer index (they differ only for Qwen2-MoE with dense layers).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError
from core.model_info import ModelInfo

_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def as_torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bf16"``/``"bfloat16"``/``torch.bfloat16`` ... -> ``torch.bfloat16``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).replace("torch.", "").lower()
    if key not in _DTYPE_NAMES:
        raise UserError(f"unknown dtype {dtype!r}; choose float32, bfloat16 or float16")
    return _DTYPE_NAMES[key]


def dtype_name(dtype: str | torch.dtype) -> str:
    return str(as_torch_dtype(dtype)).replace("torch.", "")


class RouteOutput(NamedTuple):
    logits: torch.Tensor  # (T, E) in the router's dtype
    weights: torch.Tensor  # (T, K) routing weights as the block uses them, rank order
    ids: torch.Tensor  # (T, K) int64 expert ids, highest probability first


class MoEAdapter:
    """Uniform view of one HF MoE causal LM. Subclasses set the family's routing rules."""

    family: str = "?"
    #: renormalise the top-k probabilities to sum to one (per family; OLMoE/Qwen read the config)
    always_normalise: bool = False
    #: the router casts the top-k weights back to the logits dtype (OLMoE, Qwen2-MoE) or keeps fp32 (Mixtral)
    cast_weights_to_logits_dtype: bool = True

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        base = getattr(model, "model", model)
        if not hasattr(base, "layers"):
            raise UserError(f"{type(model).__name__} has no decoder layers at .model.layers")
        self.decoder_layers: nn.ModuleList = base.layers
        self.moe_layer_indices: list[int] = [
            i for i, layer in enumerate(self.decoder_layers) if self._is_sparse(getattr(layer, "mlp", None))
        ]
        if not self.moe_layer_indices:
            raise UserError(f"{type(model).__name__} has no sparse MoE layers")
        first = self.moe_block(0)
        self.num_layers: int = len(self.moe_layer_indices)
        self.num_experts: int = int(first.experts.num_experts)
        self.top_k: int = int(first.gate.top_k)
        self.hidden_size: int = int(first.experts.hidden_dim)
        self.moe_intermediate_size: int = int(first.experts.intermediate_dim)
        self.norm_topk_prob: bool = self.always_normalise or bool(getattr(first.gate, "norm_topk_prob", False))
        self.act_fn = first.experts.act_fn

    # ------------------------------------------------------------------ structure
    @staticmethod
    def _is_sparse(mlp: nn.Module | None) -> bool:
        return mlp is not None and hasattr(mlp, "gate") and hasattr(mlp, "experts")

    def moe_block(self, i: int) -> nn.Module:
        """The sparse MoE block of MoE layer ``i``; ``args[0]`` of a forward pre-hook is its input."""
        return self.decoder_layers[self.moe_layer_indices[i]].mlp

    def router_module(self, i: int) -> nn.Module:
        """The router of MoE layer ``i``; its forward returns ``(logits, top-k weights, top-k ids)``."""
        return self.moe_block(i).gate

    def experts_module(self, i: int) -> nn.Module:
        return self.moe_block(i).experts

    def router_weight(self, i: int) -> torch.Tensor:
        """(E, H) router matrix of MoE layer ``i``."""
        return self.router_module(i).weight

    # ------------------------------------------------------------------ routing
    def route(self, i: int, hidden: torch.Tensor) -> RouteOutput:
        """Route ``hidden`` (T, H) with MoE layer ``i``'s router exactly as the HF block does.

        Also the building block of gating lookahead: ``route(l + d, h_l)``.
        """
        hidden = hidden.reshape(-1, self.hidden_size)
        weight = self.router_weight(i)
        logits = F.linear(hidden.to(weight.dtype), weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        top, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top = top / top.sum(dim=-1, keepdim=True)
        if self.cast_weights_to_logits_dtype:
            top = top.to(logits.dtype)
        return RouteOutput(logits, top, ids)

    # ------------------------------------------------------------------ experts
    def expert_params(self, i: int, e: int) -> dict[str, torch.Tensor]:
        """Views of expert ``e`` of MoE layer ``i``: ``gate_up_proj`` (2I, H), ``down_proj`` (H, I)."""
        ex = self.experts_module(i)
        return {"gate_up_proj": ex.gate_up_proj[e], "down_proj": ex.down_proj[e]}

    def expert_forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """One expert on ``x`` (n, H) -> (n, H), unweighted, exactly as the HF eager experts do."""
        gate, up = F.linear(x, params["gate_up_proj"]).chunk(2, dim=-1)
        return F.linear(self.act_fn(gate) * up, params["down_proj"])

    def shared_forward(self, i: int, x: torch.Tensor) -> torch.Tensor | None:
        """Output of the always-on shared expert (already gated), or None when the family has none."""
        return None

    def combine(self, i: int, x: torch.Tensor, route: RouteOutput | None = None) -> torch.Tensor:
        """Reference MoE-block output for ``x`` (T, H) from :meth:`route` + :meth:`expert_forward`.

        Accumulates in the same order as the HF eager experts (expert by expert, index_add_), so the
        result matches the block's own output in fp32.
        """
        route = route if route is not None else self.route(i, x)
        out = torch.zeros_like(x)
        for e in torch.unique(route.ids).tolist():
            rank, tok = torch.where(route.ids.T == e)  # HF's row order: by rank, then token
            y = self.expert_forward(self.expert_params(i, e), x[tok]) * route.weights[tok, rank, None]
            out.index_add_(0, tok, y.to(out.dtype))
        shared = self.shared_forward(i, x)
        return out if shared is None else out + shared

    # ------------------------------------------------------------------ sizes / identity
    def expert_bytes(self, dtype: str | torch.dtype | None = None) -> int:
        """Bytes of one routed expert (gate, up and down projections) in ``dtype``."""
        dt = as_torch_dtype(dtype) if dtype is not None else self.router_weight(0).dtype
        return 3 * self.hidden_size * self.moe_intermediate_size * torch.empty((), dtype=dt).element_size()

    def model_info(self, model_id: str, *, dtype: str | torch.dtype | None = None,
                   revision: str | None = None) -> ModelInfo:
        dt = as_torch_dtype(dtype) if dtype is not None else self.router_weight(0).dtype
        return ModelInfo(
            model_id=model_id,
            family=self.family,
            num_layers=self.num_layers,
            num_experts=self.num_experts,
            top_k=self.top_k,
            hidden_size=self.hidden_size,
            expert_bytes=self.expert_bytes(dt),
            dtype=dtype_name(dt),
            revision=revision,
            moe_intermediate_size=self.moe_intermediate_size,
            norm_topk_prob=self.norm_topk_prob,
        )

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.num_layers} MoE layers x {self.num_experts} experts, "
                f"top-{self.top_k}, hidden {self.hidden_size}, norm_topk_prob={self.norm_topk_prob})")


class OlmoeAdapter(MoEAdapter):
    """OLMoE: ``norm_topk_prob`` from the config (False for OLMoE-1B-7B), weights cast to logits dtype."""

    family = "olmoe"


class MixtralAdapter(MoEAdapter):
    """Mixtral: top-k of the fp32 softmax, always renormalised, weights kept in fp32."""

    family = "mixtral"
    always_normalise = True
    cast_weights_to_logits_dtype = False


class Qwen2MoeAdapter(MoEAdapter):
    """Qwen2-MoE: OLMoE-style routing plus a sigmoid-gated shared expert; dense layers are skipped."""

    family = "qwen2_moe"

    def shared_forward(self, i: int, x: torch.Tensor) -> torch.Tensor | None:
        block = self.moe_block(i)
        return torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)


ADAPTERS: dict[str, type[MoEAdapter]] = {
    "olmoe": OlmoeAdapter,
    "mixtral": MixtralAdapter,
    "qwen2_moe": Qwen2MoeAdapter,
}


def get_adapter(model: nn.Module) -> MoEAdapter:
    """The adapter for ``model``, chosen by ``model.config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise UserError(
            f"model type {model_type!r} is not supported; supported MoE families: {', '.join(ADAPTERS)}"
        )
    return ADAPTERS[model_type](model)
