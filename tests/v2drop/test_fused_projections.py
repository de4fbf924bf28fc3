"""q/k/v and gate/up as one product each in the static step (v2drop.fused_projections): the weights
share one tensor per group without adding memory or changing the stock model, the step makes one
GEMM per group and no q/k concatenation, and every projection still returns its own output."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from bench import op_counts
from v2drop import fused_projections, kernels, static_decode
from v2drop.adapters import adapter_for
from vlm import testing as models

FAMILIES = ["qwen2_5_vl", "qwen3_vl", "llava_onevision"]
NUM_LAYERS = 4  # the default schedule's least


def _setup(family: str):
    model = models.model(family, num_layers=NUM_LAYERS)
    visual = models.Visual("video", (2, 0, 0) if family == "llava_onevision" else (2, 8, 8))
    inputs = models.batch(family, [models.Sample(q, visual) for q in ("Describe.", "What happens in this clip?")])
    return model, adapter_for(model).text_model(model), inputs


def _storage_bytes(model: nn.Module) -> int:
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return sum(storages.values())


def _generate(model, inputs, new_tokens: int = 6):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_install_shares_each_group_without_memory_and_the_stock_model_gives_the_same_bits(family):
    model, text_model, inputs = _setup(family)
    tokens, logits = _generate(model, inputs)
    names = [n for n, _ in model.named_parameters()]
    before = _storage_bytes(model)
    assert fused_projections.install(model) == 2 * NUM_LAYERS
    attention = text_model.layers[0].self_attn
    assert fused_projections.stacked([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]) is not None
    assert _storage_bytes(model) == before and [n for n, _ in model.named_parameters()] == names
    again_tokens, again_logits = _generate(model, inputs)
    assert torch.equal(again_tokens, tokens) and torch.equal(again_logits, logits)
    assert fused_projections.install(model) == 2 * NUM_LAYERS  # idempotent: nothing moves twice
    assert _storage_bytes(model) == before


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_the_step_makes_one_gemm_per_group_and_rotates_q_and_k_in_place_of_concatenating(family, monkeypatch):
    """Per layer: q/k/v, o, gate/up and down (4 GEMMs, not 7), plus the lm_head; q and k are
    adjacent blocks of one product, so the rotary reads them as one tensor: one aten.cat fewer per
    layer than the same step with transformers' projections."""
    model, _, inputs = _setup(family)
    fused = op_counts.static_step_counts(model, inputs)
    monkeypatch.setattr(kernels, "fused_projections", lambda text_model: _nothing())
    unfused = op_counts.static_step_counts(model, inputs)
    gemms = [c.by_op.get("aten.mm", 0) + c.by_op.get("aten.addmm", 0) for c in (fused, unfused)]
    assert gemms == [4 * NUM_LAYERS + 1, 7 * NUM_LAYERS + 1]
    assert unfused.by_op["aten.cat"] - fused.by_op.get("aten.cat", 0) == NUM_LAYERS
    kernel_calls = [op_counts.kernel_calls(c.by_op) for c in (fused, unfused)]
    assert kernel_calls[1] - kernel_calls[0] == 4 * NUM_LAYERS  # 3 GEMMs and 1 concatenation per layer


def test_qwen3_q_and_k_norms_keep_their_concatenation():
    """Qwen3-VL normalises q and k after the product: new tensors, not adjacent, so concatenated."""
    model, _, inputs = _setup("qwen3_vl")
    counts = op_counts.static_step_counts(model, inputs).by_op
    assert counts.get("aten.mm", 0) + counts.get("aten.addmm", 0) == 4 * NUM_LAYERS + 1
    assert counts["aten.cat"] >= NUM_LAYERS


@pytest.mark.parametrize("dropping", [False, True], ids=["stock", "v2drop"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_and_unfused_steps_give_the_same_logits(family, dropping, monkeypatch):
    """The step's logits with the groups fused against the same step with transformers'
    projections (fused_projections swapped for a no-op), float32, a padded batch."""
    import v2drop

    model, text_model, inputs = _setup(family)
    if dropping:
        v2drop.enable(model, v2drop.Schedule.for_retention(NUM_LAYERS, 0.25))
    tokens = static_decode.generate_static(model, inputs, 6)
    fused = static_decode.forced_logits(model, inputs, tokens)
    monkeypatch.setattr(kernels, "fused_projections", lambda text_model: _nothing())
    unfused = static_decode.forced_logits(model, inputs, tokens)
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)


class _nothing:
    def __enter__(self):
        return 0

    def __exit__(self, *exc):
        return False


def test_each_projection_returns_its_own_output_on_any_input():
    """k called on another tensor than q computes its own product; the forwards are put back and
    the groups hold no weights afterwards."""
    _, text_model, _ = _setup("qwen2_5_vl")
    attention = text_model.layers[1].self_attn
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randn(2, 1, text_model.config.hidden_size, generator=gen) for _ in range(2))
    with torch.no_grad():
        expected = [attention.q_proj(x), attention.k_proj(y), attention.v_proj(x), attention.k_proj(x)]
        with fused_projections.fused_projections(text_model) as groups:
            assert groups == 2 * NUM_LAYERS
            got = [attention.q_proj(x), attention.k_proj(y), attention.v_proj(x), attention.k_proj(x)]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    group = next(g for g in fused_projections.fused_groups(text_model) if attention.q_proj in g.linears)
    assert not group.active and group.weight is None and group.input is None and group.output is None
    with torch.no_grad():  # outside the context: transformers' Linear forward, the same bits
        assert torch.equal(attention.k_proj(y), torch.nn.functional.linear(y, attention.k_proj.weight, attention.k_proj.bias))


def test_a_context_inside_another_leaves_the_outer_one_fused():
    """generate_static holds fewer_kernels over the prefill and the steps; step_kernels inside it
    (forced_logits, op counts) must not switch the groups off when it closes."""
    _, text_model, _ = _setup("qwen2_5_vl")
    group = fused_projections.fused_groups(text_model)[0]
    with fused_projections.fused_projections(text_model) as outer:
        with fused_projections.fused_projections(text_model) as inner:
            assert inner == outer == 2 * NUM_LAYERS
        assert group.active and group.weight is not None
    assert not group.active and group.weight is None


def test_a_model_cast_after_sharing_is_shared_again_and_decodes_right():
    model, text_model, inputs = _setup("llava_onevision")
    fused_projections.install(model)
    model.to(torch.float64)  # every parameter a tensor of its own again
    mlp = text_model.layers[0].mlp
    assert fused_projections.stacked([mlp.gate_proj.weight, mlp.up_proj.weight]) is None
    expected, _ = _generate(model, inputs)
    tokens = static_decode.generate_static(model, inputs, 6)
    assert tokens.tolist() == expected[:, inputs["input_ids"].shape[1]:].tolist()
    assert fused_projections.stacked([mlp.gate_proj.weight, mlp.up_proj.weight]) is not None


def test_a_projection_that_is_not_a_plain_linear_leaves_its_group_alone():
    class Adapted(nn.Linear):  # e.g. a LoRA or quantized layer: its forward is its own
        pass

    _, text_model, _ = _setup("qwen2_5_vl")
    attention = text_model.layers[0].self_attn
    old = attention.v_proj
    attention.v_proj = Adapted(old.in_features, old.out_features, bias=True)
    groups = fused_projections.projection_groups(text_model)
    assert len(groups) == 2 * NUM_LAYERS - 1 and all(attention.v_proj not in g for g in groups)


def test_sharing_under_inference_mode_leaves_ordinary_parameters():
    """The model stage decodes under torch.inference_mode: parameters made there must still take
    an in-place load afterwards (inference tensors refuse it outside the mode)."""
    model, text_model, _ = _setup("qwen3_vl")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        fused_projections.install(model)
    assert not any(p.is_inference() for p in model.parameters())
    model.load_state_dict(state)  # copies into the shared blocks in place
    mlp = text_model.layers[2].mlp
    assert fused_projections.stacked([mlp.gate_proj.weight, mlp.up_proj.weight]) is not None


def test_entering_checks_the_weights_again_only_where_they_moved(monkeypatch):
    """Each call enters the context (host time per call): a group whose weights lie where they
    were stacked last time is stacked again without the full check; a cast model is checked."""
    model, text_model, _ = _setup("llava_onevision")
    fused_projections.install(model)
    checks: list[int] = []
    real = fused_projections.stacked
    monkeypatch.setattr(fused_projections, "stacked", lambda tensors: checks.append(1) or real(tensors))
    with fused_projections.fused_projections(text_model) as fused:
        assert fused == 2 * NUM_LAYERS
    assert checks == []
    model.to(torch.float64)
    with fused_projections.fused_projections(text_model) as fused:
        assert fused == 2 * NUM_LAYERS
    assert len(checks) >= 2 * NUM_LAYERS


class _Outputs(TorchDispatchMode):
    """The shape of every tensor an aten op allocates: not views (bench.op_counts.VIEW_OPS), nor
    in-place ops (names ending in '_')."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if isinstance(out, torch.Tensor) and not name.endswith("_") and f"aten.{name}" not in op_counts.VIEW_OPS:
            self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("family", FAMILIES)
def test_the_fused_mlp_holds_one_product_and_gives_transformers_bits(family):
    """While the group is active each text MLP allocates the one [tokens, 2 * intermediate] gate/up
    product and nothing of the intermediate width besides (transformers' forward over the same
    product adds silu(gate) and silu(gate) * up), with the same bits as transformers' forward."""
    model, text_model, _ = _setup(family)
    fused_projections.install(model)
    mlps = [layer.mlp for layer in text_model.layers]
    assert all(mlp.forward.func is fused_projections.gated_mlp_in_place for mlp in mlps)
    mlp = mlps[0]
    width = mlp.gate_proj.out_features
    x = torch.randn(5, 7, mlp.gate_proj.in_features)
    with torch.no_grad():
        own = type(mlp).forward(mlp, x)
        with fused_projections.fused_projections(text_model):
            with _Outputs() as outputs:
                fused = mlp(x)
    assert torch.equal(fused, own)
    assert [s for s in outputs.shapes if s[-1] in (width, 2 * width)] == [(5 * 7, 2 * width)]


def test_an_mlp_unlike_transformers_gated_silu_keeps_its_own_forward():
    model, text_model, _ = _setup("qwen2_5_vl")
    text_model.layers[1].mlp.act_fn = nn.GELU()  # down(gelu(gate) * up): the in-place silu would differ
    fused_projections.install(model)
    forwards = [layer.mlp.forward for layer in text_model.layers]
    assert getattr(forwards[1], "func", None) is not fused_projections.gated_mlp_in_place
    assert all(f.func is fused_projections.gated_mlp_in_place for i, f in enumerate(forwards) if i != 1)


def test_the_mlp_writes_in_place_only_into_a_product_no_projection_will_serve_again():
    """A projection replaced after install (an adapter's wrapper, say) leaves the group holding the
    product for the next call on the same input: the MLP then computes out of place, and a second
    call on that tensor gives the same output."""
    model, text_model, _ = _setup("qwen2_5_vl")
    fused_projections.install(model)
    mlp = text_model.layers[0].mlp
    replaced = nn.Linear(mlp.up_proj.in_features, mlp.up_proj.out_features, bias=False)
    replaced.weight = mlp.up_proj.weight
    mlp.up_proj = replaced  # its own forward; gate_proj still serves a block of the group's product
    x = torch.randn(3, mlp.gate_proj.in_features)
    with torch.no_grad():
        own = type(mlp).forward(mlp, x)
        with fused_projections.fused_projections(text_model):
            first, second = mlp(x), mlp(x)
    assert torch.equal(first, own) and torch.equal(second, own)
