"""Evaluate expert caching: ``--mode sim`` replays a trace store through the simulator (chosen when
``--trace`` is given); ``--mode engine`` runs an HF MoE model with offloaded experts.

    python evaluate.py --trace traces/NAME --policy least_stale,lru,belady --capacity 1%,5%,25% \\
        --prefetch none,oracle --json out.json --plots plots/ --report out.html
"""

from __future__ import annotations

import argparse
import sys

from core.errors import UserError, run_cli


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--mode", choices=["sim", "engine"])
    pre.add_argument("--trace")
    known, rest = pre.parse_known_args(argv)
    mode = known.mode or ("sim" if known.trace else "engine")
    if mode == "engine":
        try:
            # offload.engine.cli imports torch (~1 s): only the engine mode needs it
            from offload.engine.cli import main as engine_main
        except ImportError:
            raise UserError("engine mode is not available in this build; give --trace for simulation mode") from None
        return int(engine_main([a for a in argv if a not in ("--mode", "engine")]) or 0)
    # offload.sweep imports numba: only the simulation mode needs it
    from offload.sweep import add_sim_arguments, run

    parser = argparse.ArgumentParser(description="Trace-driven expert-cache simulation (SpecMD policy space)")
    parser.add_argument("--mode", choices=["sim", "engine"], default="sim")
    add_sim_arguments(parser)
    args = parser.parse_args(argv)
    if not args.trace:
        raise UserError("simulation mode needs --trace traces/NAME")
    run(args, argv)
    return 0


if __name__ == "__main__":
    run_cli(main)
