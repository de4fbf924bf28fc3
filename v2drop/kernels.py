"""transformers' computations in fewer kernels, where the engine runs its own loops: the static
decode engine (v2drop.static_decode: its prefill inside `fewer_kernels`, its step inside
`step_kernels`) and the vision tower (v2drop.vision).

A decode step at batch 16 is bound by its kernel count, not by its arithmetic: on an H200 each
of the ~1,150 kernels of a 28-layer step cost a few microseconds even inside a CUDA graph, most
of the step beyond the ~3.2 ms the 7B weights take to read. The swaps below compute what
transformers computes, with fewer kernels, and hold only while the context is open. The prefill
gets all but the attention (`fewer_kernels`): a Qwen2.5-VL prefill at 28 layers launches ~690
kernels instead of ~1,340 (~810 instead of ~1,450 with V²Drop; bench.op_counts, CPU, bf16): it
counts where the host is the bound, a V²Drop prefill of one clip.

* Attention: `one_token_sdpa`, transformers' sdpa for one query token (its `pack_gqa` branch: the
  grouped query heads packed onto their key-value head, the cache read as it is), compiled or
  not, also for a flash-attn model. Under torch.compile transformers itself switches to `repeat_kv`, which copies each
  layer's whole cache `num_key_value_groups` times per step (7x for Qwen2.5-VL-7B).
* RMSNorm: `fused_rms_norm`, `F.rms_norm`, which CUDA runs as one kernel (aten._fused_rms_norm,
  torch >= 2.8) where transformers' RMSNorm launches eight (two casts, pow, mean, add, rsqrt, two
  muls): 2 norms per layer (4 with Qwen3's q/k norms) plus the final one, so ~400 of the 1,150.
  v2drop.vision.install fuses the Qwen2.5-VL vision tower's norms the same way, for good: there
  each unfused norm also writes and reads float32 copies of [patches, width] several times.
  On CPU torch decomposes it into transformers' own operations, so float32 results are the same
  bits. In bf16/fp16 the fused kernel multiplies by the weight before its one rounding, where
  transformers rounds, then multiplies and rounds again: at most about one unit in the last place
  per element. The runtime self-check (v2drop.runtime_check) compares this step's logits with
  generate()'s for every family before a model serves.
* Rotary embedding: `rotary_in_one_pass`, transformers' `apply_rotary_pos_emb` (`x * cos +
  rotate_half(x) * sin`, for q and for k) on q and k stacked along the heads, with sin's sign
  taken once per step instead of q's and k's in every layer: 5 kernels instead of 10 per layer
  plus 2 per step, the same bits. It replaces the function in the modeling module of the text
  model's attention (a module global: another thread running that family at the same time would
  use it too, with the same results), only where a probe at the first swap gives its results. Where q and k are adjacent blocks of one
  product (`adjacent_heads`) it reads them as one tensor instead of concatenating them.
* Projections: `v2drop.fused_projections`, each layer's q/k/v and gate/up as one matrix product.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import cache, partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

from v2drop.fused_projections import fused_projections

ONE_TOKEN_SDPA = "v2drop_one_token_sdpa"


@contextmanager
def step_kernels(text_model, fused: bool = True) -> Iterator[None]:
    """The static step's attention, norms, rotary and projections while the block runs;
    transformers' afterwards. fused=False keeps transformers' norms, rotary and projections (the
    attention is the step's either way), for timing the two side by side (bench_model's
    `static-unfused` engine)."""
    with one_token_attention(text_model), fewer_kernels(text_model, fused):
        yield


@contextmanager
def fewer_kernels(text_model, fused: bool = True) -> Iterator[None]:
    """The text model's norms, rotary and projections in fewer kernels while the block runs (any
    number of tokens: the prefill too); fused=False: nothing swapped."""
    with ExitStack() as stack:
        if fused:
            stack.enter_context(fused_rms_norms(text_model))
            stack.enter_context(rotary_in_one_pass_for(text_model))
            stack.enter_context(fused_projections(text_model))
        yield


def one_token_sdpa(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor,
                   scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention (integrations.sdpa_attention, its `pack_gqa` branch) for one
    query token per row: query [B, H, 1, D] -> [B, H_kv, H / H_kv, D], so the grouped query heads
    of a key-value head become its query rows and key/value [B, H_kv, L, D] are read as they are;
    the key mask [B, 1, 1, L] broadcasts. Returns [B, 1, H, D], as transformers does."""
    batch, heads, _, dim = query.shape
    packed = query.reshape(batch, key.shape[1], heads // key.shape[1], dim)
    out = F.scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(ONE_TOKEN_SDPA, one_token_sdpa)


@contextmanager
def one_token_attention(text_model) -> Iterator[None]:
    """An sdpa or flash-attn text model attends by `one_token_sdpa` (on its config, read by every
    layer at each call; put back after): the step's additive [B, 1, 1, L] key mask is no flash
    2-D 0/1 padding mask (which would also sync). Eager reads it as it is."""
    config = text_model.config
    own = config._attn_implementation
    if own not in ("sdpa", "flash_attention_2"):
        yield
        return
    config._attn_implementation = ONE_TOKEN_SDPA
    try:
        yield
    finally:
        config._attn_implementation = own


_NORMS_ATTR = "_v2drop_rms_norms"


def cached_rms_norms(text_model: nn.Module) -> list[nn.Module]:
    """`rms_norms(text_model)`, found once and kept on it: a walk of every module costs ~0.8 ms of
    host time per call at 28 layers. A norm replaced since keeps its own forward."""
    if _NORMS_ATTR not in text_model.__dict__:
        text_model.__dict__[_NORMS_ATTR] = rms_norms(text_model)
    return text_model.__dict__[_NORMS_ATTR]


def rms_norms(module: nn.Module) -> list[nn.Module]:
    """The RMSNorm layers under `module` of transformers' one form (Qwen2RMSNorm,
    Qwen2_5_VLRMSNorm, Qwen3VLTextRMSNorm: `weight * (x32 * rsqrt(mean(x32²) + eps)).to(dtype)`):
    by their attributes, and per class a probe (`same_norm`)."""
    return [m for m in module.modules()
            if type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "variance_epsilon", None), float)
            and isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() == 1 and same_norm(m)]


_SAME_NORM: dict[tuple[type, torch.dtype, str], bool] = {}


def same_norm(norm: nn.Module) -> bool:
    """Whether `fused_rms_norm` gives `norm`'s own results on a random input of its weight's dtype
    and device, within two units in the last place; probed on the first instance of each class,
    dtype and device type (a norm of another form, such as Gemma's `1 + weight`, fails it and keeps
    its forward)."""
    kind = type(norm)
    key = (kind, norm.weight.dtype, norm.weight.device.type)
    if key not in _SAME_NORM:
        x = torch.randn(4, norm.weight.shape[0], generator=torch.Generator().manual_seed(0))
        x = x.to(norm.weight.device, norm.weight.dtype)
        with torch.no_grad():
            ours, theirs = fused_rms_norm(norm, x).float(), kind.forward(norm, x).float()
        tolerance = 2 * torch.finfo(norm.weight.dtype).eps
        _SAME_NORM[key] = bool(torch.allclose(ours, theirs, rtol=tolerance, atol=tolerance))
    return _SAME_NORM[key]


# Where transformers' norm computes in float32 as F.rms_norm does (float64 it computes in float32 too,
# F.rms_norm in float64).
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fused_rms_norm(norm: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """`norm(hidden)` as one `F.rms_norm` call. Another dtype than FUSED_DTYPES, or a weight of
    another dtype than `hidden` (where transformers' result takes the wider of the two), keeps
    transformers' forward."""
    if hidden.dtype not in FUSED_DTYPES or hidden.dtype != norm.weight.dtype:
        return type(norm).forward(norm, hidden)
    return F.rms_norm(hidden, norm.weight.shape, norm.weight, norm.variance_epsilon)


_FUSED_FORWARD = "_v2drop_fused_forward"


def fuse(norm: nn.Module) -> None:
    """`norm` computes with `fused_rms_norm`: an instance attribute that shadows its class's forward.
    The same callable each time: torch.compile guards on it, and torch 2.11's dynamo recompiled the
    compiled step on every call when each call's step fused the norms with new ones ("Cache line
    invalidated because ... input_layernorm.forward got deallocated")."""
    if _FUSED_FORWARD not in norm.__dict__:
        setattr(norm, _FUSED_FORWARD, partial(fused_rms_norm, norm))
    norm.forward = norm.__dict__[_FUSED_FORWARD]


def is_fused(norm: nn.Module) -> bool:
    return getattr(norm.__dict__.get("forward"), "func", None) is fused_rms_norm


@contextmanager
def fused_rms_norms(text_model) -> Iterator[None]:
    """Each of `rms_norms(text_model)` computes with `fused_rms_norm` (an instance attribute that
    shadows its class's forward; whatever the instance had before is put back afterwards)."""
    norms = cached_rms_norms(text_model)
    before = [norm.__dict__.get("forward") for norm in norms]
    for norm in norms:
        fuse(norm)
    try:
        yield
    finally:
        for norm, forward in zip(norms, before):
            if forward is None:
                del norm.forward
            else:
                norm.forward = forward


class ByIdentity:
    """`make(obj)` for the last two objects seen, keyed by identity: a model passes the same
    objects to every layer (the step's one sin tensor; the vision tower's window and frame
    `cu_seqlens` tensors and (cos, sin) tuple). The objects are held, so an id cannot be reused
    while cached."""

    def __init__(self, make: Callable[[Any], Any]) -> None:
        self.make = make
        self.entries: list[tuple[Any, Any]] = []

    def get(self, obj: Any) -> Any:
        for seen, value in self.entries:
            if seen is obj:
                return value
        value = self.make(obj)
        self.entries = [*self.entries[-1:], (obj, value)]
        return value


def negate_first_half(x: torch.Tensor) -> torch.Tensor:
    """x with the first half of its last dimension negated: rotate_half(q) * sin equals
    q.roll(d / 2) * negate_first_half(sin), the same bits ((-a) * b and a * (-b) round alike)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., :half], x[..., half:]), dim=-1)


def rotate_signed(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, given sin's signed copy (`negate_first_half`): one roll
    where rotate_half negates and concatenates."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


# Every layer of a step gets the same sin tensor: its signed copy is made once, not once per layer.
_SIGNED_SINS = ByIdentity(negate_first_half)


def rotary_in_one_pass(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' apply_rotary_pos_emb for q and k stacked along their heads, the same bits:
    q * cos + rotate_half(q) * sin, with rotate_half(q) * sin as q.roll(d / 2) times sin's signed
    copy (`negate_first_half`), which is made once per sin tensor instead of negating q and k in
    every layer. Under torch.compile, which fuses the negation into its kernel anyway, it is made
    on each call (dynamo would guard on the cache's entries). The heads sit where cos and sin
    broadcast (`unsqueeze_dim`: q [B, H, S, D] with 1, the default; [B, S, H, D] with 2)."""
    compiling = torch.compiler.is_compiling()
    signed = negate_first_half(sin) if compiling else _SIGNED_SINS.get(sin)
    cos, signed = cos.unsqueeze(unsqueeze_dim), signed.unsqueeze(unsqueeze_dim)
    both = None if compiling else adjacent_heads(q, k, unsqueeze_dim)
    if both is None:
        both = torch.cat((q, k), dim=unsqueeze_dim)
    out = rotate_signed(both, cos, signed)
    heads = q.shape[unsqueeze_dim]
    return out.narrow(unsqueeze_dim, 0, heads), out.narrow(unsqueeze_dim, heads, k.shape[unsqueeze_dim])


def adjacent_heads(q: torch.Tensor, k: torch.Tensor, dim: int) -> torch.Tensor | None:
    """q and k as one tensor of their heads along `dim` (a view, no copy) where k's heads follow q's
    in memory with q's strides, as in one q/k/v product (v2drop.fused_projections); else None."""
    same_layout = all((a == b or i == dim) and (q.stride(i) == k.stride(i) or min(a, b) == 1)
                      for i, (a, b) in enumerate(zip(q.shape, k.shape)))  # a size-1 dim's stride is free
    if (not same_layout or q.dim() != k.dim() or q.dtype != k.dtype or q.shape[dim] < 2
            or q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()
            or k.storage_offset() != q.storage_offset() + q.shape[dim] * q.stride(dim)):
        return None
    shape = list(q.shape)
    shape[dim] += k.shape[dim]
    return q.as_strided(shape, q.stride(), q.storage_offset())


ROTARY_NAME = "apply_rotary_pos_emb"


@contextmanager
def rotary_in_one_pass_for(text_model) -> Iterator[None]:
    """`rotary_in_one_pass` in place of `apply_rotary_pos_emb` in the modules that define the text
    model's attention classes, where it passes `same_rotary`; put back afterwards."""
    modules = {sys.modules[type(layer.self_attn).__module__] for layer in text_model.layers}
    swapped = [(m, getattr(m, ROTARY_NAME)) for m in modules
               if callable(getattr(m, ROTARY_NAME, None)) and same_rotary(getattr(m, ROTARY_NAME))]
    for module, _ in swapped:
        setattr(module, ROTARY_NAME, rotary_in_one_pass)
    try:
        yield
    finally:
        for module, original in swapped:
            setattr(module, ROTARY_NAME, original)


@cache
def same_rotary(original) -> bool:
    """Whether `rotary_in_one_pass` gives exactly `original`'s q and k (float32, two batch rows,
    grouped heads); True for itself (a swap inside a swap)."""
    if original is rotary_in_one_pass:
        return True
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 3, 8, generator=gen), torch.randn(2, 2, 3, 8, generator=gen)
    cos, sin = torch.randn(2, 3, 8, generator=gen), torch.randn(2, 3, 8, generator=gen)
    try:
        theirs = original(q, k, cos, sin)
    except Exception:  # noqa: BLE001 - another signature: not the function this replaces
        return False
    ours = rotary_in_one_pass(q, k, cos, sin)
    return all(torch.equal(a, b) for a, b in zip(ours, theirs))
