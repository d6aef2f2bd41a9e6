"""Constitutional AI (datasets.constitution, stages.cai, `python -m engine cai revise | label`).

The data side runs with scripted stand-ins for the generator and the judge (here only; the product path
always runs a model): template filling, the transcript, the SFT records and the preference read from
choice-token log-probs in both orders are compared exactly with hand-derived values. The model side
runs on the tiny preset: the judge's last-position log-probs against a float64 reference, both stages
end to end through the command line, `engine rm` training on the labels, and a resume after an
interruption. Bad inputs are one `error:` line with exit status 2 (subprocesses: found before torch is
imported)."""

import json
import math
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

from rlhf_engine.cli import main
from rlhf_engine.core.files import CHECKPOINT_FILE, CONFIG_FILE, RESULT_FILE
from rlhf_engine.core.jsonl import check_fields, read_jsonl, require_str
from rlhf_engine.datasets.constitution import (
    DEFAULT_TEMPLATES,
    TEMPLATE_FIELDS,
    Principle,
    clean,
    judge_preference,
    load_constitution,
    load_template,
)
from rlhf_engine.datasets.corpus import red_team_prompts
from rlhf_engine.datasets.feedback import PreferencePair, load_feedback
from rlhf_engine.datasets.samples import load_sft_data
from rlhf_engine.errors import (
    ConfigError,
    ConstitutionError,  # fmt: skip
)
from rlhf_engine.stages.cai import (  # fmt: skip
    JUDGEMENTS_FILE,
    PREFERENCES_FILE,
    SFT_FILE,
    TRANSCRIPT_FILE,
    ModelJudge,
    draw_principle,
    label_batch,
    preference_records,
    revise_batch,
    sft_records,
)

STOP = ("\n\nHuman:",)
PRINCIPLES = [
    Principle("Critique 0.", "Revise 0.", "Which is kinder?"),
    Principle("Critique 1.", "Revise 1.", "Which is safer?"),
    Principle("Critique 2.", "Revise 2.", "Which is more honest?"),
]


class ScriptedGenerator:
    """Stand-in `Generate`: response j to text i is "<stream> <key>.<j>", followed by a stop string and
    text a real model would add after it (which the stage must cut); `script` overrides some of them."""

    def __init__(self, script=None):
        self.calls = []
        self.script = script or {}

    def __call__(self, texts, keys, stream, samples=1):
        self.calls.append((stream, list(texts), list(keys), samples))
        return [self.script.get((stream, k, j), f" {stream} {k}.{j}\n\nHuman: and then") for k in keys
                for j in range(samples)]  # fmt: skip


# ---- constitution and templates ----------------------------------------------------------------


def test_the_shipped_constitution_and_templates_load():
    principles = load_constitution(need_choice=True)
    assert len(principles) == 16 and all(p.critique_request and p.revision_request and p.choice_question
                                         for p in principles)  # fmt: skip
    assert principles[0].critique_request.startswith("Identify specific ways in which the assistant's last response")
    for kind, (required, optional) in TEMPLATE_FIELDS.items():
        t = load_template(kind)
        assert t.path == DEFAULT_TEMPLATES[kind] and set(required) <= t.fields <= set(required) | set(optional)
    # the judge template ends where the choice token follows, its file's final newline not part of it
    assert load_template("judge").text.endswith("The answer is: (")


def test_templates_fill_exactly():
    critique = load_template("critique")
    assert critique.fill(prompt="P?", response="R.", critique_request="C?") == (
        "Human: P?\n\nAssistant: R.\n\nCritique request: C?\n\nCritique:"
    )
    revision = load_template("revision")
    assert revision.fill(prompt="P?", response="R.", critique_request="C?", critique="K.", revision_request="V!") == (
        "Human: P?\n\nAssistant: R.\n\nCritique request: C?\n\nCritique: K.\n\nRevision request: V!\n\nRevision:"
    )
    judge = load_template("judge")
    assert judge.fill(prompt="P?", question="Q?", response_a="a {x}", response_b="b", choice_a="A", choice_b="B") == (
        "Consider the following conversation between a human and an assistant:\n\nHuman: P?\n\nQ?\n\nOptions:\n"
        "(A) a {x}\n(B) b\n\nThe answer is: ("
    )  # a brace inside a value stays as it is


def test_a_user_template_with_literal_braces(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text('{{"json": true}} {prompt}|{response}|{critique_request}\n\n')
    t = load_template("critique", str(path))
    assert t.fill(prompt="p", response="r", critique_request="c") == '{"json": true} p|r|c\n'  # one newline stripped


@pytest.mark.parametrize(
    "kind, text, message",
    [
        ("critique", "{prompt} {critique_request}", "missing field {response} (a critique template must use "
                                                    "{prompt}, {response}, {critique_request})"),
        ("revision", "{prompt} {response} {revision_request}", "missing field {critique}"),
        ("judge", "{prompt} {question} {response_a} {response_b} {answer}", "unknown field {answer}; judge "
         "templates have: {prompt}, {question}, {response_a}, {response_b}, {choice_a}, {choice_b}"),
        ("critique", "{prompt} {response} {critique_request} {", "Single '{' encountered in format string "
                                                                 "(write {{ and }} for literal braces)"),
        ("critique", "{prompt} {response} {critique_request} {0}", "unknown field {0}"),
    ],
)
def test_bad_templates_name_the_field_and_the_file(tmp_path, kind, text, message):
    path = tmp_path / f"{kind}.txt"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_template(kind, str(path))
    assert str(e.value).startswith(f"{kind} template {path}: {message}"), str(e.value)


@pytest.mark.parametrize(
    "lines, need_choice, message",
    [
        (["", "  "], False, "constitution {path}: empty (no principles)"),
        (['{"critique_request": "c"}'], False,
         "{path}:1: principle without a revision request (field 'revision_request')"),
        (['{"critique_request": "c", "revision_request": "r"}', '{"revision_request": "r"}'], False,
         "{path}:2: principle without a critique request (field 'critique_request')"),
        (['{"critique_request": "c", "revision_request": ""}'], False, "{path}:1: 'revision_request' must be a "
                                                                       "non-empty string"),
        (['{"critique_request": "c", "revision_request": "r", "choice_questoin": "q"}'], False,
         "{path}:1: unknown field 'choice_questoin' (did you mean 'choice_question'?); principle records have: "
         "critique_request, revision_request, choice_question"),
        (['["c", "r"]'], False, "{path}:1: expected a JSON object (a principle), got list"),
        (['{"critique_request": "c", "revision_request": "r"}'], True,
         "{path}:1: principle without a choice question (field 'choice_question'), which cai label asks the judge"),
    ],
)
def test_bad_constitutions_are_one_clear_error(tmp_path, lines, need_choice, message):
    path = tmp_path / "constitution.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConstitutionError) as e:
        load_constitution(str(path), need_choice=need_choice)
    assert str(e.value) == message.format(path=path)


def test_clean_cuts_at_the_first_stop_string_and_strips():
    assert clean("  an answer\n\nHuman: next\n\nCritique request: x", ("\n\nCritique request:", "\n\nHuman:")) == (
        "an answer"
    )
    assert clean(" plain \n", ()) == "plain"


# ---- stage 1 with a scripted generator -------------------------------------------------------------


def test_revise_batch_fills_the_templates_and_keeps_the_transcript():
    critique, revision = load_template("critique"), load_template("revision")
    generate = ScriptedGenerator()
    prompts, indices = ["First prompt?", "Second prompt?"], [5, 7]
    records = revise_batch(generate, prompts, indices, PRINCIPLES, critique, revision, rounds=2, seed=3,
                           stop_strings=STOP)  # fmt: skip

    # one batched call per phase, keyed by the prompts' positions; the answer phase gets the prompts themselves
    # (ModelGenerator lays them out as the policy answers in training: datasets.layout.prompt_ids)
    assert [(s, k, n) for s, _, k, n in generate.calls] == [
        ("answer", [5, 7], 1), ("critique/0", [5, 7], 1), ("revision/0", [5, 7], 1),
        ("critique/1", [5, 7], 1), ("revision/1", [5, 7], 1),
    ]  # fmt: skip
    assert generate.calls[0][1] == ["First prompt?", "Second prompt?"]
    k0 = [draw_principle(3, i, 3, "round0") for i in indices]
    k1 = [draw_principle(3, i, 3, "round1") for i in indices]
    # round 0 critiques the answer, round 1 the round-0 revision, each under its own principle
    assert generate.calls[1][1][1] == (
        f"Human: Second prompt?\n\nAssistant: answer 7.0\n\nCritique request: Critique {k0[1]}.\n\nCritique:"
    )
    assert generate.calls[2][1][0] == (
        f"Human: First prompt?\n\nAssistant: answer 5.0\n\nCritique request: Critique {k0[0]}.\n\n"
        f"Critique: critique/0 5.0\n\nRevision request: Revise {k0[0]}.\n\nRevision:"
    )
    assert generate.calls[3][1][0] == (
        f"Human: First prompt?\n\nAssistant: revision/0 5.0\n\nCritique request: Critique {k1[0]}.\n\nCritique:"
    )
    assert records[1] == {
        "prompt": "Second prompt?", "answer": "answer 7.0",
        "rounds": [
            {"principle": k0[1], "critique_request": f"Critique {k0[1]}.", "critique": "critique/0 7.0",
             "revision_request": f"Revise {k0[1]}.", "revision": "revision/0 7.0"},
            {"principle": k1[1], "critique_request": f"Critique {k1[1]}.", "critique": "critique/1 7.0",
             "revision_request": f"Revise {k1[1]}.", "revision": "revision/1 7.0"},
        ],
        "revision": "revision/1 7.0",
    }  # fmt: skip
    assert sft_records(records) == [
        {"prompt": "First prompt?", "completion": "revision/1 5.0"},
        {"prompt": "Second prompt?", "completion": "revision/1 7.0"},
    ]


def test_principles_are_drawn_per_prompt_whatever_the_batch():
    critique, revision = load_template("critique"), load_template("revision")
    principles = load_constitution()
    prompts = red_team_prompts()
    whole = revise_batch(ScriptedGenerator(), prompts, list(range(len(prompts))), principles, critique, revision,
                         rounds=1, seed=0)  # fmt: skip
    part = revise_batch(ScriptedGenerator(), prompts[10:13], [10, 11, 12], principles, critique, revision, rounds=1,
                        seed=0)  # fmt: skip
    assert part == whole[10:13]
    drawn = [t["rounds"][0]["principle"] for t in whole]
    assert len(set(drawn)) >= 8  # 24 prompts spread over the 16 principles, not one principle for all
    reseeded = revise_batch(ScriptedGenerator(), prompts, list(range(len(prompts))), principles, critique,
                            revision, rounds=1, seed=1)  # fmt: skip
    assert [t["rounds"][0]["principle"] for t in reseeded] != drawn


def test_an_empty_final_revision_is_left_out_of_the_sft_records():
    generate = ScriptedGenerator({("revision/0", 1, 0): "\n\nHuman: only the next turn"})
    records = revise_batch(generate, ["p0", "p1"], [0, 1], PRINCIPLES, load_template("critique"),
                           load_template("revision"), rounds=1, seed=0, stop_strings=STOP)  # fmt: skip
    assert records[1]["revision"] == "" and records[1]["rounds"][0]["revision"] == ""
    assert sft_records(records) == [{"prompt": "p0", "completion": "revision/0 0.0"}]


# ---- the judge's preference ----------------------------------------------------------------------


def test_preference_from_both_orders_is_hand_derived():
    # x as A: p(A) = 0.6, p(B) = 0.2 -> log-odds of x: log 3;  x as B: p(A) = 0.5, p(B) = 0.25 -> log 0.5.
    # mean log-odds (log 3 + log 0.5) / 2 = log(1.5) / 2, so P(x) = sqrt(1.5) / (1 + sqrt(1.5)) = 0.5505
    j = judge_preference((math.log(0.6), math.log(0.2)), (math.log(0.5), math.log(0.25)))
    assert j.log_odds == pytest.approx(0.5 * math.log(1.5), rel=1e-12)
    assert j.probability == pytest.approx(math.sqrt(1.5) / (1 + math.sqrt(1.5)), rel=1e-12)
    assert not j.consistent  # the first order prefers x, the second y
    # both orders prefer y: x as A gets p(A) = 0.1, p(B) = 0.7; x as B gets p(A) = 0.8, p(B) = 0.2
    j = judge_preference((math.log(0.1), math.log(0.7)), (math.log(0.8), math.log(0.2)))
    assert j.log_odds == pytest.approx(0.5 * (math.log(1 / 7) + math.log(1 / 4)), rel=1e-12)
    assert j.probability == pytest.approx(1 / (1 + math.sqrt(28)), rel=1e-12) and j.consistent  # sigmoid(-log(28) / 2)


@pytest.mark.parametrize("bias", [0.0, 2.0, -5.0, 30.0])
@pytest.mark.parametrize("d", [0.0, 0.7, -1.3])
def test_a_position_bias_cancels_exactly(d, bias):
    # a judge with log-odds d for x that adds `bias` to whichever completion is option A, and its two
    # choice log-probs normalised over {A, B}: the result is sigmoid(d) whatever the bias
    def logprobs(a_minus_b):
        z = math.log1p(math.exp(-abs(a_minus_b))) + max(a_minus_b, 0.0)  # log(e^l + 1), stable
        return (a_minus_b - z, -z)

    j = judge_preference(logprobs(d + bias), logprobs(-d + bias))
    assert j.log_odds == pytest.approx(d, abs=1e-12)
    assert j.probability == pytest.approx(1 / (1 + math.exp(-d)), abs=1e-12)


class ScriptedJudge:
    """Stand-in `Judge` for the template "{prompt}|{question}|{response_a}|{response_b}": (log p(A),
    log p(B)) looked up by the two responses, in the order they are shown."""

    def __init__(self, table):
        self.table = table
        self.questions = []

    def __call__(self, questions):
        self.questions += questions
        return [self.table[tuple(q.split("|")[2:4])] for q in questions]


def test_label_batch_asks_both_orders_and_reads_the_preference(tmp_path):
    template_path = tmp_path / "judge.txt"
    template_path.write_text("{prompt}|{question}|{response_a}|{response_b}\n")
    template = load_template("judge", str(template_path))
    L = math.log
    judge = ScriptedJudge({
        ("x", "y"): (L(0.6), L(0.2)), ("y", "x"): (L(0.5), L(0.25)),  # the hand-derived case above: x, 0.5505
        ("u", "v"): (L(0.1), L(0.7)), ("v", "u"): (L(0.8), L(0.2)),  # v preferred in both orders
        ("u", "w"): (L(0.4), L(0.4)), ("w", "u"): (L(0.3), L(0.3)),  # an exact tie: no preference record
        ("v", "w"): (L(0.5), L(0.25)), ("w", "v"): (L(0.5), L(0.25)),  # position bias only: a tie as well
    })  # fmt: skip
    # prompt 0's third completion is empty after the cut and its pairs are skipped; prompt 1 has 3 pairs
    generate = ScriptedGenerator({("completions", 0, 0): "x", ("completions", 0, 1): " y\n\nHuman: z",
                                  ("completions", 0, 2): "\n\nHuman: z", ("completions", 2, 0): "u",
                                  ("completions", 2, 1): "v", ("completions", 2, 2): "w"})  # fmt: skip
    records = label_batch(generate, judge, ["p0", "p2"], [0, 2], PRINCIPLES, template, samples=3,
                          choices=("A", "B"), seed=4, stop_strings=STOP)  # fmt: skip

    assert generate.calls == [("completions", ["p0", "p2"], [0, 2], 3)]
    q0, q2 = (PRINCIPLES[draw_principle(4, i, 3, "judge")].choice_question for i in (0, 2))
    assert judge.questions == [
        f"p0|{q0}|x|y", f"p0|{q0}|y|x",
        f"p2|{q2}|u|v", f"p2|{q2}|v|u", f"p2|{q2}|u|w", f"p2|{q2}|w|u", f"p2|{q2}|v|w", f"p2|{q2}|w|v",
    ]  # fmt: skip
    assert records[0]["completions"] == ["x", "y", ""] and [c["pair"] for c in records[0]["comparisons"]] == [[0, 1]]
    first = records[0]["comparisons"][0]
    assert first["logprobs"] == [[L(0.6), L(0.2)], [L(0.5), L(0.25)]]
    assert first["probability"] == pytest.approx(math.sqrt(1.5) / (1 + math.sqrt(1.5)), rel=1e-12)
    assert [c["log_odds"] for c in records[1]["comparisons"]] == pytest.approx(
        [0.5 * (L(1 / 7) + L(1 / 4)), 0.0, 0.0], abs=1e-15
    )

    pairs = preference_records(records, margin_scale=2.0)
    assert pairs == [
        {"prompt": "p0", "chosen": "x", "rejected": "y", "margin": pytest.approx(L(1.5), rel=1e-12)},
        {"prompt": "p2", "chosen": "v", "rejected": "u", "margin": pytest.approx(L(28), rel=1e-12)},
    ]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    assert load_feedback(str(path)) == [PreferencePair("p0", "x", "y", pairs[0]["margin"], 1),
                                        PreferencePair("p2", "v", "u", pairs[1]["margin"], 2)]  # fmt: skip


# ---- the judge on a model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_stack():
    from rlhf_engine.model.config import StackConfig
    from rlhf_engine.model.stack import ModelStack

    return ModelStack.build(StackConfig(model="tiny-llama", adapters=("policy",))).eval()


def test_model_judge_reads_the_choice_logprobs_at_the_last_position(tiny_stack):
    import torch

    stack = tiny_stack
    questions = ["Which is better? The answer is: (", "Short (", "A much longer question, " * 7 + "answer: ("]
    judge = ModelJudge(stack, None, ("A", "B"), batch_size=2, max_length=64)
    got = torch.tensor(judge(questions), dtype=torch.float64)  # (Q, 2); batches of 2, left-padded
    ids_a, ids_b = (stack.tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in "AB")
    for q, row in zip(questions, got):
        ids = judge.encode(q)  # the last 64 tokens: the long question is cut on the left
        assert len(ids) == min(64, len(stack.tokenizer(q)["input_ids"]) - 1)
        x = torch.tensor([ids])
        with torch.no_grad():
            hidden = stack.hidden_states(None, x, torch.ones_like(x))[0, -1].double()  # alone, unpadded
        ref = torch.log_softmax(hidden @ stack.lm_head_weight.double().T, dim=-1)  # (V,) float64
        # fp32 forward vs the float64 head on the same fp32 hidden state: a few fp32 ulps of |logit| ~ 10
        torch.testing.assert_close(row, ref[[ids_a, ids_b]], atol=2e-5, rtol=0)


class _MergingTokenizer:
    """A tokenizer whose vocabulary has "(A" as one token (as BPE vocabularies can)."""

    eos_token_id = None

    def __call__(self, text, add_special_tokens=True):
        ids, i = [], 0
        while i < len(text):
            if text.startswith("(A", i):
                ids.append(1000)
                i += 2
            else:
                ids.append(ord(text[i]))
                i += 1
        return {"input_ids": ids}


def test_model_judge_refuses_choices_that_are_not_one_token_after_the_question():
    stack = SimpleNamespace(tokenizer=_MergingTokenizer())
    with pytest.raises(ConfigError, match=r"choice 'AB' is 2 tokens of the judge's tokenizer"):
        ModelJudge(stack, None, ("AB", "B"), batch_size=1, max_length=8)
    judge = ModelJudge(stack, None, ("A", "B"), batch_size=1, max_length=8, template_path="j.txt")
    assert judge.encode("Answer: ") == [ord(c) for c in "Answer: "]
    with pytest.raises(ConfigError, match=r"judge template j.txt: the choice 'A' does not follow the question as a "
                                          r"token of its own"):  # fmt: skip
        judge.encode("Answer: (")


def test_the_judge_is_the_policy_its_base_or_another_model(tiny_stack):
    from rlhf_engine.stages.cai import build_judge

    config = SimpleNamespace(judge="", stack=SimpleNamespace(model="tiny-llama"))
    assert build_judge(config, tiny_stack, "policy") == (tiny_stack, "policy")  # the policy judges itself
    config.judge = "tiny-llama"
    assert build_judge(config, tiny_stack, "policy") == (tiny_stack, None)  # its own base: no second copy


def test_the_judge_can_be_another_local_model(tmp_path, tiny_stack):
    import dataclasses

    import torch

    from rlhf_engine.model.loading import build_preset
    from rlhf_engine.stages.cai import build_judge
    from rlhf_engine.stages.cai_config import CAI_PRESETS

    build_preset("tiny-llama", 7, str(tmp_path / "judge"))  # another save_pretrained directory, other weights
    config = dataclasses.replace(CAI_PRESETS["label"]["tiny"], judge=str(tmp_path / "judge"))
    judge, adapter = build_judge(config, tiny_stack, "policy")
    assert judge is not tiny_stack and adapter is None and judge.config.model == str(tmp_path / "judge")
    ids = torch.tensor([[5, 6, 7]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        mine = tiny_stack.hidden_states(None, ids, mask)
        theirs = judge.hidden_states(None, ids, mask)
    assert not torch.allclose(mine, theirs)  # a different model answers


# ---- both stages end to end ----------------------------------------------------------------------


def cai_args(stage, out, *more):
    return ["cai", stage, "--preset", "tiny", "--model", "tiny-llama", "--out", str(out), "--no-progress", *more]


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_revise_then_label_end_to_end_and_rm_trains_on_the_labels(tmp_path, capsys):
    # stage 1 on the embedded red-team prompts (no --prompts), 2 rounds, batches of 2
    out = tmp_path / "revise"
    assert main(cai_args("revise", out, "--max-prompts", "5", "--batch-size", "2", "--rounds", "2")) == 0
    assert capsys.readouterr().out.startswith("cai revise: 5 prompts -> ")
    transcripts = read_lines(out / TRANSCRIPT_FILE)
    assert [t["prompt"] for t in transcripts] == red_team_prompts()[:5]
    for t in transcripts:
        assert list(t) == ["prompt", "answer", "rounds", "revision"] and len(t["rounds"]) == 2
        assert all(list(r) == ["principle", "critique_request", "critique", "revision_request", "revision"]
                   for r in t["rounds"])  # fmt: skip
        assert t["revision"] == t["rounds"][-1]["revision"]

    def sft_line(obj, line):  # what `engine sft` reads: exactly these two fields, non-empty strings
        check_fields(obj, "sft", ("prompt", "completion"))
        assert set(obj) == {"prompt", "completion"}
        return require_str(obj, "prompt"), require_str(obj, "completion")

    sft = read_jsonl(str(out / SFT_FILE), sft_line)
    assert sft == [(t["prompt"], t["revision"]) for t in transcripts if t["revision"]] and sft
    assert [(e.prompt, e.completion) for e in load_sft_data(str(out / SFT_FILE))] == sft  # `engine sft`'s reader
    result = json.loads((out / RESULT_FILE).read_text())
    assert result["prompts"] == 5 and result["sft_records"] == len(sft) and result["resumed_from"] == 0
    assert json.loads((out / CONFIG_FILE).read_text())["stage"] == "cai-revise"

    # stage 2 on a prompt file, 3 completions per prompt, then `engine rm` on its output as it is
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in red_team_prompts()[5:9]))
    labels = tmp_path / "label"
    assert main(cai_args("label", labels, "--prompts", str(prompts), "--samples-per-prompt", "3")) == 0
    assert capsys.readouterr().out.startswith("cai label: 4 prompts, ")
    judgements = read_lines(labels / JUDGEMENTS_FILE)
    assert [j["prompt"] for j in judgements] == red_team_prompts()[5:9]
    records = load_feedback(str(labels / PREFERENCES_FILE))
    assert len(records) >= 4 and all(isinstance(r, PreferencePair) and r.margin >= 0 for r in records)
    for j in judgements:  # every comparison's preference, read from log-probs, is what the record says
        for c in j["comparisons"]:
            lp = c["logprobs"]
            assert c["log_odds"] == pytest.approx(0.5 * ((lp[0][0] - lp[0][1]) + (lp[1][1] - lp[1][0])), abs=1e-12)
    rm_out = tmp_path / "rm"
    assert main(["rm", "--data", str(labels / PREFERENCES_FILE), "--model", "tiny-llama", "--out", str(rm_out),
                 "--preset", "tiny", "--max-steps", "2", "--no-progress"]) == 0  # fmt: skip
    assert json.loads((rm_out / RESULT_FILE).read_text())["steps"] == 2


def test_init_adapter_is_the_policy_that_answers(tmp_path, tiny_stack):
    import torch

    from rlhf_engine.model.stack import ModelStack
    from rlhf_engine.stages.cai import ModelGenerator
    from rlhf_engine.stages.cai_config import CAI_PRESETS

    # a policy that differs from the base (peft starts lora_B at zero), saved as an `engine sft` output is
    stack = ModelStack.build(tiny_stack.config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in stack.model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    stack.save(str(tmp_path / "sft"), roles=("policy",))
    out = tmp_path / "revise"
    assert main(cai_args("revise", out, "--max-prompts", "2", "--init-adapter", str(tmp_path / "sft"))) == 0
    answers = [t["answer"] for t in read_lines(out / TRANSCRIPT_FILE)]
    sampling = CAI_PRESETS["revise"]["tiny"].sampling
    prompts = red_team_prompts()[:2]  # the answer phase takes the prompts themselves (ModelGenerator lays them out)

    def answered_by(adapter):
        texts = ModelGenerator(stack, adapter, sampling, 0)(prompts, [0, 1], "answer")
        return [clean(t, sampling.stop_strings) for t in texts]

    assert answers == answered_by("policy") and answers != answered_by(None)


def test_an_interrupted_revise_resumes_to_the_uninterrupted_output(tmp_path, capsys, monkeypatch):
    import rlhf_engine.stages.cai

    args = ("--max-prompts", "5", "--batch-size", "2", "--checkpoint-every", "1")
    whole = tmp_path / "whole"
    assert main(cai_args("revise", whole, *args)) == 0

    real = rlhf_engine.stages.cai.ModelGenerator.__call__

    def interrupted_at_the_third_batch(self, texts, keys, stream, samples=1):
        if keys[0] == 4:
            raise KeyboardInterrupt
        return real(self, texts, keys, stream, samples)

    monkeypatch.setattr(rlhf_engine.stages.cai.ModelGenerator, "__call__", interrupted_at_the_third_batch)
    out = tmp_path / "cut"
    assert main(cai_args("revise", out, *args)) == 130
    assert not (out / SFT_FILE).exists() and not (out / TRANSCRIPT_FILE).exists()  # never a partial dataset
    import torch

    assert torch.load(out / CHECKPOINT_FILE, weights_only=True)["step"] == 2
    monkeypatch.setattr(rlhf_engine.stages.cai.ModelGenerator, "__call__", real)
    capsys.readouterr()
    assert main(cai_args("revise", out, *args)) == 0
    assert json.loads((out / RESULT_FILE).read_text())["resumed_from"] == 2
    for name in (SFT_FILE, TRANSCRIPT_FILE):
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name


# ---- the command line ----------------------------------------------------------------------------


def run_cli(*args):
    return subprocess.run([sys.executable, "-P", "-m", "rlhf_engine", *args], capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_help_lists_every_option():
    top = run_cli("cai", "--help")
    assert top.returncode == 0 and "revise" in top.stdout and "label" in top.stdout
    shared = ("--model", "--out", "--prompts", "--max-prompts", "--constitution", "--init-adapter", "--batch-size",
              "--seed", "--checkpoint-every", "--quantization", "--device", "--max-new-tokens", "--temperature",
              "--stop-strings", "--preset", "--config", "--no-resume", "--no-progress")  # fmt: skip
    for stage, own in (("revise", ("--rounds", "--critique-template", "--revision-template")),
                       ("label", ("--judge", "--judge-template", "--samples-per-prompt", "--choices",
                                  "--margin-scale", "--judge-batch-size", "--judge-max-length"))):  # fmt: skip
        out = run_cli("cai", stage, "--help")
        assert out.returncode == 0
        for flag in (*shared, *own, f"example: python -m engine cai {stage}"):
            assert flag in out.stdout, (stage, flag)


def one_error_line(out) -> str:
    lines = out.stderr.splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    return lines[0]


@pytest.mark.parametrize(
    "stage, files, more, message",
    [
        ("revise", {"c.jsonl": ""}, ["--constitution", "<c.jsonl>"], "error: constitution <c.jsonl>: empty "
                                                                     "(no principles)"),
        ("revise", {"c.jsonl": '{"critique_request": "Identify harm."}\n'}, ["--constitution", "<c.jsonl>"],
         "error: <c.jsonl>:1: principle without a revision request (field 'revision_request')"),
        ("label", {"c.jsonl": '{"critique_request": "c", "revision_request": "r"}\n'}, ["--constitution", "<c.jsonl>"],
         "error: <c.jsonl>:1: principle without a choice question (field 'choice_question'), which cai label asks "
         "the judge"),
        ("revise", {"t.txt": "{prompt} {critique} {revision_request}\n"}, ["--revision-template", "<t.txt>"],
         "error: revision template <t.txt>: missing field {response} (a revision template must use {prompt}, "
         "{response}, {critique}, {revision_request})"),
        ("label", {"t.txt": "{prompt} {question} {response_a} {response_b} {principle}"},
         ["--judge-template", "<t.txt>"], "error: judge template <t.txt>: unknown field {principle}; judge templates "
                                          "have: {prompt}, {question}, {response_a}, {response_b}, {choice_a}, "
                                          "{choice_b}"),
        ("revise", {"p.jsonl": '{"prompt": "hi", "answer": "x"}\n'}, ["--prompts", "<p.jsonl>"],
         "error: <p.jsonl>:1: unknown field 'answer'; prompt records have: prompt"),
        ("revise", {}, ["--critique-template", "<missing.txt>"], "error: critique_template '<missing.txt>': no such "
                                                                 "file"),
        ("label", {}, ["--choices", "A"], "error: choices=('A',): expected two distinct non-empty labels, e.g. A,B"),
        ("label", {}, ["--samples-per-prompt", "1"], "error: samples_per_prompt=1: the judge compares at least 2"),
        ("label", {}, ["--judge", "/no/such/judge"], "error: judge '/no/such/judge': not a preset (tiny-llama, "
                                                     "small-llama, small-llama-32k, world-llama, llama-1b), not a "
                                                     "named base (smollm2-135m-instruct) and no such directory"),
        ("revise", {}, ["--rounds", "0"], "error: rounds=0: must be >= 1"),
    ],
)
def test_bad_inputs_are_one_line_and_exit_2(tmp_path, stage, files, more, message):
    def at(text):  # <name> -> the file's path
        return re.sub(r"<([\w.]+)>", lambda m: str(tmp_path / m.group(1)), text)

    for name, text in files.items():
        (tmp_path / name).write_text(text)
    out = run_cli(*cai_args(stage, tmp_path / "out", *map(at, more)))
    assert one_error_line(out) == at(message)
    assert not os.path.exists(tmp_path / "out")  # refused before the run opened OUT


def test_a_stage_is_required():
    out = run_cli("cai")
    assert one_error_line(out).startswith("error: the following arguments are required: STAGE")
