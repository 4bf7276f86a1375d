"""Quantized expert copies (offload/quantization.py, HQQ underneath).

The error bounds asserted here follow from HQQ's quantizer (hqq.core.quantize.Quantizer.quantize):
a group of ``g`` weights with range [lo, hi] gets the step ``s = (hi - lo) / (2**b - 1)`` and the
zero ``z = -lo / s``; codes are ``clamp(round(w / s + z), 0, 2**b - 1)`` and dequantize to
``(code - z) * s``. Hence:

- round-to-nearest (``optimize=False``, exact fp32 metadata): ``|w - w'| <= s / 2``;
- HQQ's optimizer moves only the zero (to z'), so a value may also be clamped by ``|z' - z|`` codes:
  ``|w - w'| <= s * (1/2 + |z' - z|)``;
- fp16 scale and zero (the default) are each rounded by at most 2**-11 of their value, which adds
  at most ``2**-11 * s * (2**b - 1 + 2|z'|)``; a bf16 result adds its own rounding, 2**-9 of ``|w'|``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core.errors import UserError
from data_pipeline.models import load_model
from offload.engine.expert_store import HostExpertStore
from offload.quantization import (
    NBITS,
    PRECISIONS,
    QuantizedHostTier,
    dequantize,
    expert_nbytes,
    expert_template,
    quantize_expert,
)

QUANTIZED = ("int8", "int4", "int2")
FP16_EPS = 2.0**-11  # fp16 unit roundoff
BF16_EPS = 2.0**-9


@pytest.fixture(autouse=True)
def one_thread():
    """HQQ's many small reductions crawl when two busy cores are oversubscribed; one thread is 100x faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-olmoe")


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    return w.float().reshape(-1, group_size)


def _rtn_step_zero(w: torch.Tensor, nbits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group step and zero of min-max round-to-nearest, computed here, not read from the library."""
    g = _groups(w, group_size)
    lo, hi = g.min(dim=1, keepdim=True).values, g.max(dim=1, keepdim=True).values
    step = (hi - lo) / (2**nbits - 1)
    return step, -lo / step


def _weights(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """An expert-shaped pair of weights with a few outliers (heavier tails than a Gaussian)."""
    gen = torch.Generator().manual_seed(seed)
    ws = {"gate_up_proj": torch.randn(96, 128, generator=gen), "down_proj": torch.randn(128, 64, generator=gen)}
    for w in ws.values():
        w.view(-1)[torch.randint(0, w.numel(), (20,), generator=gen)] *= 6
    return {n: w.to(dtype) for n, w in ws.items()}


@pytest.mark.parametrize("precision", QUANTIZED)
def test_round_to_nearest_error_is_at_most_half_a_step(precision):
    weights = _weights(0)
    q = quantize_expert(weights, precision, 32, optimize=False, meta_dtype=torch.float32)
    deq = dequantize(q)
    for name, w in weights.items():
        step, _ = _rtn_step_zero(w, NBITS[precision], 32)
        err = (_groups(deq[name], 32) - _groups(w, 32)).abs()
        assert (err <= step / 2 * (1 + 1e-5) + 1e-6).all()
        # and the step is really used: some value sits near a half step away
        assert err.max() > 0.3 * step.max() / 2


@pytest.mark.parametrize("precision", QUANTIZED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hqq_default_error_within_its_bound(precision, dtype):
    """The default config: HQQ's zero optimisation, fp16 scale/zero, result in the native dtype."""
    nbits, group_size = NBITS[precision], 64
    weights = _weights(1, dtype)
    q = quantize_expert(weights, precision, group_size)
    deq = dequantize(q)
    for name, w in weights.items():
        assert deq[name].dtype == dtype and deq[name].shape == w.shape
        step, z_rtn = _rtn_step_zero(w, nbits, group_size)
        z = q.tensors[name].zero.float()
        assert torch.allclose(q.tensors[name].scale.float(), step, rtol=2 * FP16_EPS)  # the optimiser keeps the step
        bound = (step * (0.5 + (z - z_rtn).abs() * (1 + FP16_EPS))
                 + FP16_EPS * step * (2**nbits - 1 + 2 * z.abs()) * 1.01)
        out = _groups(deq[name], group_size)
        if dtype == torch.bfloat16:
            bound = bound + BF16_EPS * out.abs()
        assert ((out - _groups(w, group_size)).abs() <= bound + 1e-6).all()


@pytest.mark.parametrize("precision", QUANTIZED)
def test_hqq_optimiser_lowers_mean_error(precision):
    """What HQQ's zero optimisation is for: a lower mean error than plain round-to-nearest."""
    weights = _weights(2)
    errs = {}
    for optimize in (False, True):
        deq = dequantize(quantize_expert(weights, precision, optimize=optimize))
        errs[optimize] = sum((deq[n] - w).abs().mean().item() for n, w in weights.items())
    assert errs[True] < errs[False]


def test_bytes_per_precision_are_the_packed_tensors_sizes(tiny):
    template = expert_template(tiny.adapter)
    weights = tiny.adapter.expert_params(0, 0)
    sizes = {p: expert_nbytes(template, p) for p in PRECISIONS}
    # tiny-olmoe, fp32: gate_up 128x128 + down 128x64 = 24576 weights in 256 + 128 = 384 groups of 64;
    # per group an fp16 scale and zero (4 bytes)
    assert sizes == {"native": 24576 * 4, "int8": 24576 + 384 * 4, "int4": 24576 // 2 + 384 * 4,
                     "int2": 24576 // 4 + 384 * 4}
    for p in PRECISIONS:
        q = quantize_expert(weights, p)
        real = sum(t.numel() * t.element_size()
                   for qt in q.tensors.values()
                   for t in ((qt,) if isinstance(qt, torch.Tensor) else (qt.codes, qt.scale, qt.zero)))
        assert q.nbytes == real == sizes[p]
    assert sizes["native"] > sizes["int8"] > sizes["int4"] > sizes["int2"]


def test_bytes_of_an_olmoe_1b_7b_expert():
    """OLMoE-1B-7B: hidden 2048, expert intermediate 1024, bf16 (12 MiB an expert)."""
    template = {"gate_up_proj": ((2048, 2048), torch.bfloat16), "down_proj": ((2048, 1024), torch.bfloat16)}
    n, groups = 3 * 2048 * 1024, 3 * 2048 * 1024 // 64
    assert expert_nbytes(template, "native") == 2 * n == 12 * 2**20
    assert expert_nbytes(template, "int8") == n + 4 * groups
    assert expert_nbytes(template, "int4") == n // 2 + 4 * groups
    assert expert_nbytes(template, "int2") == n // 4 + 4 * groups
    assert expert_nbytes(template, "int4", meta_dtype=torch.float32) == n // 2 + 8 * groups


def test_an_input_width_the_group_size_does_not_divide_takes_its_largest_divisor_below():
    """olmoe-mini's experts: gate_up (96, 96) and down (96, 48); groups of 64 fit neither, groups of 48 both."""
    w = {"gate_up_proj": torch.randn(96, 96), "down_proj": torch.randn(96, 48)}
    template = {n: (tuple(t.shape), t.dtype) for n, t in w.items()}
    q = quantize_expert(w, "int4", 64)
    assert {n: t.group_size for n, t in q.tensors.items()} == {"gate_up_proj": 48, "down_proj": 48}
    groups = (96 * 96 + 96 * 48) // 48
    assert q.nbytes == expert_nbytes(template, "int4") == (96 * 96 + 96 * 48) // 2 + 4 * groups
    deq = dequantize(q)
    for n, t in w.items():
        assert deq[n].shape == t.shape and (deq[n] - t).abs().max() < t.abs().max() / 4


def test_shapes_that_cannot_be_packed_are_refused():
    with pytest.raises(UserError, match="cannot be packed"):  # 3 groups: HQQ would drop codes at 4 bits
        quantize_expert({"w": torch.randn(3, 64)}, "int4", 64)
    with pytest.raises(UserError, match="unknown precision"):
        quantize_expert({"w": torch.randn(8, 64)}, "int3")  # type: ignore[arg-type]


# measured on all 192 tiny-olmoe experts with this input (seed 0): max relative error of the expert
# output int8 0.0097, int4 0.162, int2 0.933; min cosine similarity int2 0.746
OUTPUT_BOUNDS = {"int8": 0.02, "int4": 0.25, "int2": 1.0}


def test_expert_forward_close_to_native(tiny):
    adapter = tiny.adapter
    x = torch.randn(32, adapter.hidden_size, generator=torch.Generator().manual_seed(0))
    for layer, expert in [(0, 0), (0, 17), (adapter.num_layers - 1, 5), (adapter.num_layers - 1, 31)]:
        weights = adapter.expert_params(layer, expert)
        ref = adapter.expert_forward(weights, x)
        rel = {}
        for p in QUANTIZED:
            y = adapter.expert_forward(dequantize(quantize_expert(weights, p)), x)
            rel[p] = ((y - ref).norm() / ref.norm()).item()
            assert rel[p] <= OUTPUT_BOUNDS[p], (layer, expert, p, rel[p])
        assert rel["int8"] < rel["int4"] < rel["int2"]
        y2 = adapter.expert_forward(dequantize(quantize_expert(weights, "int2")), x)
        assert F.cosine_similarity(y2.flatten(), ref.flatten(), dim=0) > 0.65  # still points the right way
        assert torch.equal(adapter.expert_forward(dequantize(quantize_expert(weights, "native")), x), ref)


def test_host_tier_holds_every_expert_at_each_precision(tiny):
    adapter = tiny.adapter
    store = HostExpertStore(adapter, release_model_weights=False)
    tier = QuantizedHostTier(store, ("int4", "int2", "int4"), optimize=False)
    assert tier.precisions == ("native", "int4", "int2")
    count = adapter.num_layers * adapter.num_experts
    assert tier.total_bytes_by_precision() == {
        p: count * expert_nbytes(store.template, p) for p in tier.precisions
    }
    assert tier.total_bytes("native") == store.total_bytes
    for layer, expert in [(0, 0), (3, 9), (adapter.num_layers - 1, adapter.num_experts - 1)]:
        native = store.expert(layer, expert)
        assert all(torch.equal(t, native[n]) for n, t in dequantize(tier.expert(layer, expert, "native")).items())
        for p in ("int4", "int2"):
            held = tier.expert(layer, expert, p)
            assert held.nbytes == tier.expert_nbytes(p)
            fresh = dequantize(quantize_expert(native, p, optimize=False))
            slot = {n: torch.full_like(t, float("nan")) for n, t in native.items()}  # a device slot stand-in
            written = dequantize(held, out=slot)
            assert all(written[n] is slot[n] and torch.equal(slot[n], fresh[n]) for n in native)
    with pytest.raises(UserError, match="not built"):
        tier.expert(0, 0, "int8")


def test_a_shared_tier_grows_to_what_each_user_needs(tiny):
    """fetch-lowest-bit needs int2 only, fetch-priority every precision: one tier serves both engines."""
    store = HostExpertStore(tiny.adapter, release_model_weights=False)
    tier = QuantizedHostTier(store, ("int2",), optimize=False)
    held = tier.expert(1, 2, "int2").tensors["down_proj"].codes
    tier.ensure(("int8", "int2"))
    assert tier.precisions == ("native", "int2", "int8")
    assert tier.expert(1, 2, "int2").tensors["down_proj"].codes.data_ptr() == held.data_ptr()  # not rebuilt
    fresh = dequantize(quantize_expert(store.expert(1, 2), "int8", optimize=False))
    assert all(torch.equal(t, fresh[n]) for n, t in dequantize(tier.expert(1, 2, "int8")).items())
