"""Sibling projections as one matrix product in the static decode engine: each attention layer's
q, k and v projections, and each MLP's gate and up projections, read the same input, so the
engine computes each group with one GEMM over the group's weights stacked, where transformers
launches 3 (and 2): 84 kernels fewer in a 28-layer step of ~610 (bench.op_counts; 28 more where
the rotary then reads q and k as one tensor, v2drop.kernels.adjacent_heads), and as many in each
prefill. At batch 16 on a GPU a step is bound by its kernel count (v2drop.kernels), and k and v
are the layer's smallest GEMMs (512 of 3,584 rows each in Qwen2.5-VL-7B), the ones that use a GPU
worst.

Weights (`share_storage`; `install` at load, else the first use): a group's weights, and its
biases, are moved into one tensor, the Linear modules keeping row blocks of it (views). No memory
is added, and transformers' own forward reads the same values, each block contiguous as before
(the same bits: tests/v2drop/test_fused_projections.py). A model moved or cast afterwards holds
separate tensors again: the next use shares them anew, and reads a group as one only after
checking that its blocks are adjacent (`stacked`).

Forwards (`install`, once): each projection's forward becomes its group's `FusedGroup.block`,
which outside the context is transformers' Linear forward. Inside `fused_projections` (entered by
v2drop.kernels.fewer_kernels, once per static-engine call, over its prefill and its steps),
whichever projection of a group is called first on an input computes the whole product and
returns its block; the others return theirs when called on the same tensor (by identity), else
compute the whole product again. transformers' attention and MLP call q, k, v (gate, up) in turn
on one tensor. Entering compares where each group's weights lie with where they were last
stacked, and checks them fully only where they moved: ~0.45 ms of host time for 28 layers on this
2-core CPU (~4 ms with the full check each time).

MLPs (`gated_mlp_in_place`): while a group is active its MLP, transformers' down(silu(gate(x)) *
up(x)), computes silu and the product in place in the gate's block of the stacked product, so at
its peak it holds that one [tokens, 2 * intermediate] product where transformers' forward over the
same product also holds silu(gate) and silu(gate) * up: 4 such [tokens, intermediate] tensors
become 2 (at 2,097 tokens of Qwen2.5-VL-7B in bf16, 152 MiB less per clip in a prefill). The same
elementwise operations on the same values; the down projection reads the gate's half where it
lies (rows 2 * intermediate apart), a GEMM layout a BLAS may round differently, as below (this CPU
gives the same bits: tests/v2drop/test_fused_projections.py). Used for an MLP only where a probe
at the first use, on separate gate and up products, gives its own forward's exact output: it checks
the forward's form (a gated SiLU), not the stacked layout.

A block of the stacked product is a different GEMM shape from the projection alone: the BLAS may
round it differently (cuBLAS picks kernels by shape). The runtime self-check
(v2drop.runtime_check) compares the static engine's logits with generate()'s before a model serves.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

# (the decoder layer's submodule, its projections that read the same input, in the order called)
GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))
_GROUPS_ATTR = "_v2drop_projection_groups"  # on the text model: its FusedGroups, made by `install`


def projection_groups(text_model: nn.Module) -> list[list[nn.Linear]]:
    """Each decoder layer's GROUPS whose members are plain Linear layers of one input width, dtype,
    device and bias-or-not (a quantized or adapted projection is not a plain Linear: left alone)."""
    groups = []
    for layer in text_model.layers:
        for parent_name, names in GROUPS:
            linears = [getattr(getattr(layer, parent_name, None), name, None) for name in names]
            if all(type(m) is nn.Linear for m in linears) and _alike(linears):
                groups.append(linears)
    return groups


def _alike(linears: Sequence[nn.Linear]) -> bool:
    first = linears[0]
    return all(m.in_features == first.in_features and m.weight.dtype == first.weight.dtype
               and m.weight.device == first.weight.device and (m.bias is None) == (first.bias is None)
               for m in linears)


def stacked(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The tensors as one tensor of all their rows (a view, no copy) when they are contiguous,
    adjacent row blocks of one storage, in order; else None."""
    first = tensors[0]
    offset = first.storage_offset()
    for t in tensors:
        if (not t.is_contiguous() or t.storage_offset() != offset or t.shape[1:] != first.shape[1:]
                or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()):
            return None
        offset += t.numel()
    return first.detach().as_strided((sum(t.shape[0] for t in tensors), *first.shape[1:]), first.stride())


@torch.no_grad()
def share_storage(linears: Sequence[nn.Linear]) -> None:
    """Move the group's weights (and biases) into one tensor each, every Linear keeping its row
    block as a view, where they are not already (`stacked`). Adds one group's size to the peak
    while the old tensors are replaced."""
    for name in ("weight", "bias"):
        tensors = [getattr(m, name) for m in linears]
        if tensors[0] is None or stacked(tensors) is not None:
            continue
        with torch.inference_mode(False):  # ordinary tensors, also when called under inference_mode
            joined = torch.cat([t.detach() for t in tensors])
        start = 0
        for m, t in zip(linears, tensors):
            setattr(m, name, nn.Parameter(joined[start:start + t.shape[0]], requires_grad=t.requires_grad))
            start += t.shape[0]


class FusedGroup:
    """One group's projections: transformers' own forward each, or, while active, blocks of one
    product computed once per input."""

    def __init__(self, linears: Sequence[nn.Linear]) -> None:
        self.linears = list(linears)
        sizes = [m.out_features for m in linears]
        self.bounds = [(sum(sizes[:i]), size) for i, size in enumerate(sizes)]  # (start, length)
        self.layout: tuple[int, ...] = ()  # `_layout` when the weights were last stacked
        self.weight: torch.Tensor | None = None  # the stacked weight and bias while active
        self.bias: torch.Tensor | None = None
        self.active = False
        self.fusable = False  # whether the weights at `layout` stack
        self.rows = 0
        self.depth = 0  # how many fused_projections contexts hold it active
        self._clear()

    def _clear(self) -> None:
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.served = 0

    def activate(self) -> bool:
        """Stack the weights (sharing their storage first where they moved since the last time);
        False, and transformers' forwards, where they cannot be stacked."""
        self.depth += 1
        if self.depth > 1:  # a context inside another: as the outer one left it
            return self.active
        layout = _layout(self.linears)
        if layout != self.layout:  # first use, or the weights moved: check them again
            if _alike(self.linears):
                share_storage(self.linears)
            self.layout = _layout(self.linears)
            weight = stacked([m.weight for m in self.linears])
            bias = stacked([m.bias for m in self.linears]) if self.linears[0].bias is not None else None
            self.fusable = weight is not None and (bias is not None or self.linears[0].bias is None)
            self.rows = self.bounds[-1][0] + self.bounds[-1][1]
        if self.fusable:  # the layout checked: the stacked views again, with no check
            params = self.linears[0]._parameters
            weight = params["weight"]
            self.weight = weight.detach().as_strided((self.rows, weight.shape[1]), weight.stride())
            bias = params.get("bias")
            self.bias = None if bias is None else bias.detach().as_strided((self.rows,), (1,))
        self.active = self.fusable
        return self.active

    def deactivate(self) -> None:
        self.depth -= 1
        if self.depth == 0:
            self.active, self.weight, self.bias = False, None, None  # hold no weights between calls
            self._clear()

    def block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Projection `index`'s output on `x`: its columns of the stacked product (a view)."""
        if not self.active:
            own = self.linears[index]
            return F.linear(x, own.weight, own.bias)  # nn.Linear.forward
        if self.input is not x:
            self.input, self.output, self.served = x, F.linear(x, self.weight, self.bias), 0
        assert self.output is not None
        start, length = self.bounds[index]
        out = self.output.narrow(-1, start, length)
        self.served += 1
        if self.served == len(self.bounds):
            self._clear()  # every block handed out: hold neither tensor until the next input
        return out


def _layout(linears: Sequence[nn.Linear]) -> tuple[int, ...]:
    """Where each weight and bias lies (its storage, its first element) and its rows."""
    return tuple(n for m in linears for t in m._parameters.values() if t is not None
                 for n in (t.untyped_storage().data_ptr(), t.data_ptr(), t.shape[0]))


def install(model: nn.Module) -> int:
    """Share the weights of every group of the model's text decoder and give each projection its
    group's forward, now, at load: before the memory budget is measured, where the first use
    would otherwise do it. On CUDA the replaced tensors go back to the device (the caching
    allocator would keep them reserved). Idempotent. Returns how many groups can be fused."""
    from v2drop.adapters import adapter_for  # the adapters import transformers' model classes

    groups = fused_groups(adapter_for(model).text_model(model))
    fusable = sum(group.activate() for group in groups)
    for group in groups:
        group.deactivate()
    if any(m.weight.is_cuda for group in groups for m in group.linears):
        torch.cuda.empty_cache()
    return fusable


def fused_groups(text_model: nn.Module) -> list[FusedGroup]:
    """The text model's FusedGroups, made on first use and kept on it (the same objects and
    forwards at every call: torch.compile guards on them). A projection replaced since keeps its
    own forward, and its group's others still return their own rows."""
    groups = text_model.__dict__.get(_GROUPS_ATTR)
    if groups is None:
        groups = [FusedGroup(linears) for linears in projection_groups(text_model)]
        mlps = {id(layer.mlp.gate_proj): layer.mlp for layer in text_model.layers if hasattr(layer, "mlp")}
        for group in groups:
            for i, m in enumerate(group.linears):
                m.forward = partial(group.block, i)
            mlp = mlps.get(id(group.linears[0]))
            if mlp is not None and in_place_matches(mlp):
                mlp.forward = partial(gated_mlp_in_place, mlp, group)
        text_model.__dict__[_GROUPS_ATTR] = groups
    return groups


def gated_mlp_in_place(mlp: nn.Module, group: FusedGroup, x: torch.Tensor) -> torch.Tensor:
    """The MLP's own forward, down(silu(gate(x)) * up(x)); while `group` (its gate and up) is
    active, with silu and the product in place in the gate's block of the one product."""
    if not group.active:
        return type(mlp).forward(mlp, x)
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)  # blocks of one product, each no longer needed after
    if group.input is not None:  # a projection replaced since: the group still serves this product
        return mlp.down_proj(mlp.act_fn(gate) * up)
    return mlp.down_proj(F.silu(gate, inplace=True).mul_(up))


@torch.no_grad()
def in_place_matches(mlp: nn.Module) -> bool:
    """Whether gated_mlp_in_place's computation gives the MLP's own forward's exact output, on two
    random tokens (its class's forward and its activation function decide; each MLP is probed,
    once per model, a few microseconds of a GPU each)."""
    weight = mlp.gate_proj.weight
    x = torch.randn(2, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight)
    try:
        own = type(mlp).forward(mlp, x)
        in_place = mlp.down_proj(F.silu(mlp.gate_proj(x), inplace=True).mul_(mlp.up_proj(x)))
    except (AttributeError, RuntimeError, TypeError):  # not a gated MLP of this form
        return False
    return bool(torch.equal(own, in_place))


@contextmanager
def fused_projections(text_model: nn.Module) -> Iterator[int]:
    """Every group of the text model computes as one product while the block runs. Yields how
    many groups are fused."""
    groups = fused_groups(text_model)
    active = sum(group.activate() for group in groups)
    try:
        yield active
    finally:
        for group in groups:
            group.deactivate()
