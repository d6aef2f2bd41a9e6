"""Samples: SFT records (JSONL `{"prompt", "completion"}` or `{"messages": [{"role", "content"}, ...]}`,
the tokenizer's chat template; the last message is the assistant's reply that trains; or the embedded
corpus) and their tokens: a sample's ids and how many of them are the prompt (datasets.layout). A
preference pair's two sides are laid out the same way, for DPO and the reward model alike.

Pure Python: no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..core.jsonl import check_fields, read_jsonl, require_str
from ..errors import DataError
from .corpus import embedded_sft_examples
from .layout import is_chat, sample_ids

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


def encode_example(tokenizer, example: SFTExample, max_length: int, source: str = "data") -> tuple[list[int], int]:
    """(token ids, P): the sample's ids and how many of them are the prompt (datasets.layout.sample_ids:
    the chat layout where the tokenizer has a template, else the plain one). A chat record's prompt is
    its earlier messages; such a record with a tokenizer without a template is a DataError naming it."""
    if example.messages is None:
        return sample_ids(tokenizer, example.prompt, example.completion, max_length)
    if not is_chat(tokenizer):
        raise DataError(f"{source}:{example.line}: 'messages' records need a tokenizer with a chat template and "
                        "this model's tokenizer has none; write {\"prompt\", \"completion\"} records instead")
    return sample_ids(tokenizer, example.messages[:-1], example.messages[-1][1], max_length)


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
