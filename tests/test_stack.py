"""The shared model stack: one 4-bit base, adapters for policy/value/reward, the bare base as reference.

Letters: B batch, T time, H hidden, V vocab."""

import os

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from rlhf_engine.core.tensors import last_token_index
from rlhf_engine.errors import ConfigError
from rlhf_engine.model.config import MODEL_PRESETS, StackConfig
from rlhf_engine.model.loading import disable_bnb_cpu_repack, load_causal_lm
from rlhf_engine.model.stack import ModelStack

B, T = 3, 9


def perturb_adapters(stack, seed=0, std=0.2):
    """peft starts lora_B at zero (every adapter == the base); give each adapter distinct weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in stack.model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def batch(seed=0, vocab=259):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (B, T), generator=g)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, 6:] = 0  # right padding
    attention_mask[2, :2] = 0  # left padding
    return input_ids, attention_mask


def positions(mask):
    """Position ids that count real tokens only, as the stack uses them (left padding shifts nothing)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def build(**kw):
    stack = ModelStack.build(StackConfig(model="tiny-llama", **kw))
    perturb_adapters(stack)
    return stack


@pytest.fixture(scope="module")
def stack():
    return build()


def max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


def lora_grads(stack, role):
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in stack.named_role_parameters(role)}


def assert_grads_close(got, want, atol=1e-5, rtol=1e-4):
    assert got.keys() == want.keys()
    bad = []
    for name in want:
        if got[name] is None or want[name] is None:
            bad.append(f"{name}: got {got[name] is not None}, want {want[name] is not None}")
        elif not torch.allclose(got[name], want[name], atol=atol, rtol=rtol):
            bad.append(f"{name}: max |diff| {max_diff(got[name], want[name]):.3e}")
    assert not bad, f"{len(bad)}/{len(want)} gradients differ; first: {bad[:3]}"


# ---- roles -----------------------------------------------------------------------------------


def test_roles_return_hidden_states_and_scalars(stack):
    input_ids, mask = batch()
    H = MODEL_PRESETS["tiny-llama"]["hidden_size"]
    V = MODEL_PRESETS["tiny-llama"]["vocab_size"]
    hidden = stack.policy(input_ids, mask)
    assert hidden.shape == (B, T, H)
    assert stack.reference(input_ids, mask).shape == (B, T, H)
    assert stack.values(input_ids, mask).shape == (B, T)
    assert stack.reward(input_ids, mask).shape == (B,)
    assert stack.lm_head_weight.shape == (V, H)
    # the hidden state is the one right before lm_head: hidden @ W.T are the model's logits
    with stack._active("policy"):
        logits = stack.model.get_base_model()(input_ids=input_ids, attention_mask=mask, position_ids=positions(mask)).logits
    torch.testing.assert_close(hidden @ stack.lm_head_weight.T, logits, atol=1e-5, rtol=1e-5)


def test_left_padding_leaves_a_sequences_hidden_states_alone(tmp_path):
    # A prompt left-padded in a batch sits at the positions it has alone (as in generation), so its
    # hidden states (hence its log-probs) do not depend on the batch's longest prompt. Llama's rotary
    # positions are relative and hide a shift; GPT-2 adds ABSOLUTE position embeddings, so there a
    # shifted position changes every hidden state.
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhf_engine.model.tokenizers import byte_tokenizer

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=259, n_embd=32, n_layer=2, n_head=2, n_positions=64)).save_pretrained(
        tmp_path)  # fmt: skip
    byte_tokenizer().save_pretrained(tmp_path)
    stack = ModelStack.build(StackConfig(model=str(tmp_path), quantization=None, adapters=("policy",),
                                         target_modules=("c_attn",)))  # fmt: skip
    input_ids, mask = batch()
    real = mask[2].bool()
    alone = stack.policy(input_ids[2:3, real], torch.ones(1, int(real.sum()), dtype=torch.long))
    padded = stack.policy(input_ids, mask)[2:3, real]
    assert max_diff(alone, padded) < 1e-5


def test_reference_is_the_bare_base(stack):
    input_ids, mask = batch()
    base, _ = load_causal_lm(stack.config, torch.device("cpu"), torch.float32)  # same preset + seed
    want = base.model(input_ids=input_ids, attention_mask=mask, position_ids=positions(mask)).last_hidden_state
    ref = stack.reference(input_ids, mask)
    assert not ref.requires_grad
    assert torch.equal(ref, want)  # same 4-bit weights, same kernels: bit-identical
    # each adapter moves its role away from the base, and the roles differ from each other
    policy = stack.policy(input_ids, mask)
    value_hidden = stack.hidden_states("value", input_ids, mask)
    reward_hidden = stack.hidden_states("reward", input_ids, mask)
    for a, b in [(policy, ref), (value_hidden, ref), (policy, value_hidden), (policy, reward_hidden)]:
        assert max_diff(a, b) > 1e-3


def test_role_switches_copy_no_weights_and_keep_trainability(stack):
    input_ids, mask = batch()
    before = {n: (p.data_ptr(), p.requires_grad) for n, p in stack.model.named_parameters()}
    heads_before = {n: p.data_ptr() for n, p in stack.heads.named_parameters()}
    stack.policy(input_ids, mask)
    stack.reference(input_ids, mask)
    stack.values(input_ids, mask)
    stack.reward(input_ids, mask)
    assert {n: (p.data_ptr(), p.requires_grad) for n, p in stack.model.named_parameters()} == before
    assert {n: p.data_ptr() for n, p in stack.heads.named_parameters()} == heads_before
    # routing is restored: outside a role call the model's own active adapter is untouched
    assert all(not m._disable_adapters for m in stack._tuner_layers)
    trainable = {n for n, p in stack.model.named_parameters() if p.requires_grad}
    assert trainable and all(".policy." in n or ".value." in n for n in trainable)


def test_lm_head_is_never_adapted(stack):
    assert not any("lm_head" in n for n, _ in stack.model.named_parameters() if "lora_" in n)
    assert isinstance(stack.model.get_base_model().lm_head, nn.Linear)
    assert not stack.lm_head_weight.requires_grad
    with pytest.raises(ConfigError, match="lm_head"):
        ModelStack.build(StackConfig(model="tiny-llama", target_modules=("q_proj", "lm_head")))


def test_last_token_index_left_and_right_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 4, 0]


def test_unquantized_base_when_asked():
    stack = ModelStack.build(StackConfig(model="tiny-llama", quantization=None, adapters=("reward",)))
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in stack.model.modules())
    assert stack.reward(*batch()).shape == (B,)


def test_bf16_compute_on_cpu():
    stack = build(compute_dtype="bfloat16")
    input_ids, mask = batch()
    hidden, values = stack.policy_and_values(input_ids, mask)
    assert hidden.dtype == stack.lm_head_weight.dtype == torch.bfloat16
    assert values.dtype == stack.reward(input_ids, mask).dtype == torch.float32  # heads run in fp32
    (hidden.float().square().mean() + values.mean()).backward()
    for role in ("policy", "value"):
        assert all(p.dtype == torch.float32 and p.grad is not None for p in stack.role_parameters(role))


# ---- gradients ---------------------------------------------------------------------------------


def test_every_linear4bit_has_the_cpu_repack_disabled(stack):
    layers = [m for m in stack.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 7 * MODEL_PRESETS["tiny-llama"]["num_hidden_layers"]  # q k v o gate up down
    assert all(m.support_avx512bf16_for_cpu is False for m in layers)


def _policy_grads_after(stack, eval_pass: bool):
    input_ids, mask = batch()
    upstream = torch.randn(B, T, stack.lm_head_weight.shape[1], generator=torch.Generator().manual_seed(5))
    if eval_pass:  # what a rollout does before the update: eval mode, no grad, every role
        stack.eval()
        with torch.no_grad():
            stack.policy(input_ids, mask), stack.values(input_ids, mask), stack.reward(input_ids, mask)
        stack.train()
    stack.set_trainable("policy")
    (stack.policy(input_ids, mask) * upstream).sum().backward()
    return lora_grads(stack, "policy")


def test_lora_gradients_survive_an_eval_mode_no_grad_pass():
    want = _policy_grads_after(build(), eval_pass=False)
    got = _policy_grads_after(build(), eval_pass=True)
    assert_grads_close(got, want)
    # negative control: with bitsandbytes' repack left on (as on an avx512_bf16 CPU), the same eval
    # pass corrupts the gradients, so this test would catch a missing disable_bnb_cpu_repack. (The CPU
    # stack routes Linear4bit through rlhf_kernels.nf4_linear, which never repacks; the control takes
    # bitsandbytes' own forward back, the path of a CPU stack without the kernel.)
    trapped = build()
    for m in trapped.model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            del m.forward  # model.loading.route_nf4_through_kernels's instance attribute
            m.support_avx512bf16_for_cpu = True
    broken = _policy_grads_after(trapped, eval_pass=True)
    assert any(broken[n] is None or max_diff(broken[n], want[n]) > 1e-2 for n in want)
    assert disable_bnb_cpu_repack(trapped.model) == 14


def test_ppo_step_trains_policy_and_value_adapters_together():
    stack = build()
    input_ids, mask = batch()
    g = torch.Generator().manual_seed(7)
    up_hidden = torch.randn(B, T, stack.lm_head_weight.shape[1], generator=g)  # random upstream grads
    up_values = torch.randn(B, T, generator=g)

    # one step: policy and value forward, one backward (what a PPO update does)
    stack.set_trainable("policy", "value")
    stack.model.zero_grad(set_to_none=True)
    stack.heads.zero_grad(set_to_none=True)
    hidden, values = stack.policy_and_values(input_ids, mask)
    ((hidden * up_hidden).sum() + (values * up_values).sum()).backward()
    got_policy, got_value = lora_grads(stack, "policy"), lora_grads(stack, "value")
    assert all(p.grad is None for _, p in stack.named_role_parameters("reward"))
    assert all(p.grad is None for n, p in stack.model.named_parameters() if "lora_" not in n)

    # reference: each role on its own through peft's documented set_adapter, one backward each
    peft_model, decoder = stack.model, stack._decoder
    peft_model.zero_grad(set_to_none=True)
    stack.heads.zero_grad(set_to_none=True)
    peft_model.set_adapter("policy")
    (decoder(input_ids=input_ids, attention_mask=mask, position_ids=positions(mask)).last_hidden_state * up_hidden).sum().backward()
    peft_model.set_adapter("value")
    # peft's set_adapter froze the policy adapter: switching roles with it would drop policy grads
    assert not any(p.requires_grad for _, p in stack.named_role_parameters("policy") if ".policy." in _)
    value_hidden = decoder(input_ids=input_ids, attention_mask=mask, position_ids=positions(mask)).last_hidden_state
    (stack.heads["value"](value_hidden) * up_values).sum().backward()
    want_policy, want_value = lora_grads(stack, "policy"), lora_grads(stack, "value")

    assert_grads_close(got_policy, want_policy)
    assert_grads_close(got_value, want_value)
    assert all(g is not None and g.abs().sum() > 0 for g in [*got_policy.values(), *got_value.values()])


def test_value_head_on_the_policy_needs_one_base_forward():
    stack = build(value_mode="policy_head")
    assert "value" not in stack.config.adapters and "value" in stack.roles
    input_ids, mask = batch()
    calls = []
    handle = stack._decoder.register_forward_hook(lambda *a: calls.append(1))
    hidden, values = stack.policy_and_values(input_ids, mask)
    handle.remove()
    assert len(calls) == 1
    torch.testing.assert_close(values, stack.heads["value"](hidden))
    # the value loss reaches the policy adapter (shared trunk) and the value head
    stack.set_trainable("policy", "value")
    values.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stack.role_parameters("policy"))
    assert all(p.grad is not None for p in stack.role_parameters("value"))


def test_separate_value_adapter_costs_a_second_forward(stack):
    calls = []
    handle = stack._decoder.register_forward_hook(lambda *a: calls.append(1))
    stack.policy_and_values(*batch())
    handle.remove()
    assert len(calls) == 2


# ---- save / load ---------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path, stack):
    input_ids, mask = batch(seed=3)
    with torch.no_grad():
        stack.heads["reward"].proj.bias.fill_(0.25)
        want = stack.reward(input_ids, mask)
    files = stack.save(str(tmp_path), roles=("reward", "value"))
    names = sorted(os.path.basename(f) for f in files)
    assert names == ["adapter_reward.safetensors", "adapter_value.safetensors", "heads.safetensors", "stack.json"]
    # adapters + heads only (plus headers and stack.json); the base is named, not stored
    report = stack.memory_report()
    role_bytes = sum(report[k]["bytes"] for k in ("adapter:reward", "adapter:value", "head:reward", "head:value"))
    saved_bytes = sum(os.path.getsize(f) for f in files)
    assert role_bytes < saved_bytes < role_bytes + 16 * 1024
    assert '"model": "tiny-llama"' in (tmp_path / "stack.json").read_text()

    loaded = ModelStack.from_saved(str(tmp_path))
    assert torch.equal(loaded.reward(input_ids, mask), want)
    assert torch.equal(loaded.values(input_ids, mask), stack.values(input_ids, mask))
    # the policy was not saved: the reloaded one is the fresh init (lora_B = 0 -> equals the base)
    assert torch.equal(loaded.policy(input_ids, mask), loaded.reference(input_ids, mask))


def test_load_rejects_a_mismatched_adapter(tmp_path, stack):
    stack.save(str(tmp_path), roles=("reward",))
    other = ModelStack.build(StackConfig(model="tiny-llama", lora_r=4, adapters=("reward",)))
    with pytest.raises(ConfigError, match="saved with lora_r=8, this stack has lora_r=4"):
        other.load_roles(str(tmp_path))
    other_base = ModelStack.build(StackConfig(model="tiny-llama", seed=1, adapters=("reward",)))
    with pytest.raises(ConfigError, match="saved with seed=0"):
        other_base.load_roles(str(tmp_path))
    with pytest.raises(ConfigError, match="stack.json"):
        other.load_roles(str(tmp_path / "nowhere"))


def test_base_loaded_from_a_directory(tmp_path):
    from rlhf_engine.model.loading import build_preset

    build_preset("tiny-llama", seed=0, out_dir=str(tmp_path))
    from_dir = ModelStack.build(StackConfig(model=str(tmp_path), adapters=("reward",)))
    from_preset = ModelStack.build(StackConfig(model="tiny-llama", adapters=("reward",)))
    input_ids, mask = batch()
    assert torch.equal(from_dir.reference(input_ids, mask), from_preset.reference(input_ids, mask))
    with pytest.raises(ConfigError, match="no config.json"):
        ModelStack.build(StackConfig(model=str(tmp_path / "..")))


# ---- memory --------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantization", ["nf4", None])
def test_a_loaded_base_reads_nothing_from_its_checkpoint_file(tmp_path, quantization):
    # from_pretrained maps model.safetensors and hands out tensors that view it (the embeddings and norms
    # with NF4, everything unquantised); a live view keeps the whole mapping resident (loading.py
    # measures 300 MiB on SmolLM2). After loading, no parameter may point into a mapped safetensors
    # file, the mapping is gone, and every value is still the file's.
    from safetensors.torch import load_file

    from rlhf_engine.model.loading import build_preset

    build_preset("tiny-llama", seed=0, out_dir=str(tmp_path))
    model, _ = load_causal_lm(StackConfig(model=str(tmp_path), quantization=quantization), torch.device("cpu"),
                              torch.float32)  # fmt: skip
    with open("/proc/self/maps") as f:
        assert str(tmp_path) not in f.read()  # the file is mapped no more
    saved = load_file(str(tmp_path / "model.safetensors"))
    params = dict(model.named_parameters())
    unquantized = [n for n, p in params.items() if not isinstance(p, bnb.nn.Params4bit)]
    assert "model.embed_tokens.weight" in unquantized and "model.norm.weight" in unquantized
    for name in unquantized:
        assert torch.equal(params[name], saved[name]), name


def test_four_roles_add_only_adapter_sized_parameters():
    """small-llama (H=256, 4 layers, V=259): count parameters and bytes of the shared stack."""
    from transformers import LlamaConfig, LlamaForCausalLM

    preset = MODEL_PRESETS["small-llama"]
    r = 8
    stack = ModelStack.build(StackConfig(model="small-llama", lora_r=r))
    report = stack.memory_report()

    dense = LlamaForCausalLM(LlamaConfig(**preset))  # the same model unquantized, for reference
    n_dense = sum(p.numel() for p in dense.parameters())
    linears = [m for name, m in dense.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in name]
    n_lora = sum(r * (m.in_features + m.out_features) for m in linears)  # A: r x in, B: out x r
    H = preset["hidden_size"]

    # counts: the base is stored once; each role adds exactly its LoRA (and head) parameters
    assert report["base"]["params"] == n_dense
    for role in ("policy", "value", "reward"):
        assert report[f"adapter:{role}"] == {"params": n_lora, "bytes": 4 * n_lora}  # fp32 LoRA
    assert report["head:value"]["params"] == report["head:reward"]["params"] == H + 1
    assert report["total"]["params"] == n_dense + 3 * n_lora + 2 * (H + 1)
    assert 3 * n_lora < 0.2 * n_dense  # adapters are small next to the base

    # bytes: 4-bit linears cost 0.5 B/param + quant state; embeddings/norms stay fp32 on CPU
    n_linear = sum(m.weight.numel() for m in linears)
    assert n_linear / 2 < report["base"]["bytes"] - 4 * (n_dense - n_linear) < 0.6 * n_linear
    # four roles on one 4-bit base vs four separate bf16 copies of the model (what TRL/OpenRLHF
    # load): measured 3.85 MB (2.07 MB base + 3 x 0.59 MB fp32 LoRA + heads) vs 24.3 MB, 6.3x
    four_bf16_copies = 4 * 2 * n_dense
    assert report["total"]["bytes"] < four_bf16_copies / 4


def test_reward_from_the_rm_stage_loads_into_a_full_ppo_stack(tmp_path):
    rm_stack = build(adapters=("reward",))  # what `python -m engine rm` trains and saves
    rm_stack.save(str(tmp_path))
    ppo_stack = ModelStack.build(StackConfig(model="tiny-llama"))  # policy, value, reward
    ppo_stack.load_roles(str(tmp_path))
    input_ids, mask = batch(seed=4)
    assert torch.equal(ppo_stack.reward(input_ids, mask), rm_stack.reward(input_ids, mask))
    # the reward stays frozen in the PPO stack: only policy and value train
    assert not any(p.requires_grad for p in ppo_stack.role_parameters("reward"))


def test_a_reward_only_stack_frees_the_lm_head():
    # The reward model reads hidden states only: its (V, H) lm_head weight (259 x 64 fp32 here, untied) is
    # freed, and the scores are those of the stack that kept it.
    keep = ModelStack.build(StackConfig(model="tiny-llama", adapters=("reward",)))
    freed = ModelStack.build(StackConfig(model="tiny-llama", adapters=("reward",)))
    assert freed.release_lm_head() == 259 * 64 * 4 and freed.lm_head_weight.numel() == 0
    assert freed.release_lm_head() == 0  # nothing left to free
    input_ids, mask = batch()
    with torch.no_grad():
        assert torch.equal(freed.reward(input_ids, mask), keep.reward(input_ids, mask))
    assert freed.memory_report()["base"]["bytes"] == keep.memory_report()["base"]["bytes"] - 259 * 64 * 4
