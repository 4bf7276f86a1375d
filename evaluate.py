"""Evaluate expert caching, in one of two modes that share their flags (offload/evaluate_cli.py):

- engine (no ``--trace``): run a model with offloaded experts next to its references;
- simulation (``--trace traces/NAME``): sweep the trace-driven simulator over comma lists.

    python evaluate.py --policy least_stale
    python evaluate.py --trace traces/NAME --policy least_stale,lru,belady --capacity 1%,5%,25% \\
        --prefetch none,oracle --json out.json --plots plots/ --report out.html
"""

from __future__ import annotations

import sys

from core.errors import run_cli
from offload.evaluate_cli import SweepArgs, parse_args

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Parse and check everything (one parser, offload/evaluate_cli.py), then run the chosen mode; bad
    input raises UserError before any model loads or any configuration runs."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if isinstance(args, SweepArgs):
        # numba kernels: only simulation mode needs them
        from offload.sweep import run

        run(args)
        return 0
    # torch, transformers and the engine: only engine mode needs them
    from offload.engine.cli import run as run_engine

    return run_engine(args)

if __name__ == "__main__":
    run_cli(main)
