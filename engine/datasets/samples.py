"""Samples: SFT records (JSONL `{"prompt", "completion"}` or `{"messages": [{"role", "content"}, ...]}`,
the tokenizer's chat template; the last message is the assistant's reply that trains; or the embedded
corpus) and their tokens: a sample's ids and how many of them are the prompt (datasets.layout). A
preference pair's two sides are laid out the same way, for DPO and the reward model alike.

Pure Python: no torch.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from ..core.jsonl import check_fields, read_jsonl, require_str
from ..errors import DataError
from .corpus import embedded_sft_examples
from .layout import encode, encode_prompt, format_prompt, format_sample

SFT_FIELDS = ("prompt", "completion")
CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class SFTExample:
    """One training example: `completion` is the reply to `prompt`."""

    prompt: str  # the prompt text; for a chat record, its earlier messages as JSON (held-out splits use it)
    completion: str
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content) of a chat record, the reply last
    line: int = 0  # line in the data file (0: built in code)


def parse_example(obj, line: int = 0) -> SFTExample:
    """One JSON object -> SFTExample; ValueError says what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        check_fields(obj, "chat", ("messages",), SFT_FIELDS + ("messages",))
        messages = obj["messages"]
        if not isinstance(messages, list) or len(messages) < 2:
            raise ValueError("'messages' must be a list of at least 2 messages (a prompt, then the reply)")
        turns = []
        for i, m in enumerate(messages):
            try:
                turns.append(_parse_message(m))
            except ValueError as e:
                raise ValueError(f"message {i}: {e}") from e
        if turns[-1][0] != "assistant":
            raise ValueError(f"the last message is the reply that trains: its role must be 'assistant', not "
                             f"{turns[-1][0]!r}")  # fmt: skip
        key = json.dumps([list(t) for t in turns[:-1]], ensure_ascii=False)
        return SFTExample(key, turns[-1][1], tuple(turns), line)
    check_fields(obj, "sft", SFT_FIELDS, SFT_FIELDS + ("messages",))
    prompt, completion = require_str(obj, "prompt"), require_str(obj, "completion")
    if not completion.strip():
        raise ValueError("'completion' is only whitespace")
    return SFTExample(prompt, completion, None, line)


def _parse_message(m) -> tuple[str, str]:
    if not isinstance(m, dict):
        raise ValueError(f"expected an object with 'role' and 'content', got {type(m).__name__}")
    check_fields(m, "message", ("role", "content"))
    role, content = require_str(m, "role"), require_str(m, "content")
    if role not in CHAT_ROLES:
        raise ValueError(f"role {role!r}: expected one of {', '.join(CHAT_ROLES)}")
    if not content.strip():
        raise ValueError("'content' is only whitespace")
    return role, content


def load_sft_data(path: str) -> list[SFTExample]:
    """The SFT JSONL file, or the embedded corpus when `path` is ""; a bad line is a DataError naming
    `path:line`."""
    if not path:
        return [SFTExample(p, c) for p, c in embedded_sft_examples()]
    return read_jsonl(path, parse_example)


# ---- tokens -------------------------------------------------------------------------------------


def _with_prompt_length(ids: list[int], prompt_ids: list[int], max_length: int) -> tuple[list[int], int]:
    """(the last max_length ids, P): P = how many leading ids agree with the prompt's, less what the
    truncation dropped (a token that straddles the boundary carries completion text: it trains)."""
    P = 0
    while P < min(len(ids), len(prompt_ids)) and ids[P] == prompt_ids[P]:
        P += 1
    drop = max(0, len(ids) - max_length)
    return ids[drop:], max(P - drop, 0)


def encode_example(tokenizer, example: SFTExample, max_length: int, source: str = "data") -> tuple[list[int], int]:
    """(token ids, P): the sample's ids (ending with EOS) and how many of them are the prompt.

    prompt/completion: layout.encode(format_sample(prompt, completion)), the prompt being
    layout.encode_prompt(format_prompt(prompt)) (what the policy continues in PPO). Chat: the
    tokenizer's chat template over every message, the prompt being its render of the earlier ones with
    the generation prompt; a tokenizer without a template is a DataError naming the record."""
    if example.messages is None:
        ids = encode(tokenizer, format_sample(example.prompt, example.completion), sys.maxsize)
        return _with_prompt_length(ids, encode_prompt(tokenizer, format_prompt(example.prompt)), max_length)
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{source}:{example.line}: 'messages' records need a tokenizer with a chat template and "
                        "this model's tokenizer has none; write {\"prompt\", \"completion\"} records instead")
    messages = [{"role": r, "content": c} for r, c in example.messages]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    ids = list(tokenizer(full, add_special_tokens=False)["input_ids"])  # the template writes BOS itself
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)  # generation stops at EOS: the reply must teach it, as text.encode does
    return _with_prompt_length(ids, list(tokenizer(prompt, add_special_tokens=False)["input_ids"]), max_length)


def completion_tokens(ids: list[int], P: int) -> int:
    """Tokens of a sample the loss covers: positions max(P, 1).. (position 0 has nothing before it)."""
    return len(ids) - max(P, 1)


def encode_pairs(tokenizer, pairs, max_length: int, source: str = "data") -> list:
    """Preference pairs (datasets.feedback.PreferencePair) -> [((chosen ids, P), (rejected ids, P))]: each
    side laid out as an SFT sample of the pair's prompt."""
    return [
        (encode_example(tokenizer, SFTExample(p.prompt, p.chosen, line=p.line), max_length, source),
         encode_example(tokenizer, SFTExample(p.prompt, p.rejected, line=p.line), max_length, source))
        for p in pairs
    ]  # fmt: skip
