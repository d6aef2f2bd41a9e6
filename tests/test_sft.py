"""stages.sft: the layout and the completion-only loss against the model's own full logits, chat records,
length-bucketed batches, and the stage on the run machinery (held-out loss on the embedded corpus,
kernels on vs off, micro-batches, the warm-up, an SFT adapter as PPO's starting policy and frozen
reference, resume after SIGKILL), bad data on the command line. Letters: B sequences, T time."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from rlhf_engine.algos.losses import sft_loss
from rlhf_engine.cli import main
from rlhf_engine.core.order import DataOrder
from rlhf_engine.core.tensors import IGNORE_INDEX as IGNORE
from rlhf_engine.datasets.batching import bucketed_batch, collate
from rlhf_engine.datasets.samples import SFTExample, completion_tokens, encode_example, load_sft_data, parse_example
from rlhf_engine.model.config import StackConfig
from rlhf_engine.model.logprobs import completion_logprobs
from rlhf_engine.model.stack import build_policy_stack
from rlhf_engine.model.tokenizers import byte_tokenizer
from rlhf_engine.stages.ppo_config import ppo_preset
from rlhf_engine.stages.sft import train_sft
from rlhf_engine.stages.sft_config import sft_preset
from util import REWARD, assert_rel_norm, rows, saved_weights, tiny, untimed


def config(tmp_path, name="out", **kw):
    return tiny(sft_preset, tmp_path, name, **kw)


# ---- layout and loss -----------------------------------------------------------------------------------


def test_the_prompt_is_what_the_policy_continues_and_truncation_keeps_the_end():
    tok = byte_tokenizer()  # one token per byte (id = byte + 3), EOS appended
    ids, P = encode_example(tok, SFTExample("abcdef", "xyz"), 512)
    assert tok.decode(ids) == "abcdef\nxyz</s>" and P == len("abcdef\n") and completion_tokens(ids, P) == 4
    # longer than max_length: the last tokens stay, the prompt loses its start first
    ids, P = encode_example(tok, SFTExample("abcdef", "xyz"), 6)
    assert tok.decode(ids) == "f\nxyz</s>" and P == 2 and completion_tokens(ids, P) == 4
    # no prompt left: the first kept token has nothing before it, the other two train
    ids, P = encode_example(tok, SFTExample("abcdef", "xyz"), 3)
    assert tok.decode(ids) == "yz</s>" and P == 0 and completion_tokens(ids, P) == 2
    batch = collate([encode_example(tok, SFTExample("ab", "c"), 512), encode_example(tok, SFTExample("a", "xyz"), 512)],
                    tok.pad_token_id)  # fmt: skip
    # row 0 "ab\nc</s>" + pad: labels are c and </s> at positions 2, 3; row 1 "a\nxyz</s>": x y z </s>
    assert batch.input_ids.shape == (2, 6) and batch.attention_mask.sum(1).tolist() == [5, 6]
    assert batch.labels[0].tolist() == [IGNORE, IGNORE, ord("c") + 3, 1, IGNORE]
    assert batch.labels[1].tolist() == [IGNORE, ord("x") + 3, ord("y") + 3, ord("z") + 3, 1]


@pytest.fixture(scope="module")
def stack():
    s = build_policy_stack(StackConfig(model="tiny-llama", adapters=("policy",)), "")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a policy that differs from the base
        for name, p in s.model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return s.eval()


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_loss_is_the_token_mean_over_completion_tokens_only(stack, backend):
    # The reference: the policy's full logits (hidden @ W.T) in float64, log_softmax, and the completion
    # tokens counted from the text alone (the byte tokenizer: one token per completion byte, plus EOS, at
    # the end of each row's real tokens). Counting a prompt token too, or shifting by one, changes it.
    examples = [SFTExample("My house is too hot.", "Open a window."), SFTExample("Hi", "Hello there, how are you?"),
                SFTExample("What is two plus three?", "Five.")]  # fmt: skip
    tok = stack.tokenizer
    batch = collate([encode_example(tok, e, 512) for e in examples], tok.pad_token_id)
    with torch.no_grad():
        hidden = stack.policy(batch.input_ids, batch.attention_mask)  # (B, T, H)
        logp, rows_of = completion_logprobs(hidden, stack.lm_head_weight, batch.labels, backend)
        lp = torch.log_softmax(hidden.double() @ stack.lm_head_weight.double().T, -1)  # (B, T, V)
    total, n, want_rows = 0.0, 0, []
    for r, e in enumerate(examples):
        L, k = int(batch.attention_mask[r].sum()), len(e.completion.encode()) + 1
        for j in range(L - k, L):  # completion token j, predicted at position j - 1
            total -= float(lp[r, j - 1, batch.input_ids[r, j]])
            n += 1
            want_rows.append(r)
    assert logp.shape == (n,) and rows_of.tolist() == want_rows
    assert float(sft_loss(logp, n)) == pytest.approx(total / n, rel=1e-6)


def test_chat_records_through_the_tokenizers_template():
    tok = byte_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")  # fmt: skip
    ex = parse_example({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                     {"role": "assistant", "content": "Hello."}]}, 7)  # fmt: skip
    ids, P = encode_example(tok, ex, 512)
    # the prompt is the template's render of the earlier messages with the generation prompt; the reply and
    # the template's end of turn (here "\n", the first thing it writes after a message) train: generation
    # stops there (datasets.layout.stop_token_ids), so no EOS follows it
    assert tok.decode(ids[:P]) == "<system>Be brief.\n<user>Hi\n<assistant>" and tok.decode(ids[P:]) == "Hello.\n"
    assert ex.line == 7 and ex.prompt == json.dumps([["system", "Be brief."], ["user", "Hi"]])


# ---- batches --------------------------------------------------------------------------------------------


def padding(batches, lengths):
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_length_buckets_visit_every_item_once_per_epoch_with_less_padding():
    rng = random.Random(0)
    lengths = [rng.randint(5, 200) for _ in range(37)]  # 37 items, batches of 4: 10 steps per epoch
    order = DataOrder(37, 4, seed=3)
    spe = order.steps_per_epoch
    for epoch in range(2):
        batches = [bucketed_batch(order, lengths, epoch * spe + k, window=4) for k in range(spe)]
        assert sorted(i for b in batches for i in b) == list(range(37)) and all(1 <= len(b) <= 4 for b in batches)
        plain = [order.batch(epoch * spe + k) for k in range(spe)]
        assert padding(batches, lengths) < 0.5 * padding(plain, lengths)
        # window 1 is the plain order
        one = [sorted(bucketed_batch(order, lengths, epoch * spe + k, 1)) for k in range(spe)]
        assert one == [sorted(b) for b in plain]
    # a pure function of (seed, step), and the seed matters
    assert bucketed_batch(order, lengths, 13, 4) == bucketed_batch(DataOrder(37, 4, seed=3), lengths, 13, 4)
    other = DataOrder(37, 4, seed=4)
    assert [bucketed_batch(other, lengths, k, 4) for k in range(spe)] != [bucketed_batch(order, lengths, k, 4)
                                                                          for k in range(spe)]  # fmt: skip


# ---- the stage ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    return train_sft(config(tmp_path_factory.mktemp("sft"), max_steps=24, eval_every=12))


def test_sft_lowers_held_out_loss_on_the_embedded_corpus(sft_run):
    # The embedded corpus: 40 prompts, each with its own reply; 8 whole prompts held out (eval_fraction 0.2).
    # The random tiny base starts far above uniform (its lm_head rows have norm 2: measured 7.39 nats per
    # token, log 259 = 5.56); 24 steps (6 epochs) of LoRA SFT teach it English-like bytes: measured 3.43.
    r = sft_run
    assert r.train_examples == 32 and r.eval_examples == 8 and r.steps == 24
    assert r.eval_loss < 0.6 * r.eval_loss_start, (r.eval_loss_start, r.eval_loss)
    rs = rows(r.out)
    assert [x["step"] for x in rs] == list(range(25)) and rs[0]["eval_loss"] == r.eval_loss_start
    assert rs[12]["eval_loss"] < rs[0]["eval_loss"] and rs[-1]["eval_loss"] == pytest.approx(r.eval_loss)
    assert rs[-1]["loss"] < 0.6 * rs[1]["loss"]
    for key in ("loss", "grad_norm", "lr", "tokens", "tokens_per_s", "padding", "step_s", "peak_mem_mib"):
        assert all(key in x for x in rs[1:]), key
    assert json.load(open(os.path.join(r.out, "stack.json")))["roles"] == ["policy"]
    assert os.path.isfile(os.path.join(r.out, "checkpoint.pt")) and os.path.isfile(os.path.join(r.out, "result.json"))


def test_an_sft_adapter_starts_ppo_and_is_its_frozen_reference(sft_run, tmp_path):
    from rlhf_engine.stages.ppo import build_stack

    stack, _ = build_stack(ppo_preset("tiny", out=str(tmp_path / "ppo"), reward_fn=REWARD, init_adapter=sft_run.out))
    saved = saved_weights(sft_run.out)
    policy, reference = dict(stack.named_role_parameters("policy")), dict(stack.named_role_parameters("reference"))
    for k, v in saved.items():
        assert torch.equal(policy[k], v) and torch.equal(reference[k.replace(".policy.", ".reference.")], v)
    assert all(p.requires_grad for p in policy.values()) and not any(p.requires_grad for p in reference.values())


def test_kernels_on_vs_off_micro_batches_and_the_warm_up(tmp_path):
    # The same 3 steps with the fused kernels ("auto": C++ here) and with the PyTorch reference ([N, V]
    # logits): the same losses, grad norms and adapter weights. Tolerance: fp32 computations of the same
    # math in different orders (~1e-6 relative per op): metrics to 1e-4; weights norm-wise as in
    # tests/test_ppo.py (Adam amplifies fp32 differences where a gradient is near 0). Micro-batches of 3
    # instead of 8: each loss is its tokens' sum over the WHOLE batch's token count, so the sum of their
    # gradients is the batch's (up to fp32 order). The warm-up: lr * (s + 1) / 2 for the first 2 steps.
    kw = dict(max_steps=3, warmup_steps=2)
    on = train_sft(config(tmp_path, "on", backend="auto", **kw))
    off = train_sft(config(tmp_path, "off", backend="torch", **kw))
    micro = train_sft(config(tmp_path, "micro", micro_batch_size=3, **kw))
    ron = untimed(rows(on.out))
    assert [r.get("lr") for r in ron] == [None, 1.5e-3, 3e-3, 3e-3]
    for other in (off, micro):
        for a, b in zip(ron, untimed(rows(other.out)), strict=True):
            for k in a:
                if k == "padding":  # micro-batches pad to their own longest row
                    continue
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (other.out, a["step"], k)
        wa, wb = saved_weights(on.out), saved_weights(other.out)
        for k in wa:
            assert_rel_norm(wa[k], wb[k], bound=1e-3, name=k)


# ---- the command line: resume after SIGKILL, bad data --------------------------------------------------


def sft_args(out, *extra):
    return ["sft", "--preset", "tiny", "--model", "tiny-llama", "--out", str(out), "--no-progress", *extra]


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tmp_path):
    # The killed run is a child process (SIGKILL after its step-2 row); the uninterrupted run and the resume
    # run here, on one thread like the child (the C++ kernels and GEMMs then add in the same order).
    steps = ["--max-steps", "40", "--checkpoint-every", "1"]
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(sft_args(tmp_path / "straight", *steps)) == 0
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("TRITON_INTERPRET", None)
        child = subprocess.Popen([sys.executable, "-P", "-m", "rlhf_engine", *sft_args(tmp_path / "killed", *steps)],
                                 env=env, stderr=subprocess.PIPE, text=True)  # fmt: skip
        metrics = tmp_path / "killed" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):  # steps 0, 1, 2 logged
            assert child.poll() is None, child.stderr.read()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert not (tmp_path / "killed" / "result.json").exists()  # it died mid-run
        assert main(sft_args(tmp_path / "killed", *steps)) == 0
    finally:
        torch.set_num_threads(saved)
    assert json.loads((tmp_path / "killed" / "result.json").read_text())["resumed_from"] >= 1
    assert untimed(rows(tmp_path / "killed")) == untimed(rows(tmp_path / "straight"))
    a, b = saved_weights(tmp_path / "killed"), saved_weights(tmp_path / "straight")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "p"}, ":2: missing key 'completion'"),
        ({"completion": "c"}, ":2: missing key 'prompt'"),
        ({"prompt": "p", "completion": ""}, ":2: 'completion' must be a non-empty string"),
        ({"prompt": "p", "completion": " \n"}, ":2: 'completion' is only whitespace"),
        ({"prompt": "p", "completions": "c"}, ":2: unknown field 'completions' (did you mean 'completion'?)"),
        ({"messages": [{"role": "user", "content": "hi"}]}, ":2: 'messages' must be a list of at least 2 messages"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
         ":2: message 1: 'content' must be a non-empty string"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}]},
         ":2: the last message is the reply that trains: its role must be 'assistant', not 'user'"),
        ({"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
         ":2: message 0: role 'bot': expected one of system, user, assistant"),
    ],
)
def test_bad_data_is_one_line_naming_file_and_line(tmp_path, capsys, record, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n" + json.dumps(record) + "\n")
    assert main(sft_args(tmp_path / "out", "--data", str(data))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {data}{message}"), err
    assert not (tmp_path / "out").exists()  # refused before the run opened OUT


def test_chat_records_without_a_chat_template_are_one_line(tmp_path, capsys):
    # the preset byte tokenizer has no chat template: the first chat record is named
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}) + "\n")
    assert load_sft_data(str(data))[1].messages == (("user", "Hi"), ("assistant", "Hello."))
    assert main(sft_args(tmp_path / "out", "--data", str(data), "--eval-fraction", "0")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {data}:2: 'messages' records need a tokenizer with a chat template and this model's "
                   "tokenizer has none; write {\"prompt\", \"completion\"} records instead"]  # fmt: skip


def test_help_names_every_knob():
    out = subprocess.run([sys.executable, "-P", "-m", "rlhf_engine", "sft", "--help"], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert out.returncode == 0
    for f in ("--data", "--model", "--out", "--preset", "--max-steps", "--backend", "--init-adapter", "--epochs",
              "--batch-size", "--micro-batch-size", "--bucket-window", "--lr", "--warmup-steps", "--max-length",
              "--eval-fraction", "--eval-every", "--checkpoint-every", "--seed", "--config", "--no-resume",
              "--no-progress", "--lora-r", "--quantization", "--device"):  # fmt: skip
        assert f in out.stdout, f
