"""Small prefills replayed as CUDA graphs, one per shape: the host out of a dropped prefill's way.

Why: at batch 1 a V²Drop prefill's later stages hold a few hundred tokens, so their kernels take
less time than the host needs to launch them (transformers' decoder layers, ~25 kernels each).
On an H200 with 7B shapes the batch-1 prefill took 31.3 ms against the stock model's 56.0 ms, a
time ratio of 0.56 where the FLOP ratio is 0.26 (~15 ms of kernels); on a CPU the host alone spends
51-63 ms on those 28 layers at toy width. A replayed graph launches the recorded kernels without
the host, so a prefill costs its kernels. At batch >= 16 the time ratio is already within 6 % of
the FLOP ratio: large prefills are left eager (`max_tokens`).

How: the caller (v2drop.api's patched text forward) knows every shape of a prefill on the host
before it runs (`RowCounts`), and a batch job repeats the same shapes (same frames, same prompt).
`PrefillGraphs.run(key, fn, inputs, cache)`, with `key` naming everything the shapes depend on:

1. First call of a key: `fn(inputs, cache)` runs eagerly (on CUDA on a side stream, which also
   warms up kernels and workspaces), then it is recorded once on copies of the inputs (fixed
   buffers) with a cache of its own, and the recording is replayed once and checked against that
   eager run, bit for bit. Any failure (a host-device sync inside, a difference) leaves the key
   eager for good, with a warning and the reason in `failures`.
2. Later calls: the inputs are copied into the buffers, the recording is replayed, and its outputs
   and its cache's keys and values are copied out (the next replay overwrites them).

Each recording holds its activations' memory, so at most `max_graphs` keys are kept (the oldest
goes). Inputs and outputs may hold tensors anywhere in dataclasses, lists, tuples and dicts; the
non-tensor values are the recording's own, fixed by the key.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from v2drop import compat, loop
from v2drop.cuda_graphs import CudaGraph, on_side_stream
from v2drop.select import RowCounts, variation_scores
from v2drop.tokens import TokenState

logger = logging.getLogger("v2drop")

PrefillFn = Callable[[Any, Any], Any]  # (inputs, cache or None) -> outputs


def map_tensors(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """`value` with `fn` applied to every tensor in it, through dataclasses, lists, tuples and dicts."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: map_tensors(getattr(value, f.name), fn)
                                             for f in dataclasses.fields(value) if f.init})
    if isinstance(value, list | tuple):
        return type(value)(map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    return value


def tensors_in(value: Any) -> list[torch.Tensor]:
    """Every tensor in `value`, in map_tensors' order."""
    found: list[torch.Tensor] = []
    map_tensors(value, found.append)
    return found


def shapes_of(value: Any) -> Hashable:
    """A key part: each tensor's shape, dtype and device in order, and the structure around them."""
    return repr(map_tensors(value, lambda t: (tuple(t.shape), t.dtype, t.device)))


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def same_bits(a: Any, b: Any) -> bool:
    ta, tb = tensors_in(a), tensors_in(b)
    return len(ta) == len(tb) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(ta, tb))


def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [] if cache is None else [(layer.keys, layer.values) for layer in cache.layers]


@dataclasses.dataclass
class Entry:
    buffers: Any  # the recording's inputs
    recording: Any  # a CudaGraph (or the recorder given)


class PrefillGraphs:
    """Recorded prefills by key, for v2drop.enable(model, schedule, prefill_graphs=PrefillGraphs()).

    max_tokens: prefills of at most this many token slots (batch x length) are recorded; larger
    ones keep the GPU busy on their own. max_graphs: recordings kept (each holds its activations).
    recorder: what records a closure (CudaGraph); it runs for inputs on its `device_type` only.
    """

    def __init__(self, max_tokens: int = 8192, max_graphs: int = 4, recorder: Any = CudaGraph) -> None:
        self.max_tokens, self.max_graphs, self.recorder = max_tokens, max_graphs, recorder
        self.entries: OrderedDict[Hashable, Entry | None] = OrderedDict()  # None: failed, stays eager
        self.failures: dict[str, str] = {}  # repr(key) -> why it stays eager
        self.replays = 0

    def wants(self, device: torch.device, token_slots: int) -> bool:
        """Whether a prefill of `token_slots` (batch x length) on `device` is recorded."""
        return (device.type == self.recorder.device_type and token_slots <= self.max_tokens
                and not torch.is_grad_enabled())

    def run(self, key: Hashable, fn: PrefillFn, inputs: Any, cache, config) -> Any:
        """`fn(inputs, cache)`, replayed from the key's recording when there is one; `cache` (a
        DynamicCache or None) is filled as `fn` fills it. `config`: the text model's, for the
        recording's own cache."""
        if key not in self.entries:
            return self._first_call(key, fn, inputs, cache, config)
        self.entries.move_to_end(key)
        entry = self.entries[key]
        if entry is None:
            return fn(inputs, cache)
        for buffer, value in zip(tensors_in(entry.buffers), tensors_in(inputs)):
            buffer.copy_(value)
        out, layers = entry.recording.replay()
        self.replays += 1
        for i, (keys, values) in enumerate(layers if cache is not None else []):
            cache.update(keys, values, i)  # copies: DynamicCache concatenates onto its empty layer
        return map_tensors(out, torch.clone)

    def _first_call(self, key: Hashable, fn: PrefillFn, inputs: Any, cache, config) -> Any:
        buffers = map_tensors(inputs, torch.clone)  # before fn runs: fn may reassign its inputs' fields
        out = _warm_up(fn, inputs, cache)

        def recorded() -> tuple[Any, list]:
            own = DynamicCache(config=config) if cache is not None else None
            return fn(map_tensors(buffers, _same), own), cache_layers(own)  # new containers, the buffers' tensors

        entry: Entry | None = None
        try:
            recording = self.recorder(recorded)
            replayed = map_tensors(recording.replay(), torch.clone)
            if not same_bits(replayed, (out, cache_layers(cache))):
                raise RuntimeError("the replayed prefill differs from the eager one")
            entry = Entry(buffers, recording)
        except Exception as error:  # noqa: BLE001 - this key stays eager; the reason is kept and logged
            self.failures[repr(key)] = f"{type(error).__name__}: {str(error)[:300]}"
            logger.warning("v2drop: prefill not recorded, it stays eager (%s)", self.failures[repr(key)])
        self.entries[key] = entry
        while len(self.entries) > self.max_graphs:
            self.entries.popitem(last=False)
        return out


def _warm_up(fn: PrefillFn, inputs: Any, cache) -> Any:
    """fn(inputs, cache) eagerly; on CUDA on a side stream, as graph recording wants its kernels'
    lazy set-up done away from the stream it records on."""
    if not (tensors := tensors_in(inputs)) or tensors[0].device.type != "cuda":
        return fn(inputs, cache)
    return on_side_stream(lambda: fn(inputs, cache))


def dropping_prefill(graphs: PrefillGraphs, text_model, run: PrefillFn, tokens: TokenState, counts: RowCounts,
                     cache, settings: tuple) -> Any:
    """`run(tokens, cache)` (a v2drop.loop.prefill_with_drops call), replayed when it can be
    recorded. `settings`: (schedule, scorer, use_cache, layer kwargs), all of run's that shape it."""
    _, score, _, layer_kwargs = settings
    batch, length = tokens.valid.shape
    if (not graphs.wants(tokens.hidden.device, batch * length)
            or counts.padded(length)  # stage 0's mask would be built by reading the padding back
            or score is not variation_scores  # the random control draws anew on each call
            or tensors_in(layer_kwargs)):
        return run(tokens, cache)
    key = ("drop", counts, repr(settings), text_model.config._attn_implementation, shapes_of(tokens))
    return graphs.run(key, run, tokens, cache, text_model.config)


def stock_prefill(graphs: PrefillGraphs, text_model, stock_forward, inputs_embeds: torch.Tensor,
                  attention_mask: torch.Tensor | None, call: dict) -> Any:
    """The text model's own forward of a prefill (`stock_forward(inputs_embeds=..., **call)`),
    replayed when it can be recorded: small and unpadded. The one sync that finds out there is no
    padding is the stock forward's own; the recording then runs without a mask, where transformers
    would read an all-ones one back from the device."""
    cache = compat.pop_cache(dict(call))
    use_cache = text_model.config.use_cache if call["use_cache"] is None else call["use_cache"]
    if (not graphs.wants(inputs_embeds.device, inputs_embeds.shape[0] * inputs_embeds.shape[1])
            or not isinstance(cache, DynamicCache | None)
            or (attention_mask is not None and not bool(loop.valid_tokens(inputs_embeds, attention_mask).all()))):
        return stock_forward(inputs_embeds=inputs_embeds, **call)
    if use_cache and cache is None:
        cache = DynamicCache(config=text_model.config)
    rest = {k: v for k, v in call.items() if k not in ("attention_mask", "position_ids", "use_cache")}
    compat.pop_cache(rest)

    def run(inputs, cache):
        embeds, positions, kwargs = inputs
        out = stock_forward(inputs_embeds=embeds, attention_mask=None, position_ids=positions, use_cache=use_cache,
                            **compat.cache_kwarg(cache), **kwargs)
        return out.last_hidden_state

    inputs = (inputs_embeds, call["position_ids"], rest)
    key = ("stock", use_cache, text_model.config._attn_implementation, shapes_of(inputs))
    return loop.output(graphs.run(key, run, inputs, cache, text_model.config), cache, use_cache)
