"""Tiny vision-language models with RANDOM (seeded) weights, built offline from real transformers classes.

Why: tests, the offline preset (`model.source: tiny:<family>`) and benchmarks need a model that runs the
exact code paths of the real checkpoints (real config classes, real modeling files, a real byte-level BPE
tokenizer with the family's special tokens and chat template, the family's real processor) without
downloading anything. Nothing here is a mock: only the sizes are small and the weights random. What
differs between families (classes, special tokens, config and processor settings) is the family's
row in `vlm.families`; the tokenizer is trained in `vlm.tiny_tokenizer`.

    from vlm import tiny, loading
    path = tiny.build_cached("qwen2_5_vl", "~/.cache/v2drop-batch/tiny", num_layers=8)
    model, processor = loading.load(path)

Token counts with the defaults (patch 14, 112 px):
  qwen2_5_vl       4 frames 112x112 -> grid (t=2, h=8, w=8) -> 2*8*8/2**2 = 32 <|video_pad|>; image 112x112 -> 16
  qwen3_vl         patch 16: 4 frames 112x112 -> 128x128 -> grid (2, 8, 8) -> 2 timestamped spans of 16
  llava_onevision  4 frames 112x112 -> 4 * ceil(8/2)**2 + 1 newline = 65 <video>;
                   image 112x112 -> anyres 2x2 crops: 64 base + 8*8 unpadded + 8 newlines = 136 <image>
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from vlm.families import TINY_FAMILIES, family
from vlm.tiny_tokenizer import build_tokenizer

# Bump when the built directory changes for the same arguments, so `build_cached` rebuilds.
BUILDER_VERSION = 2
MARKER_FILE = "RANDOM_WEIGHTS.json"
DEFAULT_MAX_PIXELS = 224 * 224

# --------------------------------------------------------------------------------------------- configs
def _padded_vocab_size(tokenizer: Any, multiple: int = 64) -> int:
    """Rounds the tokenizer length up, as real checkpoints do (Qwen: 151665 tokens, 152064 embeddings)."""
    return math.ceil(len(tokenizer) / multiple) * multiple


def _text_config(
    tokenizer: Any,
    *,
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    vocab_size: int | None,
) -> dict[str, Any]:
    """Fields shared by every family's Qwen2 text model; `vocab_size` may exceed the tokenizer (7B shape)."""
    vocab_size = vocab_size or _padded_vocab_size(tokenizer)
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )


def build_config(
    model_type: str,
    tokenizer: Any,
    *,
    num_layers: int = 8,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int | None = None,
    vision_hidden_size: int = 32,
    vision_depth: int = 2,
) -> Any:
    """The family's real config class with small sizes; pass 7B sizes (hidden_size=3584, num_heads=28,
    num_kv_heads=4, intermediate_size=18944, num_layers=28, vocab_size=152064) for benchmark shapes."""
    import transformers

    row = family(model_type)
    text = _text_config(
        tokenizer,
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
    )
    special_ids = {token: tokenizer.convert_tokens_to_ids(token) for token in row.special_tokens}
    kwargs = row.tiny_config(special_ids, text, vision_hidden_size, vision_depth)
    return getattr(transformers, row.config_class)(**kwargs)


# --------------------------------------------------------------------------------------------- model
def build_model(config: Any, *, seed: int = 0, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Instantiates the family's real model class. The RNG is forked so seeding here does not disturb the
    caller's random state; `device="meta"` gives a weightless model for 7B-shaped FLOP/shape checks."""
    import transformers

    model_cls = getattr(transformers, family(config.model_type).model_class)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = model_cls._from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = [config.text_config.eos_token_id, config.text_config.bos_token_id]
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    return model.eval()


# --------------------------------------------------------------------------------------------- processor
def build_processor(model_type: str, tokenizer: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Any:
    """The family's real processor (its real image and video processors) with the tiny sizes."""
    import transformers

    row = family(model_type)
    parts = row.tiny_processor(max_pixels)
    return getattr(transformers, row.processor_class)(
        image_processor=getattr(transformers, row.image_processor_class)(**parts["image_processor"]),
        tokenizer=tokenizer,
        video_processor=getattr(transformers, row.video_processor_class)(**parts["video_processor"]),
        chat_template=row.chat_template,
        **parts["processor"],
    )


# --------------------------------------------------------------------------------------------- build / load
_TEXT_OVERRIDES = ("num_heads", "num_kv_heads", "intermediate_size", "vocab_size", "vision_hidden_size", "vision_depth")
_BUILD_OVERRIDES = ("bpe_vocab_size", "max_pixels")


def build(
    model_type: str,
    out_dir: str | Path,
    *,
    num_layers: int = 8,
    hidden_size: int = 64,
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """Builds config, random seeded model, tokenizer and processor and saves them into `out_dir`.

    Overrides: num_heads, num_kv_heads, intermediate_size, vocab_size, vision_hidden_size, vision_depth
    (reach the config), bpe_vocab_size, max_pixels (tokenizer, Qwen pixel bound). Same arguments -> identical
    files (weights, vocab)."""
    family(model_type)  # an unknown family is refused by name before any work
    unknown = set(overrides) - set(_TEXT_OVERRIDES) - set(_BUILD_OVERRIDES)
    if unknown:
        allowed = _TEXT_OVERRIDES + _BUILD_OVERRIDES
        raise TypeError(f"unknown tiny.build overrides {sorted(unknown)}; allowed: {allowed}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(model_type, bpe_vocab_size=overrides.get("bpe_vocab_size", 1024))
    config_kwargs = {k: v for k, v in overrides.items() if k in _TEXT_OVERRIDES}
    config = build_config(model_type, tokenizer, num_layers=num_layers, hidden_size=hidden_size, **config_kwargs)
    build_model(config, seed=seed).save_pretrained(out_dir)
    max_pixels = overrides.get("max_pixels", DEFAULT_MAX_PIXELS)
    build_processor(model_type, tokenizer, max_pixels=max_pixels).save_pretrained(out_dir)
    _write_marker(out_dir, model_type, dict(num_layers=num_layers, hidden_size=hidden_size, seed=seed, **overrides))
    return out_dir


def _write_marker(out_dir: Path, model_type: str, kwargs: dict[str, Any]) -> None:
    """The marker lets `is_random_weights` (and anyone reading the folder) tell these apart from real weights."""
    marker = {"v2drop_tiny": BUILDER_VERSION, "family": model_type, "weights": "random", "build_kwargs": kwargs}
    (out_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    (out_dir / "README.md").write_text(
        f"# Tiny {model_type} with RANDOM weights\n\n"
        "Built offline by `vlm.tiny` for tests and the offline preset. The weights are random (seeded):\n"
        "outputs are meaningless text. Arguments: `" + json.dumps(kwargs, sort_keys=True) + "`.\n"
    )


def is_random_weights(path: str | Path) -> bool:
    """True for directories written by `build` (they carry the marker file)."""
    marker = Path(path) / MARKER_FILE
    try:
        return json.loads(marker.read_text()).get("weights") == "random"
    except (OSError, ValueError):
        return False


def cache_key(model_type: str, **kwargs: Any) -> str:
    """Directory name for a build: family plus a hash of every argument and the builder version."""
    payload = json.dumps({"family": model_type, "v": BUILDER_VERSION, **kwargs}, sort_keys=True, default=str)
    return f"{model_type}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


def build_cached(model_type: str, cache_dir: str | Path, **kwargs: Any) -> Path:
    """Builds once per argument set into `cache_dir/<family>-<hash>`; concurrent callers (several Ray
    actors on one node) each build into a private temp dir and the first rename wins."""
    family(model_type)  # an unknown family is refused by name before any work
    cache_dir = Path(cache_dir).expanduser()
    target = cache_dir / cache_key(model_type, **kwargs)
    if is_random_weights(target):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache_dir))
    try:
        build(model_type, tmp, **kwargs)
        os.rename(tmp, target)  # atomic on one filesystem; fails if another process already renamed
    except OSError:
        if not is_random_weights(target):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build a tiny random-weight VLM offline.")
    parser.add_argument("family", choices=TINY_FAMILIES)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build(args.family, args.out_dir, num_layers=args.num_layers, hidden_size=args.hidden_size, seed=args.seed)
    print(path)


if __name__ == "__main__":
    main()
