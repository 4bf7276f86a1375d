"""Expert precisions and what they cost, without torch: the names and numbers the step, the cache,
the policies and the simulator need (the simulator has no tensors and imports no torch).

- **names**: ``native`` (the model's own dtype) and the HQQ-quantized ``int8``, ``int4``, ``int2``
  (:mod:`offload.quantization` makes them), highest first; a *ladder* is the subset a host tier holds.
- **bytes**: a low-bit copy of a weight moves its bit-packed codes plus one scale and one zero per
  group of ``group_size`` consecutive input weights (fp16 each by default). This is HQQ's layout and
  :func:`offload.quantization.expert_nbytes` (on torch dtypes) is this same formula; a test checks
  both against the tensors HQQ really builds.
- **shapes from a model's numbers**: every adapter stores an expert fused as ``gate_up_proj`` (2I, H)
  and ``down_proj`` (H, I) (data_pipeline.adapters), so a trace store's ``ModelInfo`` (hidden size,
  MoE intermediate size, dtype) is enough to size every precision's copy.
- **compute**: dequantizing a copy into its slot launches a fixed number of small kernels per weight
  tensor (:data:`DEQUANT_KERNELS`), memory-bound on the native and packed bytes; the hardware profile
  turns that into seconds (``Hardware.dequant_time``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, get_args

from core.errors import UserError

Precision = Literal["native", "int8", "int4", "int2"]
#: Every precision, highest first (the order a fall-back cascade walks).
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
#: Bits per weight code of each quantized precision.
NBITS: dict[Precision, int] = {"int8": 8, "int4": 4, "int2": 2}
DEFAULT_GROUP_SIZE = 64
DEFAULT_META_ITEMSIZE = 2  # fp16 scale and zero

#: Kernels that dequantizing one weight tensor into its slot launches in an fp32 model: HQQ's unpack
#: (a mask, a shift and a strided write per code in a byte), ``(code - zero) * scale`` and the write
#: into the slot; a native dtype other than fp32 adds one cast. Counted with a dispatch mode in
#: tests/test_quantization.py, so a change of HQQ's unpacking shows up there.
DEQUANT_KERNELS: dict[Precision, int] = {"int8": 4, "int4": 8, "int2": 14}

_ITEMSIZE = {"float32": 4, "fp32": 4, "float": 4, "float16": 2, "fp16": 2, "half": 2, "bfloat16": 2, "bf16": 2,
             "float64": 8, "double": 8}

#: name -> (shape, bytes per native weight) of one expert's weight tensors
Shapes = Mapping[str, tuple[Sequence[int], int]]


def as_precision(name: str) -> Precision:
    """Validate a precision name (``native``, ``int8``, ``int4``, ``int2``)."""
    if name not in PRECISIONS:
        raise UserError(f"unknown precision {name!r}; choose one of {', '.join(PRECISIONS)}")
    return name  # type: ignore[return-value]


def precision_ladder(names: str | Sequence[str]) -> tuple[Precision, ...]:
    """The precisions a host tier holds, highest first, from ``"native,int4"`` or a sequence. ``native``
    is always among them: a cascade upgrades to it and the most important misses are fetched at it."""
    items = [n.strip() for n in names.split(",")] if isinstance(names, str) else [str(n) for n in names]
    chosen = {as_precision(n) for n in items if n}
    chosen.add("native")
    return tuple(p for p in PRECISIONS if p in chosen)


def rank(precision: str) -> int:
    """0 for native, growing as bits fall (a precision is *higher* than another when its rank is lower)."""
    return PRECISIONS.index(as_precision(precision))


def itemsize(dtype: str | None) -> int:
    """Bytes of one native weight of ``dtype`` (a torch or numpy dtype name; bf16 when unknown)."""
    if dtype is None:
        return 2
    name = str(dtype).lower().replace("torch.", "")
    if name not in _ITEMSIZE:
        raise UserError(f"cannot size low-bit copies of weights in {dtype!r}; expected one of {', '.join(_ITEMSIZE)}")
    return _ITEMSIZE[name]


def group_size_for(shape: Sequence[int], group_size: int) -> int:
    """The group size a weight is quantized with: ``group_size`` when it divides the input dimension, else
    the largest divisor of that dimension below it (olmoe-mini's experts are 96 and 48 wide: groups of 48),
    so a small model gets lower-bit copies rather than a refusal. Groups never straddle two rows."""
    if len(shape) != 2 or group_size < 1 or int(shape[1]) < 1 or int(shape[1]) % group_size == 0:
        return group_size
    n = int(shape[1])
    return max(d for d in range(1, min(group_size, n) + 1) if n % d == 0)


def check_groups(shape: Sequence[int], nbits: int, group_size: int) -> int:
    """Number of groups of a weight; raise when HQQ could not pack it without losing codes."""
    if len(shape) != 2:
        raise UserError(f"expert weights must be 2-D (out, in), got shape {tuple(shape)}")
    if group_size < 1 or shape[1] % group_size:
        raise UserError(f"group size {group_size} does not divide the input dimension of shape {tuple(shape)}")
    groups = shape[0] * shape[1] // group_size
    per_byte = 8 // nbits
    if groups % per_byte:
        # HQQ packs group rows in blocks of 8 // nbits and would silently drop the remainder
        raise UserError(
            f"{groups} groups of {group_size} in shape {tuple(shape)} cannot be packed {per_byte} codes "
            f"to a byte at {nbits} bits; choose a group size giving a multiple of {per_byte} groups"
        )
    return groups


def weight_nbytes(shape: Sequence[int], native_itemsize: int, precision: str, *,
                  group_size: int = DEFAULT_GROUP_SIZE, meta_itemsize: int = DEFAULT_META_ITEMSIZE) -> int:
    """Bytes of one weight at ``precision``: packed codes plus one scale and one zero per group."""
    precision = as_precision(precision)
    numel = 1
    for n in shape:
        numel *= int(n)
    if precision == "native":
        return numel * native_itemsize
    nbits = NBITS[precision]
    groups = check_groups(shape, nbits, group_size_for(shape, group_size))
    return numel * nbits // 8 + 2 * groups * meta_itemsize


def shapes_nbytes(shapes: Shapes, precision: str, *, group_size: int = DEFAULT_GROUP_SIZE,
                  meta_itemsize: int = DEFAULT_META_ITEMSIZE) -> int:
    """Bytes one expert of ``shapes`` moves at ``precision``."""
    return sum(weight_nbytes(shape, size, precision, group_size=group_size, meta_itemsize=meta_itemsize)
               for shape, size in shapes.values())


def moe_expert_shapes(hidden_size: int, intermediate_size: int, dtype: str | None) -> dict[str, tuple[tuple[int, int], int]]:
    """One expert's weights from a model's numbers: the adapters' fused ``gate_up_proj`` (2I, H) and
    ``down_proj`` (H, I), each weight ``itemsize(dtype)`` bytes."""
    size = itemsize(dtype)
    return {"gate_up_proj": ((2 * int(intermediate_size), int(hidden_size)), size),
            "down_proj": ((int(hidden_size), int(intermediate_size)), size)}


def byte_ratios(shapes: Shapes, precisions: Sequence[str] = PRECISIONS) -> dict[str, float]:
    """Bytes of a copy at each precision as a share of the native copy's (``native``: 1.0)."""
    native = shapes_nbytes(shapes, "native")
    return {p: shapes_nbytes(shapes, p) / native for p in precisions}


def with_itemsize(shapes: Shapes, native_itemsize: int) -> dict[str, tuple[Sequence[int], int]]:
    """The same weights stored natively in another dtype (an emulated expert of another model)."""
    return {name: (shape, native_itemsize) for name, (shape, _) in shapes.items()}


def dequant_kernels(shapes: Shapes, precision: str) -> int:
    """Kernels dequantizing one expert of ``shapes`` at ``precision`` into its slot launches (0: native)."""
    if as_precision(precision) == "native":
        return 0
    return sum(DEQUANT_KERNELS[precision] + (size != 4) for _, size in shapes.values())
