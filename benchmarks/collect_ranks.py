"""Distributed collection: wall time of ``collect`` with 1, 2, 4 ranks (torchrun, gloo) and whether the stores agree.

Each run collects the same texts into a fresh store: ``python -m data_pipeline.collect`` for one
process, ``python -m torch.distributed.run --standalone --nproc-per-node N -m data_pipeline.collect``
for N ranks. Every process runs one intra-op thread (torchrun's default), so the stores must be
byte-identical; the table shows the content digest of each. "wall" includes starting the
processes and loading the model; "collect" is the collection loop alone (the manifest's last run).
Run by hand:

    python benchmarks/collect_ranks.py [--ranks 1,2,4] [--max-tokens 20000] [--model tiny-olmoe]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipeline.trace_store import TraceStore  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--max-tokens", default="20000")
    ap.add_argument("--model", default="tiny-olmoe")
    ap.add_argument("--extra", default="--seq-len 128 --batch-size 8 --shard-sequences 16 --hidden-layers 0",
                    help="further collect arguments")
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    collect = ["-m", "data_pipeline.collect", "--model", args.model, "--max-tokens", args.max_tokens, "--no-progress",
               *args.extra.split()]
    print(f"{'ranks':>5} {'wall s':>7} {'collect s':>9} {'tok/s':>8}  content digest")
    with tempfile.TemporaryDirectory(prefix="collect-ranks-") as tmp:
        for n in (int(x) for x in args.ranks.split(",")):
            out = Path(tmp) / f"ranks-{n}"
            launch = [] if n == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)]
            cmd = [sys.executable, *launch, *collect, "--out", str(out)]
            t0 = time.perf_counter()
            r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if r.returncode:
                raise SystemExit(f"{n} ranks failed: {r.stderr.strip()[-2000:]}")
            store = TraceStore(out, verify_checksums=True)
            run = store.manifest["runs"][-1]
            print(f"{n:>5} {wall:>7.1f} {run['seconds']:>9.1f} {run['tokens_per_s']:>8,.0f}  "
                  f"{store.content_digest()[:16]} ({store.num_tokens:,} tokens)", flush=True)
            shutil.rmtree(out)


if __name__ == "__main__":
    main()
