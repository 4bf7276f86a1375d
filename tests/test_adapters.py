"""Adapters reproduce each family's routing and expert math exactly (tiny seeded configs, eager experts)."""

from __future__ import annotations

import pytest
import torch

from core.errors import UserError
from data_pipeline.adapters import ADAPTERS, get_adapter
from data_pipeline.models import build_tiny_olmoe


def tiny_mixtral(seed: int = 0):
    # transformers: ~3 s for these model classes; only this family's tests
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=128,
        initializer_range=0.1, experts_implementation="eager",
    )
    torch.manual_seed(seed)
    return MixtralForCausalLM(cfg).eval()


def tiny_qwen2_moe(seed: int = 0):
    # transformers: ~3 s for these model classes; only this family's tests
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=80, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        num_experts=12, num_experts_per_tok=3, norm_topk_prob=False, mlp_only_layers=[1],
        max_position_embeddings=128, initializer_range=0.1, experts_implementation="eager",
    )
    torch.manual_seed(seed)
    return Qwen2MoeForCausalLM(cfg).eval()


def tiny_olmoe(seed: int = 0):
    return build_tiny_olmoe(seed, num_hidden_layers=3, vocab_size=512)


BUILDERS = {"olmoe": tiny_olmoe, "mixtral": tiny_mixtral, "qwen2_moe": tiny_qwen2_moe}


@pytest.fixture(scope="module", params=list(BUILDERS))
def family_model(request):
    return request.param, BUILDERS[request.param]()


def _moe_inputs(model, adapter, n_tokens: int = 12, seed: int = 1):
    """Run the model once; return {moe layer: (T, H) input of the block} and the model output."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, model.config.vocab_size, (2, n_tokens // 2), generator=g)
    got: dict[int, torch.Tensor] = {}
    hooks = [
        adapter.moe_block(i).register_forward_pre_hook(
            lambda mod, args, i=i: got.__setitem__(i, args[0].detach().reshape(-1, adapter.hidden_size))
        )
        for i in range(adapter.num_layers)
    ]
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_router_logits=True)
    finally:
        for h in hooks:
            h.remove()
    return got, out


def test_structure(family_model):
    family, model = family_model
    ad = get_adapter(model)
    assert ad.family == family
    cfg = model.config
    assert ad.top_k == cfg.num_experts_per_tok
    assert ad.hidden_size == cfg.hidden_size
    if family == "qwen2_moe":
        assert ad.moe_layer_indices == [0, 2, 3]  # layer 1 is dense (mlp_only_layers)
        assert ad.num_experts == cfg.num_experts
        assert ad.moe_intermediate_size == cfg.moe_intermediate_size
    else:
        assert ad.moe_layer_indices == list(range(cfg.num_hidden_layers))
        assert ad.moe_intermediate_size == cfg.intermediate_size
    assert ad.num_layers == len(ad.moe_layer_indices)
    assert ad.norm_topk_prob == (True if family == "mixtral" else cfg.norm_topk_prob)
    for i in range(ad.num_layers):
        assert ad.router_weight(i).shape == (ad.num_experts, ad.hidden_size)
        p = ad.expert_params(i, ad.num_experts - 1)
        assert p["gate_up_proj"].shape == (2 * ad.moe_intermediate_size, ad.hidden_size)
        assert p["down_proj"].shape == (ad.hidden_size, ad.moe_intermediate_size)
        assert p["down_proj"].data_ptr() == ad.experts_module(i).down_proj[ad.num_experts - 1].data_ptr()  # a view
    assert ad.expert_bytes("bf16") == 3 * ad.hidden_size * ad.moe_intermediate_size * 2
    assert ad.expert_bytes(torch.float32) == 3 * ad.hidden_size * ad.moe_intermediate_size * 4
    info = ad.model_info("x", dtype="bfloat16")
    assert (info.num_layers, info.num_experts, info.top_k, info.family) == (ad.num_layers, ad.num_experts, ad.top_k, family)
    assert info.expert_bytes == ad.expert_bytes("bf16") and info.dtype == "bfloat16"


def test_route_equals_block_router(family_model):
    _, model = family_model
    ad = get_adapter(model)
    inputs, out = _moe_inputs(model, ad)
    for i in range(ad.num_layers):
        logits, weights, ids = ad.router_module(i)(inputs[i])
        r = ad.route(i, inputs[i])
        assert torch.equal(r.logits, logits)
        assert torch.equal(r.ids, ids)
        assert torch.equal(r.weights, weights)
        assert r.weights.dtype == weights.dtype
        # and the model's own output_router_logits (no padding here)
        assert torch.equal(out.router_logits[i], r.logits)


def test_combine_rebuilds_block_output(family_model):
    family, model = family_model
    ad = get_adapter(model)
    inputs, _ = _moe_inputs(model, ad)
    for i in range(ad.num_layers):
        x = inputs[i]
        with torch.no_grad():
            want = ad.moe_block(i)(x.unsqueeze(0)).squeeze(0)
            got = ad.combine(i, x)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        assert (ad.shared_forward(i, x) is not None) == (family == "qwen2_moe")


def test_route_bf16_matches_router():
    model = tiny_olmoe().to(torch.bfloat16)
    ad = get_adapter(model)
    inputs, _ = _moe_inputs(model, ad)
    logits, weights, ids = ad.router_module(1)(inputs[1])
    r = ad.route(1, inputs[1])
    assert r.weights.dtype == torch.bfloat16
    assert torch.equal(r.logits, logits) and torch.equal(r.ids, ids) and torch.equal(r.weights, weights)


def test_norm_topk_prob_respected():
    model = build_tiny_olmoe(0, num_hidden_layers=2, vocab_size=512, norm_topk_prob=True)
    ad = get_adapter(model)
    assert ad.norm_topk_prob
    x = torch.randn(5, ad.hidden_size)
    r = ad.route(0, x)
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(5))
    assert torch.equal(r.weights, ad.router_module(0)(x)[1])


def test_unsupported_family_names_supported_ones():
    # transformers: ~3 s for these model classes; only this family's tests
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(UserError) as e:
        get_adapter(model)
    msg = str(e.value)
    assert "llama" in msg and all(f in msg for f in ADAPTERS) and "\n" not in msg
