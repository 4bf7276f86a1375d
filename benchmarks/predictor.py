"""Predictor cost at real OLMoE sizes: forecast latency per layer vs one MoE layer; training speed.

    python benchmarks/predictor.py [--threads 2] [--repeats 200]

Sizes are allenai/OLMoE-1B-7B-0924's: hidden 2048, 64 experts, top-8, 16 MoE layers, expert
intermediate size 1024; lookahead D=3. Every family is built at those sizes with random weights
(latency does not depend on what was learned) and asked for one decode token's forecast at a
middle layer, the call the engine makes once per layer. The reference is one randomly
initialised ``OlmoeSparseMoeBlock`` (fp32, CPU, one token, HF's eager experts as the project runs
them on CPU: memory-bound, 8 experts x 24 MiB read per token) on the same machine and threads; the
ratio is the share of a layer's time the forecast adds if it ran on the critical path (goal:
at most 2 %). The last columns are what the simulator charges per call on a GPU profile
(``Predictor.work`` through ``Hardware.kernel_time``: kernel launches plus compute- or memory-bound
work), next to this CPU's measurement. Training throughput is the optimiser step of the LightningModule's loss on
random batches at the same sizes (samples = tokens, each with all its layers), without the
Trainer's loop around it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from offload.hardware import get_hardware  # noqa: E402
from predictors.base import PredictContext  # noqa: E402
from predictors.frequency import ConditionalFrequency, FrequencyPredictor  # noqa: E402
from predictors.gate_lookahead import GateLookahead  # noqa: E402
from predictors.mlp_lookahead import MLPLookahead  # noqa: E402
from predictors.sklearn_baseline import SklearnLogReg  # noqa: E402
from predictors.trajectory import TrajectoryPredictor  # noqa: E402

L, E, K, H, INTERMEDIATE, D = 16, 64, 8, 2048, 1024, 3
LAYER = 7


def _timings(fn: Callable[[], object], repeats: int, warmup: int = 10) -> tuple[float, float]:
    """(min, median) seconds per call. The ratio uses the minimum: on a shared machine other
    processes inflate medians at random, and the minimum is the cost of the work itself."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)


def moe_layer_seconds(repeats: int) -> tuple[float, float]:
    # transformers: ~3 s to import; only for the MoE-layer reference
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    cfg = OlmoeConfig(hidden_size=H, intermediate_size=INTERMEDIATE, num_experts=E, num_experts_per_tok=K,
                      num_hidden_layers=L)
    cfg._experts_implementation = "eager"  # what data_pipeline.models uses on CPU (exact, loop over chosen experts)
    block = OlmoeSparseMoeBlock(cfg).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(1, 1, H)
    with torch.inference_mode():
        return _timings(lambda: block(x), repeats)


def build_families(seed: int = 0) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    routers = torch.randn(L, E, H, generator=g) * 0.02
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(L * 256)]).reshape(256, L, K).numpy()
    pair = {"mean": torch.zeros(H), "components": torch.randn(64, H, generator=g),
            "coef": torch.randn(E, 64, generator=g), "intercept": torch.zeros(E)}
    return {
        "frequency": FrequencyPredictor.fit(ids, E, D),
        "conditional_frequency": ConditionalFrequency.fit(ids, E, D),
        "gate_lookahead": GateLookahead(routers, K, D),
        "sklearn_logreg": SklearnLogReg(L, E, K, D, {(LAYER, 1): pair}, n_components=64),
        "mlp_lookahead (width 128)": MLPLookahead(routers, K, D, width=128).eval(),
        "mlp_lookahead (width 256)": MLPLookahead(routers, K, D, width=256).eval(),
        "trajectory (dim 32)": TrajectoryPredictor.fit(ids, E, D, dim=32).eval(),
        "trajectory (dim 0)": TrajectoryPredictor.fit(ids, E, D, dim=0).eval(),
    }


def one_token_context():
    g = torch.Generator().manual_seed(1)
    chosen = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(L)])[None]  # (1, L, K)
    previous = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(L)])[None]
    return PredictContext(layer=LAYER, hidden=torch.randn(1, H, generator=g), chosen=chosen[:, : LAYER + 1],
                          previous=previous)


def training_samples_per_s(predictor, batch_size: int, steps: int) -> float:
    # lightning: ~3 s to import; only for the training throughput
    from predictors.lightning_module import LookaheadModule

    module = LookaheadModule(predictor.train(), list(range(L)))
    opt = module.configure_optimizers()
    g = torch.Generator().manual_seed(2)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(batch_size * L)]).reshape(batch_size, L, K)
    batch = {"topk_ids": ids, "previous": ids.roll(1, dims=0), "row": torch.arange(batch_size),
             "hidden": torch.randn(batch_size, L, H, generator=g)}

    def step() -> None:
        loss = module._loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return batch_size / _timings(step, steps, warmup=2)[1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads for everything measured")
    ap.add_argument("--repeats", type=int, default=200, help="timed calls per measurement (median)")
    ap.add_argument("--batch-size", type=int, default=256, help="training batch (tokens)")
    ap.add_argument("--train-steps", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console()
    console.width = max(console.width, 100)

    with console.status("timing one OLMoE MoE layer (fp32, one token)"):
        moe, moe_median = moe_layer_seconds(args.repeats)
    families = build_families()
    ctx = one_token_context()
    table = Table(title=f"forecast for one decode token at layer {LAYER} (D={D}) vs one OLMoE MoE layer "
                        f"(min {moe * 1e3:.2f} ms, median {moe_median * 1e3:.2f} ms), {args.threads} threads")

    a100, pcie5 = get_hardware("a100-5gbs"), get_hardware("pcie5")
    for col in ("family", "min (us)", "median (us)", "min / MoE-layer min", "goal <= 2%",
                "simulated us (a100-5gbs)", "simulated us (pcie5)"):
        table.add_column(col, justify="left" if col == "family" else "right")
    with torch.inference_mode():
        for name, pred in families.items():
            s, median = _timings(lambda p=pred: p.predict(ctx), args.repeats)
            ratio = s / moe
            # what the simulator charges on the device timeline: Predictor.work through the roofline
            work = pred.work(1)
            table.add_row(name, f"{s * 1e6:.0f}", f"{median * 1e6:.0f}", f"{ratio:.2%}",
                          "yes" if ratio <= 0.02 else "[red]no[/]", f"{a100.kernel_time(*work) * 1e6:.1f}",
                          f"{pcie5.kernel_time(*work) * 1e6:.1f}")
    console.print(table)

    train = Table(title=f"training throughput (median; loss + backward + AdamW step, batch {args.batch_size}, all 16 layers)")
    train.add_column("family")
    train.add_column("samples/s", justify="right")
    for name in ("mlp_lookahead (width 128)", "trajectory (dim 32)", "trajectory (dim 0)"):
        with console.status(f"training {name}"):
            rate = training_samples_per_s(families[name], args.batch_size, args.train_steps)
        train.add_row(name, f"{rate:,.0f}")
    console.print(train)


if __name__ == "__main__":
    main()
