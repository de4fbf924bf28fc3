"""The tiny models' tokenizer: a real `Qwen2Tokenizer` whose byte-level BPE is trained here, offline.

Every family here uses Qwen's tokenizer; the family's special tokens and chat template come from
its row in `vlm.families`. Trained on a few lines of ordinary English, so prompts, captions and
questions tokenize into words rather than bytes (a 1,024-token vocab by default).
"""

from __future__ import annotations

import json
from typing import Any

from vlm.families import family

# Enough ordinary English that prompts, captions and questions tokenize into words, not bytes.
_TRAINING_TEXT = """
Describe this video in detail. What is happening in the video? What is the person doing?
Summarize the main events of the clip. How many people are there? What color is the car?
A man is walking his dog along a quiet street on a sunny morning. The dog stops to sniff a tree.
A woman sits at a wooden table and reads a book while drinking a cup of coffee near the window.
Two children are playing football in a green park; one of them kicks the ball towards the goal.
The camera slowly pans across a kitchen where someone is chopping vegetables and boiling water.
A red car drives down a busy road in the city at night, passing shops, lights and tall buildings.
The video shows a cat jumping onto a sofa, then lying down and falling asleep in the warm sun.
In the first scene a chef prepares pasta; in the second scene he serves it to smiling guests.
A group of friends hike up a mountain trail, stop at the top and look at the view of the valley.
The weather is cloudy and it starts to rain, so people open their umbrellas and hurry home.
A bird flies over the lake, lands on a branch and sings while the water moves in the wind.
The presenter stands in front of a screen and explains a chart with numbers about the year.
Answer the question based on the video. Is the door open or closed? Where does this take place?
The image contains a white plate with bread, cheese and fresh fruit on a blue kitchen table.
First, second, third, then, after that, finally, before, during, while, because, however.
the a an and or but of to in on at for with from by over under into through between above below
is are was were be been being have has had do does did will would can could should may might
one two three four five six seven eight nine ten hundred thousand left right up down front back
""".strip()



def _train_bpe(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Trains a byte-level BPE with Qwen2's exact normalizer and pre-tokenizer, so the vocab and merges
    drop into the real `Qwen2Tokenizer` and split text the way the real checkpoints do."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(_TRAINING_TEXT.splitlines(), trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    return model["vocab"], merges


def build_tokenizer(model_type: str, *, bpe_vocab_size: int = 1024) -> Any:
    """A real `Qwen2Tokenizer` (every family here uses Qwen's tokenizer) with the family's special tokens
    appended after the BPE vocab, as in the real checkpoints, and its chat template attached."""
    from transformers import AddedToken, Qwen2Tokenizer

    row = family(model_type)
    vocab, merges = _train_bpe(bpe_vocab_size)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in row.special_tokens],
                         special_tokens=True)
    tokenizer.chat_template = row.chat_template
    tokenizer.model_max_length = 32768
    return tokenizer
