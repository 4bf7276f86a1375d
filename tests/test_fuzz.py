"""Seeded random damage to a small store and to small import files: every outcome is either the right
answer or one clean :class:`UserError`, never another exception and never a silently different result.

Store: one byte of the manifest flipped or the manifest cut (its checksum guards every single
change; a manifest without a ``checksum`` entry reads as a hand edit, unchecked), several bytes of a
shard or of the router weights flipped, or the file cut. Import files (generic CSV, JSONL,
route_trace): a byte replaced, the text cut, a line repeated, dropped or swapped; whatever imports
must say exactly what an independent line-by-line reading of the damaged file says, whether the
importer reads the file whole or in small blocks and groups (its streaming path).
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from test_trace_store import INFO, make_rows

from core.errors import UserError
from data_pipeline import import_routes as imp
from data_pipeline.trace_store import TraceStore, TraceStoreWriter

CASES = int(os.environ.get("FUZZ_CASES", "300"))  # raise it for a deeper local run


def _read(path: Path, *, verify: bool = True) -> dict[str, object]:
    """Everything a consumer can read, through the default (lazily verified) reader."""
    store = TraceStore(path, verify_on_read=verify)
    out: dict[str, object] = {"model": dict(store.model.__dict__), "bounds": store.sequence_bounds().tolist(),
                              "hidden_layers": list(store.hidden_layers)}
    for name in ("seq_id", "position", "token_id", "phase", "topk_ids", "topk_weights", "router_logits", "hidden_0"):
        out[name] = np.array(store.column(name))
    out["router_weights"] = {k: v.copy() for k, v in store.router_weights().items()}
    return out


def _equal(a: dict[str, object], b: dict[str, object]) -> bool:
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, np.ndarray):
            if not (x.dtype == y.dtype and np.array_equal(x, y, equal_nan=True)):
                return False
        elif isinstance(x, dict) and x and isinstance(next(iter(x.values())), np.ndarray):
            if x.keys() != y.keys() or not all(np.array_equal(x[i], y[i]) for i in x):
                return False
        elif x != y:
            return False
    return True


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> dict[str, bytes]:
    """A small store (2 shards, logits, hidden states, router weights, skipped last-layer routes) as bytes."""
    path = tmp_path_factory.mktemp("fuzz") / "s"
    w = TraceStoreWriter(path, INFO, hidden_layers=[0], store_router_logits=True, skipped_reason="test")
    for i, (sids, lens) in enumerate([([0, 1], [3, 2]), ([2], [4])]):
        rows = make_rows(sids, lens, seed=i)
        rows["hidden"] = {0: rows["hidden"][0]}
        rows["topk_ids"][0, -1] = -1  # the first token of each shard did not run the last layer
        rows["topk_weights"][0, -1] = 0
        w.write_shard(**rows)
    w.save_router_weights({i: np.full((INFO.num_experts, 4), i, np.float32) for i in range(INFO.num_layers)})
    w.finalize()
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def _mutate(rng: np.random.Generator, data: bytes, max_flips: int) -> tuple[bytes, str]:
    if rng.random() < 0.25:
        cut = int(rng.integers(0, len(data)))
        return data[:cut], f"cut at {cut}"
    raw = bytearray(data)
    flips = []
    for _ in range(int(rng.integers(1, max_flips + 1))):
        at = int(rng.integers(0, len(raw)))
        raw[at] = int(rng.integers(0, 256))
        flips.append(at)
    return bytes(raw), f"bytes at {flips} replaced"


@pytest.mark.parametrize("verify", [True, False], ids=["checksums", "no-checksums"])
def test_fuzz_store(original, tmp_path, verify):
    names = sorted(original)
    weights = np.array([0.35 if n == "manifest.json" else 0.1 if n.startswith("router") else 0.0 for n in names])
    shards = [i for i, n in enumerate(names) if n.startswith("shards/")]
    weights[shards] = (1 - weights.sum()) / len(shards)
    targets = [n for n in names if n != "writer.lock"]
    weights = np.array([weights[names.index(n)] for n in targets])
    base = tmp_path / "base"
    for name, data in original.items():
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        (base / name).write_bytes(data)
    want = _read(base)
    outcomes = {"read": 0, "error": 0}
    for case in range(CASES if verify else CASES // 3):
        rng = np.random.default_rng(case)
        target = targets[int(rng.choice(len(targets), p=weights / weights.sum()))]
        data, how = _mutate(rng, original[target], 1 if target == "manifest.json" else 8)
        folder = tmp_path / f"c{case}"
        for name, content in original.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data if name == target else content)
        try:
            got = _read(folder, verify=verify)
        except UserError as e:
            assert "\n" not in str(e), (case, target, how)
            outcomes["error"] += 1
            continue
        except Exception as e:  # noqa: BLE001 -- the point: nothing else may escape
            pytest.fail(f"case {case}: {target} {how} -> {type(e).__name__}: {e}")
        if verify:  # without checksums a changed weight can read as a weight: only "no traceback" holds there
            assert _equal(want, got), f"case {case}: {target} {how} read back differently without an error"
        outcomes["read"] += 1
    assert outcomes["error"] > outcomes["read"], outcomes  # the damage was real, and caught
    print(f"store fuzz ({'checksums' if verify else 'no checksums'}): {outcomes}")


# ---------------------------------------------------------------------------------- import files
GENERIC = "".join(
    ["seq,step,phase,layer,expert,weight,token\n"]
    + [f"{s},{t},{'prefill' if t < 2 else 'decode'},{la},{(s * 7 + t * 3 + la * 5 + r * 11) % 16},"
       f"{0.6 - 0.2 * r:.1f},{s * 10 + t}\n"
       for s in range(2) for t in range(3) for la in range(3) for r in range(2)]
)
ROUTE = ("# route_trace v1\n# model=/m/toy.gguf arch=toy n_layer=3 n_expert=16 n_expert_used=2\n"
         "turn,phase,step,layer,slot,expert,weight,residency,expert_bytes\n"
         + "".join(f"0,{int(t >= 2)},{t},{la},{r},{(t * 3 + la * 5 + r * 11) % 16},{0.6 - 0.2 * r:.1f},0,1\n"
                   for t in range(4) for la in range(3) for r in range(2) if not (t < 1 and la == 2)))


def _jsonl(text: str) -> str:
    rows = list(csv.DictReader(io.StringIO(text)))
    out = []
    for r in rows:
        out.append(json.dumps({k: (v if k == "phase" else float(v) if k == "weight" else int(v)) for k, v in r.items()}))
    return "\n".join(out) + "\n"


def _oracle(kind: str, text: str) -> list[dict[str, object]]:
    """The damaged file read line by line with the standard library: one dict per routed expert."""
    if kind == "jsonl":
        rows = [json.loads(line) for line in text.split("\n") if line.strip()]
        rows = [{k: str(v) for k, v in r.items()} for r in rows]
    else:
        body = [line for line in text.split("\n") if line.strip() and not line.startswith("#")]
        rows = list(csv.DictReader(io.StringIO("\n".join(body))))
    out = []
    for r in rows:
        phase = {"prefill": 0, "0": 0, "decode": 1, "1": 1}[r["phase"].strip().lower()]
        seq = int(r["turn" if kind == "route" else "seq"])
        out.append({"seq": seq, "step": int(r["step"]), "phase": phase, "layer": int(r["layer"]),
                    "expert": int(r["expert"]), "weight": float(r.get("weight") or 0),
                    "slot": int(r["slot"]) if kind == "route" else None, "token": r.get("token")})
    return out


def _check_against_oracle(kind: str, text: str, tokens: dict[str, np.ndarray]) -> None:
    rows = _oracle(kind, text)
    keys = sorted({(r["seq"], r["step"]) for r in rows})
    assert tokens["seq_id"].tolist() == [k[0] for k in keys] and tokens["position"].tolist() == [k[1] for k in keys]
    ids, w = tokens["topk_ids"], tokens["topk_weights"]
    assert int((ids >= 0).sum()) == len(rows), "an access was dropped or invented"
    rank: dict[tuple[int, int, int], int] = {}
    for r in rows:
        t = keys.index((r["seq"], r["step"]))
        g = (r["seq"], r["step"], r["layer"])
        k = r["slot"] if kind == "route" else rank.get(g, 0)
        rank[g] = rank.get(g, 0) + 1
        assert ids[t, r["layer"], k] == r["expert"] and w[t, r["layer"], k] == np.float32(r["weight"])
        assert tokens["phase"][t] == r["phase"]
        if r["token"] not in (None, ""):
            assert tokens["token_id"][t] == int(r["token"])


@pytest.mark.parametrize("blocks", ["whole", "streamed"])
@pytest.mark.parametrize("kind", ["csv", "jsonl", "route"])
def test_fuzz_import_files(kind, blocks, tmp_path, monkeypatch):
    """``streamed``: read in 61-byte blocks, checked in groups of about 5 rows (every sequence its own group)."""
    if blocks == "streamed":
        monkeypatch.setattr(imp, "BLOCK_BYTES", 61)
        monkeypatch.setattr(imp, "GROUP_ROWS", 5)
    text = {"csv": GENERIC, "jsonl": _jsonl(GENERIC), "route": ROUTE}[kind]
    path = tmp_path / ("r.jsonl" if kind == "jsonl" else "r.csv")

    def parse(p: Path):
        return imp.parse_route_trace(p) if kind == "route" else imp.parse_generic(p, "m", None)

    def whole_error(p: Path) -> str | None:
        """The error of a whole-file reading (None: it imports), to compare the streamed one with."""
        with monkeypatch.context() as mp:
            mp.setattr(imp, "BLOCK_BYTES", 1 << 20)
            mp.setattr(imp, "GROUP_ROWS", 1 << 20)
            try:
                parse(p)
            except UserError as e:
                return str(e)
        return None

    path.write_text(text)
    _check_against_oracle(kind, text, parse(path)[1])  # the undamaged file imports as read
    outcomes = {"imported": 0, "error": 0}
    for case in range(CASES // 3):
        rng = np.random.default_rng(1000 + case)
        lines = text.splitlines(keepends=True)
        what = int(rng.integers(0, 5))
        if what == 0:  # one byte replaced (any byte, or a character a CSV cares about)
            at = int(rng.integers(0, len(text)))
            char = rng.choice([chr(int(rng.integers(0, 256))), *list(',"\n\r0123456789.-e{}[]: ')])
            damaged = text[:at] + char + text[at + 1:]
        elif what == 1:
            damaged = text[: int(rng.integers(1, len(text)))]
        elif what == 2:
            i = int(rng.integers(1, len(lines)))
            damaged = "".join(lines[: i + 1] + [lines[i]] + lines[i + 1:])
        elif what == 3:
            i = int(rng.integers(1, len(lines)))
            damaged = "".join(lines[:i] + lines[i + 1:])
        else:
            i = int(rng.integers(1, len(lines) - 1))
            damaged = "".join(lines[:i] + [lines[i + 1], lines[i]] + lines[i + 2:])
        path.write_bytes(damaged.encode("utf-8", "surrogateescape"))
        try:
            info, tokens = parse(path)
        except UserError as e:
            assert "\n" not in str(e), (case, repr(damaged))
            if blocks == "streamed":  # the same fault named, though checked block by block and group by group
                assert str(e) == whole_error(path), (case, repr(damaged))
            outcomes["error"] += 1
            continue
        except Exception as e:  # noqa: BLE001 -- the point: nothing else may escape
            pytest.fail(f"{kind} case {case}: {type(e).__name__}: {e}\n{damaged!r}")
        try:
            _check_against_oracle(kind, damaged, tokens)
        except (AssertionError, ValueError, KeyError, json.JSONDecodeError) as e:
            pytest.fail(f"{kind} case {case} imported something other than what the file says ({e!r}):\n{damaged!r}")
        outcomes["imported"] += 1
    assert outcomes["error"] > 0 and outcomes["imported"] > 0, outcomes
    print(f"{kind} fuzz: {outcomes}")
