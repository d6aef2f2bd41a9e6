"""Constitutional AI on the engine's model stack (Bai et al. 2022): supervised data from self-critique and
revision, and preference labels from an AI judge (RLAIF), both written as the files the training stages
read unchanged.

    python -m engine cai revise --preset tiny --model tiny-llama --out runs/cai-sft
    python -m engine cai label --preset tiny --model tiny-llama --out runs/cai-prefs
    python -m engine rm --data runs/cai-prefs/preferences.jsonl --model tiny-llama --out runs/rm

`cai_revise`, per batch of prompts (one run step):
    1. answer     the policy answers the prompt laid out as in training (datasets.layout.prompt_ids)
    2. critique   a principle drawn for the (prompt, round) pair; the critique template asks its request
    3. revise     the revision template asks the principle's revision request; with rounds > 1 the next
                  round critiques this revision under a new draw
  -> OUT/sft.jsonl         {"prompt", "completion"}: each prompt and its final revision (`engine sft` data;
                           a prompt whose final revision is empty is left out)
     OUT/transcript.jsonl  {"prompt", "answer", "rounds": [{"principle", "critique_request", "critique",
                           "revision_request", "revision"}, ...], "revision"}, one line per prompt

`cai_label`, per batch of prompts (one run step):
    1. sample     samples_per_prompt completions per prompt from the policy
    2. ask        for every pair (x, y) of distinct non-empty completions, the judge template asks the
                  prompt's drawn choice question with x as option A and y as B, then with y as A and x as B
    3. read       the judge's log-probs of the two choice tokens at the LAST position of each question:
                  (Q, H) hidden states through rlhf_kernels.linear_logprobs, no logits over the sequence
    4. prefer     datasets.constitution.judge_preference: the two orders' log-odds averaged (a position
                  bias cancels), P(x preferred) = sigmoid(log-odds)
  -> OUT/preferences.jsonl pairwise feedback {"prompt", "chosen", "rejected", "margin"}, the preferred
                           completion first, margin = margin_scale * |log-odds| (`engine rm` / `engine dpo`
                           data; an exact tie is left out)
     OUT/judgements.jsonl  per prompt: the drawn principle, the completions, and per pair both orders'
                           choice log-probs, the log-odds, P(x preferred) and whether the orders agree

Randomness: the principle of a (prompt, round) is a pure function of (seed, prompt index, round), and
each generation phase samples from its own stream keyed by the prompt index (model.generation), so a
prompt gets the same transcript in any batch and a resumed run writes what an uninterrupted one writes.

Run machinery (core.run): OUT is locked and gets config.json when the run opens; each step writes a
metrics row and moves the progress bar; checkpoint.pt carries the records done so far (every
checkpoint_every steps), so the same command resumes after the last checkpointed batch. The datasets are
written once, atomically, when every prompt is done, and removed when a run opens: like result.json, a
dataset that exists is complete.

Letters: B prompts in a batch, Q judge questions, C choices (2), H hidden, V vocabulary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import rlhf_kernels as kernels

from ..core.files import write_jsonl
from ..core.order import epoch_seed
from ..core.run import Run, StageResult
from ..core.tensors import pad
from ..datasets.constitution import Principle, Template, clean, judge_preference, label_inputs, revise_inputs
from ..datasets.layout import prompt_ids, stop_token_ids, template_prompt_ids
from ..errors import ConfigError
from ..model.config import SamplingConfig
from ..model.generation import sample
from .cai_config import CAIConfig, CAILabelConfig, CAIReviseConfig

SFT_FILE = "sft.jsonl"
TRANSCRIPT_FILE = "transcript.jsonl"
PREFERENCES_FILE = "preferences.jsonl"
JUDGEMENTS_FILE = "judgements.jsonl"

# generate(texts, keys, stream, samples) -> `samples` responses per text (row i * samples + j); keys[i]
# names text i's randomness and `stream` the phase: in ANSWER_STREAMS the texts are user prompts (laid out
# as the policy answers in training), in the others ("critique/0", "revision/0") filled templates
ANSWER_STREAMS = ("answer", "completions")
Generate = Callable[[list[str], list[int], str, int], list[str]]
# judge(questions) -> (log p(choice A), log p(choice B)) per question
Judge = Callable[[list[str]], list[tuple[float, float]]]


def draw_principle(seed: int, prompt_index: int, n_principles: int, stream: str) -> int:
    """The principle (an index into the constitution) for one prompt and stream ("round0", "judge"):
    a pure function of (seed, prompt index, stream), whatever the batch."""
    return epoch_seed(seed, prompt_index, f"cai/principle/{stream}") % n_principles


# ---- stage 1: critique and revision -------------------------------------------------------------


def revise_batch(
    generate: Generate, prompts: list[str], indices: list[int], principles: list[Principle],
    critique: Template, revision: Template, *, rounds: int, seed: int, stop_strings: tuple[str, ...] = (),
) -> list[dict]:  # fmt: skip
    """Transcripts of B prompts (`indices`: their positions in the prompt list), one batched generation
    per phase: answers, then per round the critiques and the revisions."""
    # step 1. answer: the policy answers each prompt as it would in training
    answers = generate(prompts, indices, "answer", 1)
    records = [{"prompt": p, "answer": clean(a, stop_strings), "rounds": []} for p, a in zip(prompts, answers)]
    responses = [r["answer"] for r in records]
    for r in range(rounds):
        drawn = [draw_principle(seed, i, len(principles), f"round{r}") for i in indices]
        # step 2. critique the current response against the drawn principle
        asks = [critique.fill(prompt=rec["prompt"], response=resp, critique_request=principles[k].critique_request)
                for rec, resp, k in zip(records, responses, drawn)]  # fmt: skip
        critiques = [clean(t, stop_strings) for t in generate(asks, indices, f"critique/{r}", 1)]
        # step 3. revise it as the principle's revision request asks
        asks = [
            revision.fill(prompt=rec["prompt"], response=resp, critique_request=principles[k].critique_request,
                          critique=crit, revision_request=principles[k].revision_request)
            for rec, resp, k, crit in zip(records, responses, drawn, critiques)
        ]  # fmt: skip
        responses = [clean(t, stop_strings) for t in generate(asks, indices, f"revision/{r}", 1)]
        for rec, k, crit, rev in zip(records, drawn, critiques, responses):
            rec["rounds"].append({
                "principle": k, "critique_request": principles[k].critique_request, "critique": crit,
                "revision_request": principles[k].revision_request, "revision": rev,
            })  # fmt: skip
    for rec, final in zip(records, responses):
        rec["revision"] = final
    return records


def sft_records(transcripts: list[dict]) -> list[dict]:
    """`engine sft` data: {"prompt", "completion"} = the prompt and its final revision, for every
    transcript whose final revision is not empty."""
    return [{"prompt": t["prompt"], "completion": t["revision"]} for t in transcripts if t["revision"]]


# ---- stage 2: AI preference labels --------------------------------------------------------------


def label_batch(
    generate: Generate, judge: Judge, prompts: list[str], indices: list[int], principles: list[Principle],
    template: Template, *, samples: int, choices: tuple[str, str], seed: int, stop_strings: tuple[str, ...] = (),
) -> list[dict]:  # fmt: skip
    """Judgement records of B prompts: `samples` completions each, and for every pair of distinct
    non-empty completions the judge's choice log-probs in both orders and the preference they give."""
    # step 1. sample the completions to compare
    texts = generate(prompts, indices, "completions", samples)
    # step 2. every pair, asked in both orders: (x as A, y as B), then (y as A, x as B)
    records, questions = [], []
    for b, (prompt, i) in enumerate(zip(prompts, indices)):
        completions = [clean(t, stop_strings) for t in texts[b * samples : (b + 1) * samples]]
        k = draw_principle(seed, i, len(principles), "judge")
        pairs = [(x, y) for x in range(samples) for y in range(x + 1, samples)
                 if completions[x] and completions[y] and completions[x] != completions[y]]  # fmt: skip
        for x, y in pairs:
            for a, bb in ((x, y), (y, x)):
                questions.append(template.fill(
                    prompt=prompt, question=principles[k].choice_question, response_a=completions[a],
                    response_b=completions[bb], choice_a=choices[0], choice_b=choices[1],
                ))  # fmt: skip
        records.append({"prompt": prompt, "principle": k, "choice_question": principles[k].choice_question,
                        "completions": completions, "comparisons": [{"pair": [x, y]} for x, y in pairs]})  # fmt: skip
    # step 3. the judge's choice-token log-probs, every question of the batch together
    logprobs = iter(judge(questions) if questions else [])
    # step 4. the preference of each pair, position bias cancelled
    for rec in records:
        for comparison in rec["comparisons"]:
            x_as_a, x_as_b = next(logprobs), next(logprobs)
            j = judge_preference(x_as_a, x_as_b)
            comparison.update(logprobs=[list(x_as_a), list(x_as_b)], log_odds=j.log_odds,
                              probability=j.probability, consistent=j.consistent)  # fmt: skip
    return records


def preference_records(judgements: list[dict], margin_scale: float) -> list[dict]:
    """Pairwise feedback records (datasets.feedback): the preferred completion as `chosen`, margin =
    margin_scale * |log-odds|; an exact tie (log-odds 0) prefers nothing and is left out."""
    out = []
    for rec in judgements:
        for c in rec["comparisons"]:
            if c["log_odds"] == 0:
                continue
            x, y = c["pair"] if c["log_odds"] > 0 else c["pair"][::-1]
            out.append({"prompt": rec["prompt"], "chosen": rec["completions"][x], "rejected": rec["completions"][y],
                        "margin": margin_scale * abs(c["log_odds"])})  # fmt: skip
    return out


# ---- the model behind generate and judge ----------------------------------------------------------


class ModelGenerator:
    """`Generate` on a model: model.generation.sample on one role of a stack (adapter None: the bare
    base), each stream sampling from its own seed."""

    def __init__(self, stack, adapter: str | None, sampling: SamplingConfig, seed: int):
        self.stack, self.adapter, self.sampling, self.seed = stack, adapter, sampling, seed

    def __call__(self, texts: list[str], keys: list[int], stream: str, samples: int = 1) -> list[str]:
        seed = epoch_seed(self.seed, 0, f"cai/sample/{stream}")
        tok = self.stack.tokenizer
        layout = prompt_ids if stream in ANSWER_STREAMS else template_prompt_ids
        out = sample(self.stack, [layout(tok, t) for t in texts], self.sampling, adapter=self.adapter,
                     samples_per_prompt=samples, seed=seed, keys=keys, stop_ids=stop_token_ids(tok))  # fmt: skip
        return out.responses


class ModelJudge:
    """`Judge` on a model: the log-probs of the choice tokens as the next token after each question,
    from the hidden state of the LAST position only, (Q, H) through rlhf_kernels.linear_logprobs.

    The log-probs are normalised over the whole vocabulary (padding rows of a padded vocabulary
    included); judge_preference uses only their differences, where the normaliser cancels."""

    def __init__(self, stack, adapter: str | None, choices: tuple[str, ...], *, batch_size: int, max_length: int,
                 template_path: str = ""):  # fmt: skip
        self.stack, self.adapter, self.choices = stack, adapter, tuple(choices)
        self.batch_size, self.max_length, self.template_path = batch_size, max_length, template_path
        tokenizer = stack.tokenizer
        self.choice_ids = []
        for label in self.choices:
            ids = tokenizer(label, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ConfigError(f"choice {label!r} is {len(ids)} tokens of the judge's tokenizer; "
                                  "each choice must be one token (e.g. A,B)")  # fmt: skip
            self.choice_ids.append(ids[0])

    def encode(self, question: str) -> list[int]:
        """The question's token ids (its last max_length), after checking that each choice follows it as
        a token of its own: otherwise the choice token's log-prob is not the probability of the choice."""
        tokenizer = self.stack.tokenizer
        ids = template_prompt_ids(tokenizer, question)
        for label, choice in zip(self.choices, self.choice_ids):
            if template_prompt_ids(tokenizer, question + label) != ids + [choice]:
                raise ConfigError(f"judge template {self.template_path or '(shipped)'}: the choice {label!r} does not "
                                  "follow the question as a token of its own (the tokenizer merges it with the "
                                  "text before it); end the template where a token ends, e.g. with '('")  # fmt: skip
        return ids[-self.max_length :]

    @torch.no_grad()
    def __call__(self, questions: list[str]) -> list[tuple[float, ...]]:
        tokenizer, device = self.stack.tokenizer, self.stack.device
        rows = [self.encode(q) for q in questions]
        choices = torch.tensor(self.choice_ids, device=device)
        C = len(self.choice_ids)
        out: list[tuple[float, ...]] = []
        for start in range(0, len(rows), self.batch_size):
            ids, mask = pad(rows[start : start + self.batch_size], tokenizer.pad_token_id, side="left")
            # left-padded, so every question ends at the last column, whose hidden state predicts the answer;
            # eval mode: a judge is a fixed function (no LoRA dropout)
            with self.stack.evaluating():
                hidden = self.stack.hidden_states(self.adapter, ids.to(device), mask.to(device))[:, -1]  # (Q, H)
            logp = kernels.linear_logprobs(hidden.repeat_interleave(C, dim=0), self.stack.lm_head_weight,
                                           choices.repeat(hidden.shape[0]),
                                           **self.stack.head())  # (Q * C,)  # fmt: skip
            out += [tuple(row) for row in logp.view(-1, C).double().tolist()]
        return out


def build_policy(config: CAIConfig):
    """(stack, adapter): the base with init_adapter's weights in its policy adapter, or the bare base
    (adapter None) when no adapter is given."""
    from ..model.stack import ModelStack

    stack = ModelStack.build(dataclasses.replace(config.stack, adapters=("policy",))).eval()
    if not config.init_adapter:
        return stack, None
    stack.load_roles(config.init_adapter, roles=("policy",))
    return stack, "policy"


def build_judge(config: CAILabelConfig, stack, adapter: str | None):
    """(stack, adapter) of the judge: the answering policy itself (judge ""), its bare base (judge =
    the policy's base: no second copy), or another base built like the policy's."""
    from ..model.stack import ModelStack

    if not config.judge:
        return stack, adapter
    if config.judge == config.stack.model:
        return stack, None
    return ModelStack.build(dataclasses.replace(config.stack, model=config.judge, adapters=("policy",))).eval(), None


# ---- the stages ---------------------------------------------------------------------------------


class Records:
    """The records done so far as run state: each checkpoint carries them, a resumed run gets them back."""

    def __init__(self):
        self.items: list[dict] = []

    def state_dict(self) -> dict:
        return {"items": list(self.items)}

    def load_state_dict(self, state: dict) -> None:
        self.items = list(state["items"])


@dataclass
class ReviseResult(StageResult):
    prompts: int  # prompts processed
    sft_records: int  # lines of sft.jsonl
    empty_revisions: int  # prompts whose final revision was empty (left out of sft.jsonl)


@dataclass
class LabelResult(StageResult):
    prompts: int  # prompts processed
    comparisons: int  # pairs of distinct non-empty completions the judge compared (each in both orders)
    preference_records: int  # lines of preferences.jsonl (comparisons without exact ties)
    consistent_fraction: float | None  # share of comparisons whose two orders agree (None: no comparison)


def _batches(run: Run, n: int, batch_size: int):
    """(step, prompt indices) for every batch from the resumed one on, behind the progress bar."""
    for step in run.steps(math.ceil(n / batch_size)):
        yield step, list(range(step * batch_size, min(n, (step + 1) * batch_size)))


def _open_outputs(run: Run, names: tuple[str, ...]) -> None:
    """Remove the datasets of an earlier run: a dataset in OUT is always a completed run's."""
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.remove(run.path(name))


def cai_revise(config: CAIReviseConfig) -> ReviseResult:
    """Stage 1 (see the module docstring): OUT/sft.jsonl and OUT/transcript.jsonl."""
    with Run("cai-revise", config, progress_keys=("changed",)) as run:
        # step 1. prompts, constitution and templates, each checked (a bad one is one error line)
        prompts, principles, critique, revision = revise_inputs(config)
        _open_outputs(run, (SFT_FILE, TRANSCRIPT_FILE))

        # step 2. the model that answers, critiques and revises; the records so far are the run state
        stack, adapter = build_policy(config)
        generate = ModelGenerator(stack, adapter, config.sampling, config.seed)
        transcripts = Records()
        run.track(transcripts=transcripts)
        run.resume()

        for step, indices in _batches(run, len(prompts), config.batch_size):
            # step 3. answer, critique and revise this batch's prompts
            t0 = time.perf_counter()
            batch = revise_batch(
                generate, [prompts[i] for i in indices], indices, principles, critique, revision,
                rounds=config.rounds, seed=config.seed, stop_strings=config.sampling.stop_strings,
            )  # fmt: skip
            transcripts.items += batch
            # step 4. metrics row, checkpoint and progress
            run.end_step(step + 1, {
                "prompts_done": indices[-1] + 1,
                "answer_chars": sum(len(t["answer"]) for t in batch) / len(batch),
                "revision_chars": sum(len(t["revision"]) for t in batch) / len(batch),
                "changed": sum(t["revision"] != t["answer"] for t in batch) / len(batch),
                "empty_revisions": sum(not t["revision"] for t in batch),
                "seconds": time.perf_counter() - t0,
            })  # fmt: skip

        # step 5. the datasets, written once and atomically
        sft = sft_records(transcripts.items)
        files = [write_jsonl(run.path(SFT_FILE), sft), write_jsonl(run.path(TRANSCRIPT_FILE), transcripts.items)]
        result = ReviseResult(
            out=config.out, steps=run.total, resumed_from=run.start, files=files, prompts=len(transcripts.items),
            sft_records=len(sft), empty_revisions=len(transcripts.items) - len(sft),
        )  # fmt: skip
        run.finish(result)
    return result


def cai_label(config: CAILabelConfig) -> LabelResult:
    """Stage 2 (see the module docstring): OUT/preferences.jsonl and OUT/judgements.jsonl."""
    with Run("cai-label", config, progress_keys=("consistent",)) as run:
        # step 1. prompts, constitution (with choice questions) and the judge template, each checked
        prompts, principles, template = label_inputs(config)
        _open_outputs(run, (PREFERENCES_FILE, JUDGEMENTS_FILE))

        # step 2. the policy that answers and the judge (the policy itself unless --judge names another)
        stack, adapter = build_policy(config)
        generate = ModelGenerator(stack, adapter, config.sampling, config.seed)
        judge_stack, judge_adapter = build_judge(config, stack, adapter)
        judge = ModelJudge(judge_stack, judge_adapter, config.choices, batch_size=config.judge_batch_size,
                           max_length=config.judge_max_length, template_path=template.path)  # fmt: skip
        judgements = Records()
        run.track(judgements=judgements)
        run.resume()

        for step, indices in _batches(run, len(prompts), config.batch_size):
            # step 3. sample, ask the judge in both orders, read the preference from the choice log-probs
            t0 = time.perf_counter()
            batch = label_batch(generate, judge, [prompts[i] for i in indices], indices, principles, template,
                                samples=config.samples_per_prompt, choices=config.choices, seed=config.seed,
                                stop_strings=config.sampling.stop_strings)  # fmt: skip
            comparisons = [c for rec in batch for c in rec["comparisons"]]
            run.check_finite(judge_log_odds=[c["log_odds"] for c in comparisons])  # a margin must be a number
            judgements.items += batch
            # step 4. metrics row, checkpoint and progress
            n = max(1, len(comparisons))
            run.end_step(step + 1, {
                "prompts_done": indices[-1] + 1,
                "comparisons": len(comparisons),
                "consistent": sum(c["consistent"] for c in comparisons) / n,
                "chosen_probability": sum(max(c["probability"], 1 - c["probability"]) for c in comparisons) / n,
                # mean log p(A) - log p(B) over the questions: > 0 when the judge favours the first option
                "position_bias": sum(lp[0] - lp[1] for c in comparisons for lp in c["logprobs"]) / (2 * n),
                "seconds": time.perf_counter() - t0,
            })  # fmt: skip

        # step 5. the datasets, written once and atomically
        pairs = preference_records(judgements.items, config.margin_scale)
        files = [write_jsonl(run.path(PREFERENCES_FILE), pairs),
                 write_jsonl(run.path(JUDGEMENTS_FILE), judgements.items)]  # fmt: skip
        comparisons = [c for rec in judgements.items for c in rec["comparisons"]]
        consistent = sum(c["consistent"] for c in comparisons) / len(comparisons) if comparisons else None
        result = LabelResult(out=config.out, steps=run.total, resumed_from=run.start, files=files,
                             prompts=len(judgements.items), comparisons=len(comparisons),
                             preference_records=len(pairs), consistent_fraction=consistent)  # fmt: skip
        run.finish(result)
    return result
