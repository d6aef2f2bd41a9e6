"""The model's own logits against the engine's: every log-prob, entropy, KL and sample comes from hidden
states and the lm_head through rlhf_kernels (no logits), so a model whose logits are not
`hidden @ lm_head.weight.T` must be modelled exactly (an lm_head bias, a constant logit scale) or refused
when the stack loads (a soft-cap, any other transform).

Tiny models built from configs (no hub): Phi (lm_head bias; Llama's lm_head never has one: its
mlp_bias / attention_bias are other layers), Cohere (logits * logit_scale), Granite (logits /
logits_scaling), Gemma-2 (final_logit_softcapping). Letters: B sequences, P prompt tokens, R response
positions, V vocabulary."""

import pytest
import torch

from rlhf_engine.core.tensors import IGNORE_INDEX
from rlhf_engine.datasets.layout import encode_prompt, format_prompt
from rlhf_engine.errors import ConfigError
from rlhf_engine.model.config import SamplingConfig, StackConfig
from rlhf_engine.model.generation import gumbel, row_streams, sample
from rlhf_engine.model.loading import logit_scale
from rlhf_engine.model.logprobs import completion_logprobs, policy_reference_stats
from rlhf_engine.model.stack import ModelStack
from rlhf_engine.model.tokenizers import byte_tokenizer

TOK = byte_tokenizer()
SMALL = dict(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, pad_token_id=TOK.pad_token_id, eos_token_id=TOK.eos_token_id, bos_token_id=None)  # fmt: skip


def tiny_model(kind: str, **extra):
    """An in-memory causal LM of `kind` with logits of order 10 (|w_v| ~ 5): large enough that a missed
    bias, scale or soft-cap moves log-probs by nats, not by rounding."""
    from transformers import (CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM, GraniteConfig,
                              GraniteForCausalLM, PhiConfig, PhiForCausalLM)  # fmt: skip

    config_cls, model_cls = {"phi": (PhiConfig, PhiForCausalLM), "cohere": (CohereConfig, CohereForCausalLM),
                             "granite": (GraniteConfig, GraniteForCausalLM),
                             "gemma2": (Gemma2Config, Gemma2ForCausalLM)}[kind]  # fmt: skip
    torch.manual_seed(0)
    model = model_cls(config_cls(**SMALL, **extra)).eval()
    with torch.no_grad():
        head = model.get_output_embeddings()
        head.weight.mul_(5.0 / head.weight.norm(dim=1, keepdim=True).clamp(min=1e-6))  # (a padding row is 0)
        if head.bias is not None:
            head.bias.normal_(0.0, 3.0)  # transformers initialises it to 0, which would hide a dropped bias
    return model


def saved(tmp_path, kind: str, **extra) -> str:
    out = tmp_path / kind
    tiny_model(kind, **extra).save_pretrained(out)
    TOK.save_pretrained(out)
    return str(out)


def build(path: str) -> ModelStack:
    stack = ModelStack.build(StackConfig(model=path, quantization=None, adapters=("policy",),
                                         target_modules=("q_proj", "v_proj")))  # fmt: skip
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a policy that differs from the base (the reference)
        for name, p in stack.model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return stack.eval()


def own_logits(stack, adapter, ids, mask) -> torch.Tensor:
    """(B, T, V) float64: the causal LM's own forward, lm_head and whatever follows it included."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with stack._active(adapter), torch.no_grad():
        return stack.model.get_base_model()(input_ids=ids, attention_mask=mask, position_ids=pos).logits.double()


@pytest.fixture(scope="module", params=[("phi", {}), ("cohere", {"logit_scale": 0.5})], ids=["bias", "scale"])
def model_stack(request, tmp_path_factory):
    kind, extra = request.param
    stack = build(saved(tmp_path_factory.mktemp("logits"), kind, **extra))
    assert (stack.lm_head_bias is not None) == (kind == "phi") and stack.logit_scale == extra.get("logit_scale", 1.0)
    return stack


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_log_probs_entropy_and_kl_are_the_models_own(model_stack, backend):
    # Reference: log_softmax(own logits / T) in float64, of the policy and of the bare base (the reference),
    # at T = 0.7 (the scale must fold into the temperature, not replace it). Tolerance: fp32 kernels on
    # logits of order 10 (measured ~2e-6).
    stack, T = model_stack, 0.7
    prompts = [format_prompt(p) for p in ("My house is too hot.", "Hi")]
    s = sample(stack, [encode_prompt(stack.tokenizer, p) for p in prompts], SamplingConfig(max_new_tokens=6), seed=2)
    P, ids, am = s.prompt_length, s.input_ids, s.attention_mask
    m = s.response_mask
    labels = torch.where(m, ids[:, P:], IGNORE_INDEX)
    st = policy_reference_stats(stack, ids, am, labels, P, T, backend)
    lp = torch.log_softmax(own_logits(stack, "policy", ids, am)[:, P - 1 : -1] / T, -1)  # (B, R, V)
    lq = torch.log_softmax(own_logits(stack, None, ids, am)[:, P - 1 : -1] / T, -1)
    tok = ids[:, P:, None]
    want = {"logp": lp.gather(-1, tok)[..., 0], "ref_logp": lq.gather(-1, tok)[..., 0],
            "ent": -(lp.exp() * lp).sum(-1), "kl": (lp.exp() * (lp - lq)).sum(-1)}  # fmt: skip
    for name, w in want.items():
        torch.testing.assert_close(torch.where(m, st[name].double(), 0), torch.where(m, w, 0), atol=1e-4, rtol=1e-5,
                                   msg=name)  # fmt: skip
    # SFT's and DPO's path: completion tokens only, at temperature 1
    full_labels = torch.cat([torch.full_like(ids[:, 1:P], IGNORE_INDEX), labels], dim=1)  # (B, T - 1)
    logp, rows = completion_logprobs(st["hidden"], stack.lm_head_weight, full_labels, backend, **stack.head())
    l1 = torch.log_softmax(own_logits(stack, "policy", ids, am)[:, P - 1 : -1], -1).gather(-1, tok)[..., 0]
    torch.testing.assert_close(logp.double(), l1[m], atol=1e-4, rtol=1e-5)


def test_sampling_draws_from_the_models_own_logits(model_stack):
    # The sampler's draw is argmax(logits / T + g) with g a pure function of (seed, row key, step, v)
    # (model.generation): replay it on the model's own logits, recomputed by a full forward per step.
    stack, T, seed = model_stack, 0.8, 3
    prompt = encode_prompt(stack.tokenizer, format_prompt("Hi there"))
    s = sample(stack, [prompt], SamplingConfig(max_new_tokens=8, temperature=T), seed=seed)
    streams = row_streams(seed, torch.tensor([0]))
    out = []
    for step in range(8):
        x = torch.tensor([prompt + out])
        logits = own_logits(stack, "policy", x, torch.ones_like(x))[:, -1]  # (1, V)
        out.append(int((logits / T + gumbel(streams, step, logits.shape[-1])).argmax()))
        if out[-1] == stack.tokenizer.eos_token_id:
            break
    assert s.input_ids[0, s.prompt_length : s.prompt_length + int(s.response_length[0])].tolist() == out
    # and the logits the sampler uses are the model's own
    hidden = stack.hidden_states("policy", x, torch.ones_like(x))
    torch.testing.assert_close(stack.logits(hidden).double(), own_logits(stack, "policy", x, torch.ones_like(x)),
                               atol=1e-4, rtol=1e-5)  # fmt: skip


def test_a_soft_capped_model_is_refused_when_the_stack_loads(tmp_path):
    # Gemma-2's logits are c * tanh(x / c); with c = 2 every log-prob would be off by nats (a soft-cap
    # needs kernel work in every backend, so it is refused rather than approximated)
    path = saved(tmp_path, "gemma2", final_logit_softcapping=2.0, head_dim=16)
    with pytest.raises(ConfigError, match=r"final_logit_softcapping=2.0 soft-caps its logits .* refusing"):
        build(path)


def test_a_logit_divisor_folds_into_the_scale():
    # Granite divides its logits by logits_scaling: the scale is 1 / 4, and the load-time probe agrees
    assert logit_scale(tiny_model("granite", logits_scaling=4.0), "granite") == 0.25
    assert logit_scale(tiny_model("phi"), "phi") == 1.0


def test_an_undeclared_transform_of_the_logits_is_refused():
    # A model whose forward multiplies its logits by a constant its config does not name: only the probe
    # (the model's own logits vs scale * (hidden @ W.T + b)) can see it
    from transformers import LlamaConfig, LlamaForCausalLM

    class Scaled(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0
            return out

    torch.manual_seed(0)
    model = Scaled(LlamaConfig(**SMALL)).eval()
    with pytest.raises(ConfigError, match=r"its logits are not 1 \* \(hidden @ lm_head.weight.T \+ bias\)"):
        logit_scale(model, "scaled")
    assert logit_scale(LlamaForCausalLM(LlamaConfig(**SMALL)).eval(), "plain") == 1.0


def test_every_stage_reads_the_models_own_log_probs(model_stack):
    # The stages' own call sites of the fused ops (a site that forgot the bias or the scale would train on
    # wrong numbers): SFT's held-out loss, DPO's pair forward, PPO's micro-batch loss, the CAI judge, each
    # against log_softmax of the model's own logits in float64.
    import dataclasses

    from rlhf_engine.algos.losses import dpo_losses, ppo_micro_loss
    from rlhf_engine.datasets.batching import collate, collate_pairs
    from rlhf_engine.datasets.feedback import PreferencePair
    from rlhf_engine.datasets.samples import SFTExample, encode_example, encode_pairs
    from rlhf_engine.stages.cai import ModelJudge
    from rlhf_engine.stages.dpo import pair_forward
    from rlhf_engine.stages.dpo_config import dpo_preset
    from rlhf_engine.stages.ppo_config import ppo_preset
    from rlhf_engine.stages.sft import evaluate_sft

    stack = model_stack
    tok = stack.tokenizer

    def completion_sums(adapter, batch):  # (rows,) summed own log-probs of each row's completion tokens
        lp = torch.log_softmax(own_logits(stack, adapter, batch.input_ids, batch.attention_mask)[:, :-1], -1)
        keep = batch.labels != IGNORE_INDEX
        tokens = torch.where(keep, batch.labels, 0)[..., None]
        return torch.where(keep, lp.gather(-1, tokens)[..., 0], 0).sum(1), int(keep.sum())

    # SFT: the held-out loss is the token mean of -log p over completion tokens
    data = [encode_example(tok, SFTExample("My house is too hot.", "Open a window."), 512),
            encode_example(tok, SFTExample("Hi", "Hello there."), 512)]  # fmt: skip
    sums, n = completion_sums("policy", collate(data, tok.pad_token_id))
    assert evaluate_sft(stack, data, 2, "auto")["eval_loss"] == pytest.approx(-float(sums.sum()) / n, rel=1e-5)

    # DPO: the policy's and the reference's sequence log-probs, and the loss from them
    pairs = encode_pairs(tok, [PreferencePair("q", "yes please", "no"), PreferencePair("r", "a", "bcd")], 512)
    cfg = dpo_preset("tiny", data="x.jsonl", out="x")
    losses, _, _, policy, _ = pair_forward(stack, pairs, cfg)
    batch = collate_pairs(pairs, tok.pad_token_id)
    pi, ref = completion_sums("policy", batch)[0], completion_sums(None, batch)[0]
    torch.testing.assert_close(policy.double(), pi, atol=1e-4, rtol=1e-5)
    want, _, _ = dpo_losses(pi[:2], pi[2:], ref[:2], ref[2:], beta=cfg.beta)
    torch.testing.assert_close(losses.double().detach(), want, atol=1e-5, rtol=1e-5)

    # PPO: old log-probs from the model's own logits at T = 0.7 -> the micro-batch's ratio is exactly 1
    ppo = dataclasses.replace(ppo_preset("tiny", out="x", reward_fn="a:b", advantage="grpo", samples_per_prompt=2),
                              sampling=SamplingConfig(max_new_tokens=6, temperature=0.7))  # fmt: skip
    s = sample(stack, [encode_prompt(tok, format_prompt("Hi"))], ppo.sampling, samples_per_prompt=2, seed=4)
    P, m = s.prompt_length, s.response_mask
    lp = torch.log_softmax(own_logits(stack, "policy", s.input_ids, s.attention_mask)[:, P - 1 : -1] / 0.7, -1)
    labels = torch.where(m, s.input_ids[:, P:], IGNORE_INDEX)
    old = torch.where(m, lp.gather(-1, s.input_ids[:, P:, None])[..., 0], 0).float()
    mb = {"input_ids": s.input_ids, "attention_mask": s.attention_mask, "labels": labels, "mask": m,
          "old_logprobs": old, "ref_logprobs": old, "advantages": torch.where(m, 1.0, 0.0)}  # fmt: skip
    n = float(m.sum())
    _, stats = ppo_micro_loss(stack, mb, P, ppo, 0.0, m.float() / n, n)
    # approx_kl = mean(ratio - 1 - log ratio): 0 up to fp32 rounding of log-probs that agree to ~1e-6 (a dropped
    # bias or scale moves log-probs by nats: approx_kl ~ 1)
    assert stats["approx_kl"] == pytest.approx(0.0, abs=1e-6) and stats["clipfrac"] == 0.0
    assert stats["pg_loss"] == pytest.approx(-1.0, rel=1e-5)  # ratio 1 at every token: sum_t (1 / n) (-A_t * 1)

    # CAI: the judge's choice log-probs at the question's last position
    judge = ModelJudge(stack, "policy", ("A", "B"), batch_size=2, max_length=64)
    got = torch.tensor(judge(["Which is better? ("]), dtype=torch.float64)[0]
    x = torch.tensor([judge.encode("Which is better? (")])
    want = torch.log_softmax(own_logits(stack, "policy", x, torch.ones_like(x))[0, -1], -1)[judge.choice_ids]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
