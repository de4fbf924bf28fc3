"""Operator calls and host-device syncs of one decode step, counted at torch's dispatcher.

Counting needs no GPU: every aten call a step makes on CPU it also makes on CUDA (each one at
least a kernel launch or a view), and `aten::_local_scalar_dense` is the call behind `.item()`,
`bool(tensor)` and `if tensor:`, which on a GPU stalls the host until the queue has drained.

One decode step is the difference between `generate` with n + 1 and with n new tokens, so it
holds everything a step costs: the model forward, generate's logits processing and stopping check.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten calls that copy a value to the host (a sync on GPU). nonzero and masked_select sync too:
# their output size depends on the data.
SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select")


class OpCounter(TorchDispatchMode):
    """Counts every aten call made inside `with OpCounter() as counter:` by op name."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@dataclass(frozen=True)
class StepCounts:
    op_calls: int  # aten calls in one decode step
    syncs: int  # of which host-device synchronisations (SYNC_OPS)
    by_op: dict[str, int]  # every op whose count is not zero

    def as_dict(self) -> dict:
        return {"op_calls": self.op_calls, "syncs": self.syncs}


def generate_calls(model, inputs: dict, new_tokens: int) -> Counter:
    call = {k: (dict(v) if isinstance(v, dict) else v) for k, v in inputs.items()}  # generate pops entries
    with torch.no_grad(), OpCounter() as counter:
        model.generate(**call, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return counter.calls


def decode_step_counts(model, inputs: dict, new_tokens: int = 2) -> StepCounts:
    """The aten calls of step `new_tokens + 1` of greedy generate on `inputs`."""
    step = generate_calls(model, inputs, new_tokens + 1)
    step.subtract(generate_calls(model, inputs, new_tokens))
    by_op = {name: n for name, n in step.items() if n}
    return StepCounts(op_calls=sum(by_op.values()), syncs=sum(by_op.get(op, 0) for op in SYNC_OPS), by_op=by_op)
