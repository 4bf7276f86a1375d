"""Streaming import: peak memory and rows/s of ``python -m data_pipeline.import_routes`` on synthetic CSVs.

Writes generic routing CSVs (``seq,step,phase,layer,expert,weight``) shaped like an OLMoE serving
log: 16 layers, top-8 of 64 experts, 256-token sequences (32 prompt tokens), 8 requests in flight
whose rows interleave step by step, as a batched server logs them. Each file is imported by the
CLI in a fresh process; its peak RSS comes from ``wait4`` (the kernel's high-water mark of that
process alone) and rows/s from its wall time. The store is opened afterwards to check that every
row arrived. Files and stores live in ``--tmp`` and are deleted unless ``--keep``. Run by hand:

    python benchmarks/import_routes.py [--rows 5000000,50000000] [--tmp /tmp]
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

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipeline.trace_store import TraceStore  # noqa: E402

L, E, K, TOKENS, PROMPT, IN_FLIGHT = 16, 64, 8, 256, 32, 8


def write_csv(path: Path, rows: int, seed: int = 0) -> int:
    """A synthetic serving log of at least ``rows`` rows (whole sequences); returns the rows written."""
    rng = np.random.default_rng(seed)
    per_token = L * K
    per_seq = TOKENS * per_token
    n_seq = -(-rows // per_seq)
    n_seq += -n_seq % IN_FLIGHT
    with open(path, "wb") as f:
        f.write(b"seq,step,phase,layer,expert,weight\n")
        options = pacsv.WriteOptions(include_header=False, quoting_style="none")
        for wave in range(0, n_seq, IN_FLIGHT):  # IN_FLIGHT requests, their steps interleaved
            seqs = np.arange(wave, wave + IN_FLIGHT, dtype=np.int64)
            step, seq, layer = np.meshgrid(np.arange(TOKENS), seqs, np.arange(L), indexing="ij")
            n = step.size
            # K distinct experts per (token, layer): a random offset and stride walk over the 64
            start = rng.integers(0, E, size=n)
            stride = rng.choice(np.arange(1, E, 2), size=n)  # odd strides: K distinct ids mod 64
            expert = (start[:, None] + stride[:, None] * np.arange(K)) % E
            weight = np.round(rng.dirichlet(np.ones(K), size=n), 4)
            phase = np.where(step.reshape(-1) < PROMPT, "prefill", "decode")
            table = pa.table({
                "seq": np.repeat(seq.reshape(-1), K), "step": np.repeat(step.reshape(-1), K),
                "phase": np.repeat(phase, K), "layer": np.repeat(layer.reshape(-1), K),
                "expert": expert.reshape(-1), "weight": weight.reshape(-1),
            })
            pacsv.write_csv(table, f, write_options=options)
    return n_seq * per_seq


def run_import(csv: Path, out: Path) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of the import CLI in a fresh process (``wait4``: that process only)."""
    cmd = [sys.executable, "-m", "data_pipeline.import_routes", str(csv), "--out", str(out), "--no-progress",
           "--num-experts", str(E)]
    with tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode:
            err.seek(0)
            raise SystemExit(f"import failed: {err.read().strip()}")
    return wall, int(usage.ru_maxrss) * 1024  # Linux reports kilobytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="5000000,50000000", help="comma list of row counts")
    ap.add_argument("--tmp", type=Path, default=Path("/tmp"), help="folder for the CSVs and stores")
    ap.add_argument("--keep", action="store_true", help="keep the CSVs and stores")
    args = ap.parse_args()
    print(f"{'rows':>12} {'CSV':>9} {'import s':>9} {'rows/s':>11} {'peak RSS':>10}  store")
    for rows in (int(x) for x in args.rows.split(",")):
        csv, out = args.tmp / f"routes-{rows}.csv", args.tmp / f"routes-{rows}.store"
        shutil.rmtree(out, ignore_errors=True)
        try:
            n = write_csv(csv, rows)
            wall, rss = run_import(csv, out)
            store = TraceStore(out)
            assert store.num_tokens * L * K == n, (store.num_tokens, n)
            print(f"{n:>12,} {csv.stat().st_size / 2**20:>7.0f}MB {wall:>9.1f} {n / wall:>11,.0f} "
                  f"{rss / 2**20:>8.0f}MB  {store.num_tokens:,} tokens in {len(store.manifest['shards'])} shards",
                  flush=True)
        finally:
            if not args.keep:
                csv.unlink(missing_ok=True)
                shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
