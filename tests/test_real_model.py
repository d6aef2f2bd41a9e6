"""Every stage on a real pretrained chat model (SmolLM2-135M-Instruct, the named base
smollm2-135m-instruct; fetched and converted once per session by the `smollm` fixture of conftest.py):
the chat layout shared by training, sampling and scoring, the tied output embedding, and a few steps of
each stage (tiny batches and lengths: these prove the plumbing on a real model, the quality is the
pipeline's: `make run-real`).

Letters: B sequences, P prompt tokens, R response tokens, V vocabulary, H hidden."""

import os

import pytest
import torch

import rlhf_kernels as kernels
from rlhf_engine.cli import main
from rlhf_engine.datasets.layout import end_of_turn_id, prompt_ids, sample_ids, stop_token_ids
from util import REWARD, rows, saved_weights

NAME = "smollm2-135m-instruct"
IM_END = 2  # `<|im_end|>`: ChatML's end of turn, SmolLM2's eos (and pad)


@pytest.fixture(scope="module")
def tokenizer(smollm):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm[0])


def test_the_chat_layout_of_training_is_what_ppo_samples_and_the_reward_model_scores(smollm, tokenizer):
    from rlhf_engine.algos.rollout import rollout
    from rlhf_engine.model.config import SamplingConfig, StackConfig
    from rlhf_engine.model.stack import ModelStack

    # the template renders a user turn with its generation prompt; the end of an assistant turn is <|im_end|>
    assert end_of_turn_id(tokenizer) == IM_END and stop_token_ids(tokenizer) == (IM_END,)
    prompt = "What is the capital of France? Answer in one sentence."
    text = tokenizer.decode(prompt_ids(tokenizer, prompt))
    assert text.endswith(f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"), text

    # PPO samples from exactly those ids (greedy here) and stops at <|im_end|>; the sample SFT, DPO and the RM
    # train on for (prompt, that answer) is those prompt ids, then the answer's tokens, then the end of turn
    stack = ModelStack.build(StackConfig(model=NAME, adapters=("policy",))).eval()
    traj = rollout(stack, [prompt], [0], SamplingConfig(max_new_tokens=32, temperature=0.0), seed=0, adapter=None)
    assert bool(traj.stopped[0]) and "Paris" in traj.responses[0], traj.responses
    P0 = traj.prompt_length
    sampled_prompt = traj.input_ids[0, :P0][traj.attention_mask[0, :P0].bool()].tolist()
    sampled_reply = traj.input_ids[0, P0:][traj.mask[0]].tolist()
    ids, P = sample_ids(tokenizer, prompt, traj.responses[0])
    assert ids[:P] == sampled_prompt == prompt_ids(tokenizer, prompt)
    assert ids[-1] == sampled_reply[-1] == IM_END  # both end the turn where generation stopped
    # the reply as text: a model may sample a tokenization BPE would not write (here " Capital" as one token
    # where the tokenizer writes " Cap" + "ital"); training data is text, so the sample holds the text's own
    # tokens, and they decode to exactly what was sampled
    assert ids[P:-1] == tokenizer(traj.responses[0], add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids[P:]) == tokenizer.decode(sampled_reply)
    # a chat record with the same turns lays out the same way
    from rlhf_engine.datasets.samples import encode_example, parse_example

    record = parse_example({"messages": [{"role": "user", "content": prompt},
                                         {"role": "assistant", "content": traj.responses[0]}]})  # fmt: skip
    assert encode_example(tokenizer, record, 512) == (ids, P)


def test_the_tied_output_embedding_is_shared_unquantised_unadapted_and_counted_once(smollm):
    from transformers import AutoModelForCausalLM

    from rlhf_engine.model.config import StackConfig
    from rlhf_engine.model.stack import ModelStack

    stack = ModelStack.build(StackConfig(model=NAME, adapters=("policy", "reward")))
    embed = stack.model.get_base_model().get_input_embeddings().weight
    assert stack.lm_head_weight is embed and stack.lm_head_weight.dtype == torch.float32  # not a 4-bit Params4bit
    assert not hasattr(stack.lm_head_weight, "quant_state")
    assert not any("lora_" in n and ("embed" in n or "lm_head" in n) for n, _ in stack.model.named_parameters())
    report = stack.memory_report()
    V, H = embed.shape
    unique_base = {id(p): p for n, p in stack.model.named_parameters() if "lora_" not in n}
    assert report["base"]["params"] == sum(
        int(torch.Size(p.quant_state.shape).numel()) if hasattr(p, "quant_state") else p.numel()
        for p in unique_base.values()
    )  # the embedding once, not again as lm_head: V * H is in the base exactly once
    assert report["base"]["params"] < 135_000_000 + V * H // 2

    # log-probs from linear_logprobs on the tied weight equal the model's own (full precision: the same weights)
    full = ModelStack.build(StackConfig(model=NAME, adapters=("policy",), quantization=None)).eval()
    hf = AutoModelForCausalLM.from_pretrained(smollm[0]).eval()
    ids = torch.tensor([prompt_ids(full.tokenizer, "My house is too hot. How can I cool it down?")])
    labels = ids[:, 1:]
    with torch.no_grad():
        ours = kernels.linear_logprobs(full.reference(ids, torch.ones_like(ids))[:, :-1], full.lm_head_weight, labels)
        theirs = torch.log_softmax(hf(ids).logits[:, :-1].double(), -1).gather(-1, labels[..., None])[..., 0]
    # fp32 hidden states through two forward implementations of the same weights: |logit| ~ 40 here
    assert (ours.double() - theirs).abs().max() < 2e-3, (ours.double() - theirs).abs().max()


def _train(stage, tmp_path, *args):
    out = str(tmp_path / stage.replace(" ", "-"))
    assert main([*stage.split(), "--model", NAME, "--out", out, "--no-progress", *args]) == 0
    return out


def _changed(out, name="adapter_policy.safetensors"):
    """The saved adapter moved away from its start (peft starts lora_B at zero)."""
    w = saved_weights(out, (name,))
    return any(float(t.abs().max()) > 0 for n, t in w.items() if "lora_B" in n)


SFT_FLAGS = ("--preset", "tiny", "--max-steps", "2", "--batch-size", "2", "--micro-batch-size", "2",
             "--max-length", "96", "--eval-fraction", "0.2", "--lr", "1e-3")  # fmt: skip


def test_sft_on_prompt_completion_and_chat_records(tmp_path):
    import json

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "My house is too hot.", "completion": "Close the curtains in the day and run a fan."},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}]},
        {"prompt": "My plants keep dying.", "completion": "Water them less and give them more light."},
        {"prompt": "I can't sleep.", "completion": "Keep a regular bedtime."},
    ]))  # fmt: skip
    out = _train("sft", tmp_path, "--data", str(data), *SFT_FLAGS)
    assert _changed(out) and rows(out)[-1]["step"] == 2


def test_rm_and_dpo_on_ranked_feedback(tmp_path):
    import json

    data = tmp_path / "feedback.jsonl"
    data.write_text("".join(json.dumps({
        "prompt": p, "completions": ["You could open a window at night.", "I'm sorry for your loss.", "Who cares?"],
        "rankings": [[1, 2, 3], [1, 3, 2]], "labelers": ["ana", "ben"]}) + "\n"
        for p in ("My house is too hot.", "My room is hot.", "It is hot at home.")))  # fmt: skip
    rm = _train("rm", tmp_path, "--data", str(data), "--preset", "tiny", "--max-steps", "2", "--batch-size", "2",
                "--max-length", "96", "--eval-fraction", "0.3")  # fmt: skip
    assert _changed(rm, "adapter_reward.safetensors")
    dpo = _train("dpo", tmp_path, "--data", str(data), *SFT_FLAGS[:-2], "--eval-fraction", "0.3", "--lr", "1e-3")
    assert _changed(dpo)


PPO_FLAGS = ("--preset", "tiny", "--reward-fn", REWARD, "--max-steps", "2", "--rollout-batch-size", "2",
             "--minibatch-size", "2", "--micro-batch-size", "2", "--max-new-tokens", "8", "--eval-every", "0",
             "--eval-prompts", "2", "--lr", "1e-3")  # fmt: skip


@pytest.mark.parametrize("advantage", ["gae", "rloo"])
def test_ppo_and_critic_free_rl(tmp_path, advantage):
    extra = ("--advantage", "rloo", "--group-size", "2", "--minibatch-size", "4", "--micro-batch-size", "4") \
        if advantage == "rloo" else ()  # fmt: skip
    out = _train("ppo", tmp_path, *PPO_FLAGS, *extra)
    assert _changed(out) and [r["step"] for r in rows(out)] == [0, 1, 2]
    evaluated = str(tmp_path / "eval.json")
    assert main(["eval", "--policy", out, "--reward-fn", REWARD, "--max-prompts", "2", "--max-new-tokens", "8",
                 "--out", evaluated, "--progress", "false"]) == 0  # fmt: skip
    assert os.path.isfile(evaluated)


def test_constitutional_ai_with_the_model_as_its_own_critic_and_judge(tmp_path):
    flags = ("--preset", "tiny", "--max-prompts", "2", "--batch-size", "2", "--max-new-tokens", "8")
    revise = _train("cai revise", tmp_path, *flags)
    assert os.path.isfile(os.path.join(revise, "transcript.jsonl"))
    label = _train("cai label", tmp_path, *flags, "--judge-max-length", "512")
    assert os.path.isfile(os.path.join(label, "judgements.jsonl"))
