"""The replacement forward of one MoE block: route, then compute experts from device slots.

The math is the family adapter's (``route``, ``expert_forward``, ``shared_forward``); this module only
changes *where the expert weights come from*. Experts are accumulated one at a time with
``index_add_`` in the order the caller gives, with HF's row order inside an expert (by rank, then
token), so with the same order as HF's eager experts (ascending expert id) the output is bit-identical
to the block's own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch


def expert_rows(ids: torch.Tensor, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rank, token) positions where ``expert`` was chosen in ``ids`` (T, K), in HF's row order."""
    rank, token = torch.where(ids.T == expert)
    return rank, token


def add_expert_output(
    out: torch.Tensor,
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    expert: int,
    params: Mapping[str, torch.Tensor],
    expert_forward: Callable[[Mapping[str, torch.Tensor], torch.Tensor], torch.Tensor],
) -> None:
    """``out[t] += weights[t, k] * expert(x[t])`` for every (t, k) with ``ids[t, k] == expert``."""
    rank, token = expert_rows(ids, expert)
    if token.numel() == 0:
        return
    y = expert_forward(params, x[token]) * weights[token, rank, None]
    out.index_add_(0, token, y.to(out.dtype))


def replace_forward(block: torch.nn.Module, forward: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Make ``block(hidden)`` call ``forward`` (an instance attribute shadows the class method).

    Family-agnostic: no parent module or attribute name is needed, and :func:`restore_forward`
    undoes it exactly.
    """
    block.forward = forward  # type: ignore[method-assign]


def restore_forward(block: torch.nn.Module) -> None:
    if "forward" in block.__dict__:
        del block.forward
