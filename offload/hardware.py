"""Hardware profiles for the timing model: host->device link, device compute, fixed per-layer costs.

A profile is named on the command line, optionally with overrides:
``--hardware a100-5gbs`` or ``--hardware "rtx4090:link_gbps=12,tflops=60"``.

The numbers are effective rates, not datasheet peaks: ``link_gbps`` is what a copy of pinned host
memory achieves (the SpecMD paper throttles an A100 to about 5 GB/s), ``tflops`` what the expert
matmuls reach, ``hbm_gbps`` the device memory bandwidth that bounds an expert's time at small batch
(decode reads every weight once per token).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from core.errors import UserError


@dataclass(frozen=True)
class Hardware:
    name: str
    link_gbps: float  # host->device copy bandwidth, GB/s (1e9 bytes)
    tflops: float  # effective expert-matmul rate, 1e12 FLOP/s
    hbm_gbps: float  # device memory bandwidth, GB/s
    layer_us: float  # per layer and pass: attention, norms, router, launches (fixed part)
    token_us: float  # per layer and token: the dense part that grows with the prompt
    expert_us: float  # per expert run: kernel launches and gather/scatter
    kernel_us: float = 5.0  # one small kernel launch (a predictor's fixed cost per launch)

    @property
    def link_bytes_per_s(self) -> float:
        return self.link_gbps * 1e9

    def copy_time(self, nbytes: float) -> float:
        """Seconds to move one expert of ``nbytes`` over the link."""
        return nbytes / self.link_bytes_per_s

    def expert_time(self, nbytes: float, tokens: int, bytes_per_param: float) -> float:
        """Seconds one expert takes for ``tokens`` tokens: compute- or memory-bound, whichever is slower."""
        flops = 2.0 * (nbytes / bytes_per_param) * tokens
        return max(flops / (self.tflops * 1e12), nbytes / (self.hbm_gbps * 1e9)) + self.expert_us * 1e-6

    def kernel_time(self, flops: float, nbytes: float, kernels: int) -> float:
        """Seconds of a small computation: launches plus compute- or memory-bound work (roofline)."""
        return kernels * self.kernel_us * 1e-6 + max(flops / (self.tflops * 1e12), nbytes / (self.hbm_gbps * 1e9))

    def dequant_time(self, native_bytes: float, packed_bytes: float, kernels: int) -> float:
        """Seconds to dequantize one low-bit copy into its slot: ``kernels`` small elementwise kernels
        (offload.precision.dequant_kernels) reading the packed bytes and writing the native ones."""
        return self.kernel_time(0.0, native_bytes + packed_bytes, kernels)

    def device_copy_time(self, nbytes: float, kernels: int) -> float:
        """Seconds of an on-device copy of ``nbytes`` in ``kernels`` copies (an upgrade into its slot)."""
        return self.kernel_time(0.0, 2.0 * nbytes, kernels)

    def layer_time(self, tokens: int) -> float:
        """Seconds of the non-expert part of one layer for a pass of ``tokens`` tokens."""
        return (self.layer_us + self.token_us * tokens) * 1e-6

    def describe(self) -> dict[str, Any]:
        return asdict(self)


PROFILES: dict[str, Hardware] = {
    p.name: p
    for p in (
        # the SpecMD setting: A100 80GB, experts in pinned host memory, copies throttled to ~5 GB/s
        Hardware("a100-5gbs", link_gbps=5.0, tflops=150.0, hbm_gbps=1600.0, layer_us=60.0, token_us=1.0, expert_us=15.0),
        # the same GPU on an unthrottled PCIe 4.0 x16 link
        Hardware("pcie4", link_gbps=25.0, tflops=150.0, hbm_gbps=1600.0, layer_us=60.0, token_us=1.0, expert_us=15.0),
        # an H100 on PCIe 5.0 x16
        Hardware("pcie5", link_gbps=50.0, tflops=400.0, hbm_gbps=3000.0, layer_us=40.0, token_us=0.5, expert_us=10.0),
        # consumer: RTX 4090 (24 GB) on PCIe 4.0 x16, less compute and memory bandwidth
        Hardware("rtx4090", link_gbps=25.0, tflops=80.0, hbm_gbps=1000.0, layer_us=80.0, token_us=1.5, expert_us=20.0),
        # consumer laptop-class: RTX 3060 on PCIe 3.0 x16
        Hardware("rtx3060", link_gbps=12.0, tflops=25.0, hbm_gbps=360.0, layer_us=120.0, token_us=3.0, expert_us=25.0),
    )
}

_FIELDS = ("link_gbps", "tflops", "hbm_gbps", "layer_us", "token_us", "expert_us", "kernel_us")


def hardware_names() -> list[str]:
    return list(PROFILES)


def get_hardware(spec: str) -> Hardware:
    """``name`` or ``name:field=value,...`` (fields: link_gbps, tflops, hbm_gbps, layer_us, token_us, expert_us,
    kernel_us)."""
    name, _, overrides = spec.partition(":")
    base = PROFILES.get(name.strip())
    if base is None:
        raise UserError(f"unknown hardware profile {name!r}; valid: {', '.join(PROFILES)}")
    changes: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in overrides.split(","))):
        field, eq, value = item.partition("=")
        if not eq or field.strip() not in _FIELDS:
            raise UserError(f"bad hardware override {item!r}; use field=value with field in {', '.join(_FIELDS)}")
        try:
            changes[field.strip()] = float(value)
        except ValueError:
            raise UserError(f"hardware override {item!r}: {value!r} is not a number") from None
        if changes[field.strip()] <= 0 and field.strip() in ("link_gbps", "tflops", "hbm_gbps"):
            raise UserError(f"hardware override {item!r} must be positive")
    if not changes:
        return base
    return replace(base, name=spec, **changes)


def bytes_per_param(dtype: str | None) -> float:
    """Bytes of one weight for an expert stored in ``dtype`` (bf16 when unknown)."""
    table = {"float32": 4.0, "fp32": 4.0, "float16": 2.0, "fp16": 2.0, "bfloat16": 2.0, "bf16": 2.0,
             "int8": 1.0, "fp8": 1.0, "int4": 0.5, "q4": 0.5625, "int2": 0.25}
    if dtype is None:
        return 2.0
    d = dtype.lower().replace("torch.", "")
    return table.get(d, 2.0)
