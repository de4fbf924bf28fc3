"""A slow, obviously-right V²Drop: no cache, one sample, the whole sequence recomputed per step.

At every generation step the full sequence (prompt + tokens so far) runs through the decoder
layers; at each drop layer the visual tokens are ranked with Python's `sorted` on
(-score, index) and the top-k kept; positions are gathered and the rotary cos/sin recomputed
from them; the mask is a plain causal mask built by hand. Nothing here shares code with
`v2drop.loop` except the model's own layers. The tests and the run-time self-check
(`v2drop.self_check`) compare the engine with it.
"""

from __future__ import annotations

import math

import torch

from v2drop.schedule import Schedule


class _Captured(Exception):
    pass


def text_model_inputs(model, inputs: dict) -> dict:
    """The embeddings and position ids the stock model feeds its text decoder for `inputs`."""
    text_model = model.model.language_model
    captured = {}

    def hook(module, args, kwargs):
        captured.update(kwargs)
        raise _Captured

    handle = text_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**inputs)
    except _Captured:
        pass
    finally:
        handle.remove()
    return captured


def _positions(model, captured: dict) -> torch.Tensor:
    """[P, L] positions of one sample: P = 3 for Qwen M-RoPE, 1 for 1-D RoPE."""
    embeds = captured["inputs_embeds"]
    positions = captured.get("position_ids")
    if positions is None:
        return torch.arange(embeds.shape[1])[None]
    if positions.ndim == 3:  # [3 or 4, 1, L]
        return positions[-3:, 0]
    return positions[0][None]


def _rotary(text_model, hidden, positions):
    if positions.shape[0] == 3:
        return text_model.rotary_emb(hidden, positions[:, None, :])
    return text_model.rotary_emb(hidden, positions)


def _causal_mask(length: int, dtype) -> torch.Tensor:
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype).triu(1)
    return mask[None, None]


def _deepstack(captured: dict) -> dict[int, list[torch.Tensor]]:
    """Qwen3-VL: {prompt index of a visual token: its feature per DeepStack level}; {} elsewhere."""
    mask, levels = captured.get("visual_pos_masks"), captured.get("deepstack_visual_embeds")
    if mask is None or not levels:
        return {}
    visual_indices = [t for t, is_visual in enumerate(mask[0].tolist()) if is_visual]
    return {t: [level[n] for level in levels] for n, t in enumerate(visual_indices)}


def forward_last_logits(model, schedule: Schedule, embeds, positions, visual, deepstack=None) -> torch.Tensor:
    """Logits of the last token. embeds [L, D], positions [P, L], visual [L] bool; `deepstack` as
    `_deepstack` returns: added to a token's hidden state after layer k, wherever that token now is."""
    text_model = model.model.language_model
    drops = dict(zip(schedule.layers, schedule.keep))
    hidden, previous = embeds[None], None
    source = list(range(embeds.shape[0]))  # each remaining token's index in the prompt
    for i, layer in enumerate(text_model.layers):
        if i in drops:
            assert previous is not None, "Schedule layers start at 1: a drop always has a layer before it"
            keep = _reference_keep(hidden[0], previous[0], visual, drops[i])
            hidden, positions, visual = hidden[:, keep], positions[:, keep], visual[keep]
            source = [source[t] for t in keep]
        cos, sin = _rotary(text_model, hidden, positions)
        previous = hidden
        hidden = layer(
            hidden,
            attention_mask=_causal_mask(hidden.shape[1], hidden.dtype),
            position_embeddings=(cos, sin),
            position_ids=None,
            use_cache=False,
        )
        for t, src in enumerate(source):
            if src in (deepstack or {}) and i < len(deepstack[src]):
                hidden[0, t] = hidden[0, t] + deepstack[src][i]
    return model.lm_head(text_model.norm(hidden))[0, -1]


def _reference_keep(hidden, previous, visual, keep: float) -> list[int]:
    scores = (hidden.double() - previous.double()).norm(dim=-1).tolist()
    visual_positions = [t for t in range(len(scores)) if visual[t]]
    k = min(len(visual_positions), math.floor(len(visual_positions) * keep + 1e-9))
    chosen = sorted(visual_positions, key=lambda t: (-scores[t], t))[:k]
    return sorted([t for t in range(len(scores)) if not visual[t]] + chosen)


@torch.no_grad()
def generate(model, inputs: dict, schedule: Schedule, visual_ids, max_new_tokens: int):
    """Greedy tokens and per-step logits for ONE unpadded sample."""
    captured = text_model_inputs(model, inputs)
    embeds = captured["inputs_embeds"][0]
    positions = _positions(model, captured)
    visual = torch.isin(inputs["input_ids"][0], torch.tensor(visual_ids))
    deepstack = _deepstack(captured)
    tokens, logits = [], []
    embed_tokens = model.model.language_model.embed_tokens
    for _ in range(max_new_tokens):
        step_logits = forward_last_logits(model, schedule, embeds, positions, visual, deepstack)
        token = int(step_logits.argmax())
        tokens.append(token)
        logits.append(step_logits)
        # A new text token takes the next position after the largest one so far (all rows alike).
        next_position = positions.max() + 1
        positions = torch.cat([positions, next_position.repeat(positions.shape[0], 1)], dim=1)
        embeds = torch.cat([embeds, embed_tokens(torch.tensor([token]))], dim=0)
        visual = torch.cat([visual, torch.tensor([False])])
    return tokens, torch.stack(logits)
