"""The device tier: a fixed number of expert-sized slots, allocated once.

The pool is the capacity limit: it never grows, so a 5 % cache really holds 5 % of the experts no
matter how much memory the device has. Which expert sits in which slot is the engine's directory;
the pool only owns the memory.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


class DevicePool:
    """``num_slots`` slots, each one tensor per expert parameter, on ``device``."""

    def __init__(
        self,
        num_slots: int,
        template: Mapping[str, tuple[torch.Size, torch.dtype]],
        device: torch.device | str = "cpu",
    ):
        if num_slots < 1:
            raise ValueError(f"a pool needs at least one slot, got {num_slots}")
        self.num_slots = num_slots
        self.device = torch.device(device)
        self._buffers = {
            name: torch.zeros((num_slots, *shape), dtype=dtype, device=self.device)
            for name, (shape, dtype) in template.items()
        }

    def slot(self, index: int) -> dict[str, torch.Tensor]:
        """Views of one slot's tensors: copy into them, or compute from them."""
        return {name: buf[index] for name, buf in self._buffers.items()}

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())
