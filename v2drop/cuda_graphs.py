"""The engine's one way to record a CUDA graph: warm up on a side stream, record once, replay.

Used by the static decode step (v2drop.static_decode.CapturedStep) and by recorded prefills
(v2drop.prefill_graphs). Recording executes nothing: a replay runs the recorded kernels on the
same memory, reading the recording's input buffers and writing its outputs in place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def on_side_stream(fn: Callable[[], Any]) -> Any:
    """fn() on a CUDA side stream that waits for the current one, which then waits for it: the
    warm-up before a recording, so that lazy set-up (cuBLAS workspaces, compiled kernels) happens
    away from the stream being recorded."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = fn()
    torch.cuda.current_stream().wait_stream(side)
    return out


class CudaGraph:
    """`closure()` recorded as one torch.cuda.CUDAGraph (recording runs nothing); replay() runs its
    kernels again on the same memory and returns the recorded outputs, now holding the new values."""

    device_type = "cuda"

    def __init__(self, closure: Callable[[], Any]) -> None:
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = closure()

    def replay(self) -> Any:
        self.graph.replay()
        return self.out
