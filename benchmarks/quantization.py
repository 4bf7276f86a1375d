"""Quantized expert copies: bytes, error and build time per precision (offload/quantization.py, HQQ).

For every expert of the model (or the first ``--experts`` of each MoE layer) and each precision:
bytes one copy moves, weight error (mean |w - w'| / mean |w|), expert-output error
(||f(x) - f'(x)|| / ||f(x)|| on ``--tokens`` random N(0, 1) inputs through ``adapter.expert_forward``),
and the time to quantize and to dequantize one expert on this CPU. ``--olmoe-shape`` adds the bytes
and the build time of one OLMoE-1B-7B-sized expert (random bf16 weights, std 0.02), since the real
model is not on this machine.

    python benchmarks/quantization.py
    python benchmarks/quantization.py --no-optimize --olmoe-shape
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.errors import run_cli  # noqa: E402
from data_pipeline.models import load_model  # noqa: E402
from offload.quantization import (  # noqa: E402
    PRECISIONS,
    dequantize,
    expert_nbytes,
    expert_template,
    quantize_expert,
)

OLMOE_TEMPLATE = {"gate_up_proj": ((2048, 2048), torch.bfloat16), "down_proj": ((2048, 1024), torch.bfloat16)}


def _timed(fn, repeat: int = 1):
    start = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    return out, (time.perf_counter() - start) / repeat


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-olmoe")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--no-optimize", action="store_true", help="plain round-to-nearest instead of HQQ's solver")
    ap.add_argument("--experts", type=int, default=0, help="experts per layer to measure (0: all)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--olmoe-shape", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    optimize = not args.no_optimize

    adapter = load_model(args.model).adapter
    template = expert_template(adapter)
    x = torch.randn(args.tokens, adapter.hidden_size, generator=torch.Generator().manual_seed(0))
    x = x.to(next(iter(adapter.expert_params(0, 0).values())).dtype)
    per_layer = args.experts or adapter.num_experts
    keys = [(layer, e) for layer in range(adapter.num_layers) for e in range(per_layer)]

    table = Table(title=f"{args.model}: {len(keys)} experts, group {args.group_size}, "
                        f"{'HQQ-optimised' if optimize else 'round-to-nearest'}, {args.threads} thread(s)")
    for col in ("precision", "bytes/expert", "of native", "weight err", "output err mean", "output err max",
                "quantize ms", "dequantize ms"):
        table.add_column(col, justify="right")
    native = expert_nbytes(template, "native", group_size=args.group_size)
    for p in PRECISIONS:
        w_err, out_err, t_q, t_d = [], [], [], []
        for layer, e in keys:
            w = adapter.expert_params(layer, e)
            q, tq = _timed(lambda w=w, p=p: quantize_expert(w, p, args.group_size, optimize=optimize))
            d, td = _timed(lambda q=q: dequantize(q), repeat=5)
            ref = adapter.expert_forward(w, x)
            w_err.append(sum((d[n] - t).abs().sum().item() for n, t in w.items())
                         / sum(t.abs().sum().item() for t in w.values()))
            out_err.append(((adapter.expert_forward(d, x) - ref).norm() / ref.norm()).item())
            t_q.append(tq)
            t_d.append(td)
        nbytes = expert_nbytes(template, p, group_size=args.group_size)
        table.add_row(p, f"{nbytes:,}", f"{nbytes / native:.1%}", f"{statistics.mean(w_err):.4f}",
                      f"{statistics.mean(out_err):.4f}", f"{max(out_err):.4f}",
                      f"{1000 * statistics.median(t_q):.2f}", f"{1000 * statistics.median(t_d):.3f}")
    console = Console(width=max(Console().width, 120))
    console.print(table)

    if args.olmoe_shape:
        gen = torch.Generator().manual_seed(0)
        w = {n: (torch.randn(*shape, generator=gen) * 0.02).to(dt) for n, (shape, dt) in OLMOE_TEMPLATE.items()}
        big = Table(title="OLMoE-1B-7B-sized expert (2048 x 2048 + 2048 x 1024, bf16, random), this CPU")
        for col in ("precision", "bytes/expert", "of native", "weight err", "quantize s", "dequantize s"):
            big.add_column(col, justify="right")
        big_native = expert_nbytes(OLMOE_TEMPLATE, "native", group_size=args.group_size)
        for p in PRECISIONS:
            q, tq = _timed(lambda p=p: quantize_expert(w, p, args.group_size, optimize=optimize))
            d, td = _timed(lambda q=q: dequantize(q))
            err = (sum((d[n].float() - t.float()).abs().sum().item() for n, t in w.items())
                   / sum(t.float().abs().sum().item() for t in w.values()))
            nbytes = expert_nbytes(OLMOE_TEMPLATE, p, group_size=args.group_size)
            big.add_row(p, f"{nbytes:,}", f"{nbytes / big_native:.1%}", f"{err:.4f}", f"{tq:.2f}", f"{td:.3f}")
        console.print(big)


if __name__ == "__main__":
    run_cli(main)
