"""A hardware profile for *this* machine: the simulator's compute model fitted to measured passes.

The engine's rows are replayed in the simulator so both can be compared row by row; for that the
simulator needs what a layer and an expert cost here, not on an A100. A run that holds every
expert (no copy, no wait) gives pass times; the simulator's compute model is fitted to them by
non-negative least squares::

    pass time = L * layer_us + L * tokens * token_us + expert runs * expert_us
                + sum over runs of tokens * 2 * params / tflops

(the memory-bound term is switched off: ``hbm_gbps`` is set huge, a CPU has no HBM roofline worth
modelling at these sizes). Prefill and decode passes weigh the same in the fit, and errors are
relative, so the short decode passes are not drowned by the long prefills. The link is the
emulated bandwidth.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from scipy.optimize import nnls

from core.passes import build_passes
from offload.precision import dequant_kernels


def fit_compute_profile(store: Any, pass_times: np.ndarray, *, link_bytes_per_s: float | None,
                        expert_params: float) -> tuple[str, dict[str, float]]:
    """(``get_hardware`` spec, fit details) from a store recorded with every expert resident and the
    wall time of each of its passes (store order: per sequence its prefill, then its decode steps)."""
    ps = build_passes(store)
    times = np.asarray(pass_times, dtype=np.float64)
    if len(times) != ps.num_passes:
        raise ValueError(f"{len(times)} pass times for {ps.num_passes} recorded passes")
    L = ps.num_layers
    per_pass = np.diff(ps.layer_ptr).reshape(ps.num_passes, L).sum(axis=1)
    pass_of_access = np.repeat(np.arange(ps.num_passes), per_pass)
    token_runs = np.bincount(pass_of_access, weights=ps.tokens, minlength=ps.num_passes)
    X = np.stack([np.full(ps.num_passes, L), L * ps.pass_tokens, per_pass, token_runs], axis=1).astype(float)
    prefill = ps.phase == 0
    w = np.where(prefill, (~prefill).sum() / max(prefill.sum(), 1), 1.0) / times
    coef, _ = nnls(X * w[:, None], times * w)
    fitted = X @ coef
    fit = {
        "layer_us": max(coef[0] * 1e6, 1e-3), "token_us": max(coef[1] * 1e6, 1e-6),
        "expert_us": max(coef[2] * 1e6, 1e-3),
        "tflops": 2 * expert_params / max(coef[3], 1e-15) / 1e12,
        "r2": 1 - float(((times - fitted) ** 2).sum() / max(((times - times.mean()) ** 2).sum(), 1e-30)),
        "prefill_error": float(fitted[prefill].mean() / times[prefill].mean() - 1) if prefill.any() else 0.0,
        "decode_error": float(fitted[~prefill].mean() / times[~prefill].mean() - 1) if (~prefill).any() else 0.0,
    }
    link = 1e6 if link_bytes_per_s is None else link_bytes_per_s / 1e9  # unthrottled: a link that never waits
    spec = (f"a100-5gbs:link_gbps={link:.6g},tflops={fit['tflops']:.6g},hbm_gbps=1e9,"
            f"layer_us={fit['layer_us']:.6g},token_us={fit['token_us']:.6g},expert_us={fit['expert_us']:.6g}")
    return spec, fit


def fit_dequant_kernel_us(weights: dict[str, Any], precisions: list[str], device: str = "cpu",
                          repeats: int = 30) -> dict[str, float]:
    """This machine's cost of dequantizing one expert (``weights``, as ``adapter.expert_params`` gives it)
    at each low precision into a slot, as the simulator models it: ``dequant_kernels`` launches of
    ``kernel_us`` each (the bytes term is off in a calibrated profile). Returns the fitted ``kernel_us``
    (least squares through the origin over the precisions) and the median measured microseconds of each."""
    # hqq: ~2 s to import; only to time the low-bit dequantization
    from offload.quantization import dequantize, quantize_expert, template_shapes

    dev = torch.device(device)
    weights = {n: w.detach().to(dev) for n, w in weights.items()}
    shapes = template_shapes({n: (w.shape, w.dtype) for n, w in weights.items()})
    slot = {n: torch.empty_like(w) for n, w in weights.items()}
    measured: dict[str, float] = {}
    for p in precisions:
        q = quantize_expert(weights, p, optimize=False)  # the same dequantization as HQQ's optimised codes
        times = []
        for _ in range(repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            dequantize(q, out=slot)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t0)
        measured[p] = float(np.median(times)) * 1e6
    kernels = {p: dequant_kernels(shapes, p) for p in precisions}
    kernel_us = sum(measured[p] * kernels[p] for p in precisions) / sum(k * k for k in kernels.values())
    return {"kernel_us": kernel_us, **{f"dequant_{p}_us": t for p, t in measured.items()}}
