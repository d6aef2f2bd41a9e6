"""The tokenizers of the preset bases, built locally (no hub): the byte tokenizer, and byte-level BPE
tokenizers trained on a text corpus and shipped as files (engine/data/tokenizers/<name>.json).

    byte    bytes + pad(0) / eos(1) / unk(2): every preset except world-llama
    world   a byte-level BPE of the pipeline's embedded world (world-llama): a word of that world is
            about one token; any other text still encodes, byte by byte. Trained by
            `pipeline.world.train_tokenizer` (deterministic); tests check the shipped file equals it.
"""

from __future__ import annotations

import os

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "tokenizers")
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # pad, eos, unk of the BPE tokenizers, ids 0, 1, 2


def byte_tokenizer():
    """The tokenizer of the preset bases: bytes + pad(0)/eos(1)/unk(2)."""
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer(extra_ids=0)


def train_bpe(texts: list[str], vocab_size: int):
    """A byte-level BPE `tokenizers.Tokenizer` trained on `texts` (deterministic), SPECIAL_TOKENS first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    bpe.train_from_iterator(texts, trainer)
    return bpe


def wrap_bpe(bpe):
    """A transformers tokenizer around a `tokenizers.Tokenizer` with SPECIAL_TOKENS."""
    from transformers import PreTrainedTokenizerFast

    pad, eos, unk = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token=pad, eos_token=eos, unk_token=unk)


def shipped_bpe(name: str):
    """The shipped BPE tokenizer `name` (DATA_DIR/<name>.json), wrapped for transformers."""
    from tokenizers import Tokenizer

    return wrap_bpe(Tokenizer.from_file(os.path.join(DATA_DIR, f"{name}.json")))


TOKENIZERS = {"byte": byte_tokenizer, "world": lambda: shipped_bpe("world")}
