"""One timed `generate` call over a padded batch, and what it costs per sample.

Timing (per call, so every sample of one call reports the same numbers):
    inputs_ms    building the call's inputs before it: the processor (on the GPU or the actor's
                 CPU, workers.device_inputs) and the copy to the device; not in the two below.
    prefill_ms   from just before the call's first model work (`generate`, or a shared video prefill
                 before it: workers.shared_prefix) to the moment the first token's logits exist,
                 taken by a LogitsProcessor on its first call (after torch.cuda.synchronize on GPU).
                 It covers the vision encoder, the language-model prefill (where V²Drop acts) and
                 generate's own setup, and does not repeat any work (no separate max_new_tokens=1 run).
    generate_ms  the whole call, prefill plus every decode step.
Memory (per call):
    peak_memory_bytes  GPU: torch.cuda.max_memory_allocated after reset_peak_memory_stats, i.e.
                 the tensor high-water mark during the call, weights included. CPU: the process's
                 peak resident set size (VmHWM) during the call, weights included; Linux lets us
                 reset it by writing 5 to /proc/self/clear_refs. Where that is not allowed it is the
                 process peak since start (ru_maxrss), an upper bound.
"""

from __future__ import annotations

import gc
import logging
import resource
import time
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

import v2drop
from v2drop import static_decode
from v2drop.greedy import UnappliedSettings, greedy_settings
from workers.rows import GenResult
from workers.settings import GenerationConfig

log = logging.getLogger(__name__)
STOP_CHECK_EVERY = 8  # static engine: one host-device sync per 8 steps to stop once every row is done


class FirstTokenTimer(LogitsProcessor):
    """Records when the first token's logits arrive, i.e. when prefill has finished."""

    observes_only = True  # returns the scores unchanged: the static engine may run it (v2drop.greedy)

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.first_logits_at: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.first_logits_at is None:
            _synchronize(self.device)
            self.first_logits_at = time.perf_counter()
        return scores


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory during a `with` block; see the module docstring for what it measures."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes: int | None = None
        self._rss_reset = False

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._rss_reset = _reset_peak_rss()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            peak = _peak_rss_bytes() if self._rss_reset else None
            self.peak_bytes = peak or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


def sampling_kwargs(generation_cfg: GenerationConfig) -> dict[str, Any]:
    """Greedy at temperature 0 (deterministic); otherwise nucleus sampling, with no top-k: generate()
    merges the model's generation_config under these, and Qwen2-VL Instruct's holds top_k=1, which
    would make every sample the argmax."""
    kwargs: dict[str, Any] = {"max_new_tokens": generation_cfg.max_new_tokens}
    if generation_cfg.temperature == 0:
        return {**kwargs, "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {**kwargs, "do_sample": True, "temperature": generation_cfg.temperature, "top_p": generation_cfg.top_p,
            "top_k": None}


def stop_token_ids(model: Any, processor: Any) -> set[int]:
    """EOS and pad ids: generation ends at the first of them (pad fills finished rows)."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    for pad in (model.generation_config.pad_token_id, processor.tokenizer.pad_token_id):
        if pad is not None:
            ids.add(int(pad))
    return ids


def count_output_tokens(new_tokens: torch.Tensor, stop_ids: set[int]) -> list[int]:
    """Per row of [B, N] generated ids, the tokens before the first EOS/pad.

    Example: [[5, 7, EOS, PAD], [5, 6, 8, 9]] -> [2, 4].
    """
    stops = torch.isin(new_tokens, torch.tensor(sorted(stop_ids), device=new_tokens.device))
    any_stop = stops.any(dim=1)
    first_stop = stops.int().argmax(dim=1)
    return torch.where(any_stop, first_stop, torch.full_like(first_stop, new_tokens.shape[1])).tolist()


def pad_token_id(model: Any, processor: Any) -> int | None:
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = processor.tokenizer.pad_token_id
    if pad is None:
        eos = model.generation_config.eos_token_id
        pad = eos[0] if isinstance(eos, (list, tuple)) else eos
    return pad


def run_decode(model: Any, inputs: Mapping[str, Any], generation_cfg: GenerationConfig,
               engine: str, **generate_kwargs: Any) -> torch.Tensor:
    """Sequences [B, P + N] from one engine. The static engine captures its step as a CUDA graph
    on a GPU and checks every STOP_CHECK_EVERY steps whether every row has finished."""
    sampling = sampling_kwargs(generation_cfg)
    if engine == "dynamic":
        return model.generate(**inputs, **sampling, **generate_kwargs)
    tokens = static_decode.generate_static(
        model, dict(inputs), sampling["max_new_tokens"], capture=model.device.type == "cuda",
        stop_check_every=STOP_CHECK_EVERY, **generate_kwargs)
    return torch.cat([inputs["input_ids"], tokens], dim=1)


def timed_generate(
    model: Any, processor: Any, make_inputs: Callable[[str], Mapping[str, Any]], generation_cfg: GenerationConfig
):
    """Decode once on what `make_inputs(engine)` returns; returns (generate inputs, sequences
    [B, P+N], prefill_ms, generate_ms, peak bytes, fallback reason or None). `make_inputs` runs
    inside the timed region, so model work done there (a shared video prefill) counts as prefill.
    If the static engine fails (not for lack of memory), the call is decoded again on the dynamic
    engine and the reason is returned: a caption is not lost to a faster path's failure. That
    happens after the except clause, whose error would keep the static cache on the device, on
    inputs made again where the failed attempt consumed a cache (a shared video prefix), and the
    times are the retry's own (the failed attempt's prefill and steps are no part of them)."""
    engine = generation_cfg.engine()
    timer = FirstTokenTimer(model.device)
    fallback = None
    with PeakMemory(model.device) as memory, torch.inference_mode():
        _synchronize(model.device)
        started = time.perf_counter()
        inputs = make_inputs(engine)
        kwargs = {"logits_processor": LogitsProcessorList([timer]), "pad_token_id": pad_token_id(model, processor)}
        if engine == "static" and (unapplied := unapplied_settings(model, kwargs)):
            engine, fallback = "dynamic", f"{unapplied}; dynamic engine used"
        failed = None
        try:
            sequences = run_decode(model, inputs, generation_cfg, engine, **kwargs)
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # noqa: BLE001 - logged, in the rows, and decoded again
            if engine != "static":
                raise
            failed = f"static decode failed ({type(error).__name__}: {str(error)[:200]}); dynamic engine used"
        if failed is not None:
            fallback = failed
            log.warning("%s", fallback)
            gc.collect()  # the failed attempt's frames, should a reference cycle hold them
            timer.first_logits_at = None
            _synchronize(model.device)
            started = time.perf_counter()
            if cache_arg_given(inputs):  # the failed attempt continued from this cache: make it again
                del inputs
                inputs = make_inputs("dynamic")
            sequences = run_decode(model, inputs, generation_cfg, "dynamic", **kwargs)
        _synchronize(model.device)
        finished = time.perf_counter()
    prefill_ms = ((timer.first_logits_at or finished) - started) * 1000.0
    return inputs, sequences, prefill_ms, (finished - started) * 1000.0, memory.peak_bytes, fallback


def unapplied_settings(model: Any, generate_kwargs: Mapping[str, Any]) -> str | None:
    """Why the static engine would refuse this model's generation settings (v2drop.greedy), or
    None; logged once per reason, as it holds for every call of the model."""
    try:
        greedy_settings(model, generate_kwargs)
    except UnappliedSettings as error:
        _warn_once(str(error))
        return str(error)
    return None


@cache
def _warn_once(message: str) -> None:
    log.warning("%s: decoding with generate() instead", message)


def cache_arg_given(inputs: Mapping[str, Any]) -> bool:
    return any(name in inputs for name in ("cache", "past_key_values"))


def generate_batch(
    model: Any, processor: Any, inputs: Mapping[str, Any], generation_cfg: GenerationConfig,
    inputs_ms: float | None = None,
) -> list[GenResult]:
    """Generate for one padded batch; one GenResult per sample, in batch order. `inputs`: on the
    model's device, and `inputs_ms` how long building them took (both from
    workers.device_inputs.timed_inputs); `inputs_ms` is stamped on the results."""
    marker = v2drop.stats_marker(model)
    _, sequences, prefill_ms, generate_ms, peak_bytes, fallback = timed_generate(
        model, processor, lambda engine: inputs, generation_cfg)
    stats = v2drop.prefill_stats(model, inputs["input_ids"], inputs["attention_mask"], marker)
    return results_for(processor, model, inputs, sequences, stats, inputs_ms=inputs_ms, prefill_ms=prefill_ms,
                       generate_ms=generate_ms, peak_memory_bytes=peak_bytes, fallback_reason=fallback)


def results_for(
    processor: Any, model: Any, inputs: Mapping[str, Any], sequences: torch.Tensor, stats: Sequence[v2drop.VisualStats],
    **timing: Any,
) -> list[GenResult]:
    """One GenResult per row of `sequences`: the text after the prompt, token counts, the visual
    columns of `stats` and the call's `timing` (inputs_ms, prefill_ms, generate_ms, peak_memory_bytes)."""
    new_tokens = sequences[:, inputs["input_ids"].shape[1] :]
    output_tokens = count_output_tokens(new_tokens, stop_token_ids(model, processor))
    prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
    texts = [
        processor.tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(new_tokens, output_tokens)
    ]
    return [
        GenResult(output_text=text, prompt_tokens=int(prompt), output_tokens=int(n), **timing, **stat.columns())
        for text, prompt, n, stat in zip(texts, prompt_tokens, output_tokens, stats)
    ]
