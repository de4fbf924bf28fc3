"""`self_check`: prove at run time that the patched forward is still right on the installed stack.

A patch of another library's forward breaks silently when that library changes (transformers
5.24 renamed the cache keyword; every row still said ok). So before a family is used in a
process, a small random-weight model of that family is built from the installed transformers
classes, on CPU in float64, and:

1. with every keep at 1.0 the patched model must give the stock model's greedy tokens and
   logits, for a left-padded batch of two samples with different prompt lengths and videos;
2. with drops (one of them before Qwen3-VL's last DeepStack layer) each sample of that padded
   batch must give the tokens and logits of the slow, cache-less reference (`v2drop.reference`),
   and the per-layer visual counts must follow the schedule;
3. the static decode engine (`v2drop.static_decode`, the model stage's default when greedy) must
   give generate()'s greedy tokens for that padded batch, stock and with drops;
4. the repetition penalty the static step applies itself (`v2drop.greedy`, as instruct models
   ship one) must give the scores of generate()'s own processor at every step, and the engine
   under it generate()'s tokens.

About a second on CPU per family. A failure raises `SelfCheckError` saying what differed.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch
import transformers
from torch import nn

from v2drop import greedy, reference, static_decode
from v2drop.adapters import adapter_for
from v2drop.api import disable, last_stats, patch
from v2drop.schedule import Schedule
from vlm import testing
from vlm.families import FAMILIES

NUM_LAYERS = 4
NEW_TOKENS = 3
IDENTITY = Schedule(layers=(1, 2, 3), keep=(1.0, 1.0, 1.0))
# Drops at layer 1: before the tiny Qwen3-VL's last DeepStack addition (after layers 0 and 1).
DROPS = Schedule(layers=(1, 2, 3), keep=(0.5, 0.5, 0.0))
# Qwen2.5-VL Instruct ships 1.05; a larger penalty moves the tiny models' scores more
PENALTY = 1.3
LOGITS_ATOL = 1e-6  # float64: real mistakes are orders of magnitude larger
# The check runs sdpa whatever the model uses: the patch is the same for every attention backend
# (flash_attention_2 cannot run on CPU), and stock eager attention gives NaN for left-padded
# float64 batches in transformers 5.23-5.24.
ATTENTION = "sdpa"


class SelfCheckError(RuntimeError):
    """The patched forward differs from the stock model or the reference on this installation."""


@dataclass(frozen=True)
class SelfCheckResult:
    family: str  # config.model_type
    transformers_version: str
    seconds: float

    def describe(self) -> str:
        return f"passed ({self.family}, transformers {self.transformers_version}, {self.seconds:.1f} s)"


def self_check(model_or_family: nn.Module | str, *, cached: bool = True) -> SelfCheckResult:
    """Run the check for this model's family (once per family in a process, unless `cached=False`)."""
    family = model_or_family if isinstance(model_or_family, str) else _family(model_or_family)
    return _cached(family) if cached else run(family)


@functools.cache  # a failure raises, so only passes are remembered
def _cached(family: str) -> SelfCheckResult:
    return run(family)


def _family(model: nn.Module) -> str:
    adapter_for(model)  # an unsupported family is refused by name
    return model.config.model_type


def run(family: str) -> SelfCheckResult:
    start = time.perf_counter()
    samples = _samples(family)
    model = testing.model(family, num_layers=NUM_LAYERS, dtype=torch.float64, attn=ATTENTION)
    inputs = testing.batch(family, samples)
    where = f"v2drop self-check failed ({family}, transformers {transformers.__version__})"
    try:
        stock_tokens, stock_logits = _greedy(model, inputs)
        patch(model, IDENTITY)
        tokens, logits = _greedy(model, inputs)
        _expect_same(f"{where}: with every keep at 1.0, vs the stock model", tokens, logits, stock_tokens, stock_logits)
        _expect_static_engine_tokens(f"{where}: static decode engine, every keep at 1.0", model, inputs,
                                     stock_tokens, stock_logits)
        _expect_generates_repetition_penalty(f"{where}: repetition penalty {PENALTY}", model, inputs)
        patch(model, DROPS)
        tokens, logits = _greedy(model, inputs)
        counts = [s["visual_tokens_per_layer"] for s in last_stats(model)]
        _expect_static_engine_tokens(f"{where}: static decode engine, with drops", model, inputs, tokens, logits)
        disable(model)
        for i, sample in enumerate(samples):
            expected = DROPS.tokens_per_layer(testing.num_visual_tokens(family, sample.visual), NUM_LAYERS)
            if counts[i] != expected:
                raise SelfCheckError(f"{where}: sample {i} kept {counts[i]} visual tokens per layer, "
                                     f"the schedule says {expected}")
            ref_tokens, ref_logits = _reference(model, family, inputs, samples, i)
            _expect_same(f"{where}: with drops, sample {i} of a padded batch vs the slow reference",
                         tokens[i:i + 1], logits[i:i + 1], ref_tokens, ref_logits)
    finally:
        disable(model)
    return SelfCheckResult(family, transformers.__version__, time.perf_counter() - start)


def _samples(family: str) -> list[testing.Sample]:
    """Two videos of different sizes (Qwen) behind prompts of different lengths: a padded batch."""
    sizes = ((2, 4, 4), (2, 6, 4)) if FAMILIES[family].patch_grid_inputs else ((2, 0, 0), (2, 0, 0))
    questions = ("What happens in this clip?", "Describe the people, the colours and the places in it.")
    return [testing.Sample(q, testing.Visual("video", size)) for q, size in zip(questions, sizes)]


@torch.no_grad()
def _greedy(model: nn.Module, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, dim=1)  # [B, T], [B, T, V]


@torch.no_grad()
def _expect_static_engine_tokens(what: str, model: nn.Module, inputs: dict, want_tokens, want_logits) -> None:
    """The static engine's logits, fed generate()'s tokens, equal generate()'s; and its own greedy
    run, stopping rows at end tokens as a user's run does, gives generate()'s tokens."""
    logits = static_decode.forced_logits(model, dict(inputs), want_tokens)
    _expect_same(f"{what}, fed generate()'s tokens", want_tokens[:, 1:], logits, want_tokens[:, 1:], want_logits[:, 1:])
    want = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    tokens = static_decode.generate_static(model, dict(inputs), NEW_TOKENS)
    if not torch.equal(tokens, want):
        raise SelfCheckError(f"{what}: greedy tokens {tokens.tolist()} != generate()'s {want.tolist()}")


@torch.no_grad()
def _expect_generates_repetition_penalty(what: str, model: nn.Module, inputs: dict) -> None:
    """v2drop.greedy.penalize_repeats on generate()'s raw logits gives the scores generate()'s
    processor gave, step by step (step 0 penalises the prompt's tokens, later steps the fed token
    too); the static engine under the penalty gives generate()'s tokens."""
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, repetition_penalty=PENALTY,
                         output_logits=True, output_scores=True, return_dict_in_generate=True)
    prompt = inputs["input_ids"]
    tokens = out.sequences[:, prompt.shape[1]:]
    seen = greedy.seen_tokens(prompt, out.logits[0].shape[-1], inputs["attention_mask"])
    for t, (raw, scores) in enumerate(zip(out.logits, out.scores)):
        fed = prompt[:, -1:] if t == 0 else tokens[:, t - 1:t]
        mine = greedy.penalize_repeats(raw, seen, fed, PENALTY)
        _expect_same(f"{what}, step {t} vs generate()'s processor", mine.argmax(-1), mine, scores.argmax(-1), scores)
    static = static_decode.generate_static(model, dict(inputs), NEW_TOKENS, repetition_penalty=PENALTY)
    if not torch.equal(static, tokens):
        raise SelfCheckError(f"{what}: static engine's greedy tokens {static.tolist()} != generate()'s {tokens.tolist()}")


def _reference(model, family, inputs, samples, index) -> tuple[torch.Tensor, torch.Tensor]:
    visual_ids = adapter_for(model).visual_token_ids(model)
    single = testing.select(inputs, family, samples, index)
    tokens, logits = reference.generate(model, single, DROPS, visual_ids, max_new_tokens=NEW_TOKENS)
    return torch.tensor([tokens]), logits[None]


def _expect_same(what: str, tokens, logits, want_tokens, want_logits) -> None:
    if not torch.equal(tokens, want_tokens):
        raise SelfCheckError(f"{what}: greedy tokens {tokens.tolist()} != {want_tokens.tolist()}")
    if not (torch.isfinite(logits).all() and torch.isfinite(want_logits).all()):
        raise SelfCheckError(f"{what}: non-finite logits")
    error = (logits.double() - want_logits.double()).abs().max().item()
    if not error <= LOGITS_ATOL:
        raise SelfCheckError(f"{what}: logits differ by {error:.2e} (allowed {LOGITS_ATOL:.0e})")
