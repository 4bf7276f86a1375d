"""Lower-bit copies of experts (int8 / int4 / int2) beside the native weights, made with HQQ.

The precision variants of miss handling (fetch-lowest-bit, fetch-priority, HOBBIT's cascade) need
every expert in host memory at several precisions, so that a miss can be served by copying fewer
bytes. This module is that building block and nothing more: it quantizes one expert, reports the
real bytes each precision moves over the link, dequantizes back into the expert's native dtype and
shape (on whatever device the packed copy sits, e.g. straight into a device slot), and holds a whole
model's experts at the requested precisions. It knows nothing of the cache, copier or engine.

Why HQQ (PyPI ``hqq``, Apache-2.0) and not the others, checked against torch 2.13 CPU:

- **HQQ**: 8/4/3/2/1 bits with per-group scale and zero; its quantize and dequantize are plain
  torch ops, so the same code runs on CPU and CUDA; codes are really bit-packed (two int4 or four
  int2 codes per byte); calibration-free, seconds per OLMoE expert on one CPU core; about 0.6 MB
  itself (5.5 MB with the deps pip adds: accelerate, einops, termcolor, psutil). It is also what
  the SpecMD paper used for its int2 experts.
- **torchao 0.18**: on CPU its int4/int2 weight-only tensors keep one int8 per value
  (``IntxUnpackedToInt8Tensor``), so an "int2" copy moves as many bytes as int8; the packed int4
  layout needs an extra kernel package (``mslk``) or CUDA; its compiled extensions do not load
  against torch 2.13; 28 MB.
- **optimum-quanto 0.2.7**: packs int4/int2 with groups, but int8 weights are symmetric per-axis
  only (no groups), its CPU path builds a C++ extension with ninja at first use (~35 s and a
  compiler on the machine), and its last release is from 2025-03.
- **bitsandbytes 0.50**: no int2; its 4-bit formats are NF4/FP4 (not integer int4) and its int8 is
  row-wise absmax (no groups); 125 MB.

Layout (HQQ's, ``axis=1``): each weight ``(out, in)`` is cut into groups of ``group_size``
consecutive input weights of one output row; a group stores ``round(w / scale + zero)`` clamped to
``[0, 2**bits - 1]`` plus its ``scale`` and ``zero``, and dequantizes as ``(code - zero) * scale``.
Scale and zero are kept in fp16 by default: bf16's 8-bit mantissa would add up to half a
quantization step of error at int8, fp32 costs twice the metadata bytes. With ``optimize=True``
(HQQ's default) HQQ moves each group's zero point to lower the mean error (a half-quadratic solver,
scale unchanged); ``optimize=False`` is plain round-to-nearest and about 10x faster to build.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from hqq.core.quantize import Quantizer

from core.errors import UserError
from offload.precision import (  # noqa: F401  (the names this module has always offered)
    DEFAULT_GROUP_SIZE,
    NBITS,
    PRECISIONS,
    Precision,
    as_precision,
    check_groups,
    group_size_for,
    weight_nbytes,
)

DEFAULT_META_DTYPE = torch.float16
_AXIS = 1  # groups run along the input dimension of an (out, in) weight

#: name -> (shape, dtype) of one expert's tensors, as :class:`HostExpertStore.template` gives it.
Template = Mapping[str, tuple[Sequence[int], torch.dtype]]


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def packed_nbytes(
    shape: Sequence[int],
    dtype: torch.dtype,
    precision: Precision,
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
    meta_dtype: torch.dtype = DEFAULT_META_DTYPE,
) -> int:
    """Bytes of one weight at ``precision``: packed codes plus one scale and one zero per group
    (:func:`offload.precision.weight_nbytes` on this torch dtype)."""
    return weight_nbytes(shape, _itemsize(dtype), precision, group_size=group_size,
                         meta_itemsize=_itemsize(meta_dtype))


def template_shapes(template: Template) -> dict[str, tuple[Sequence[int], int]]:
    """``template`` as :mod:`offload.precision` sizes it: name -> (shape, bytes per native weight)."""
    return {name: (tuple(shape), _itemsize(dtype)) for name, (shape, dtype) in template.items()}


def expert_nbytes(
    template: Template,
    precision: Precision,
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
    meta_dtype: torch.dtype = DEFAULT_META_DTYPE,
) -> int:
    """Bytes one expert moves over the link at ``precision`` (what a copy of it costs)."""
    return sum(
        packed_nbytes(shape, dtype, precision, group_size=group_size, meta_dtype=meta_dtype)
        for shape, dtype in template.values()
    )


def expert_template(adapter) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """name -> (shape, dtype) of one routed expert of ``adapter``'s model (expert 0 of MoE layer 0)."""
    return {name: (t.shape, t.dtype) for name, t in adapter.expert_params(0, 0).items()}


# ---------------------------------------------------------------------------------------- one tensor
@dataclass(frozen=True)
class QuantizedTensor:
    """One weight matrix at ``nbits``: HQQ's bit-packed codes and per-group scale and zero."""

    codes: torch.Tensor  # uint8, (groups * nbits / 8, group_size)
    scale: torch.Tensor  # (groups, 1): the quantization step of each group
    zero: torch.Tensor  # (groups, 1): each group's zero point, in code units
    shape: torch.Size  # the native weight's shape and dtype, restored by dequantize
    dtype: torch.dtype
    nbits: int
    group_size: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> QuantizedTensor:
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return QuantizedTensor(move(self.codes), move(self.scale), move(self.zero), self.shape,
                               self.dtype, self.nbits, self.group_size)


def quantize_tensor(
    weight: torch.Tensor,
    nbits: int,
    group_size: int = DEFAULT_GROUP_SIZE,
    *,
    optimize: bool = True,
    meta_dtype: torch.dtype = DEFAULT_META_DTYPE,
) -> QuantizedTensor:
    """Quantize an ``(out, in)`` weight with HQQ on the device it lives on."""
    group_size = group_size_for(weight.shape, group_size)
    check_groups(weight.shape, nbits, group_size)
    codes, meta = Quantizer.quantize(
        weight.detach(), nbits=nbits, group_size=group_size, optimize=optimize, axis=_AXIS,
        device=weight.device, bitpack=True,
    )
    return QuantizedTensor(
        codes=codes, scale=meta["scale"].to(meta_dtype), zero=meta["zero"].to(meta_dtype),
        shape=weight.shape, dtype=weight.dtype, nbits=nbits, group_size=group_size,
    )


def dequantize_tensor(q: QuantizedTensor) -> torch.Tensor:
    """The weight back in its native shape and dtype, on the device ``q`` sits on.

    HQQ computes ``(code - zero) * scale`` in fp32 (codes are exact there) and the result is rounded
    once, to the native dtype.
    """
    packing = Quantizer.bit_to_packing[q.nbits]
    meta = {
        "nbits": q.nbits, "group_size": q.group_size, "shape": q.shape, "axis": _AXIS,
        "scale": q.scale, "zero": q.zero, "packing": packing,
        "unpack_view_dtype": Quantizer.unpack_view_dtype[packing], "view_as_float": False,
        "compute_dtype": torch.float32,
    }
    return Quantizer.dequantize(q.codes, meta).to(q.dtype)


# ---------------------------------------------------------------------------------------- one expert
@dataclass(frozen=True)
class QuantizedExpert:
    """One expert at one precision. ``native`` holds the expert's own tensors, so callers have one path."""

    precision: Precision
    tensors: Mapping[str, QuantizedTensor | torch.Tensor]

    @property
    def nbytes(self) -> int:
        """Bytes a copy of this expert moves: the packed codes, scales and zeros (or native tensors)."""
        return sum(
            t.nbytes if isinstance(t, QuantizedTensor) else t.numel() * t.element_size()
            for t in self.tensors.values()
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> QuantizedExpert:
        """The same copy on ``device`` (packed: dequantize there, after the copy)."""
        return QuantizedExpert(
            self.precision, {n: t.to(device, non_blocking=non_blocking) for n, t in self.tensors.items()}
        )


def quantize_expert(
    weights: Mapping[str, torch.Tensor],
    precision: Precision,
    group_size: int = DEFAULT_GROUP_SIZE,
    *,
    optimize: bool = True,
    meta_dtype: torch.dtype = DEFAULT_META_DTYPE,
) -> QuantizedExpert:
    """One expert (``adapter.expert_params`` / ``HostExpertStore.expert`` layout) at ``precision``.

    ``native`` keeps the given tensors (no copy); the others quantize every weight with HQQ.
    """
    precision = as_precision(precision)
    if precision == "native":
        return QuantizedExpert(precision, dict(weights))
    nbits = NBITS[precision]
    return QuantizedExpert(precision, {
        name: quantize_tensor(w, nbits, group_size, optimize=optimize, meta_dtype=meta_dtype)
        for name, w in weights.items()
    })


def dequantize(q: QuantizedExpert, out: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The expert's tensors in their native dtype and shape, where ``q`` sits.

    With ``out`` (e.g. a device slot: ``DevicePool.slot(i)``) the result is written into those
    tensors and they are returned.
    """
    result: dict[str, torch.Tensor] = {}
    for name, t in q.tensors.items():
        w = dequantize_tensor(t) if isinstance(t, QuantizedTensor) else t
        result[name] = w if out is None else out[name].copy_(w)
    return result


# ---------------------------------------------------------------------------------------- host tier
class ExpertSource(Protocol):
    """What the tier reads: the engine's :class:`~offload.engine.expert_store.HostExpertStore`."""

    num_layers: int
    num_experts: int
    template: Template | None

    def expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]: ...


class QuantizedHostTier:
    """Every expert of ``store`` at each requested precision, in host memory beside the native copy.

    Per MoE layer and weight name, the packed codes, scales and zeros of all experts are stacked in
    one tensor each (pinned when ``pin``, so copies to CUDA can be asynchronous), and
    :meth:`expert` hands out views, as the native store does. ``device`` is where quantization runs
    (``cuda`` is much faster for the real model); results always come back to the host.
    """

    def __init__(
        self,
        store: ExpertSource,
        precisions: Sequence[Precision] = ("int8", "int4", "int2"),
        *,
        group_size: int = DEFAULT_GROUP_SIZE,
        optimize: bool = True,
        meta_dtype: torch.dtype = DEFAULT_META_DTYPE,
        pin: bool = False,
        device: torch.device | str = "cpu",
    ):
        if store.template is None:
            raise UserError("the host store holds no experts")
        self.store = store
        self.template = dict(store.template)
        self.group_size = group_size
        self.meta_dtype = meta_dtype
        self._options = {"optimize": optimize, "pin": pin, "device": device}
        self.precisions: tuple[Precision, ...] = ("native",)
        # _layers[precision][layer][name] = (codes, scale, zero), each stacked over experts
        self._layers: dict[Precision, list[dict[str, tuple[torch.Tensor, ...]]]] = {}
        self.ensure(precisions)

    def ensure(self, precisions: Sequence[Precision]) -> None:
        """Build the precisions of ``precisions`` this tier does not hold yet (a tier shared between engines
        grows to what each one needs); the others are left as they are."""
        quantized = [p for p in dict.fromkeys(as_precision(p) for p in precisions)
                     if p != "native" and p not in self._layers]
        for p in quantized:  # fail before hours of work on a shape that cannot be packed
            expert_nbytes(self.template, p, group_size=self.group_size, meta_dtype=self.meta_dtype)
        store, device, pin = self.store, self._options["device"], self._options["pin"]
        for p in quantized:
            self._layers[p] = []
            for layer in range(store.num_layers):
                per_expert = [
                    quantize_expert(
                        {n: w.to(device) for n, w in store.expert(layer, e).items()}, p, self.group_size,
                        optimize=bool(self._options["optimize"]), meta_dtype=self.meta_dtype,
                    ).to("cpu")
                    for e in range(store.num_experts)
                ]
                stacked = {}
                for name in self.template:
                    parts = [per_expert[e].tensors[name] for e in range(store.num_experts)]
                    arrays = tuple(torch.stack([getattr(q, f) for q in parts]) for f in ("codes", "scale", "zero"))
                    stacked[name] = tuple(a.pin_memory() if pin else a for a in arrays)
                self._layers[p].append(stacked)
            self.precisions = (*self.precisions, p)

    def expert(self, layer: int, expert: int, precision: Precision) -> QuantizedExpert:
        """Views of one expert's host copy at ``precision`` (``native``: the store's own tensors)."""
        if precision == "native":
            return QuantizedExpert("native", self.store.expert(layer, expert))
        if precision not in self._layers:
            raise UserError(f"precision {precision!r} was not built; this tier holds {', '.join(self.precisions)}")
        tensors = {}
        for name, (shape, dtype) in self.template.items():
            codes, scale, zero = self._layers[precision][layer][name]
            tensors[name] = QuantizedTensor(codes[expert], scale[expert], zero[expert], torch.Size(shape),
                                            dtype, NBITS[precision], self.group_size)
        return QuantizedExpert(precision, tensors)

    def expert_nbytes(self, precision: Precision) -> int:
        """Bytes one expert moves at ``precision``."""
        return expert_nbytes(self.template, precision, group_size=self.group_size, meta_dtype=self.meta_dtype)

    def total_bytes(self, precision: Precision) -> int:
        """Host bytes all experts take at ``precision``: the held tensors' own sizes (``native``: the store's)."""
        if precision == "native":
            return self.expert_nbytes("native") * self.store.num_layers * self.store.num_experts
        if precision not in self._layers:
            raise UserError(f"precision {precision!r} was not built; this tier holds {', '.join(self.precisions)}")
        return sum(a.numel() * a.element_size()
                   for layer in self._layers[precision] for arrays in layer.values() for a in arrays)

    def total_bytes_by_precision(self) -> dict[Precision, int]:
        return {p: self.total_bytes(p) for p in self.precisions}
