"""model.generation: KV-cached sampling from a role of the stack.

Letters: B rows, P prompt tokens, R response tokens, V vocabulary."""

import math

import pytest
import torch

from rlhf_engine.datasets.layout import encode_prompt
from rlhf_engine.errors import ConfigError
from rlhf_engine.model.config import SamplingConfig, StackConfig
from rlhf_engine.model.generation import filter_logits, gumbel, next_tokens, row_streams, sample
from rlhf_engine.model.stack import ModelStack

PROMPTS = ["My house is too hot.", "Hi", "Translate 'thank you' into Spanish, please."]


@pytest.fixture(scope="module")
def stack():
    s = ModelStack.build(StackConfig(model="tiny-llama", adapters=("policy",)))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a policy that differs from the base (peft starts lora_B at zero)
        for name, p in s.model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return s.eval()


def ids_of(stack, prompts):
    """The prompts' token ids, as every stage encodes them (datasets.layout.encode_prompt)."""
    return [encode_prompt(stack.tokenizer, p) for p in prompts]


def naive_greedy(stack, prompt, R, max_prompt_length=256):
    """Greedy decoding with a full forward per step (no cache): the definition the cached loop must meet."""
    ids = encode_prompt(stack.tokenizer, prompt)[-max_prompt_length:]
    out = []
    for _ in range(R):
        x = torch.tensor([ids + out])
        hidden = stack.hidden_states("policy", x, torch.ones_like(x))
        out.append(int((hidden[0, -1] @ stack.lm_head_weight.T).argmax()))
        if out[-1] == stack.tokenizer.eos_token_id:
            break
    return out


def response_tokens(s, b):
    return s.input_ids[b, s.prompt_length : s.prompt_length + int(s.response_length[b])].tolist()


def test_greedy_with_cache_and_left_padding_equals_full_forwards(stack):
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.0)
    s = sample(stack, ids_of(stack, PROMPTS), cfg)
    assert s.input_ids.shape[0] == 3 and s.attention_mask.shape == s.input_ids.shape
    for b, prompt in enumerate(PROMPTS):
        assert response_tokens(s, b) == naive_greedy(stack, prompt, 12), prompt
        # prompt left-padded: it ends at column P - 1; the mask marks it and the response
        n_prompt = len(encode_prompt(stack.tokenizer, prompt)[-256:])
        assert s.attention_mask[b, : s.prompt_length].sum() == n_prompt
        assert s.attention_mask[b, s.prompt_length - n_prompt : s.prompt_length].all()
        assert s.attention_mask[b, s.prompt_length :].sum() == s.response_length[b]


def test_static_cache_gives_the_dynamic_cache_tokens(stack):
    dyn = sample(stack, ids_of(stack, PROMPTS), SamplingConfig(max_new_tokens=10, temperature=0.0))
    sta = sample(stack, ids_of(stack, PROMPTS), SamplingConfig(max_new_tokens=10, temperature=0.0, cache="static"))
    assert torch.equal(dyn.input_ids, sta.input_ids) and torch.equal(dyn.response_length, sta.response_length)


def test_a_rows_sample_does_not_depend_on_its_batch(stack):
    # the same (seed, key) -> the same response, alone or beside other prompts, at any row
    cfg = SamplingConfig(max_new_tokens=16, temperature=1.0, top_p=0.95)
    alone = sample(stack, ids_of(stack, [PROMPTS[0]]), cfg, seed=7, keys=[41])
    batch = sample(stack, ids_of(stack, [PROMPTS[2], PROMPTS[0], PROMPTS[1]]), cfg, seed=7, keys=[3, 41, 9])
    assert response_tokens(alone, 0) == response_tokens(batch, 1)
    other_seed = sample(stack, ids_of(stack, [PROMPTS[0]]), cfg, seed=8, keys=[41])
    other_key = sample(stack, ids_of(stack, [PROMPTS[0]]), cfg, seed=7, keys=[42])
    assert response_tokens(other_seed, 0) != response_tokens(alone, 0)
    assert response_tokens(other_key, 0) != response_tokens(alone, 0)


def test_samples_per_prompt_are_grouped_and_distinct(stack):
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.0)
    s = sample(stack, ids_of(stack, PROMPTS)[:2], cfg, samples_per_prompt=3)
    assert s.prompt_index.tolist() == [0, 0, 0, 1, 1, 1]
    group = [tuple(response_tokens(s, b)) for b in range(3)]
    assert len(set(group)) > 1  # three draws from a random-weight model differ
    # row j of a group is the same draw with the group alone
    solo = sample(stack, ids_of(stack, PROMPTS)[1:2], cfg, samples_per_prompt=3, keys=[1])
    assert [response_tokens(solo, j) for j in range(3)] == [response_tokens(s, 3 + j) for j in range(3)]


def test_k_samples_of_a_prompt_share_its_prefill_and_draw_what_separate_rows_draw(stack):
    # k = 3 samples of two prompts (the prompts prefilled once, their caches copied to 3 rows each) against
    # the same six rows as six one-sample prompts (each prefilled): row prompt * 3 + j draws from stream
    # key * 3 + j, which the one-sample rows get with keys 3 * key + j. Same tokens, masks and lengths.
    cfg = SamplingConfig(max_new_tokens=10, temperature=1.0)
    prompts = ids_of(stack, PROMPTS[1:])  # two prompts of different lengths: left padding in both
    shared = sample(stack, prompts, cfg, samples_per_prompt=3, seed=5, keys=[4, 7])
    rows = sample(stack, [p for p in prompts for _ in range(3)], cfg, seed=5, keys=[12, 13, 14, 21, 22, 23])
    assert torch.equal(shared.input_ids, rows.input_ids) and torch.equal(shared.attention_mask, rows.attention_mask)
    assert torch.equal(shared.response_length, rows.response_length) and shared.responses == rows.responses
    assert len({tuple(response_tokens(shared, b)) for b in range(3)}) > 1  # three different draws


def test_gumbel_draw_follows_the_softmax():
    # Gumbel-max over counter-based noise: 40000 rows drawing from softmax([2, 1, 0, -1, -inf]); each
    # frequency within 4 standard errors of its probability (the test is deterministic: fixed seed).
    n = 40000
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]]).expand(n, 5)
    streams = row_streams(123, torch.arange(n))
    draws = (logits.double() + gumbel(streams, 0, 5)).argmax(-1)
    p = torch.softmax(logits[0], -1)
    freq = torch.bincount(draws, minlength=5).double() / n
    for v in range(5):
        se = math.sqrt(p[v] * (1 - p[v]) / n)
        assert abs(freq[v] - p[v]) <= 4 * se + 1e-12, (v, float(freq[v]), float(p[v]))
    # the noise of different steps is independent: step 0 and step 1 draws agree only by chance
    draws1 = (logits.double() + gumbel(streams, 1, 5)).argmax(-1)
    assert abs(float((draws == draws1).double().mean()) - float((p**2).sum())) < 0.02


def test_top_k_and_top_p():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, 2, 1.0)[0, 2:]).all() and torch.isfinite(filter_logits(logits, 2, 1.0)[0, :2]).all()
    # softmax([3, 2, 1, 0]) = [0.644, 0.237, 0.087, 0.032]: top_p 0.85 keeps the first two (0.644 < 0.85 <= 0.881)
    kept = torch.isfinite(filter_logits(logits, 0, 0.85))[0].tolist()
    assert kept == [True, True, False, False]
    assert torch.isfinite(filter_logits(logits, 0, 0.5))[0].tolist() == [True, False, False, False]
    # top_k = 1 and a tiny top_p are greedy
    streams = row_streams(0, torch.arange(64))
    wide = torch.randn(64, 30, generator=torch.Generator().manual_seed(0))
    for cfg in (SamplingConfig(top_k=1), SamplingConfig(top_p=1e-6)):
        assert torch.equal(next_tokens(wide, cfg, streams, 0), wide.argmax(-1))


def test_stop_token_first_no_stop_and_stop_strings(stack):
    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0)
    first = naive_greedy(stack, PROMPTS[0], 1)[0]
    # the very first token is a stop token: a one-token response that stopped
    s = sample(stack, ids_of(stack, PROMPTS)[:1],
               SamplingConfig(max_new_tokens=6, temperature=0.0, stop_token_ids=(first,)))  # fmt: skip
    assert int(s.response_length[0]) == 1 and bool(s.stopped[0]) and response_tokens(s, 0) == [first]
    # no stop within the limit: max_new_tokens tokens, not stopped
    s = sample(stack, ids_of(stack, PROMPTS)[:1], greedy)
    assert int(s.response_length[0]) == 6 and not bool(s.stopped[0])
    # a stop string: ends at the token that completes it, which stays in the response (the shortest
    # greedy prefix that decodes to text: a random byte model also emits bytes that decode to nothing)
    tokens = naive_greedy(stack, PROMPTS[0], 6)
    n = next(i for i in range(1, 7) if stack.tokenizer.decode(tokens[:i], skip_special_tokens=True))
    text = stack.tokenizer.decode(tokens[:n], skip_special_tokens=True)
    s = sample(stack, ids_of(stack, PROMPTS)[:1],
               SamplingConfig(max_new_tokens=6, temperature=0.0, stop_strings=(text,)))  # fmt: skip
    assert bool(s.stopped[0]) and s.responses[0] == text and int(s.response_length[0]) == n


def test_long_prompt_keeps_its_last_tokens(stack):
    long = "x" * 50 + " the end"
    s = sample(stack, ids_of(stack, [long, "short"]),
               SamplingConfig(max_new_tokens=3, temperature=0.0, max_prompt_length=16))  # fmt: skip
    assert s.prompt_length == 16
    kept = stack.tokenizer.decode(s.input_ids[0, :16].tolist(), skip_special_tokens=True)
    assert kept.endswith(" the end") and len(kept) == 16


@pytest.mark.parametrize(
    "kw, match",
    [({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_k": -2}, "top_k"),
     ({"max_new_tokens": 0}, "max_new_tokens"), ({"cache": "paged"}, "cache"), ({"stop_strings": ("",)}, "stop")],
)  # fmt: skip
def test_bad_config(kw, match):
    with pytest.raises(ConfigError, match=match):
        SamplingConfig(**kw).validate()


def test_ids_past_the_tokenizer_are_never_sampled():
    # A model whose embedding matrix is larger than its tokenizer (padded vocabularies; the llama-1b
    # preset pairs 128256 rows with the 259-id byte tokenizer): the extra ids name no token and must
    # never be drawn (decoding one fails). Make them the most likely ones and sample.
    s = ModelStack.build(StackConfig(model="tiny-llama", adapters=("policy",)))
    extra = 5
    head = s._lm_head
    with torch.no_grad():
        grown = torch.cat([head.weight, head.weight[:extra] * 0 + 10.0 * head.weight[0]], dim=0)
    head.weight = torch.nn.Parameter(grown, requires_grad=False)
    out = sample(s, ids_of(s, PROMPTS), SamplingConfig(max_new_tokens=6, temperature=1.0), seed=1)
    assert int(out.input_ids.max()) < len(s.tokenizer)
    assert all(isinstance(r, str) for r in out.responses)
