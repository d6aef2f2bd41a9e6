"""model.prefix: rows that share a prompt run it once (a KV cache expanded to every row that reads it),
and give the hidden states, log-probs, scores and gradients of the unshared forward.

The reference is the same stack with stack.config.shared_prefix off (every row whole): both are fp32
computations of the same attention sets at the same positions, the shared one summing a prompt's
gradient over its rows through the cached keys and values instead of row by row. Tolerance: measured
differences are 1.1e-5 on sequence log-probs of ~-57 (2e-7 relative), 1.2e-7 on reward scores, and
7e-6 relative on gradients at worst; the bounds leave 7-10x. A gradient tensor is compared against the whole gradient's norm when its own is
far smaller (a LoRA A whose B barely reaches the output: its fp32 rounding is the other terms').

Letters: B rows, T time, P prompt tokens (left-padded), R response positions, H hidden."""

import dataclasses

import pytest
import torch

from rlhf_engine.datasets.batching import collate, collate_pairs
from rlhf_engine.model.config import StackConfig
from rlhf_engine.model.logprobs import completion_logprobs, sequence_logps
from rlhf_engine.model.prefix import plan_prefixes
from rlhf_engine.model.stack import ModelStack
from util import assert_close


@pytest.fixture(scope="module")
def stack():
    s = ModelStack.build(StackConfig(model="tiny-llama", adapters=("policy", "reward")))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # adapters and head away from their init, so every LoRA weight has a gradient
        for name, p in list(s.model.named_parameters()) + list(s.heads.named_parameters()):
            if "lora_" in name or "proj" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    s.set_trainable("policy", "reward")
    return s.train(True)


@pytest.fixture
def unshared(stack):
    """The stack with shared_prefix off for the duration of a test."""
    config = stack.config
    stack.config = dataclasses.replace(config, shared_prefix=False)
    yield stack
    stack.config = config


def tokens(g, n):
    return torch.randint(3, 250, (n,), generator=g).tolist()


def pairs(seed=0):
    """Preference pairs of prime prompt lengths and uneven completions (one side a single token), each
    side (ids, P) as datasets.samples lays them out."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for P, (c, r) in zip((7, 11, 13), ((5, 1), (2, 9), (6, 6))):
        prompt = tokens(g, P)
        out.append(((prompt + tokens(g, c), P), (prompt + tokens(g, r), P)))
    return out


def grads(stack, roles):
    return {n: p.grad.clone() for role in roles for n, p in stack.named_role_parameters(role)}


def assert_same_grads(got: dict, want: dict, bound: float = 5e-5) -> None:
    """Per tensor, ||got - want|| <= bound * max(||want||, 1e-2 * ||every gradient||), in float64."""
    total = torch.cat([w.double().flatten() for w in want.values()]).norm().item()
    for name, w in want.items():
        err = (got[name].double() - w.double()).norm().item()
        scale = max(w.double().norm().item(), 1e-2 * total)
        assert err <= bound * scale, f"{name}: error {err:.3g} > {bound:.0e} x {scale:.3g} (||want|| = {w.norm():.3g})"


def run(stack, fn, roles):
    for role in roles:
        for p in stack.role_parameters(role):
            p.grad = None
    out = fn()
    # a random upstream gradient: every output row's gradient path is checked, not only their sum
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * w).sum().backward()
    return out.detach(), grads(stack, roles)


def test_the_plan_of_a_small_batch():
    # Rows 0, 1 and 3 share the prompt [5, 6, 7]; row 2 has its own; row 3 is left-padded (PPO's layout),
    # row 1 right-padded. Hand-derived: prefixes [[5, 6, 7], [5, 9, 8]] (left-padded to L = 3),
    # suffixes [8, 9], [4], [3, 3], [1, 2] (S = 2), each row's prefix length 3; the gather puts the
    # prefix's last token (index 1 + group) at the prompt's last column and suffix token j of row b at
    # 1 + G + b * S + j; everything else reads the zero row 0.
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 4, 0], [5, 9, 8, 3, 3], [0, 5, 6, 7, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    # row 3's real tokens are [5, 6, 7, 1]: a prompt of 3; its suffix is [1]
    plan = plan_prefixes(ids, mask, [3, 3, 3, 3])
    assert plan.prefix_ids.tolist() == [[5, 6, 7], [5, 9, 8]] and plan.prefix_mask.tolist() == [[1, 1, 1]] * 2
    assert plan.group.tolist() == [0, 0, 1, 0] and plan.prefix_length.tolist() == [3, 3, 3, 3]
    assert plan.suffix_ids.tolist() == [[8, 9], [4, 0], [3, 3], [1, 0]]
    assert plan.suffix_mask.tolist() == [[1, 1], [1, 0], [1, 1], [1, 0]]
    assert plan.gather.tolist() == [[0, 0, 1, 3, 4], [0, 0, 1, 5, 0], [0, 0, 2, 7, 8], [0, 0, 0, 1, 9]]
    assert plan.shared_tokens == 2 * 3
    # a row keeps at least one token of its own, and a prefix at least one token
    short = plan_prefixes(torch.tensor([[5, 6, 0], [5, 6, 7]]), torch.tensor([[1, 1, 0], [1, 1, 1]]), [2, 2])
    assert short is None  # [5] + [6] and [5, 6] + [7]: two different prefixes, nothing shared
    one = plan_prefixes(torch.tensor([[5, 6], [5, 7]]), torch.tensor([[1, 1], [1, 1]]), [0, 0])
    assert one.prefix_ids.tolist() == [[5]] and one.group.tolist() == [0, 0] and one.suffix_ids.tolist() == [[6], [7]]
    assert plan_prefixes(ids[:3], mask[:3], [0, 0, 0]).prefix_ids.tolist() == [[5]]  # rows 0-2 start with 5


def test_dpo_pairs_logprobs_and_gradients_equal_the_unshared_forward(stack, unshared):
    batch = collate_pairs(pairs(), pad_id=0)

    def seq_logps():
        hidden = stack.policy(batch.input_ids, batch.attention_mask, batch.prompt_lengths)
        logp, rows = completion_logprobs(hidden, stack.lm_head_weight, batch.labels, "auto")
        return sequence_logps(logp, rows, batch.input_ids.shape[0])  # (2b,)

    want, want_g = run(unshared, seq_logps, ["policy"])
    stack.config = dataclasses.replace(stack.config, shared_prefix=True)
    assert plan_prefixes(batch.input_ids, batch.attention_mask, batch.prompt_lengths).shared_tokens == 7 + 11 + 13
    got, got_g = run(stack, seq_logps, ["policy"])
    assert_close(got, want, atol=5e-5, rtol=1e-6, name="sequence logps")  # (2b,) of about -57
    assert_same_grads(got_g, want_g)


def test_reward_scores_and_gradients_equal_the_unshared_forward(stack, unshared):
    # The reward head reads each row's last real token: never inside the shared prompt
    batch = collate_pairs(pairs(seed=2), pad_id=0)

    def scores():
        return stack.reward(batch.input_ids, batch.attention_mask, batch.prompt_lengths)  # (2b,)

    want, want_g = run(unshared, scores, ["reward"])
    stack.config = dataclasses.replace(stack.config, shared_prefix=True)
    got, got_g = run(stack, scores, ["reward"])
    assert_close(got, want, atol=1e-5, rtol=1e-5, name="scores")
    assert_same_grads(got_g, want_g)


def test_k_responses_to_left_padded_prompts_equal_the_unshared_forward(stack, unshared):
    # PPO / GRPO's grid: prompts left-padded to P, k = 3 responses each right-padded to R; position j of
    # the grid is predicted by column P - 1 + j. Two prompts of different lengths, responses of 1-6 tokens.
    g = torch.Generator().manual_seed(3)
    prompts = [tokens(g, 5), tokens(g, 9)]
    P, R = 9, 6
    ids = torch.zeros(6, P + R, dtype=torch.long)
    mask = torch.zeros(6, P + R, dtype=torch.long)
    for b, n in enumerate((1, 6, 4, 2, 5, 3)):
        prompt = prompts[b // 3]
        ids[b, P - len(prompt) : P], mask[b, P - len(prompt) : P] = torch.tensor(prompt), 1
        ids[b, P : P + n], mask[b, P : P + n] = torch.tensor(tokens(g, n)), 1
    labels = torch.where(mask[:, P:].bool(), ids[:, P:], -100)
    caps = mask[:, :P].sum(1)

    def grid_logps():
        hidden = stack.policy(ids, mask, caps)[:, P - 1 : -1]  # (B, R, H)
        import rlhf_kernels as kernels

        return kernels.linear_logprobs(hidden, stack.lm_head_weight, labels)  # (B, R), 0 past each response

    want, want_g = run(unshared, grid_logps, ["policy"])
    stack.config = dataclasses.replace(stack.config, shared_prefix=True)
    got, got_g = run(stack, grid_logps, ["policy"])
    assert torch.isfinite(got).all()
    assert_close(got, want, atol=1e-5, rtol=1e-5, name="grid logps")
    assert_same_grads(got_g, want_g)


@pytest.mark.parametrize("role", ["reward", "policy"])
def test_a_shared_prefix_backward_is_bitwise_the_same_every_time(stack, role):
    # Rows that share a prompt sum their gradients into it: through the expanded cache (both roles) and
    # the prefix's last hidden state, which the policy's rows read (it predicts their first token). On a
    # CPU, advanced indexing's backward adds repeated rows in parallel in the threads' order: the same
    # backward then differed in the last bits call to call (2 threads), which sent a chaotic PPO run to a
    # different end each time. 4 prompts x 8 responses (a prompt's rows spread over the batch, as chosen
    # and rejected halves are, so both threads add into it), 2 threads, six backward passes of one batch.
    g = torch.Generator().manual_seed(5)
    P, R = 40, 12
    ids = torch.zeros(32, P + R, dtype=torch.long)
    for b in range(32):
        ids[b, :P] = torch.tensor(tokens(torch.Generator().manual_seed(b % 4), P))
        ids[b, P:] = torch.tensor(tokens(g, R))
    mask, caps = torch.ones_like(ids), torch.full((32,), P)
    forward = {"reward": lambda: stack.reward(ids, mask, caps), "policy": lambda: stack.policy(ids, mask, caps)[:, P - 1 :]}
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = {tuple(t.numpy().tobytes() for t in run(stack, forward[role], [role])[1].values()) for _ in range(6)}
    finally:
        torch.set_num_threads(threads)
    assert len(seen) == 1


def test_nothing_shared_is_the_plain_forward(stack):
    # distinct prompts: no plan, the one plain forward (bit for bit)
    batch = collate([(p[0][0], p[0][1]) for p in pairs(seed=4)], pad_id=0)
    assert plan_prefixes(batch.input_ids, batch.attention_mask, batch.prompt_lengths) is None
    with torch.no_grad():
        a = stack.policy(batch.input_ids, batch.attention_mask, batch.prompt_lengths)
        b = stack.policy(batch.input_ids, batch.attention_mask)
    assert torch.equal(a, b)


@pytest.mark.parametrize("stage", ["rm", "dpo", "grpo"])
def test_each_stage_runs_shared_prompts_once_and_trains_the_same(tmp_path, monkeypatch, stage):
    # One step of the reward model, DPO (policy and reference forwards) and GRPO (k = 4 responses per
    # prompt: the no-grad and the training forwards) with shared_prefix on and off: the shared path runs
    # (a stage that forgot to pass its prompt lengths would never reach it), and the step's numbers
    # agree to fp32 (1e-5 relative; measured 1e-7).
    import rlhf_engine.model.stack as stack_module
    from rlhf_engine.stages.dpo import train_dpo
    from rlhf_engine.stages.dpo_config import dpo_preset
    from rlhf_engine.stages.ppo import train_ppo
    from rlhf_engine.stages.ppo_config import ppo_preset
    from rlhf_engine.stages.rm import train_reward_model
    from rlhf_engine.stages.rm_config import reward_preset
    from util import REWARD, rows, synthetic_ranked, tiny

    calls = []
    real = stack_module.prefix_hidden

    def counted(stack, adapter, plan):
        calls.append((adapter, torch.is_grad_enabled()))
        return real(stack, adapter, plan)

    monkeypatch.setattr(stack_module, "prefix_hidden", counted)
    data = synthetic_ranked(tmp_path / "ranked.jsonl", n_prompts=8)
    out = {}
    for shared in (True, False):
        name = f"{stage}-{shared}"
        if stage == "rm":
            cfg = tiny(reward_preset, tmp_path, name, data=data, max_steps=1)
            cfg.stack.shared_prefix, run, keys = shared, train_reward_model, ("loss", "grad_norm", "reward_margin")
        elif stage == "dpo":
            cfg = tiny(dpo_preset, tmp_path, name, data=data, max_steps=1)
            cfg.stack.shared_prefix, run, keys = shared, train_dpo, ("loss", "grad_norm", "logps_chosen")
        else:
            cfg = tiny(ppo_preset, tmp_path, name, reward_fn=REWARD, advantage="grpo", samples_per_prompt=4,
                       rollout_batch_size=2, minibatch_size=8, micro_batch_size=8, ppo_epochs=2, max_steps=1)  # fmt: skip
            cfg.stack = dataclasses.replace(cfg.stack, adapters=("policy",), shared_prefix=shared)
            run, keys = train_ppo, ("pg_loss", "grad_norm", "entropy", "reward_mean")
        before = len(calls)
        run(cfg)
        assert (len(calls) > before) == shared, (stage, shared, calls)
        out[shared] = rows(cfg.out)[-1]
    # the trained forward (grad) of every stage; DPO's reference (the bare base); GRPO's no-grad forward
    want = {"rm": {("reward", True)}, "dpo": {("policy", True), (None, False)},
            "grpo": {("policy", True), ("policy", False)}}[stage]  # fmt: skip
    assert want <= set(calls), calls
    for k in keys:
        assert out[True][k] == pytest.approx(out[False][k], rel=1e-5, abs=1e-7), k
