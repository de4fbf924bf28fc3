"""Greedy decoding on a preallocated KV cache per stage, with one static-shape step function.

The dynamic path (`model.generate` on a DynamicCache) grows every layer's cache with `torch.cat`
each step and builds masks of growing length, so no step can be captured as a CUDA graph. Here:

1. `generate(max_new_tokens=1)` runs the prefill (stock or V²Drop) and gives the first token, the
   filled DynamicCache, and (through a hook on the text model) the prompt's rotary positions.
   The text model's norms, rotary and projections run in fewer kernels (v2drop.kernels.fewer_kernels).
2. The cache is copied into a preallocated one per stage (v2drop.stage_cache): each layer sized
   to its own prefill length plus the new tokens, each stage with a key-valid buffer and a slot
   buffer that the step sets once and the stage's layers write at.
3. `decode_step` has static shapes: one token per row in, one token per row out. It runs with
   v2drop.kernels' attention, norms and rotary (transformers' computation in fewer kernels:
   one sdpa call reading the cache as it is, one fused kernel per RMSNorm on CUDA, q and k rotated
   in one pass).
   On CUDA the step can be captured as one CUDA graph (`capture=True`): step 0 runs eagerly as
   the warm-up, the graph is recorded once (recording executes nothing, so no state moves), and
   steps 1.. replay it after copying the token and the step number into its input buffers. No
   compiler is involved, so capturing costs about one step per call. On CPU the step runs
   uncaptured. `compile=True` runs the step through `torch.compile` (inductor, no cudagraphs of
   its own: the capture above records the compiled kernels), which fuses the ~500 kernels of
   an eager 28-layer step; a replayed graph still launches each kernel it has. It compiles with
   dynamic cache lengths: calls of the same batch size reuse one compiled graph whatever their
   prompt lengths; each new batch size compiles once more (transformers' layers specialise the
   batch dimension).
4. Rows that produced an end token emit the pad token from then on, as generate does; the loop
   stops once every row has finished (checked every `stop_check_every` steps, one sync each).
   When at most half of the rows still decoding are unfinished at a check, the finished ones
   leave the batch (`select_rows`: smaller buffers, so a captured step is captured again, about
   one step's cost), so short answers do not keep the whole batch decoding to the longest. Not
   with `compile=True`: each new batch size would compile again.

Next-token positions continue from the prompt's last rotary position + 1 per row (the M-RoPE
text rule of the Qwen families; 1-D RoPE for LLaVA-OneVision). The model's generation settings
are generate()'s (v2drop.greedy): end and pad tokens, a repetition penalty applied in the step;
any other logits processor generate() would run makes the engine refuse the call.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch

from v2drop import key_masks
from v2drop.adapters import adapter_for
from v2drop.compat import cache_kwarg, output_cache
from v2drop.cuda_graphs import CudaGraph, on_side_stream
from v2drop.greedy import GreedySettings, greedy_settings, penalize_repeats, seen_tokens
from v2drop.kernels import fewer_kernels, one_token_attention, step_kernels
from v2drop.loop import rotary
from v2drop.stage_cache import StaticState, select_rows, static_state


@torch.no_grad()
def generate_static(model, inputs: dict, max_new_tokens: int, *, capture: bool = False, compile: bool = False,
                    stop_check_every: int = 1, fused_kernels: bool = True, **prefill_kwargs) -> torch.Tensor:
    """Greedy tokens [B, <= max_new_tokens], equal to `model.generate(..., do_sample=False)`'s new
    tokens. `prefill_kwargs` go to the prefill's generate call (a logits processor that times the
    first token, pad_token_id); settings of them or of the model's generation_config that the
    steps would not apply raise v2drop.greedy.UnappliedSettings first. fused_kernels=False: the prefill and the step with transformers' own
    norms, rotary and projections (v2drop.kernels.fewer_kernels), for benchmarks."""
    settings = greedy_settings(model, prefill_kwargs)  # UnappliedSettings before any model work
    text_model = adapter_for(model).text_model(model)
    with fewer_kernels(text_model, fused_kernels):  # the prefill and the steps: entered once per call
        first, dynamic, positions = _prefill(model, text_model, inputs, **prefill_kwargs)
        if max_new_tokens == 1 or bool(torch.isin(first, torch.tensor(settings.eos, device=first.device)).all()):
            return first  # generate()'s [B, 1] when every row ended at its first token
        state = static_state(model, text_model, dynamic, positions, inputs.get("attention_mask"), max_new_tokens)
        del dynamic
        set_repetition_penalty(state, model, inputs, settings)
        with one_token_attention(text_model):  # with fewer_kernels: step_kernels
            return _decode(model, text_model, state, first, max_new_tokens, settings, capture=capture,
                           compile=compile, stop_check_every=stop_check_every)


def set_repetition_penalty(state: StaticState, model, inputs: dict, settings: GreedySettings) -> None:
    """The steps apply `settings`' repetition penalty from here on, counting the prompt's tokens."""
    if settings.repetition_penalty != 1.0:
        state.seen = seen_tokens(inputs["input_ids"], model.lm_head.weight.shape[0], inputs.get("attention_mask"))
        state.repetition_penalty = settings.repetition_penalty


def _decode(model, text_model, state: StaticState, first: torch.Tensor, max_new_tokens: int, settings: GreedySettings,
            *, capture: bool, compile: bool, stop_check_every: int) -> torch.Tensor:
    """generate_static's loop: tokens [B, <= max_new_tokens] from the first one and the filled state."""
    eos, pad = torch.tensor(settings.eos, dtype=torch.long, device=first.device), settings.pad
    fn = compiled_decode_step() if compile else decode_step
    step_class = CapturedStep if capture else EagerStep
    step = step_class(model, text_model, state, fn)
    tokens = torch.full((first.shape[0], max_new_tokens), pad, dtype=torch.long, device=first.device)
    tokens[:, :1] = first
    finished = torch.isin(first[:, 0], eos)
    rows = torch.arange(first.shape[0], device=first.device)  # the rows `state` holds, in its order
    for t in range(max_new_tokens - 1):
        nxt = torch.where(finished[rows], pad, step(tokens[rows, t:t + 1], t))
        tokens[rows, t + 1] = nxt
        finished[rows] = finished[rows] | torch.isin(nxt, eos)
        if (t + 1) % stop_check_every:
            continue
        unfinished = ~finished[rows]
        decoding = int(unfinished.sum())  # the check's one sync
        if decoding == 0:
            return tokens[:, : t + 2]
        if not compile and decoding <= len(rows) // 2:
            keep = unfinished.nonzero().squeeze(1)
            state, rows = select_rows(state, keep), rows[keep]
            step = step_class(model, text_model, state, fn)
    return tokens


def decode_step(model, text_model, state: StaticState, token: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """One greedy step with static shapes: token [B, 1] at step t (0-d long) -> next token [B]."""
    logits = decode_logits(model, text_model, state, token, t)
    if state.seen is not None:  # the repetition penalty generate() applies (v2drop.greedy)
        logits = penalize_repeats(logits, state.seen, token, state.repetition_penalty)
    return logits.argmax(dim=-1)


StepFunction = Callable[..., torch.Tensor]  # decode_step's signature


@cache
def compiled_decode_step() -> StepFunction:
    """decode_step through torch.compile, made once per process so that every call shares its
    compiled graphs (dynamo caches them on the function's code); dynamic=True: one graph for every
    cache length, one per batch size."""
    return torch.compile(decode_step, dynamic=True)


def decode_logits(model, text_model, state: StaticState, token: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Token [B, 1] at step t (0-d long) -> the next token's logits [B, V]."""
    hidden = text_model.embed_tokens(token)
    cos, sin = rotary(text_model, hidden, state.next_positions + t)
    ends = state.starts[1:] + [len(text_model.layers)]
    for s, (start, end) in enumerate(zip(state.starts, ends)):
        torch.add(state.prefill_lengths[s:s + 1], t, out=state.write_at[s])
        state.valid[s].index_fill_(1, state.write_at[s], True)
        mask = key_masks.additive_key_mask(state.valid[s], 1, hidden.dtype)
        for layer in text_model.layers[start:end]:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=None,
                           use_cache=True, **cache_kwarg(state.cache))
    return model.lm_head(text_model.norm(hidden[:, -1]))


@torch.no_grad()
def forced_logits(model, inputs: dict, tokens: torch.Tensor) -> torch.Tensor:
    """The static step's logits [B, T - 1, V] when fed `tokens` [B, T] (generate()'s new tokens):
    entry i is the logits after tokens[:, i], i.e. generate()'s logits for new token i + 1. For
    checking the engine against generate() (v2drop.runtime_check), uncaptured."""
    text_model = adapter_for(model).text_model(model)
    with fewer_kernels(text_model):
        _, dynamic, positions = _prefill(model, text_model, inputs)
    state = static_state(model, text_model, dynamic, positions, inputs.get("attention_mask"), tokens.shape[1])
    with step_kernels(text_model):
        steps = [decode_logits(model, text_model, state, tokens[:, t:t + 1], torch.tensor(t, device=tokens.device))
                 for t in range(tokens.shape[1] - 1)]
    return torch.stack(steps, dim=1)


class EagerStep:
    """The step function called directly (CPU, or CUDA without capture)."""

    def __init__(self, model, text_model, state: StaticState, fn: StepFunction = decode_step) -> None:
        self.args, self.fn = (model, text_model, state), fn

    def __call__(self, token: torch.Tensor, t: int) -> torch.Tensor:
        return self.fn(*self.args, token, torch.tensor(t, device=token.device))


class CapturedStep:
    """The step function as one CUDA graph over fixed input buffers (token, step number)."""

    def __init__(self, model, text_model, state: StaticState, fn: StepFunction = decode_step) -> None:
        if not torch.cuda.is_available() or state.next_positions.device.type != "cuda":
            raise ValueError("capture=True needs the model on a CUDA device; use capture=False on CPU")
        self.args, self.fn = (model, text_model, state), fn
        self.recording: CudaGraph | None = None
        self.token: torch.Tensor | None = None
        self.t = torch.zeros((), dtype=torch.long, device=state.next_positions.device)

    def __call__(self, token: torch.Tensor, t: int) -> torch.Tensor:
        if self.recording is None:
            return self._warm_up_and_capture(token, t)
        assert self.token is not None  # set by the capture
        self.token.copy_(token)
        self.t.fill_(t)
        return self.recording.replay()

    def _warm_up_and_capture(self, token: torch.Tensor, t: int) -> torch.Tensor:
        self.token = token.clone()
        self.t.fill_(t)
        # the real step t, also warming up kernels and workspaces (and compiling, when compiled)
        first = on_side_stream(lambda: self.fn(*self.args, self.token, self.t).clone())
        # records only: cache counters and masks do not move
        self.recording = CudaGraph(lambda: self.fn(*self.args, self.token, self.t))
        return first


def _prefill(model, text_model, inputs: dict, **generate_kwargs):
    """First token [B, 1], the filled DynamicCache, and the prompt's rotary positions."""
    adapter = adapter_for(model)
    seen = {}

    def record(module, args, kwargs):
        if "positions" not in seen:  # the prefill is the first text-model call
            embeds = kwargs.get("inputs_embeds")
            seen["positions"] = adapter.positions(module, embeds, kwargs.get("position_ids"), None)

    hook = text_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        call = {k: (dict(v) if isinstance(v, dict) else v) for k, v in inputs.items()}
        # greedy, with a cache (greedy_settings refused do_sample=True): the caller's own keywords give way
        out = model.generate(**call, **{**generate_kwargs, "max_new_tokens": 1, "do_sample": False,
                                        "return_dict_in_generate": True, "use_cache": True})
    finally:
        hook.remove()
    return out.sequences[:, -1:], output_cache(out), seen["positions"]

