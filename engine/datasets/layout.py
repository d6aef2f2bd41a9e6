"""The one place where text becomes model input, shared by every stage (rm, sft, dpo, ppo, eval, cai,
the pipeline): a prompt and its completion are laid out the same way for the reward model, the policy's
training data and the policy's generation, so a policy is trained, sampled and scored on one layout.

Two layouts, chosen by the tokenizer:

    chat    the tokenizer has a chat template (an instruct model, e.g. SmolLM2's ChatML): a prompt is a
            user turn (or a chat's earlier messages) rendered by the template with its generation prompt;
            the completion follows as the assistant's content tokens and ends with the template's end-of-
            turn token (`<|im_end|>` for ChatML), where generation stops
    plain   no template (the preset bases): the prompt, a newline, the completion, EOS

The chat layout puts a sample's ids together from the prompt's ids and the completion's, never by
tokenizing the rendered conversation in one piece, so a sample is exactly the prompt PPO samples from
plus the completion's tokens (a BPE merge across the boundary cannot move it).

Pure Python: no torch (a tokenizer is any object with transformers' tokenizer interface).
"""

from __future__ import annotations

import sys

_PROBE = "\x00probe\x00"  # an assistant message the template renders around (finds the end-of-turn text)


def format_sample(prompt: str, completion: str) -> str:
    """The plain layout: a prompt and a completion as one text: the prompt, a newline, the completion."""
    return f"{prompt}\n{completion}"


def format_prompt(prompt: str) -> str:
    """What the policy continues when it answers `prompt` in the plain layout: format_sample(prompt, "")."""
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
    """Token ids of a text to continue: special tokens as the tokenizer adds them (a BOS), but not a
    trailing EOS (byte-level tokenizers append one)."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if ids and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return ids


# ---- the chat layout -----------------------------------------------------------------------------------


def is_chat(tokenizer) -> bool:
    """The tokenizer renders conversations (a chat template): the chat layout applies."""
    return bool(getattr(tokenizer, "chat_template", None))


def _pieces(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def end_of_turn_id(tokenizer) -> int | None:
    """The token that ends an assistant turn: the first one the chat template writes after an assistant
    message's content (`<|im_end|>` for ChatML); EOS in the plain layout."""
    if not is_chat(tokenizer):
        return tokenizer.eos_token_id
    cached = getattr(tokenizer, "_rlhf_end_of_turn", None)
    if cached is None:
        messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _PROBE}]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        after = text[text.rindex(_PROBE) + len(_PROBE) :]
        ids = _pieces(tokenizer, after)
        cached = ids[0] if ids else tokenizer.eos_token_id
        tokenizer._rlhf_end_of_turn = cached
    return cached


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """Tokens that end a response: EOS, and the end of an assistant turn in the chat layout."""
    return tuple(sorted({t for t in (tokenizer.eos_token_id, end_of_turn_id(tokenizer)) if t is not None}))


def messages_of(prompt) -> list[dict]:
    """A prompt as chat messages: a string is one user turn; a chat record's earlier messages pass as
    they are ((role, content) pairs or dicts)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [m if isinstance(m, dict) else {"role": m[0], "content": m[1]} for m in prompt]


def prompt_ids(tokenizer, prompt, *, reply_prefix: str = "") -> list[int]:
    """What the policy continues when it answers `prompt` (a string, or a chat's earlier messages).

    chat: the template's rendering of the messages with the generation prompt, then `reply_prefix` (the
    start of the assistant's reply, e.g. "Critique:"), as token ids; plain: format_prompt(prompt) +
    reply_prefix."""
    if not is_chat(tokenizer):
        if not isinstance(prompt, str):
            raise ValueError("a chat prompt (messages) needs a tokenizer with a chat template")
        return encode_prompt(tokenizer, format_prompt(prompt) + reply_prefix)
    text = tokenizer.apply_chat_template(messages_of(prompt), tokenize=False, add_generation_prompt=True)
    return _pieces(tokenizer, text + reply_prefix)  # the template writes its own special tokens


def template_prompt_ids(tokenizer, text: str) -> list[int]:
    """A filled prompt template (cai's critique, revision and judge templates) as the ids to continue.
    plain: the text itself; chat: everything before the text's last line as a user turn, its last line
    ("Critique:", "The answer is: (") as the start of the assistant's reply."""
    if not is_chat(tokenizer):
        return encode_prompt(tokenizer, text)
    head, _, last = text.rpartition("\n")
    return prompt_ids(tokenizer, head.rstrip("\n") or last, reply_prefix=last if head else "")


def sample_ids(tokenizer, prompt, completion: str, max_length: int = sys.maxsize) -> tuple[list[int], int]:
    """(token ids, P): a prompt and its completion as one sample, P of its ids being the prompt's.

    chat: prompt_ids(prompt) + the completion's tokens + the end-of-turn token, so the ids equal what the
    policy samples (the prompt, then its tokens up to the stop); plain: encode(format_sample(...)), P the
    ids it shares with the prompt alone. Longer samples keep their LAST max_length ids (a score is read
    at the last token, the completion is at the end); P shrinks by what the cut took."""
    if is_chat(tokenizer):
        head = prompt_ids(tokenizer, prompt)
        ids = head + _pieces(tokenizer, completion) + [end_of_turn_id(tokenizer)]
        P = len(head)
    else:
        ids = encode(tokenizer, format_sample(prompt, completion), sys.maxsize)
        head = encode_prompt(tokenizer, format_prompt(prompt))
        P = 0
        while P < min(len(ids), len(head)) and ids[P] == head[P]:  # a token straddling the boundary trains
            P += 1
    drop = max(0, len(ids) - max_length)
    return ids[drop:], max(P - drop, 0)
