"""algos.rewards: the three reward sources and score shaping."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from rlhf_engine.algos.rewards import ClassifierReward, FunctionReward, RunningMoments, StackReward, shape_scores
from rlhf_engine.core.tensors import pad
from rlhf_engine.errors import ConfigError, RewardError
from rlhf_engine.model.config import StackConfig
from rlhf_engine.model.stack import ModelStack
from rlhf_engine.model.tokenizers import byte_tokenizer

PROMPTS = ["p1", "p2", "p3"]
RESPONSES = ["eee", "abc", "hello there"]


def test_function_reward_by_module_and_by_file(tmp_path):
    want = [1.0, 0.0, 3 / 11]
    assert FunctionReward("_reward_fns:count_e").score(PROMPTS, RESPONSES).tolist() == pytest.approx(want)
    f = tmp_path / "my_rules.py"
    f.write_text("def score(prompts, responses):\n    return [len(r) for r in responses]\n")
    assert FunctionReward(f"{f}:score").score(PROMPTS, RESPONSES).tolist() == [3.0, 3.0, 11.0]


@pytest.mark.parametrize(
    "spec, match",
    [("no_colon", "expected MODULE:FUNCTION"), ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
     ("_reward_fns:missing", "has no attribute 'missing'"), ("_reward_fns:NOT_CALLABLE", "is not callable"),
     ("/no/such/file.py:f", "no file")],
)  # fmt: skip
def test_bad_function_specs(spec, match):
    with pytest.raises(ConfigError, match=match):
        FunctionReward(spec)


@pytest.mark.parametrize(
    "name, match",
    [("wrong_length", "returned 1 scores for 3 responses"), ("not_numbers", "returned str .high. for response 0; expected a number"),
     ("nan_for_second", "non-finite score nan for response 1")],
)  # fmt: skip
def test_bad_function_outputs(name, match):
    with pytest.raises(RewardError, match=match):
        FunctionReward(f"_reward_fns:{name}").score(PROMPTS, RESPONSES)


def _classifier(tmp_path, num_labels, id2label=None):
    tok = byte_tokenizer()
    config = LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=num_labels,
                         id2label=id2label, pad_token_id=tok.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return model, tok


def test_single_score_classifier_reward_is_its_one_logit(tmp_path):
    from rlhf_engine.datasets.layout import format_sample

    model, tok = _classifier(tmp_path, 1)
    rm = ClassifierReward(str(tmp_path), torch.device("cpu"))  # one label: no positive label to name
    enc = tok([format_sample(p, r) for p, r in zip(PROMPTS, RESPONSES)], return_tensors="pt", padding=True)
    with torch.no_grad():
        want = model(**enc).logits[:, 0]
    assert rm.index == 0 and torch.allclose(rm.score(PROMPTS, RESPONSES), want, atol=1e-6)


def test_classifier_reward_scores_and_positive_label(tmp_path):
    from rlhf_engine.datasets.layout import format_sample

    model, tok = _classifier(tmp_path, 2, {0: "hate", 1: "not hate"})
    rm = ClassifierReward(str(tmp_path), torch.device("cpu"), positive_label="Not Hate")
    got = rm.score(PROMPTS, RESPONSES)
    enc = tok([format_sample(p, r) for p, r in zip(PROMPTS, RESPONSES)], return_tensors="pt", padding=True)
    with torch.no_grad():
        want = model(**enc).logits[:, 1]
    assert torch.allclose(got, want, atol=1e-6)
    assert rm.index == 1 and ClassifierReward(str(tmp_path), torch.device("cpu"), positive_label=0).index == 0
    with pytest.raises(ConfigError, match="name the positive one"):
        ClassifierReward(str(tmp_path), torch.device("cpu"))
    with pytest.raises(ConfigError, match="no label 'toxic'"):
        ClassifierReward(str(tmp_path), torch.device("cpu"), positive_label="toxic")
    with pytest.raises(ConfigError, match="cannot load as a sequence classifier"):
        ClassifierReward(str(tmp_path / "missing"), torch.device("cpu"))


def test_stack_reward_reads_the_rm_as_trained():
    from rlhf_engine.datasets.layout import encode, format_sample

    stack = ModelStack.build(StackConfig(model="tiny-llama", adapters=("policy", "reward")))
    with torch.no_grad():
        for p in stack.heads["reward"].parameters():
            p.add_(0.5)
    got = StackReward(stack, max_length=64, batch_size=2).score(PROMPTS, RESPONSES)
    ids, mask = pad([encode(stack.tokenizer, format_sample(p, r), 64) for p, r in zip(PROMPTS, RESPONSES)],
                          stack.tokenizer.pad_token_id)  # fmt: skip
    assert torch.allclose(got, stack.reward(ids, mask).float(), atol=1e-5)
    with pytest.raises(ConfigError, match="no reward adapter"):
        StackReward(ModelStack.build(StackConfig(model="tiny-llama", adapters=("policy",))), max_length=64)


def test_shape_scores_hand_cases():
    scores = torch.tensor([1.0, 3.0, -2.0, 6.0])
    stopped = torch.tensor([True, False, True, False])
    m = RunningMoments()
    # penalty -1 where the response never stopped: (1, 2, -2, 5); clip 4: (1, 2, -2, 4)
    got = shape_scores(scores, stopped, missing_eos_penalty=-1.0, clip=4.0, normalize="none", moments=m)
    assert got.tolist() == [1.0, 2.0, -2.0, 4.0]
    # batch normalisation: (s - mean) / std, unbiased: mean 2, deviations (-1, 1, -4, 4), std sqrt(34 / 3)
    got = shape_scores(scores, stopped, missing_eos_penalty=None, clip=None, normalize="batch", moments=m)
    assert torch.allclose(got, (scores - 2.0) / (34 / 3) ** 0.5, atol=1e-6)
    # running: the moments include this batch, so a single batch normalises like "batch"
    got = shape_scores(scores, stopped, missing_eos_penalty=None, clip=None, normalize="running", moments=m)
    assert torch.allclose(got, (scores - 2.0) / (34 / 3) ** 0.5, atol=1e-6) and m.count == 4
    with pytest.raises(ConfigError, match="normalisation"):
        shape_scores(scores, stopped, missing_eos_penalty=None, clip=None, normalize="zscore", moments=m)
