"""Reward-model loss, batching, training (learns a synthetic preference), checkpoint/resume, classifier RM."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from rlhf_engine.algos.losses import reward_loss
from rlhf_engine.datasets.feedback import PreferencePair, build_pairs, load_feedback
from rlhf_engine.datasets.layout import encode, format_sample
from rlhf_engine.datasets.prompts import split_by_prompt
from rlhf_engine.errors import CheckpointError, ConfigError
from rlhf_engine.model.stack import ModelStack
from rlhf_engine.model.tokenizers import byte_tokenizer
from rlhf_engine.stages.rm import StackRewardModel, evaluate, pair_batch, train_reward_model
from rlhf_engine.stages.rm_config import reward_preset
from util import synthetic_ranked, tiny

# ---- the loss ------------------------------------------------------------------------------------


def test_loss_against_hand_computed_values():
    chosen = torch.tensor([2.0, -1.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([0.5, 0.0], dtype=torch.float64, requires_grad=True)
    # gaps d = [1.5, -1.0]; -log sigmoid(d) = log(1 + exp(-d)) = [0.2014133, 1.3132617]; mean 0.7573375
    loss, stats = reward_loss(chosen, rejected)
    assert loss.item() == pytest.approx(0.7573375, abs=1e-7)
    assert loss.item() == pytest.approx((math.log1p(math.exp(-1.5)) + math.log1p(math.exp(1.0))) / 2, abs=1e-7)
    assert stats.accuracy.item() == 0.5 and stats.reward_margin.item() == pytest.approx(0.25)
    # d loss / d s_chosen_i = -sigmoid(-d_i) / B = [-0.1824255, -0.7310586] / 2; rejected gets the opposite
    loss.backward()
    want = torch.tensor([-0.1824255, -0.7310586], dtype=torch.float64) / 2
    torch.testing.assert_close(chosen.grad, want, atol=1e-7, rtol=0)
    torch.testing.assert_close(rejected.grad, -want, atol=1e-7, rtol=0)


def test_loss_with_margin():
    chosen, rejected = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 0.0])
    # scalar margin 1: d - 1 = [0.5, -2]; log(1+e^-0.5) = 0.4740770, log(1+e^2) = 2.1269280; mean 1.3005025
    assert reward_loss(chosen, rejected, 1.0)[0].item() == pytest.approx(1.3005025, abs=1e-6)
    # per-pair margins [0, 1]: [1.5, -2] -> (0.2014133 + 2.1269280) / 2 = 1.1641706
    assert reward_loss(chosen, rejected, torch.tensor([0.0, 1.0]))[0].item() == pytest.approx(1.1641706, abs=1e-6)


def test_loss_is_stable_at_extreme_gaps():
    loss, _ = reward_loss(torch.tensor([100.0, -100.0]), torch.tensor([0.0, 0.0]))
    # pair 1: -log sigmoid(100) ~ e^-100 ~ 0; pair 2: -log sigmoid(-100) = 100 (+ e^-100)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(50.0, abs=1e-5)
    loss, _ = reward_loss(torch.tensor([1.0], dtype=torch.bfloat16), torch.tensor([1.0], dtype=torch.bfloat16))
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(math.log(2), abs=1e-6)


# ---- batching ------------------------------------------------------------------------------------


def test_pairs_pack_into_one_batch_chosen_first():
    encoded = [(([5, 6, 7], 1), ([8, 9], 1), 0.5), (([10], 0), ([11, 12, 13, 14], 2), 0.0)]
    b, margins = pair_batch(encoded, pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 0], [10, 0, 0, 0], [8, 9, 0, 0], [11, 12, 13, 14]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert margins.tolist() == [0.5, 0.0]


def test_encode_keeps_the_end_and_ends_with_eos():
    tok = byte_tokenizer()
    ids = encode(tok, format_sample("a long prompt", "reply"), max_length=6)
    assert len(ids) == 6 and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[:-1]) == "reply"


def test_held_out_split_is_by_prompt_and_deterministic():
    pairs = [PreferencePair(f"p{i // 3}", f"a{i}", f"b{i}") for i in range(60)]  # 20 prompts x 3 pairs
    train, held = split_by_prompt(pairs, 0.25, seed=1)
    assert len(held) == 5 * 3 and len(train) == 15 * 3
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    assert split_by_prompt(pairs, 0.25, seed=1) == (train, held)
    assert split_by_prompt(pairs, 0.0, seed=1) == (pairs, [])


# ---- training ------------------------------------------------------------------------------------


def tiny_config(tmp_path, data, out="out", **kw):
    kw.setdefault("eval_every", 0)  # (the preset's)
    return tiny(reward_preset, tmp_path, out, data=data, **kw)


def test_reward_model_learns_a_synthetic_preference(tmp_path):
    data = synthetic_ranked(tmp_path / "ranked.jsonl", n_prompts=40)
    config = tiny_config(tmp_path, data, max_steps=8, eval_fraction=0.25, exclude_flagged=True)
    result = train_reward_model(config)

    assert result.flagged_labelers == ["cy"]
    assert result.train_pairs == 30 * 3 and result.eval_pairs == 10 * 3
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(0, 9))
    # untrained (step 0): scores near 0, held-out loss near log 2 = 0.693 (a random head already
    # orders some pairs: accuracy 0.77 here). Trained: loss more than halved, accuracy well above 0.5
    assert rows[0]["eval_loss"] > 0.6
    assert result.eval_loss < 0.5 * rows[0]["eval_loss"], rows
    assert result.eval_accuracy >= 0.9 and rows[-1]["eval_accuracy"] == result.eval_accuracy
    assert rows[-1]["loss"] < rows[1]["loss"]
    # each step's time, tokens/s and memory peak, as the other stages log them; the run's peak survives
    # their per-step resets (result.json)
    assert all(r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["peak_mem_mib"] > 100 for r in rows[1:]), rows
    saved = json.loads((tmp_path / "out" / "result.json").read_text())
    assert saved["peak_mem_mib"] == saved["peak_rss_mib"] >= max(r["peak_mem_mib"] for r in rows[1:])

    # the saved adapter + head reproduce the held-out accuracy on a freshly built base
    stack = ModelStack.from_saved(config.out)
    pairs, _ = build_pairs(load_feedback(data), threshold=0.3, exclude_flagged=True)
    _, held = split_by_prompt(pairs, 0.25, seed=0)
    tok = stack.tokenizer
    enc = [
        (
            (encode(tok, format_sample(p.prompt, p.chosen), 128), 0),
            (encode(tok, format_sample(p.prompt, p.rejected), 128), 0),
            0.0,
        )
        for p in held
    ]
    again = evaluate(StackRewardModel(stack), [pair_batch(enc, tok.pad_token_id)])
    assert again["eval_accuracy"] == pytest.approx(result.eval_accuracy)


def test_checkpoint_resume_matches_an_uninterrupted_run(tmp_path):
    data = synthetic_ranked(tmp_path / "ranked.jsonl", n_prompts=16)
    straight = train_reward_model(tiny_config(tmp_path, data, "straight", max_steps=6, checkpoint_every=100))
    assert straight.steps == 6 and straight.resumed_from == 0

    # "crash" after step 3 (the checkpoint is written there), then rerun to 6 steps
    first = train_reward_model(tiny_config(tmp_path, data, "resumed", max_steps=3, checkpoint_every=3))
    assert first.steps == 3 and first.resumed_from == 0
    metrics = tmp_path / "resumed" / "metrics.jsonl"
    with metrics.open("a") as f:  # a row written after the checkpoint, before the crash
        f.write(json.dumps({"step": 4, "loss": 123.0}) + "\n")
    second = train_reward_model(tiny_config(tmp_path, data, "resumed", max_steps=6, checkpoint_every=3))
    assert second.resumed_from == 3 and second.steps == 6

    a = load_file(str(tmp_path / "straight" / "adapter_reward.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter_reward.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), max((a[k] - b[k]).abs().max().item() for k in a)
    # the resumed run really continued from step 3: a fresh 3-step run ends elsewhere
    fresh3 = train_reward_model(tiny_config(tmp_path, data, "three", max_steps=3))
    c = load_file(str(tmp_path / "three" / "adapter_reward.safetensors"))
    assert fresh3.steps == 3 and not all(torch.equal(b[k], c[k]) for k in b)
    # metrics: the row past the checkpoint was dropped, no step is duplicated, losses match
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5, 6]
    straight_rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows[1:]] == pytest.approx([r["loss"] for r in straight_rows[1:]], rel=1e-6)

    # resuming with a different learning rate would silently mix two runs: refused
    with pytest.raises(ConfigError, match="different config \\(lr 0.003 -> 0.01\\)"):
        train_reward_model(tiny_config(tmp_path, data, "resumed", max_steps=8, lr=1e-2))
    # so would other preferences in the same file (here: the labelers' rankings reversed), refused
    # before any model is built
    rows = [json.loads(line) for line in open(data)]
    with open(data, "w") as f:
        f.writelines(json.dumps({**r, "rankings": [[4 - x for x in k] for k in r["rankings"]]}) + "\n" for r in rows)
    with pytest.raises(CheckpointError, match="data file .* changed since the checkpoint"):
        train_reward_model(tiny_config(tmp_path, data, "resumed", max_steps=8))


def test_sequence_classifier_directory_as_the_reward_model(tmp_path):
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    from rlhf_engine.model.config import MODEL_PRESETS

    tok = byte_tokenizer()
    path = tmp_path / "my-rm"
    torch.manual_seed(0)
    cls = LlamaForSequenceClassification(LlamaConfig(**MODEL_PRESETS["tiny-llama"], num_labels=1, pad_token_id=0))
    cls.save_pretrained(path)
    tok.save_pretrained(path)
    before = {n: p.clone() for n, p in cls.named_parameters()}

    data = synthetic_ranked(tmp_path / "ranked.jsonl", n_prompts=16)
    result = train_reward_model(tiny_config(tmp_path, data, max_steps=3, stack=dict(model=str(path))))
    assert result.files == [str(tmp_path / "out" / "classifier")]
    trained = AutoModelForSequenceClassification.from_pretrained(result.files[0])
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, before[n])]
    assert "score.weight" in changed and len(changed) > len(before) // 2  # the whole model trains
    assert result.eval_accuracy is not None

    cls2 = LlamaForSequenceClassification(LlamaConfig(**MODEL_PRESETS["tiny-llama"], num_labels=2, pad_token_id=0))
    cls2.save_pretrained(tmp_path / "two-labels")
    tok.save_pretrained(tmp_path / "two-labels")
    with pytest.raises(ConfigError, match="num_labels=1"):
        two_labels = dict(model=str(tmp_path / "two-labels"))
        train_reward_model(tiny_config(tmp_path, data, "o2", max_steps=1, stack=two_labels))
