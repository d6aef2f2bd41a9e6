"""The one place where text becomes model input, shared by every stage (rm, sft, dpo, ppo, eval, cai):
a prompt and its completion are joined the same way for the reward model, the policy's training data
and the policy's generation, so a policy is scored on exactly the layout it was trained to continue.

Pure Python: no torch (a tokenizer is any object with transformers' tokenizer interface).
"""

from __future__ import annotations


def format_sample(prompt: str, completion: str) -> str:
    """A prompt and a completion as one text: the prompt, a newline, the completion."""
    return f"{prompt}\n{completion}"


def format_prompt(prompt: str) -> str:
    """What the policy continues when it answers `prompt`: format_sample(prompt, "")."""
    return format_sample(prompt, "")


def encode(tokenizer, text: str, max_length: int) -> list[int]:
    """Token ids ending with EOS; longer texts keep their LAST max_length tokens, since a score is
    read at the last token and the completion is at the end."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids = ids + [eos]
    return ids[-max_length:]


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt to continue: special tokens as the tokenizer adds them (a BOS), but not a
    trailing EOS (byte-level tokenizers append one)."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if ids and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return ids
