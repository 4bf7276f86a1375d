"""Evaluate expert caching, in one of two modes that share their flags (offload/evaluate_cli.py):

- engine (no ``--trace``): run a model with offloaded experts next to its references;
- simulation (``--trace traces/NAME``): sweep the trace-driven simulator over comma lists.

    python evaluate.py --policy least_stale
    python evaluate.py --trace traces/NAME --policy least_stale,lru,belady --capacity 1%,5%,25% \\
        --prefetch none,oracle --json out.json --plots plots/ --report out.html
"""

from __future__ import annotations

from data_pipeline.errors import run_cli
from offload.evaluate_cli import main

__all__ = ["main"]

if __name__ == "__main__":
    run_cli(main)
