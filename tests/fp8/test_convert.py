"""convert_to_fp8 on a tiny CausalLM: which layers, parameters untouched, loss close to the
high-precision model's, clear errors."""

import copy

import pytest
import torch
from torch import nn

import nanoseek.fp8.grouped as grouped_mod
from nanoseek.fp8 import FP8Linear, convert_to_fp8, fp8_experts_hook
from nanoseek.model.moe import RoutedExperts
from tests.helpers import random_model, tiny_config

ATTN = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
FFN = ["gate_proj", "up_proj", "down_proj"]


def _expected_converted(cfg):
    names = []
    blocks = [f"model.layers.{i}" for i in range(cfg.num_hidden_layers)]
    blocks += [f"mtp.{k}" for k in range(cfg.num_nextn_predict_layers)]
    for i, blk in enumerate(blocks):
        names += [f"{blk}.self_attn.{p}" for p in ATTN]
        dense = i < cfg.first_k_dense_replace
        names += [f"{blk}.mlp.{p}" if dense else f"{blk}.mlp.shared_experts.{p}" for p in FFN]
    return names


def _loss(model, ids):
    return model(ids, labels=ids).loss


def test_converts_the_recipes_layers_and_keeps_the_rest():
    cfg = tiny_config()
    model = random_model(cfg)
    report = convert_to_fp8(model, backend="emulated")
    linears = sorted(n for n in report.converted if "experts (" not in n)
    assert linears == sorted(_expected_converted(cfg))
    for name in linears:
        assert isinstance(model.get_submodule(name), FP8Linear)
    kept = dict(report.kept)
    assert "embedding" in kept["model.embed_tokens"]
    assert "output head" in kept["lm_head"]
    assert "MoE gate" in kept["model.layers.1.mlp.gate"]
    assert "norm" in kept["model.norm"] and "norm" in kept["model.layers.0.input_layernorm"]
    assert "softmax" in kept["model.layers.0.self_attn.<core>"]
    assert "eh_proj" in kept["mtp.0.eh_proj"]
    assert type(model.lm_head) is nn.Linear and type(model.mtp[0].eh_proj) is nn.Linear
    # routed experts: hooked; counted as converted once RoutedExperts reads linear_fn
    for name, m in model.named_modules():
        if isinstance(m, RoutedExperts):
            assert m.linear_fn.func is grouped_mod.fp8_grouped_linear
            assert f"{name} (routed experts, linear_fn)" in report.converted or name in kept
    text = str(report)
    assert "fp8   model.layers.*.self_attn.q_a_proj (x3)" in text
    assert "keep  lm_head: output head" in text
    # converting twice changes nothing
    again = convert_to_fp8(model, backend="emulated")
    assert sorted(n for n in again.converted if "experts (" not in n) == linears


def test_parameters_state_dict_and_optimizer_are_untouched():
    model = random_model(tiny_config())
    params = dict(model.named_parameters())
    sd = {k: (v.dtype, v.shape) for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # built before the conversion
    convert_to_fp8(model, backend="emulated", convert_eh_proj=True)
    assert isinstance(model.mtp[0].eh_proj, FP8Linear)
    assert {k: (v.dtype, v.shape) for k, v in model.state_dict().items()} == sd
    assert all(p is params[n] for n, p in model.named_parameters())  # same objects
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    before = model.model.layers[0].self_attn.q_a_proj.weight.detach().clone()
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model.train()
    _loss(model, ids).backward()
    opt.step()
    assert not torch.equal(model.model.layers[0].self_attn.q_a_proj.weight, before)
    # a full-precision state dict loads straight back in (checkpoints stay as they were)
    model.load_state_dict(random_model(tiny_config(), seed=1).state_dict())


def test_loss_and_gradients_close_to_the_high_precision_model(monkeypatch):
    """All GEMMs of the recipe in FP8, experts included (the experts through the same function
    the linear_fn hook installs): loss within 1% of fp32 on a random tiny model and gradients
    pointing the same way. Random weights are e4m3's worst case (~3.6% error per GEMM, errors
    uncorrelated), and they compound over ~20 chained GEMMs: measured loss 0.13%, gradient
    cosine 0.976 (relative error ~20%; bf16 autocast: ~1%). The <0.25% training-loss criterion of V3 is about smoothed training
    curves, checked by the experiment script, not here. std 0.05: with random_model's default
    0.15 the logits are so large that one flipped expert choice moves the loss by ~1.5%."""
    cfg = tiny_config()
    ref = random_model(cfg, std=0.05).train()
    model = copy.deepcopy(ref)
    ids = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    loss_ref = _loss(ref, ids)
    loss_ref.backward()

    calls = []  # count expert weight quantisations: proof the experts ran in FP8
    real_quant = grouped_mod.quantize_128x128
    monkeypatch.setattr(
        grouped_mod,
        "quantize_128x128",
        lambda w, p=False: calls.append(w.shape) or real_quant(w, p),
    )
    convert_to_fp8(model, backend="emulated")
    loss = _loss(model, ids)
    loss.backward()
    assert len(calls) == 2 * len(model.moe_layers())  # gate_up and down of every MoE
    assert abs(loss.item() - loss_ref.item()) / loss_ref.item() < 0.01
    g = torch.cat([p.grad.flatten() for p in model.parameters()])
    g_ref = torch.cat([p.grad.flatten() for p in ref.parameters()])
    assert torch.isfinite(g).all()
    cos = nn.functional.cosine_similarity(g, g_ref, 0).item()
    print(
        f"fp8 vs fp32: loss rel {abs(loss.item() - loss_ref.item()) / loss_ref.item():.2e}, grad cos {cos:.5f}"
    )
    assert cos > 0.95


def test_autocast_bf16_training_step_runs():
    model = random_model(tiny_config()).train()
    convert_to_fp8(model, backend="emulated")
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss(model, ids)
    loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)


@pytest.mark.filterwarnings("ignore:Initializing zero-element")
def test_layers_that_cannot_train_in_fp8_fail_by_name_before_any_swap():
    model = random_model(tiny_config())
    model.model.layers[1].self_attn.o_proj = nn.Linear(0, 64, bias=False)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.o_proj.*empty"):
        convert_to_fp8(model, backend="emulated")
    assert not any(isinstance(m, FP8Linear) for m in model.modules())  # nothing half-done

    model = random_model(tiny_config())
    w = model.model.layers[0].mlp.up_proj.weight
    w.data = w.data.to(torch.float8_e4m3fn)  # an FP8 checkpoint tensor loaded as is
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj.*float8_e4m3fn"):
        convert_to_fp8(model, backend="emulated")


def test_backend_errors():
    model = random_model(tiny_config())
    with pytest.raises(ValueError, match="must be one of"):
        convert_to_fp8(model, backend="fp4")
    with pytest.raises(ValueError, match="cuda_blockwise.*cannot run here"):
        convert_to_fp8(model, backend="cuda_blockwise")
    report = convert_to_fp8(model)  # auto on this machine's device
    assert report.backend.startswith("auto -> ")


def test_experts_hook_alone():
    model = random_model(tiny_config())
    names = fp8_experts_hook(model, backend="emulated", pow2_scales=True)
    assert names == [
        "model.layers.1.mlp.experts",
        "model.layers.2.mlp.experts",
        "mtp.0.mlp.experts",
    ]
    fn = model.model.layers[1].mlp.experts.linear_fn
    assert fn.keywords["pow2_scales"] is True and fn.keywords["backend"].name == "emulated"
