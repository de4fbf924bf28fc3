"""What the static decode engine applies of the settings generate() would decode with, and the one
logits processor it applies itself, so its tokens are generate()'s or it refuses the call.

generate() decodes with the model's `generation_config` updated by the call's keyword arguments,
and turns the settings into logits processors (transformers' `_get_logits_processor`). Greedy
decoding leaves the sampling ones out (temperature, top_k, top_p, ...). It keeps the repetition
penalty, which instruct models ship (Qwen2-VL and Qwen2.5-VL Instruct: 1.05); the static step
applies it as transformers does (`penalize_repeats`). Any other setting generate() would act on
(no_repeat_ngram_size, min_new_tokens, suppress_tokens, num_beams, stop_strings, a static cache,
...) makes `greedy_settings` refuse before any model work (`UnappliedSettings`), and the caller
decodes with generate(): the engine never gives other tokens without saying so.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

# generation_config fields (as `to_diff_dict` lists those not at their defaults) that greedy
# generate() does not act on, or that the static engine applies: end and pad tokens, the penalty
APPLIED = frozenset({
    "pad_token_id", "bos_token_id", "eos_token_id", "repetition_penalty", "max_length", "max_new_tokens",
    "do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p", "top_h", "epsilon_cutoff", "eta_cutoff",
    "use_cache", "output_attentions", "output_hidden_states", "output_scores", "output_logits",
    "return_dict_in_generate", "_from_model_config", "transformers_version",
})
CALLERS_OWN = frozenset({"logits_processor"})  # a caller's processor runs on the prefill's first token only
# A caller's logits processor with this attribute set True returns the scores it is given (a timer):
# the engine runs it on the first token alone, where generate() runs it at every step.
OBSERVES_ONLY = "observes_only"


class UnappliedSettings(ValueError):
    """The call asks generate() for something the static engine does not do: decode with generate()."""


@dataclass(frozen=True)
class GreedySettings:
    eos: tuple[int, ...]  # a row ends at the first of these
    pad: int  # what a finished row emits
    repetition_penalty: float  # 1.0: none


def greedy_settings(model: Any, generate_kwargs: Mapping[str, Any]) -> GreedySettings:
    """The settings greedy generate() would decode with on `model` and `generate_kwargs`, or
    UnappliedSettings naming those the static engine would not apply. Example: Qwen2.5-VL-7B-
    Instruct's config -> GreedySettings(eos=(151645, 151643), pad=151643, repetition_penalty=1.05)."""
    config = copy.deepcopy(model.generation_config)
    unused = config.update(**generate_kwargs)
    config.do_sample = False
    unapplied = sorted((set(config.to_diff_dict()) - APPLIED) | (set(unused) - CALLERS_OWN))
    unapplied += ["do_sample"] if generate_kwargs.get("do_sample") else []
    unapplied += [f"logits_processor {type(p).__name__}" for p in generate_kwargs.get("logits_processor") or ()
                  if not getattr(p, OBSERVES_ONLY, False)]
    if unapplied:
        raise UnappliedSettings(f"the static engine does not apply the generation settings {unapplied} "
                                "(the model's generation_config or the call's); generate() does")
    eos = config.eos_token_id
    eos = (eos,) if isinstance(eos, int) else tuple(eos or ())
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    return GreedySettings(eos, int(pad), float(config.repetition_penalty or 1.0))


def seen_tokens(input_ids: torch.Tensor, vocab_size: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, V] bool: the tokens of each row of input_ids [B, L] that generate()'s penalty counts.
    Like transformers (`prompt_ignore_length` in `_get_logits_processor`), a row's left padding is
    not counted: a padded row would otherwise penalise its pad token, which is an end token for
    the Qwen families. Ids past the logits' vocabulary cannot be generated and are left out."""
    ids = input_ids.clamp(max=vocab_size)  # vocab_size: a spare column, dropped below
    if attention_mask is not None:
        leading_pads = (attention_mask != 0).int().argmax(dim=1)
        positions = torch.arange(ids.shape[1], device=ids.device)
        ids = ids.masked_fill(positions[None, :] < leading_pads[:, None], vocab_size)
    seen = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.bool, device=ids.device)
    return seen.scatter_(1, ids, True)[:, :vocab_size].contiguous()


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, token: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor on logits [B, V] cast to float32, as generate()
    casts them: each token a row has seen, `token` [B, 1] (fed now, marked in `seen` in place)
    included, divided by `penalty` where positive, multiplied where negative. Static shapes."""
    seen.scatter_(1, token, True)
    scores = logits.float()
    return torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)
