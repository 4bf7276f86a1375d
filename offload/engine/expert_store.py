"""The host tier: every expert's weights, off the device, ready to be copied into a slot.

The adapter hands out one expert as a dict of tensors (for fused HF layouts these are views into a
``(E, ...)`` parameter). The store copies them once into per-layer stacked tensors, in pinned memory
when the device is CUDA (so copies can be asynchronous), and then empties the model's own expert
parameters: from then on the only way the model can compute an expert is through a device slot,
which is what makes the capacity limit real rather than advisory.
"""

from __future__ import annotations

import torch

from core.errors import UserError


def _storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class HostExpertStore:
    """Expert weights of every MoE layer, indexed by (MoE layer number, expert id)."""

    def __init__(self, adapter, *, pin: bool = False, release_model_weights: bool = True):
        self.num_layers = int(adapter.num_layers)
        self.num_experts = int(adapter.num_experts)
        self._layers: list[dict[str, torch.Tensor]] = []
        self.template: dict[str, tuple[torch.Size, torch.dtype]] | None = None
        for layer in range(self.num_layers):
            per_expert = [adapter.expert_params(layer, e) for e in range(self.num_experts)]
            template = {name: (t.shape, t.dtype) for name, t in per_expert[0].items()}
            if self.template is None:
                self.template = template
            elif template != self.template:
                raise UserError(
                    f"MoE layer {layer} has experts shaped {template}, layer 0 {self.template}: "
                    "the engine's slot pool needs one expert shape for all layers"
                )
            stacked: dict[str, torch.Tensor] = {}
            for name in template:
                t = torch.stack([p[name].detach().to("cpu") for p in per_expert])
                stacked[name] = t.pin_memory() if pin else t.contiguous()
            self._layers.append(stacked)
            if release_model_weights:
                self._release(adapter, layer, per_expert)
        assert self.template is not None
        self.expert_nbytes = sum(
            torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            for shape, dtype in self.template.values()
        )

    @staticmethod
    def _release(adapter, layer: int, per_expert: list[dict[str, torch.Tensor]]) -> None:
        """Empty the block's parameters that hold expert weights (the router and shared expert stay)."""
        expert_storages = {_storage_ptr(t) for p in per_expert for t in p.values()}
        for param in adapter.moe_block(layer).parameters():
            if _storage_ptr(param) in expert_storages:
                param.data = torch.empty(0, dtype=param.dtype, device=param.device)

    def expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """Views of one expert's host weights (no copy)."""
        return {name: t[expert] for name, t in self._layers[layer].items()}

    @property
    def total_bytes(self) -> int:
        return self.expert_nbytes * self.num_layers * self.num_experts
