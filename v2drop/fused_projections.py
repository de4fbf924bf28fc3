"""Sibling projections as one matrix product in the static decode step: each attention layer's q, k
and v projections, and each MLP's gate and up projections, read the same input, so the step
computes each group with one GEMM over the group's weights stacked, where transformers launches
3 (and 2): 84 kernels fewer in a 28-layer step of ~610 (bench.op_counts; 28 more where the rotary
then reads q and k as one tensor, v2drop.kernels.adjacent_heads). At batch 16 on a GPU a
step is bound by its kernel count (v2drop.kernels), and k and v are the layer's smallest GEMMs
(512 of 3,584 rows each in Qwen2.5-VL-7B), the ones that use a GPU worst.

Weights (`share_storage`, once: `install` at load, else the first step): a group's weights, and
its biases, are moved into one tensor, the Linear modules keeping row blocks of it (views). No
memory is added, and transformers' own forward reads the same values, each block contiguous as
before, so outside the step nothing changes (the same bits: tests/v2drop/test_fused_projections.py).
A model moved or cast afterwards holds separate tensors again: the next step shares them anew,
and reads a group as one only after checking that its blocks are adjacent (`stacked`).

In the step (`fused_projections`, entered by v2drop.kernels.step_kernels): whichever projection of
a group is called first on an input computes the whole product and returns its block; the others
return theirs when called on the same tensor (by identity), else compute the whole product again.
transformers' attention and MLP call q, k, v (gate, up) in turn on one tensor. A block of the
stacked product is a different GEMM shape from the projection alone: the BLAS may round it
differently (cuBLAS picks kernels by shape). The runtime self-check (v2drop.runtime_check) compares
the step's logits with generate()'s before a model serves.
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
_GROUP_ATTR = "_v2drop_projection_group"  # the FusedGroup a projection belongs to, kept across steps


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
    block as a view; nothing to do where they already are (`stacked`). Adds one group's size to
    the peak while the old tensors are replaced."""
    for name in ("weight", "bias"):
        tensors = [getattr(m, name) for m in linears]
        if tensors[0] is None or stacked(tensors) is not None:
            continue
        with torch.inference_mode(False):  # ordinary tensors, also when called under inference_mode
            whole = torch.cat([t.detach() for t in tensors])
        start = 0
        for m, t in zip(linears, tensors):
            block = whole[start:start + t.shape[0]]
            setattr(m, name, nn.Parameter(block, requires_grad=t.requires_grad))
            start += t.shape[0]


def install(model: nn.Module) -> int:
    """Share the weights of every group of the model's text decoder now, at load: before the
    memory budget is measured, where the first step would otherwise do it. On CUDA the replaced
    tensors go back to the device (the caching allocator would keep them reserved). Returns how
    many groups share their weights."""
    from v2drop.adapters import adapter_for  # the adapters import transformers' model classes

    groups = projection_groups(adapter_for(model).text_model(model))
    for linears in groups:
        share_storage(linears)
    if any(m.weight.is_cuda for linears in groups for m in linears):
        torch.cuda.empty_cache()
    return sum(stacked([m.weight for m in linears]) is not None for linears in groups)


class FusedGroup:
    """One group's stacked product, computed once per input and handed out block by block."""

    def __init__(self, linears: Sequence[nn.Linear]) -> None:
        sizes = [m.out_features for m in linears]
        self.bounds = [(sum(sizes[:i]), size) for i, size in enumerate(sizes)]  # (start, length)
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self._clear()

    def _clear(self) -> None:
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.served = 0

    def block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Projection `index`'s output on `x`: its columns of the stacked product (a view)."""
        if self.input is not x:
            self.input, self.output, self.served = x, F.linear(x, self.weight, self.bias), 0
        assert self.output is not None
        start, length = self.bounds[index]
        out = self.output.narrow(-1, start, length)
        self.served += 1
        if self.served == len(self.bounds):
            self._clear()  # every block handed out: hold neither tensor until the next step
        return out


def _group_of(linears: Sequence[nn.Linear]) -> FusedGroup | None:
    """The group's FusedGroup, made once and kept on its first projection (the same objects and
    forwards at every step: torch.compile guards on them), with its stacked weights now; None
    where they cannot be stacked."""
    share_storage(linears)
    weight = stacked([m.weight for m in linears])
    bias = stacked([m.bias for m in linears]) if linears[0].bias is not None else None
    if weight is None or (linears[0].bias is not None and bias is None):
        return None
    group = linears[0].__dict__.get(_GROUP_ATTR)
    if group is None:
        group = FusedGroup(linears)
        for i, m in enumerate(linears):
            setattr(m, _GROUP_ATTR, (group, partial(group.block, i)))
    else:
        group = group[0]
    group.weight, group.bias = weight, bias
    group._clear()
    return group


@contextmanager
def fused_projections(text_model: nn.Module) -> Iterator[int]:
    """Every group of `projection_groups(text_model)` computes as one product while the block runs
    (each projection's forward an instance attribute; what it had before is put back afterwards).
    Yields how many groups are fused."""
    groups: list[FusedGroup] = []
    swapped: list[tuple[nn.Linear, object]] = []
    for linears in projection_groups(text_model):
        if (group := _group_of(linears)) is None:
            continue
        groups.append(group)
        for m in linears:
            swapped.append((m, m.__dict__.get("forward")))
            m.forward = m.__dict__[_GROUP_ATTR][1]
    try:
        yield len(groups)
    finally:
        for m, forward in swapped:
            if forward is None:
                del m.forward
            else:
                m.forward = forward
        for group in groups:  # hold no weights: a model moved afterwards frees its old ones
            group.weight = group.bias = None
            group._clear()
