"""The batched vision attention equals the stock per-segment loop, on ragged windows too.

Grids in patches; Qwen2.5-VL windows are 8x8 patches, so (2, 12, 20) has windows of 64, 32 and
16 patches (right edge, bottom edge, corner), and two videos of different sizes give full-attention
segments of different lengths. A tower of 4 blocks with full attention in blocks 1 and 3.
"""

from __future__ import annotations

import sys

import pytest
import torch

from bench.op_counts import FUSED_ON_CUDA, OpCounter
from v2drop import kernels, vision
from vlm import testing as models
from vlm import tiny
from vlm.families import FAMILIES

GRIDS = {
    "one-video-even-windows": [(2, 16, 16)],
    "ragged-windows": [(2, 12, 20)],
    "two-videos-two-sizes": [(4, 12, 20), (2, 16, 16)],
    "tiny-image-single-window": [(1, 4, 6)],
}


def _tower(family: str, attn: str = "sdpa"):
    config = tiny.build_config(family, models.tokenizer(family), vision_depth=4)
    if family == "qwen2_5_vl":
        config.vision_config.fullatt_block_indexes = [1, 3]
    model = tiny.build_model(config, seed=1)
    for sub in (model.config, model.config.vision_config, model.config.text_config):
        sub._attn_implementation = attn
    return model


def _encode(model, grids) -> torch.Tensor:
    patches = sum(t * h * w for t, h, w in grids)
    family = model.config.model_type
    pixels = torch.randn(patches, FAMILIES[family].patch_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.model.get_video_features(pixels, torch.tensor(grids), return_dict=True)
    return torch.cat(list(out.pooler_output))


@pytest.mark.parametrize("grids", list(GRIDS.values()), ids=list(GRIDS))
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_batched_tower_equals_stock_tower(family, grids):
    model = _tower(family)
    stock = _encode(model, grids)
    assert vision.install(model) == 4
    fast = _encode(model, grids)
    torch.testing.assert_close(fast, stock, atol=1e-5, rtol=1e-5)
    vision.uninstall(model)
    torch.testing.assert_close(_encode(model, grids), stock, atol=0, rtol=0)


def test_batched_tower_makes_a_few_attention_calls_not_one_per_window():
    model = _tower("qwen2_5_vl")
    grids = [(2, 12, 20)]  # 2 frames x 6 windows per frame = 12 windows in 3 sizes
    with OpCounter() as stock:
        _encode(model, grids)
    vision.install(model)
    with OpCounter() as fast:
        _encode(model, grids)
    assert _attention_calls(stock) == 2 * 12 + 2 * 2  # 2 window blocks x 12 windows, 2 full blocks x 2 frames
    assert _attention_calls(fast) == 2 * 3 + 2 * 1  # one call per window size; the frames are one call


def _attention_calls(counter) -> int:
    # sdpa reaches the dispatcher as the kernel it chose (on CPU `_scaled_dot_product_flash_attention_for_cpu`)
    return sum(n for op, n in counter.calls.items() if "scaled_dot_product" in op)


def test_install_fuses_the_tower_norms_only_and_uninstall_puts_them_back():
    model = _tower("qwen2_5_vl")
    norms = vision.tower_norms(model)
    assert len(norms) == 2 * 4 + 1  # norm1 and norm2 of each block, the merger's ln_q
    text_norms = kernels.rms_norms(model.model.language_model)
    vision.install(model)
    assert all(n.forward.func is kernels.fused_rms_norm for n in norms)
    assert all("forward" not in n.__dict__ for n in text_norms)  # the prefill's norms stay transformers'
    with OpCounter() as counter:
        _encode(model, [(2, 12, 20)])
    if FUSED_ON_CUDA:  # this torch has the CUDA kernel (the lock's build does)
        assert counter.calls["aten._fused_rms_norm"] == len(norms)
    vision.uninstall(model)
    assert all("forward" not in n.__dict__ for n in norms)
    vision.install(model, fused=False)  # bench_model's batched tower with transformers' norms and rotary
    assert all("forward" not in n.__dict__ for n in norms)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_the_fewer_pass_rotary_is_transformers_bit_for_bit(family):
    module = sys.modules[type(vision.vision_attention_modules(_tower(family))[0]).__module__]
    assert vision.same_vision_rotary(module.apply_rotary_pos_emb_vision)
    gen = torch.Generator().manual_seed(1)  # a block's shapes: [S, 2, H, d] q and k, bf16, and float32 cos/sin
    qk = torch.randn(512, 2, 16, 80, generator=gen).bfloat16()
    cos, sin = torch.randn(512, 80, generator=gen), torch.randn(512, 80, generator=gen)
    ours = vision.rotary_in_fewer_passes(qk, *vision.signed_rotary(cos, sin))
    theirs = module.apply_rotary_pos_emb_vision(qk[:, 0], qk[:, 1], cos, sin)
    assert torch.equal(ours[:, 0], theirs[0]) and torch.equal(ours[:, 1], theirs[1])


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])  # Qwen3-VL's patch embedding has a bias
def test_the_fused_tower_is_the_unfused_one_with_fewer_kernels_and_bytes(family):
    """float32 on CPU: the fused norms and the fewer-pass rotary give the same bits (see
    v2drop.kernels); the patch embedding as a matrix product rounds differently from the Conv3d."""
    model, grids = _tower(family), [(2, 16, 16)]
    counts, outputs = {}, {}
    for fused in (False, True):
        vision.uninstall(model)
        vision.install(model, fused=fused)
        with OpCounter() as counts[fused]:
            outputs[fused] = _encode(model, grids)
    assert counts[True].calls["aten.convolution"] == 0 < counts[False].calls["aten.convolution"]
    torch.testing.assert_close(outputs[True], outputs[False], atol=1e-5, rtol=1e-5)
    (embed,) = vision.patch_embeddings(model)
    del embed.forward  # the Conv3d again, the rest fused: every bit is the unfused tower's
    assert torch.equal(_encode(model, grids), outputs[False])
    blocks = 4
    assert counts[True].calls["aten.neg"] == 1  # the signed sin, once per forward; transformers: q and k per block
    assert counts[False].calls["aten.neg"] >= 2 * blocks
    fused_norms = family == "qwen2_5_vl"  # Qwen3-VL's tower norms are LayerNorms, left as they are
    assert counts[True].bytes < (0.9 if fused_norms else 1.0) * counts[False].bytes


def test_install_leaves_eager_towers_and_llava_alone():
    assert vision.install(_tower("qwen2_5_vl", attn="eager")) == 0
    assert vision.install(_tower("llava_onevision")) == 0


def test_segment_groups_worked_example():
    groups = vision.segment_groups(torch.tensor([0, 64, 128, 176, 240]))
    by_length = {g.length: g for g in groups.groups}
    assert sorted(by_length) == [48, 64] and by_length[64].num_segments == 3
    assert by_length[48].index.tolist() == list(range(128, 176))
    order = torch.cat([g.index for g in groups.groups])
    assert order[groups.inverse].tolist() == list(range(240))
    single = vision.segment_groups(torch.tensor([0, 16, 32]))
    assert single.inverse is None and single.groups[0].index is None
