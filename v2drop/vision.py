"""Qwen vision towers on sdpa without a Python loop per attention window.

The Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision attention (transformers 5.23-5.24) packs every
window (Qwen2.5-VL's 8x8-patch windows) or frame (full-attention blocks) of a batch into one
sequence described by `cu_seqlens`. Without flash-attn's varlen kernel, transformers splits that
sequence and calls attention once per segment, in Python: 16 frames at 448x448 are 256 windows,
so 256 small sdpa calls in each of 28 window blocks, and a host-device sync (`lengths.tolist()`)
per block. On an H200 that made the tower cost 5.6x the language-model prefill.

Here the segments are grouped by length, and each group runs as ONE batched sdpa call with no
mask (so the GPU may pick its flash kernel): a video of equal-size frames is one call per block;
ragged windows at a frame's right and bottom edges add a few more (full, right edge, bottom
edge, corner). Worked example, cu_seqlens [0, 64, 128, 176, 240]: lengths 64, 64, 48, 64 ->
groups {64: starts 0, 64, 176} and {48: start 128}; outputs are put back in sequence order with
one gather. The grouping costs one sync and is computed once per distinct `cu_seqlens` tensor
(the tower passes the same two tensors, windows and frames, to every block).

`install(model)` swaps the forward of each vision-attention module (an instance attribute; the
class and other models are untouched), for towers that run on sdpa, and runs the tower's RMSNorms
as one fused kernel each (v2drop.kernels.fused_rms_norm: the same bits in float32), its rotary
embedding in fewer passes (`rotary_in_fewer_passes`: the same bits) and its patch embedding's
Conv3d as one matrix product (`linear_patch_embed`). flash-attn stays an option:
with it the stock varlen path is kept. LLaVA-OneVision's SigLIP tower already runs its frames as
one batch and is left alone.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from v2drop.kernels import ByIdentity, fuse, is_fused, negate_first_half, rms_norms, rotate_signed
from vlm.families import FAMILIES

# Vision-attention classes whose forward this module reproduces: the family table's
# `vision_attention_class` (their code is the same in qwen2_vl, qwen2_5_vl and qwen3_vl for
# transformers 5.23-5.24).
ATTENTION_CLASSES = frozenset(f.vision_attention_class for f in FAMILIES.values() if f.vision_attention_class)
_INSTALLED_ATTR = "_v2drop_batched_vision"


@dataclass(frozen=True)
class LengthGroup:
    index: torch.Tensor | None  # [n * length] token positions, segments in order; None: the whole sequence
    num_segments: int
    length: int


@dataclass(frozen=True)
class SegmentGroups:
    """A packed sequence as groups of equal-length segments."""

    groups: tuple[LengthGroup, ...]
    # [S] where each token sits in the concatenated group outputs; None when there is one group
    # covering the sequence in order (no gather needed)
    inverse: torch.Tensor | None


def segment_groups(cu_seqlens: torch.Tensor) -> SegmentGroups:
    """Group the segments [cu[i], cu[i+1]) by length. One host-device sync (the boundaries)."""
    bounds = cu_seqlens.tolist()
    starts_by_length: dict[int, list[int]] = {}
    for start, end in zip(bounds, bounds[1:]):
        if end > start:
            starts_by_length.setdefault(end - start, []).append(start)
    if len(starts_by_length) == 1:
        ((length, starts),) = starts_by_length.items()
        return SegmentGroups((LengthGroup(None, len(starts), length),), None)
    device = cu_seqlens.device
    groups, order = [], []
    for length, starts in starts_by_length.items():
        index = (torch.tensor(starts)[:, None] + torch.arange(length)).flatten()
        order.append(index)
        groups.append(LengthGroup(index.to(device), len(starts), length))
    inverse = torch.argsort(torch.cat(order)).to(device)
    return SegmentGroups(tuple(groups), inverse)


def grouped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      groups: SegmentGroups, scale: float) -> torch.Tensor:
    """Attention within each segment. query/key/value: [S, H, d] -> [S, H * d]."""
    seq, heads, dim = query.shape
    outputs = []
    for group in groups.groups:
        q, k, v = (t if group.index is None else t.index_select(0, group.index) for t in (query, key, value))
        # [n * M, H, d] -> [n, H, M, d]: one sdpa call over all n segments of this length
        q, k, v = (t.reshape(group.num_segments, group.length, heads, dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        outputs.append(out.transpose(1, 2).reshape(group.num_segments * group.length, heads * dim))
    if groups.inverse is None:
        return outputs[0]
    return torch.cat(outputs).index_select(0, groups.inverse)


def signed_rotary(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin with its first half negated), float32: what `rotary_in_fewer_passes` multiplies by."""
    return cos.float(), negate_first_half(sin).float()


def rotary_in_fewer_passes(qk: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb_vision for q and k at once, the same bits in fewer passes.
    qk: [S, 2, H, d] (q and k, a view of the qkv projection); cos, signed_sin: [S, d] float32
    (`signed_rotary`). Returns [S, 2, H, d] in qk's dtype.

    transformers copies q and k to float32, then computes q * cos + rotate_half(q) * sin, with
    rotate_half(x) = cat(-x2, x1), and casts back. `qk * cos` computes the same products without
    the copies (bf16 -> float32 is exact, and the product promotes), and rotate_half(x) * sin is
    x.roll(d / 2) * signed_sin: cat(x2, x1) times sin with its first half negated, where (-a) * b
    and a * (-b) round alike: about a third fewer bytes read and written by the rotary (q and k
    of a 16-clip batch at 7B shapes are [131,072, 16, 80], 671 MB each in float32)."""
    cos, signed_sin = cos[:, None, None, :], signed_sin[:, None, None, :]
    return rotate_signed(qk, cos, signed_sin).to(qk.dtype)


@cache
def same_vision_rotary(original) -> bool:
    """Whether `rotary_in_fewer_passes` gives exactly `original`'s q and k (bfloat16 and float32)."""
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        qk = torch.randn(6, 2, 3, 8, generator=gen).to(dtype)
        cos, sin = torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen)
        ours = rotary_in_fewer_passes(qk, *signed_rotary(cos, sin))
        if not all(torch.equal(a, b) for a, b in zip(ours.unbind(1), original(qk[:, 0], qk[:, 1], cos, sin))):
            return False
    return True


def _batched_forward(rotary, groups: ByIdentity, rotaries: ByIdentity | None):
    """The attention forward: rotary in fewer passes where `rotaries` is given (the family's
    function passed `same_vision_rotary`), else the family's own; segments grouped by length."""
    def forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
        seq = hidden_states.shape[0]
        qkv = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1)
        cos, sin = position_embeddings
        if rotaries is not None:
            query, key = rotary_in_fewer_passes(qkv[:, :2], *rotaries.get(position_embeddings)).unbind(1)
        else:
            query, key = rotary(*qkv[:, :2].unbind(1), cos, sin)
        attended = grouped_attention(query, key, qkv[:, 2], groups.get(cu_seqlens), self.scaling)
        return self.proj(attended)

    return forward


def vision_attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ in ATTENTION_CLASSES]


def install(model: nn.Module, fused: bool = True) -> int:
    """Batch the vision tower's attention windows, fuse its norms, rotate in fewer passes and embed
    patches with one matrix product (sdpa towers only). Returns how many attention modules were
    switched (0 for towers without segment loops, or not on sdpa). Idempotent. fused=False keeps
    transformers' norms, rotary and Conv3d (for benchmarks)."""
    modules = [m for m in vision_attention_modules(model) if m.config._attn_implementation == "sdpa"]
    groups = ByIdentity(segment_groups)  # one per model: every block sees the same objects
    rotaries = ByIdentity(lambda position_embeddings: signed_rotary(*position_embeddings))
    for module in modules:
        rotary = sys.modules[type(module).__module__].apply_rotary_pos_emb_vision
        fewer_passes = rotaries if fused and same_vision_rotary(rotary) else None
        module.forward = types.MethodType(_batched_forward(rotary, groups, fewer_passes), module)
        setattr(module, _INSTALLED_ATTR, True)
    for norm in tower_norms(model) if modules and fused else []:
        fuse(norm)
    for embed in patch_embeddings(model) if modules and fused else []:
        embed.forward = types.MethodType(linear_patch_embed, embed)
    return len(modules)


def uninstall(model: nn.Module) -> None:
    """The stock per-segment loop and norms again."""
    for module in vision_attention_modules(model):
        if getattr(module, _INSTALLED_ATTR, False):
            del module.forward
            delattr(module, _INSTALLED_ATTR)
    for norm in tower_norms(model):
        if is_fused(norm):
            del norm.forward
    for embed in patch_embeddings(model):
        if getattr(embed.__dict__.get("forward"), "__func__", None) is linear_patch_embed:
            del embed.forward


def patch_embeddings(model: nn.Module) -> list[nn.Module]:
    """The Qwen towers' patch embeddings (`<tower>.patch_embed`) whose Conv3d does not overlap its
    patches (kernel = stride, no padding, dilation or groups): a linear map of each flat patch."""
    return [m for name, m in model.named_modules() if name.endswith("patch_embed")
            and isinstance(conv := getattr(m, "proj", None), nn.Conv3d) and conv.stride == conv.kernel_size
            and conv.padding == (0, 0, 0) and conv.dilation == (1, 1, 1) and conv.groups == 1]


def linear_patch_embed(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """A patch embedding's forward with its Conv3d as the matrix product it is: [patches, C*T*P*P]
    times the weight viewed as [D, C*T*P*P] (no copy; checkpoints keep the Conv3d). cuDNN has no
    good algorithm for a convolution whose kernel covers its whole input: reported 11-18x slower
    than this product on an H20 (sglang-omni #132), ~62x on other set-ups and ~50,000x on Blackwell
    in bf16 (transformers #45750); vLLM does the same, and transformers offers it as
    `from_pretrained(..., fusion_config={"patch_embeddings": True})`, which registers class patches
    for the whole process at load, where this works on any built model, random ones included.
    A different kernel: it rounds differently from the convolution (about 1e-6 in float32)."""
    weight = self.proj.weight
    flat = hidden_states.reshape(-1, weight[0].numel()).to(weight.dtype)
    return F.linear(flat, weight.view(weight.shape[0], -1), self.proj.bias)


def tower_norms(model: nn.Module) -> list[nn.Module]:
    """The RMSNorms of the vision towers: the modules holding the attention blocks
    (`<tower>.blocks.<i>.attn`)."""
    towers = {name.rsplit(".blocks.", 1)[0] for name, m in model.named_modules()
              if type(m).__name__ in ATTENTION_CLASSES and ".blocks." in name}
    return [norm for tower in sorted(towers) for norm in rms_norms(model.get_submodule(tower))]
