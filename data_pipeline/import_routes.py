"""Import foreign routing logs (no hidden states) into a trace store.

Two formats:

- ``route_trace v1`` (a llama.cpp-based engine): ``#`` comment lines with ``model=... n_layer=...
  n_expert=... n_expert_used=...`` and per-layer ``expert_bytes``, then CSV columns
  ``turn,phase,step,layer,slot,expert,weight,...`` (``slot`` = rank inside the token's top-k,
  ``phase`` 0 = prefill, 1 = decode).
- generic CSV or JSONL with columns ``seq, step, phase (prefill|decode or 0|1), layer, expert[, weight]``;
  rows of one (seq, step, layer) are taken in file order as rank order.

Usage: ``python -m data_pipeline.import_routes PATH --out traces/NAME``
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from data_pipeline.errors import UserError, run_cli
from data_pipeline.trace_store import ModelInfo, TraceStore, TraceStoreWriter

ROUTE_TRACE_COLUMNS = ("turn", "phase", "step", "layer", "slot", "expert", "weight")
GENERIC_COLUMNS = ("seq", "step", "phase", "layer", "expert")


def _open_text(path: Path) -> str:
    if not path.exists():
        raise UserError(f"{path} does not exist")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None


def _read_csv(path: Path, text: str) -> dict[str, np.ndarray]:
    body = "\n".join(line for line in text.splitlines() if line and not line.startswith("#"))
    if not body:
        raise UserError(f"{path} has no rows")
    try:
        table = pacsv.read_csv(io.BytesIO(body.encode()))
    except pa.ArrowInvalid as e:
        raise UserError(f"{path} is not a readable CSV ({str(e).splitlines()[0]})") from None
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def _read_jsonl(path: Path, text: str) -> dict[str, np.ndarray]:
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise UserError(f"{path} line {i} is not valid JSON") from None
    if not rows:
        raise UserError(f"{path} has no rows")
    keys = set().union(*rows)
    return {k: np.array([r.get(k) for r in rows]) for k in keys}


def _require(path: Path, cols: dict[str, np.ndarray], needed: tuple[str, ...]) -> None:
    missing = [c for c in needed if c not in cols]
    if missing:
        raise UserError(f"{path} lacks column(s) {', '.join(missing)} (has: {', '.join(sorted(cols))})")


def _phase_codes(path: Path, values: np.ndarray) -> np.ndarray:
    if values.dtype.kind in "iu":
        out = values.astype(np.int8)
    else:
        mapping = {"prefill": 0, "decode": 1, "0": 0, "1": 1}
        try:
            out = np.array([mapping[str(v).strip().lower()] for v in values], dtype=np.int8)
        except KeyError as e:
            raise UserError(f"{path}: phase {e.args[0]!r} is neither prefill nor decode") from None
    if np.any((out != 0) & (out != 1)):
        raise UserError(f"{path}: phase must be 0/prefill or 1/decode")
    return out


def _to_tokens(
    path: Path,
    seq: np.ndarray,
    step: np.ndarray,
    phase: np.ndarray,
    layer: np.ndarray,
    rank: np.ndarray,
    expert: np.ndarray,
    weight: np.ndarray,
    num_layers: int,
    top_k: int,
) -> dict[str, np.ndarray]:
    """Scatter one-row-per-routed-expert into per-token (N, L, K) arrays, checking completeness."""
    keys = np.stack([seq, step], axis=1).astype(np.int64)
    uniq, token_index = np.unique(keys, axis=0, return_inverse=True)
    token_index = token_index.reshape(-1)
    n = len(uniq)
    if np.any((layer < 0) | (layer >= num_layers)):
        raise UserError(f"{path}: a layer index is outside 0..{num_layers - 1}")
    if np.any((rank < 0) | (rank >= top_k)):
        raise UserError(f"{path}: a rank/slot is outside 0..{top_k - 1}")
    ids = np.full((n, num_layers, top_k), -1, dtype=np.int16)
    weights = np.zeros((n, num_layers, top_k), dtype=np.float32)
    flat = (token_index * num_layers + layer) * top_k + rank
    if len(np.unique(flat)) != len(flat):
        raise UserError(f"{path}: the same (seq, step, layer, rank) appears twice")
    ids.reshape(-1)[flat] = expert
    weights.reshape(-1)[flat] = weight
    if np.any(ids < 0):
        t, l_ = np.argwhere((ids < 0).any(axis=2))[0]
        raise UserError(
            f"{path}: seq {uniq[t, 0]} step {uniq[t, 1]} layer {l_} has fewer than {top_k} experts"
        )
    tok_phase = np.zeros(n, dtype=np.int8)
    tok_phase[token_index] = phase
    return {
        "seq_id": uniq[:, 0],
        "position": uniq[:, 1],
        "token_id": np.full(n, -1, dtype=np.int32),
        "phase": tok_phase,
        "topk_ids": ids,
        "topk_weights": weights,
    }


def parse_route_trace(path: Path) -> tuple[ModelInfo, dict[str, np.ndarray]]:
    text = _open_text(path)
    header = " ".join(line for line in text.splitlines()[:4096] if line.startswith("#"))
    meta = dict(re.findall(r"(\w+)=(\S+)", header))
    missing = [k for k in ("n_layer", "n_expert", "n_expert_used") if k not in meta]
    if missing:
        raise UserError(f"{path}: route_trace header lacks {', '.join(missing)}")
    layer_bytes = {int(a): int(b) for a, b in re.findall(r"layer=(\d+) expert_bytes=(\d+)", text[:200_000])}
    cols = _read_csv(path, text)
    _require(path, cols, ROUTE_TRACE_COLUMNS)
    L, E, K = int(meta["n_layer"]), int(meta["n_expert"]), int(meta["n_expert_used"])
    expert = cols["expert"].astype(np.int64)
    if np.any((expert < 0) | (expert >= E)):
        raise UserError(f"{path}: an expert id is outside 0..{E - 1}")
    model_id = Path(meta.get("model", "unknown")).name
    per_layer = [layer_bytes.get(i, 0) for i in range(L)] if layer_bytes else None
    common = Counter(per_layer).most_common(1)[0][0] if per_layer else None
    info = ModelInfo(
        model_id=model_id,
        family=meta.get("arch", "unknown"),
        num_layers=L,
        num_experts=E,
        top_k=K,
        expert_bytes=common,
        layer_expert_bytes=per_layer,
    )
    tokens = _to_tokens(
        path, cols["turn"], cols["step"], _phase_codes(path, cols["phase"]), cols["layer"].astype(np.int64),
        cols["slot"].astype(np.int64), expert, cols["weight"].astype(np.float32), L, K,
    )
    return info, tokens


def parse_generic(path: Path, model_id: str, num_experts: int | None) -> tuple[ModelInfo, dict[str, np.ndarray]]:
    text = _open_text(path)
    is_jsonl = path.name.endswith((".jsonl", ".jsonl.gz", ".json"))
    cols = _read_jsonl(path, text) if is_jsonl else _read_csv(path, text)
    _require(path, cols, GENERIC_COLUMNS)
    seq = cols["seq"].astype(np.int64)
    step = cols["step"].astype(np.int64)
    layer = cols["layer"].astype(np.int64)
    expert = cols["expert"].astype(np.int64)
    weight = cols["weight"].astype(np.float32) if "weight" in cols else np.zeros(len(seq), np.float32)
    # rank = order of appearance inside (seq, step, layer), which a stable sort preserves
    order = np.lexsort((layer, step, seq))
    group = np.stack([seq, step, layer], axis=1)[order]
    new_group = np.concatenate([[True], np.any(group[1:] != group[:-1], axis=1)])
    starts = np.flatnonzero(new_group)
    run = np.arange(len(order)) - np.repeat(starts, np.diff(np.concatenate([starts, [len(order)]])))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = run
    L = int(layer.max()) + 1
    K = int(rank.max()) + 1
    E = int(num_experts) if num_experts else int(expert.max()) + 1
    if np.any((expert < 0) | (expert >= E)):
        raise UserError(f"{path}: an expert id is outside 0..{E - 1}")
    info = ModelInfo(model_id=model_id, family="unknown", num_layers=L, num_experts=E, top_k=K)
    tokens = _to_tokens(path, seq, step, _phase_codes(path, cols["phase"]), layer, rank, expert, weight, L, K)
    return info, tokens


def detect_format(path: Path) -> str:
    if not path.exists():
        raise UserError(f"{path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", errors="replace") as f:
        first = f.readline()
    return "route_trace" if first.startswith("# route_trace") else "generic"


def import_routes(
    path: str | Path,
    out: str | Path,
    *,
    fmt: str = "auto",
    model_id: str | None = None,
    num_experts: int | None = None,
) -> TraceStore:
    """Parse a routing log and write it as a trace store (one shard; rank order kept)."""
    path = Path(path)
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "route_trace":
        info, tokens = parse_route_trace(path)
        if model_id:
            info.model_id = model_id
    elif fmt == "generic":
        info, tokens = parse_generic(path, model_id or path.stem, num_experts)
    else:
        raise UserError(f"unknown format {fmt!r}; choose auto, route_trace or generic")
    writer = TraceStoreWriter(
        out, info, dataset={"source": str(path), "format": fmt}, collection={"imported_from": str(path)}
    )
    if writer.done_sequences:
        todo = ~np.isin(tokens["seq_id"], list(writer.done_sequences))
        tokens = {k: v[todo] for k, v in tokens.items()}
    if len(tokens["seq_id"]):
        writer.write_shard(**tokens)
    return writer.finalize()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m data_pipeline.import_routes", description=__doc__.split("\n")[0])
    ap.add_argument("path", type=Path, help="route_trace v1 CSV, or generic CSV/JSONL (optionally .gz)")
    ap.add_argument("--out", type=Path, required=True, help="trace store folder to create")
    ap.add_argument("--format", default="auto", choices=["auto", "route_trace", "generic"])
    ap.add_argument("--model-id", default=None, help="model name to record (default: from the file)")
    ap.add_argument("--num-experts", type=int, default=None, help="experts per layer (generic format)")
    args = ap.parse_args(argv)
    store = import_routes(args.path, args.out, fmt=args.format, model_id=args.model_id, num_experts=args.num_experts)
    phases = store.phases
    print(
        f"imported {store.num_tokens} tokens ({int((phases == 0).sum())} prefill, {int((phases == 1).sum())} decode) "
        f"in {store.num_sequences} sequence(s): {store.num_layers} layers x {store.num_experts} experts, "
        f"top-{store.top_k} -> {args.out}"
    )


if __name__ == "__main__":
    run_cli(main)
