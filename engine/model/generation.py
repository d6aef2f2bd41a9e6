"""Sampling responses from one role of the stack: KV-cached decoding with temperature / top-k / top-p,
stop tokens and stop strings, several samples per prompt, and randomness that belongs to each row.

Prompts come as token ids (datasets.layout renders and encodes text: the chat template where the
tokenizer has one). Letters: B rows (prompts x samples per prompt), P prompt tokens (left-padded), R
response tokens (right-padded), V vocabulary, H hidden.

Each step computes the logits of the LAST position only, (B, H) @ (H, V): sampling needs the whole
distribution of the next token, and nothing else in the engine materialises logits.

Randomness. A row's sample is a function of (seed, the row's key, the step) alone: the next token is
the Gumbel-max draw argmax_v(logits_v / T + g_v) (Gumbel 1954; it draws from softmax(logits / T)
exactly), with g_v = -log(-log(u_v)) and u_v a counter-based hash of (seed, key, step, v). So a
prompt gets the same response whatever else is in its batch or on which data-parallel rank it runs,
and a resumed run samples what the uninterrupted run sampled, with no generator state to carry.
Top-k / top-p set the logits outside the kept set to -inf before the draw.

    python -m engine ppo ...   (generation is step 2 of the PPO loop; stages/ppo.py)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.tensors import pad
from .config import SamplingConfig


@dataclass
class Samples:
    """Responses sampled for a batch of prompts: prompt (left-padded) then response (right-padded)."""

    input_ids: torch.Tensor  # (B, P + R) long
    attention_mask: torch.Tensor  # (B, P + R) long: 1 on real prompt and response tokens
    prompt_length: int  # P: responses start at this column
    response_length: torch.Tensor  # (B,) long: response tokens, the stop token included
    stopped: torch.Tensor  # (B,) bool: ended at EOS, a stop token or a stop string (else at max_new_tokens)
    prompt_index: torch.Tensor  # (B,) long: the row's prompt in the batch (row = prompt * k + sample)
    responses: list[str]  # (B,) decoded response text (special tokens skipped)

    @property
    def response_mask(self) -> torch.Tensor:
        """(B, R) bool: real response tokens."""
        R = self.input_ids.shape[1] - self.prompt_length
        return torch.arange(R, device=self.input_ids.device)[None, :] < self.response_length[:, None]


# ---- the draw ------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _i64(c: int) -> int:
    """A 64-bit constant as the signed value torch's int64 holds."""
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _C1, _C2 = _i64(0x9E3779B97F4A7C15), _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser (Steele et al. 2014): a bijection of 64-bit words that scrambles every bit;
    int64 arithmetic wraps."""
    x = (x ^ _shr(x, 30)) * _C1
    x = (x ^ _shr(x, 27)) * _C2
    return x ^ _shr(x, 31)


def row_streams(seed: int, keys: torch.Tensor) -> torch.Tensor:
    """(B,) int64 stream ids, one per row key, for `gumbel`."""
    base = _mix(torch.tensor([_i64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _MASK64)], dtype=torch.long))
    return _mix(base ^ _mix(keys.long().cpu() * _GOLDEN + 1)).to(keys.device)


def gumbel(streams: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """(B, V) float64 standard Gumbel noise, a pure function of (stream, step, v)."""
    at_step = _mix(streams ^ _i64(((step + 1) * 0xD1B54A32D192ED03) & _MASK64))  # (B,)
    v = torch.arange(vocab, device=streams.device, dtype=torch.long)
    bits = _mix(at_step[:, None] + v[None, :] * _GOLDEN)  # (B, V)
    u = (_shr(bits, 11).double() + 0.5) * 2.0**-53  # in (0, 1)
    return -torch.log(-torch.log(u))


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """(B, V) logits with everything outside the top-k and the top-p nucleus set to -inf (the most
    likely token always stays)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already reach top_p
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop[:, 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, config: SamplingConfig, streams: torch.Tensor, step: int) -> torch.Tensor:
    """(B, V) fp32 logits of the next token -> (B,) sampled ids."""
    if config.temperature == 0:
        return logits.argmax(dim=-1)
    scaled = filter_logits(logits / config.temperature, config.top_k, config.top_p)
    return (scaled.double() + gumbel(streams, step, logits.shape[-1])).argmax(dim=-1)


# ---- decoding ------------------------------------------------------------------------------------


def _stop_string_hit(tokenizer, tokens: list[int], stop_strings: tuple[str, ...]) -> bool:
    if not stop_strings:
        return False
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return any(s in text for s in stop_strings)


@torch.no_grad()
def sample(
    stack,
    prompts: list[list[int]],
    config: SamplingConfig,
    *,
    adapter: str | None = "policy",
    samples_per_prompt: int = 1,
    seed: int = 0,
    keys: list[int] | None = None,
    stop_ids: tuple[int, ...] = (),
) -> Samples:
    """Sample `samples_per_prompt` responses to each prompt from the stack with `adapter` active (None:
    the bare base). Prompts are token ids (datasets.layout.encode_prompt), of which the last
    config.max_prompt_length are kept.

    keys[i] names prompt i's randomness (default: its position); row i * k + j draws from stream
    (seed, keys[i] * k + j), so the same (seed, key) gives the same responses in any batch. A response
    ends at EOS, config.stop_token_ids, `stop_ids` (the layout's end of turn: datasets.layout.stop_token_ids)
    or a stop string. The stack samples in eval mode whatever its mode (no LoRA dropout: a fixed policy is
    a fixed distribution).
    """
    with stack.evaluating():
        return _sample(stack, prompts, config, adapter, samples_per_prompt, seed, keys, stop_ids)


def _sample(stack, prompts, config: SamplingConfig, adapter, samples_per_prompt: int, seed: int, keys,
            stop_ids: tuple[int, ...]) -> Samples:  # fmt: skip
    config.validate()
    tokenizer = stack.tokenizer
    k = samples_per_prompt
    if k < 1 or not prompts:
        raise ValueError(f"need prompts and samples_per_prompt >= 1 (got {len(prompts)} prompts, k={k})")
    keys = list(range(len(prompts))) if keys is None else list(keys)
    if len(keys) != len(prompts):
        raise ValueError(f"{len(keys)} keys for {len(prompts)} prompts")
    device = stack.device
    encoded = [list(p)[-config.max_prompt_length :] for p in prompts]
    # A prompt's k samples share its prefill: the prompts run once and each one's KV cache is copied to its
    # k rows (a dynamic cache; the static one is allocated for all B rows). Prefill was k times the work.
    share = k > 1 and config.cache == "dynamic"
    ids, mask = pad(encoded if share else [e for e in encoded for _ in range(k)], tokenizer.pad_token_id,
                    side="left")  # fmt: skip
    ids, mask = ids.to(device), mask.to(device)
    B, P = len(prompts) * k, ids.shape[1]
    R = config.max_new_tokens
    row_keys = torch.tensor([key * k + j for key in keys for j in range(k)], dtype=torch.long)
    streams = row_streams(seed, row_keys).to(device)
    stops = torch.tensor(sorted({tokenizer.eos_token_id, *config.stop_token_ids, *stop_ids} - {None}), device=device)

    cache, step_fn = _decoder_cache(stack, config, B, P + R)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = step_fn(adapter, ids, mask, positions, cache, torch.arange(P, device=device))
    if share:
        rows = torch.arange(len(prompts), device=device).repeat_interleave(k)  # row = prompt * k + sample
        cache.batch_select_indices(rows)
        ids, mask, positions, hidden = ids[rows], mask[rows], positions[rows], hidden[rows]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stopped = torch.zeros(B, dtype=torch.bool, device=device)
    out = torch.full((B, R), tokenizer.pad_token_id, dtype=torch.long, device=device)
    length = torch.zeros(B, dtype=torch.long, device=device)
    generated: list[list[int]] = [[] for _ in range(B)]
    n_tokens = len(tokenizer)  # ids past the tokenizer's (a padded embedding matrix) name no token
    for step in range(R):
        # step 1. the next-token distribution from the last position only: (B, H) @ (H, V)
        logits = stack.logits(hidden[:, -1])
        if logits.shape[-1] > n_tokens:
            logits[:, n_tokens:] = float("-inf")
        # step 2. draw, and record it in rows that are still going
        tok = torch.where(done, tokenizer.pad_token_id, next_tokens(logits, config, streams, step))
        out[:, step] = tok
        length += (~done).long()
        ended = ~done & torch.isin(tok, stops)
        if config.stop_strings:
            alive = (~done).nonzero().flatten().tolist()
            toks = tok.tolist()
            for b in alive:
                generated[b].append(toks[b])
                if _stop_string_hit(tokenizer, generated[b], config.stop_strings):
                    ended[b] = True
        stopped |= ended
        alive_now = ~done
        done = done | ended
        if bool(done.all()) or step == R - 1:
            break
        # step 3. feed the drawn tokens (rows that ended feed padding)
        mask = torch.cat([mask, alive_now.long()[:, None]], dim=1)
        positions = positions[:, -1:] + 1
        hidden = step_fn(adapter, tok[:, None], mask, positions, cache, torch.tensor([P + step], device=device))
    width = int(length.max()) if B else 0
    input_ids = torch.cat([ids, out[:, :width]], dim=1)
    response_mask = torch.arange(width, device=device)[None, :] < length[:, None]
    attention_mask = torch.cat([mask[:, :P], response_mask.long()], dim=1)
    responses = tokenizer.batch_decode(
        [row[:n] for row, n in zip(out.tolist(), length.tolist())], skip_special_tokens=True
    )
    return Samples(
        input_ids=input_ids, attention_mask=attention_mask, prompt_length=P, response_length=length,
        stopped=stopped, prompt_index=torch.arange(len(prompts), device=device).repeat_interleave(k),
        responses=responses,
    )  # fmt: skip


def _decoder_cache(stack, config: SamplingConfig, batch: int, max_len: int):
    """(cache, step(adapter, ids, mask, positions, cache, cache_position) -> (B, t, H) hidden)."""
    from transformers import DynamicCache, StaticCache

    model_config = stack.model.get_base_model().config

    def step(adapter, ids, mask, positions, cache, cache_position):
        return stack.hidden_states(adapter, ids, mask, position_ids=positions, past_key_values=cache,
                                   cache_position=cache_position)  # fmt: skip

    if config.cache == "dynamic":
        return DynamicCache(config=model_config), step
    cache = StaticCache(config=model_config, max_cache_len=max_len)
    if stack.device.type == "cuda":
        # one shape per decode step with a static cache: compiled once, replayed every step
        return cache, torch.compile(step, dynamic=False)
    return cache, step
