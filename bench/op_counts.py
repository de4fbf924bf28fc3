"""Operator calls and host-device syncs of a forward or a decode step, counted on CPU.

Counting needs no GPU: every aten call a step makes on CPU it also makes on CUDA (each one at
least a kernel launch or a view). A sync is any read of a tensor's value by the host, which on a
GPU stalls the host until the queue has drained. They show in two places:
* Python: `t.tolist()`, `t.item()`, `bool(t)`, `int(t)`, ... (HOST_READS). On CPU `tolist` reads
  memory without any aten call, so the dispatcher alone misses it.
* The dispatcher: `aten::_local_scalar_dense` called inside an op rather than under one of those
  Python reads (which are counted once already), and ops whose output size depends on the data
  (DATA_DEPENDENT_OPS), which the host must read back to allocate the output.

Ops that torch decomposes on CPU but runs as one fused kernel on CUDA (`rms_norm`, which CUDA
dispatches to aten._fused_rms_norm) count as that one kernel where this torch has it for CUDA,
since the counts stand for what a CUDA run launches.

One decode step is the difference between `generate` with n + 1 and with n new tokens, so it
holds everything a step costs: the model forward, generate's logits processing and stopping check.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

HOST_READS = frozenset({"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"})
SCALAR_READ = "aten._local_scalar_dense"  # the aten call behind item() and bool()
DATA_DEPENDENT_OPS = ("aten.nonzero", "aten.masked_select")
FUSED_ON_CUDA = {f: "aten._fused_rms_norm" for f in (torch.nn.functional.rms_norm, torch.rms_norm)
                 if torch._C._dispatch_has_kernel_for_dispatch_key("aten::_fused_rms_norm", "CUDA")}


class OpCounter:
    """`with OpCounter() as counter:` counts every aten call by op name (`calls`) and every
    host-device sync (`syncs`) made inside the block."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.syncs = 0
        self.bytes = 0  # read and written by the calls that launch kernels (`bytes_touched`)
        self.reading = 0  # depth of Python host reads in progress
        self.fused = 0  # depth of FUSED_ON_CUDA calls in progress: their aten calls are not counted
        self._modes = (_PythonReads(self), _AtenCalls(self))

    def __enter__(self) -> OpCounter:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


class _PythonReads(TorchFunctionMode):
    def __init__(self, counter: OpCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in FUSED_ON_CUDA:
            return self._fused(func, args, kwargs)
        if getattr(func, "__name__", None) not in HOST_READS:
            return func(*args, **(kwargs or {}))
        self.counter.syncs += 1
        self.counter.reading += 1
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.counter.reading -= 1

    def _fused(self, func, args, kwargs):
        if not self.counter.fused:
            self.counter.calls[FUSED_ON_CUDA[func]] += 1
        self.counter.fused += 1
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.counter.fused -= 1


class _AtenCalls(TorchDispatchMode):
    def __init__(self, counter: OpCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.counter.fused:
            return func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        self.counter.calls[name] += 1
        if name in DATA_DEPENDENT_OPS or (name == SCALAR_READ and not self.counter.reading):
            self.counter.syncs += 1
        out = func(*args, **(kwargs or {}))
        if name not in VIEW_OPS:
            self.counter.bytes += bytes_touched((args, kwargs, out))
        return out


def bytes_touched(tree) -> int:
    """The bytes of the tensors in `tree` (a call's inputs and outputs): what the kernel reads and
    writes, counting each broadcast or sliced input at the smaller of its view and its storage. An
    estimate of memory traffic that caches and fusion can only lower."""
    tensors = [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]
    return sum(min(t.numel() * t.element_size(), t.untyped_storage().nbytes()) for t in tensors)


@dataclass(frozen=True)
class StepCounts:
    op_calls: int  # aten calls
    syncs: int  # host-device synchronisations (see the module docstring)
    by_op: dict[str, int]  # every aten op whose count is not zero

    def as_dict(self) -> dict:
        return {"op_calls": self.op_calls, "kernel_calls": kernel_calls(self.by_op), "syncs": self.syncs,
                "by_op": self.by_op}


def _fresh(inputs: dict) -> dict:
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in inputs.items()}  # generate pops entries


def generate_counts(model, inputs: dict, new_tokens: int) -> OpCounter:
    with torch.no_grad(), OpCounter() as counter:
        model.generate(**_fresh(inputs), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return counter


def decode_step_counts(model, inputs: dict, new_tokens: int = 2) -> StepCounts:
    """The aten calls and syncs of step `new_tokens + 1` of greedy generate on `inputs`."""
    longer, shorter = generate_counts(model, inputs, new_tokens + 1), generate_counts(model, inputs, new_tokens)
    step = longer.calls.copy()
    step.subtract(shorter.calls)
    by_op = {name: n for name, n in step.items() if n}
    return StepCounts(op_calls=sum(by_op.values()), syncs=longer.syncs - shorter.syncs, by_op=by_op)


def prefill_counts(model, inputs: dict) -> StepCounts:
    """The aten calls and syncs of one prefill forward (what generate's first step runs)."""
    with torch.no_grad(), OpCounter() as counter:
        model(**_fresh(inputs), use_cache=True, logits_to_keep=1)
    by_op = {name: n for name, n in counter.calls.items() if n}
    return StepCounts(op_calls=sum(by_op.values()), syncs=counter.syncs, by_op=by_op)


def static_prefill_counts(model, inputs: dict) -> StepCounts:
    """The aten calls and syncs of the static decode engine's prefill (generate_static with one new
    token: the text model's norms, rotary and projections in fewer kernels, v2drop.kernels)."""
    from v2drop import static_decode

    with torch.no_grad(), OpCounter() as counter:
        static_decode.generate_static(model, _fresh(inputs), 1)
    by_op = {name: n for name, n in counter.calls.items() if n}
    return StepCounts(op_calls=sum(by_op.values()), syncs=counter.syncs, by_op=by_op)


# Aten ops that only make a view (no kernel on CUDA); every other call launches at least one.
VIEW_OPS = frozenset({"aten.view", "aten._unsafe_view", "aten.t", "aten.transpose", "aten.permute", "aten.slice",
                      "aten.select", "aten.unsqueeze", "aten.squeeze", "aten.expand", "aten.split_with_sizes",
                      "aten.split", "aten.unbind", "aten.as_strided", "aten.alias", "aten.detach", "aten.lift_fresh"})


def kernel_calls(by_op: dict[str, int]) -> int:
    """The calls of `by_op` that launch a kernel on CUDA (all but the views): in a replayed CUDA
    graph each still costs the GPU a few microseconds, however small, so at batch 1 this count times
    that cost adds to the weights' read time."""
    return sum(n for name, n in by_op.items() if name not in VIEW_OPS)


def static_step_counts(model, inputs: dict) -> StepCounts:
    """The aten calls and syncs of one step of the static decode engine (v2drop.static_decode),
    uncaptured: what a captured CUDA graph replays (the model's repetition penalty included)."""
    from v2drop import greedy, kernels, stage_cache, static_decode
    from v2drop.adapters import adapter_for

    text_model = adapter_for(model).text_model(model)
    with torch.no_grad():
        first, dynamic, positions = static_decode._prefill(model, text_model, _fresh(inputs))
        state = stage_cache.static_state(model, text_model, dynamic, positions, inputs.get("attention_mask"), 4)
        static_decode.set_repetition_penalty(state, model, inputs, greedy.greedy_settings(model, {}))
        step = static_decode.EagerStep(model, text_model, state)
        with kernels.step_kernels(text_model):
            step(first, 0)  # step 0 writes the first slot; step 1 is a steady-state step
            with OpCounter() as counter:
                step(first, 1)
    by_op = {name: n for name, n in counter.calls.items() if n}
    return StepCounts(op_calls=sum(by_op.values()), syncs=counter.syncs, by_op=by_op)
