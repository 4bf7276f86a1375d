"""olmoe-mini pretraining: the corpus split, packing, the losses, and a few steps of a tiny shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data_pipeline.corpus import SOURCES, Document, documents, split_documents
from data_pipeline.models import load_model
from data_pipeline.pretrain import (
    FusedLinearCrossEntropy,
    PretrainConfig,
    balance_loss,
    build_model,
    lm_losses,
    lr_factor,
    pack,
    pretrain,
    router_z_loss,
)


def test_corpus_reads_every_source_and_splits_by_document_deterministically() -> None:
    docs = documents()
    assert {d.source for d in docs} == set(SOURCES) and len(docs) > 40_000
    assert len({d.text for d in docs}) == len(docs)  # each text once
    parts = split_documents(docs)
    again = split_documents(tuple(reversed(docs)))  # order of the sources does not move a document
    assert all([d.text for d in parts[k]] == [d.text for d in again[k]] for k in parts)
    texts = {k: {d.text for d in v} for k, v in parts.items()}
    assert not (texts["train"] & texts["test"]) and not (texts["train"] & texts["val"])
    assert sum(map(len, texts.values())) == len(docs)
    assert 0.08 < len(texts["test"]) / len(docs) < 0.12  # test_fraction 0.1 of the hash range
    assert len({d.source for d in parts["test"][:200]}) >= 8  # ordered by hash: the sources are mixed


def test_split_follows_the_text_hash() -> None:
    docs = [Document("x", f"text {i}") for i in range(200)]
    parts = split_documents(docs, test_fraction=0.25, val_fraction=0.25)
    assert all(d.unit < 0.25 for d in parts["test"]) and all(0.25 <= d.unit < 0.5 for d in parts["val"])
    assert all(d.unit >= 0.5 for d in parts["train"])


def test_pack_appends_eos_and_cuts_blocks() -> None:
    blocks = pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_len=4, eos=0)
    assert blocks.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert pack([[1]], seq_len=4, eos=0).shape == (0, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_cross_entropy_matches_the_plain_loss(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    h = torch.randn(70, 16, requires_grad=True)
    w = torch.randn(300, 16, requires_grad=True)
    y = torch.randint(0, 300, (70,))
    ref = F.cross_entropy(h @ w.T, y)
    gh, gw = torch.autograd.grad(3 * ref, (h, w))
    out = FusedLinearCrossEntropy.apply(h, w, y, 16, dtype)  # 16 does not divide 70: a short last chunk
    fh, fw = torch.autograd.grad(3 * out, (h, w))
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(fh, gh, rtol=tol, atol=tol * gh.abs().max().item())
    torch.testing.assert_close(fw, gw, rtol=tol, atol=tol * gw.abs().max().item())


def test_balance_loss_is_hf_per_layer_and_z_loss_is_logsumexp_squared() -> None:
    # transformers: ~3 s to import; only this test
    from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

    torch.manual_seed(0)
    a, b = torch.randn(50, 8), torch.randn(50, 8) * 3
    per_layer = (load_balancing_loss_func((a,), 8, 2) + load_balancing_loss_func((b,), 8, 2)) / 2
    torch.testing.assert_close(balance_loss((a, b), 8, 2), per_layer)
    # decisive routers: every expert equally used scores top_k (HF's scale); all tokens on two scores E
    balanced, collapsed = torch.full((64, 8), -10.0), torch.full((64, 8), -10.0)
    rows = torch.arange(64)
    balanced[rows, (2 * rows) % 8] = balanced[rows, (2 * rows + 1) % 8] = 10.0
    collapsed[:, :2] = 10.0
    assert balance_loss((balanced,), 8, 2) == pytest.approx(2.0, abs=1e-3)
    assert balance_loss((collapsed,), 8, 2) == pytest.approx(8.0, abs=1e-3)
    z = router_z_loss((a, b))
    torch.testing.assert_close(z, (torch.logsumexp(a, -1).pow(2).mean() + torch.logsumexp(b, -1).pow(2).mean()) / 2)


def test_lm_losses_cross_entropy_is_hf_causal_lm_loss() -> None:
    cfg = PretrainConfig(layers=2, experts=4, top_k=2, hidden=16, expert_intermediate=8, heads=2, seq_len=12)
    model = build_model(cfg).eval()
    x = torch.randint(0, 50000, (2, 12))
    with torch.no_grad():
        ours = lm_losses(model, x)
        hf = model(input_ids=x, labels=x, output_router_logits=True)
    torch.testing.assert_close(ours["ce"], hf.loss - cfg.aux_loss_coef * hf.aux_loss, rtol=1e-5, atol=1e-5)


def test_schedule_warms_up_then_decays_to_the_floor() -> None:
    cfg = PretrainConfig(steps=100, warmup=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0) and lr_factor(100, cfg) == pytest.approx(0.1)
    assert lr_factor(55, cfg) == pytest.approx(0.55)


def test_a_few_steps_of_a_tiny_shape_save_a_loadable_model(tmp_path: Path) -> None:
    out = tmp_path / "mini"
    cfg = PretrainConfig(out=str(out), run_dir=str(tmp_path / "run"), layers=2, experts=8, top_k=2, hidden=32,
                         expert_intermediate=16, heads=2, seq_len=32, batch_size=4, steps=4, warmup=1, val_every=2,
                         val_blocks=4, max_docs=30, wandb="disabled", print_every=2)
    record = pretrain(cfg)
    assert record["steps"] == 4 and record["train_tokens"] == 4 * 4 * 32 and record["threads"] == 1
    assert record["best_val_loss"] < 11.0  # ln(50304) = 10.83 at init: it learned something in 4 steps
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "training.json"} <= files
    saved = json.loads((out / "config.json").read_text())
    assert saved["num_experts"] == 8 and saved["num_experts_per_tok"] == 2 and saved["tie_word_embeddings"]
    assert saved["dtype"] == "bfloat16" and json.loads((out / "training.json").read_text())["steps"] == 4
    loaded = load_model(str(out))
    assert loaded.info.num_layers == 2 and loaded.info.num_experts == 8 and loaded.info.top_k == 2
    assert loaded.tokenizer.eos_token_id == 50279 and len(loaded.tokenizer) == 50280
    with torch.no_grad():
        logits = loaded.model(input_ids=torch.tensor([[100, 200, 300]])).logits
    assert torch.isfinite(logits).all()
