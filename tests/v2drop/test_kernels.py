"""The static step's fused RMSNorm and one-pass rotary are transformers' RMSNorm and rotary,
swapped in only while the step runs, and the step then launches fewer kernels."""

from __future__ import annotations

import sys

import pytest
import torch

from bench import op_counts
from v2drop import fused_projections, kernels
from v2drop.adapters import adapter_for
from vlm import testing as models

FAMILIES = ["qwen2_5_vl", "qwen3_vl", "llava_onevision"]
NUM_LAYERS = 2


def _text_model(family: str):
    model = models.model(family, num_layers=NUM_LAYERS)
    return model, adapter_for(model).text_model(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_text_norm_is_found_and_put_back(family):
    model, text_model = _text_model(family)
    norms = kernels.rms_norms(text_model)
    per_layer = 4 if family == "qwen3_vl" else 2  # Qwen3: q_norm and k_norm too
    assert len(norms) == NUM_LAYERS * per_layer + 1
    assert text_model.norm in norms and text_model.layers[0].input_layernorm in norms
    with pytest.raises(RuntimeError, match="inside"):
        with kernels.fused_rms_norms(text_model):
            assert all(n.forward.func is kernels.fused_rms_norm for n in norms)
            raise RuntimeError("inside")
    assert all("forward" not in n.__dict__ for n in norms)  # the class's forward again


def test_each_step_fuses_a_norm_with_the_same_callable():
    """torch.compile guards on the norms' forward objects: new ones at each call's step made torch
    2.11 recompile the compiled step on every call (its guard saw the old ones deallocated)."""
    _, text_model = _text_model("qwen2_5_vl")
    norm = text_model.layers[0].input_layernorm
    with kernels.fused_rms_norms(text_model):
        first = norm.forward
    assert "forward" not in norm.__dict__
    with kernels.fused_rms_norms(text_model):
        assert norm.forward is first and kernels.is_fused(norm)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_fused_norm_is_transformers_norm(family):
    """float32: the same bits (torch decomposes it into transformers' operations on CPU). bf16:
    within one unit in the last place (one rounding where transformers has two)."""
    _, text_model = _text_model(family)
    norm = kernels.rms_norms(text_model)[0]
    with torch.no_grad():
        norm.weight.copy_(torch.randn_like(norm.weight))
        x = 3 * torch.randn(4, 5, norm.weight.shape[0])
        assert torch.equal(kernels.fused_rms_norm(norm, x), norm(x))
        norm.to(torch.bfloat16)
        stock, fused = norm(x.bfloat16()).float(), kernels.fused_rms_norm(norm, x.bfloat16()).float()
    ulp = torch.finfo(torch.bfloat16).eps * stock.abs()
    assert ((fused - stock).abs() <= ulp).all()
    assert not torch.equal(fused, stock)  # the rounding differs somewhere: the fused path ran


def test_a_weight_of_another_dtype_keeps_transformers_promotion():
    _, text_model = _text_model("qwen2_5_vl")
    norm = kernels.rms_norms(text_model)[0]
    x = torch.randn(2, norm.weight.shape[0]).bfloat16()
    with torch.no_grad():
        out = kernels.fused_rms_norm(norm, x)  # float32 weight, bf16 input
    assert out.dtype == torch.float32 and torch.equal(out, norm(x))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_the_static_step_launches_one_kernel_per_norm_one_rotary_pass_per_layer_and_one_sign_per_step(family):
    model, text_model = _text_model(family)
    visual = models.Visual("video", (2, 8, 8))
    inputs = models.batch(family, [models.Sample("Describe.", visual)])
    counts = op_counts.static_step_counts(model, inputs).by_op
    norms = len(kernels.rms_norms(text_model))
    if op_counts.FUSED_ON_CUDA:  # this torch has the CUDA kernel (the lock's build does)
        assert counts["aten._fused_rms_norm"] == norms and "aten.rsqrt" not in counts
    else:
        assert counts["aten.rsqrt"] == norms
    assert counts["aten.neg"] == 1  # sin's signed copy, once per step, not rotate_half's in each layer
    assert counts["aten.roll"] == NUM_LAYERS  # q and k rotated in one pass per layer


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_one_pass_rotary_gives_transformers_bits(family, dtype):
    _, text_model = _text_model(family)
    module = sys.modules[type(text_model.layers[0].self_attn).__module__]
    theirs = module.apply_rotary_pos_emb
    gen = torch.Generator().manual_seed(1)
    q, k = (torch.randn(3, h, 5, 16, generator=gen).to(dtype) for h in (8, 2))
    cos, sin = (torch.randn(3, 5, 16, generator=gen).to(dtype) for _ in range(2))
    with kernels.rotary_in_one_pass_for(text_model):
        assert module.apply_rotary_pos_emb is kernels.rotary_in_one_pass
        ours = module.apply_rotary_pos_emb(q, k, cos, sin)
    assert module.apply_rotary_pos_emb is theirs
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs(q, k, cos, sin)))


def test_the_one_pass_rotary_takes_the_heads_where_cos_broadcasts():
    """[B, S, H, D] with unsqueeze_dim=2, as transformers' function allows."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    gen = torch.Generator().manual_seed(2)
    q, k = (torch.randn(3, 5, h, 16, generator=gen) for h in (8, 2))
    cos, sin = (torch.randn(3, 5, 16, generator=gen) for _ in range(2))
    ours, theirs = kernels.rotary_in_one_pass(q, k, cos, sin, 2), apply_rotary_pos_emb(q, k, cos, sin, 2)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_the_one_pass_rotary_signs_each_sin_it_is_given():
    """sin's signed copy is kept by identity: the next step's sin, or one seen two steps before,
    each gets its own."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    gen = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, h, 1, 16, generator=gen) for h in (8, 2))
    cos = torch.randn(2, 1, 16, generator=gen)
    sins = [torch.randn(2, 1, 16, generator=gen) for _ in range(3)]
    for sin in (sins[0], sins[0], sins[1], sins[2], sins[0], sins[1]):
        ours, theirs = kernels.rotary_in_one_pass(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_a_rotary_of_another_form_is_left_in_place(monkeypatch):
    """transformers' function computing something else (here: interleaved pairs) stays."""
    _, text_model = _text_model("qwen2_5_vl")
    module = sys.modules[type(text_model.layers[0].self_attn).__module__]

    def interleaved(q, k, cos, sin, unsqueeze_dim=1):
        def rotate(x):
            return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + rotate(q) * sin, k * cos + rotate(k) * sin

    monkeypatch.setattr(module, "apply_rotary_pos_emb", interleaved)
    with kernels.rotary_in_one_pass_for(text_model):
        assert module.apply_rotary_pos_emb is interleaved


def test_unfused_step_kernels_keep_transformers_norms_and_rotary():
    """fused=False (bench_model's static-unfused engine): only the attention is the step's."""
    _, text_model = _text_model("qwen2_5_vl")
    module = sys.modules[type(text_model.layers[0].self_attn).__module__]
    with kernels.step_kernels(text_model, fused=False):
        assert text_model.config._attn_implementation == kernels.ONE_TOKEN_SDPA
        assert module.apply_rotary_pos_emb is not kernels.rotary_in_one_pass
        assert all("forward" not in n.__dict__ for n in kernels.rms_norms(text_model))
    with kernels.step_kernels(text_model):
        assert module.apply_rotary_pos_emb is kernels.rotary_in_one_pass
        assert all(n.forward.func is kernels.fused_rms_norm for n in kernels.rms_norms(text_model))
    assert text_model.config._attn_implementation == "sdpa"


def test_a_norm_of_another_form_keeps_its_forward():
    """An RMSNorm with transformers' attributes but Gemma's `1 + weight` fails the probe."""
    _, text_model = _text_model("qwen2_5_vl")
    base = type(text_model.norm)

    class GemmaStyleRMSNorm(base):
        def forward(self, hidden):
            h = hidden.float()
            return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * (1 + self.weight)).to(hidden.dtype)

    odd = GemmaStyleRMSNorm(text_model.norm.weight.shape[0])
    text_model.add_module("odd_norm", odd)
    found = kernels.rms_norms(text_model)
    assert odd not in found and text_model.norm in found
    with kernels.fused_rms_norms(text_model):
        assert "forward" not in odd.__dict__


def test_a_float64_model_keeps_transformers_norms_and_does_not_decide_for_float32():
    """transformers' norm computes in float32 even on float64 (the runtime self-check's dtype), so
    float64 keeps its forward; that probe must not stand for the class in float32."""
    _, text_model = _text_model("qwen2_5_vl")
    norm = text_model.norm
    x = torch.randn(3, norm.weight.shape[0], dtype=torch.float64)
    norm.to(torch.float64)
    assert kernels.same_norm(norm)
    with torch.no_grad():
        assert torch.equal(kernels.fused_rms_norm(norm, x), norm(x))  # transformers' own
    norm.to(torch.float32)
    assert kernels.same_norm(norm) and norm in kernels.rms_norms(text_model)


@pytest.mark.parametrize("seq", [1, 5])
def test_the_one_pass_rotary_reads_adjacent_q_and_k_as_one_tensor(seq):
    """q and k as blocks of one q/k/v product (v2drop.fused_projections): one view, no
    concatenation, transformers' bits; a k elsewhere in memory is concatenated as before."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    gen = torch.Generator().manual_seed(4)
    qkv = torch.randn(3, seq, (8 + 2 + 2) * 16, generator=gen)
    q = qkv[..., :128].view(3, seq, 8, 16).transpose(1, 2)
    k = qkv[..., 128:160].view(3, seq, 2, 16).transpose(1, 2)
    cos, sin = (torch.randn(3, seq, 16, generator=gen) for _ in range(2))
    both = kernels.adjacent_heads(q, k, 1)
    assert both is not None and torch.equal(both, torch.cat((q, k), dim=1))
    assert kernels.adjacent_heads(q, k.clone(), 1) is None
    assert kernels.adjacent_heads(q, qkv[..., 160:].view(3, seq, 2, 16).transpose(1, 2), 1) is None  # v: not next to q
    with op_counts.OpCounter() as apart:
        kernels.rotary_in_one_pass(q, k.clone(), cos, sin)  # also makes sin's signed copy (a cat)
    with op_counts.OpCounter() as adjacent:
        ours = kernels.rotary_in_one_pass(q, k, cos, sin)
    assert apart.calls["aten.cat"] == 2 and "aten.cat" not in adjacent.calls
    assert all(torch.equal(a, b) for a, b in zip(ours, apply_rotary_pos_emb(q, k, cos, sin)))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_the_static_engines_prefill_runs_the_text_model_in_fewer_kernels(family):
    """generate_static's prefill (max_new_tokens=1: nothing else runs) with the norms, rotary and
    projections swapped, against the same prefill with transformers' (fused_kernels=False): per
    layer 3 GEMMs fewer and each text norm one kernel; the same first tokens."""
    from v2drop import static_decode

    model, text_model = _text_model(family)
    visual = models.Visual("video", (2, 8, 8))
    inputs = models.batch(family, [models.Sample("Describe.", visual), models.Sample("What happens here?", visual)])
    text_norms = len(kernels.rms_norms(text_model))  # also runs each class's probe (same_norm), once
    fused_projections.install(model)  # each MLP's probe (in_place_matches), once, before counting
    counts, firsts = [], []
    for fused in (True, False):
        with torch.no_grad(), op_counts.OpCounter() as counter:
            firsts.append(static_decode.generate_static(model, dict(inputs), 1, fused_kernels=fused))
        counts.append(counter.calls)
    gemms = [c["aten.mm"] + c["aten.addmm"] for c in counts]
    assert gemms[1] - gemms[0] == 3 * NUM_LAYERS
    if op_counts.FUSED_ON_CUDA:
        assert counts[0]["aten._fused_rms_norm"] - counts[1]["aten._fused_rms_norm"] == text_norms
        assert counts[1]["aten.rsqrt"] - counts[0]["aten.rsqrt"] == text_norms
    assert torch.equal(firsts[0], firsts[1])
