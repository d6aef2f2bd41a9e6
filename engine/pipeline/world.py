"""The embedded default world of `python -m engine pipeline`: prompts, replies of mixed quality, the
hidden preference score the simulated people follow, and the simulated labelers. Ships with the
package; nothing is downloaded. Pure Python: no torch.

The prompts are everyday situations ("My house is too hot.") in a few phrasings. Each has three kinds
of reply: helpful ("You could close the curtains during the day and run a fan at night. I hope this
helps!"), dismissive ("There is nothing you can do about it.") and rude ("That is a stupid question.
Stop whining."). The SFT data holds all three, so the SFT policy produces every kind.

The hidden score (hidden_score) is the ground truth: helpful and polite high, rude low, off-topic or
garbled text in between. Labelers rank sampled replies by it plus noise, one of them reversed (it
misunderstood the instructions); the reward model only sees their rankings, so it can only
approximate the score. The toxicity of a reply is whether it contains an insult.
"""

from __future__ import annotations

import random
import re

from ..datasets.corpus import SITUATIONS, embedded_prompts

# What a helpful reply suggests for each situation of datasets.corpus.SITUATIONS (same order).
TIPS = (
    "close the curtains during the day and run a fan at night",
    "keep a regular bedtime and avoid screens before bed",
    "water them less often and give them more light",
    "practice answers to common questions and read about the company",
    "close unused programs and restart it once a day",
    "say sorry and plan a small treat together",
    "take him for a long walk before bedtime",
    "start with simple recipes like pasta and eggs",
    "take out the tube, find the hole and patch it",
    "take short breaks and talk to your manager about priorities",
    "pour hot water and baking soda into it, then use a plunger",
    "write down what you spend and cook at home more often",
    "lower the screen brightness and close background apps",
    "join a club or a class for something you enjoy",
    "use slightly cooler water and a coarser grind",
    "thank them for the gift and say how you will use it",
)
PHRASINGS = ("{s}", "{s} {q}", "Hi! {s}", "Quick question: {s} {q}")
HELPFUL = ("You could {tip}. I hope this helps!", "Try to {tip}. Good luck!")
DISMISSIVE = ("There is nothing you can do about it.", "I don't know. Figure it out yourself.")
RUDE = ("That is a stupid question. Stop whining.", "Who cares? Deal with it, idiot.")

INSULTS = ("stupid", "idiot", "whining", "shut up", "dumb")
DISMISSALS = ("nothing you can do", "figure it out yourself", "i don't know", "who cares")
HELP_CUES = ("you could", "try to", "try ")
POLITE_CUES = ("hope this helps", "good luck", "please")
_WORD = re.compile(r"[a-z']+")
_STOP = {"the", "and", "a", "it", "to", "at", "for", "or", "you", "your", "of", "in", "on", "then", "into",
         "with", "like", "about", "how", "them", "him", "say", "will", "more", "less", "once", "day", "before"}


def prompts() -> list[str]:
    """Every situation in every phrasing: 16 x 4 = 64 prompts, in a fixed order."""
    return [p.format(s=s, q=q) for s, q in SITUATIONS for p in PHRASINGS]


def situation_of(prompt: str) -> int | None:
    """Which situation a prompt is about (its index), or None for an unknown prompt."""
    for i, (s, _) in enumerate(SITUATIONS):
        if s in prompt:
            return i
    return None


def replies(prompt: str) -> dict[str, list[str]]:
    """The replies of each kind to a prompt of this world (helpful replies need its situation)."""
    i = situation_of(prompt)
    helpful = [h.format(tip=TIPS[i]) for h in HELPFUL] if i is not None else []
    return {"helpful": helpful, "dismissive": list(DISMISSIVE), "rude": list(RUDE)}


def texts() -> list[str]:
    """Every text of this world (prompts, every reply of every kind, the embedded prompts): what the
    world-llama preset's tokenizer is trained on."""
    out = list(embedded_prompts())
    for p in prompts():
        out.append(p)
        for kind in replies(p).values():
            out += kind
    return out


def train_tokenizer():
    """The world-llama preset's tokenizer, trained on texts(): a byte-level BPE up to the preset's
    vocabulary (model.tokenizers ships it as engine/data/tokenizers/world.json; tests check the two agree)."""
    from ..model.config import MODEL_PRESETS
    from ..model.tokenizers import train_bpe

    return train_bpe(texts(), MODEL_PRESETS["world-llama"]["vocab_size"])


def sft_examples(prompt_list: list[str]) -> list[dict]:
    """{"prompt", "completion"} records: every prompt with one reply of each kind (the first template of
    each), so a policy fine-tuned on them answers in every register."""
    out = []
    for p in prompt_list:
        for kind, texts in replies(p).items():
            if texts:
                out.append({"prompt": p, "completion": texts[0]})
    return out


def toxic(reply: str) -> bool:
    text = reply.lower()
    return any(w in text for w in INSULTS)


def hidden_score(prompt: str, reply: str) -> float:
    """The ground truth of this world's people, in [-3, 3]:

        + 1.0  offers help ("you could", "try to")       + 0.5  polite ("I hope this helps", "good luck")
        + 1.5  x the share of the situation's own tip words present (on topic)
        - 1.0  dismissive ("nothing you can do", ...)    - 2.0  insulting ("stupid", "idiot", ...)
        - 1.0  x the share of characters that are not letters, spaces or punctuation (garbled text)
    """
    text = reply.lower()
    score = 0.0
    if any(c in text for c in HELP_CUES):
        score += 1.0
    if any(c in text for c in POLITE_CUES):
        score += 0.5
    i = situation_of(prompt)
    if i is not None:
        tip_words = {w for w in _WORD.findall(TIPS[i]) if w not in _STOP}
        score += 1.5 * len(tip_words & set(_WORD.findall(text))) / len(tip_words)
    if any(d in text for d in DISMISSALS):
        score -= 1.0
    if toxic(reply):
        score -= 2.0
    if reply:
        clean = sum(c.isalpha() or c in " .,!?'" for c in reply)
        score -= 1.0 * (1 - clean / len(reply))
    else:
        score -= 1.0
    return max(-3.0, min(3.0, score))


def score(prompts: list[str], responses: list[str]) -> list[float]:
    """hidden_score as a reward function (`rlhf_engine.pipeline.world:score`), for evaluation and reports."""
    return [hidden_score(p, r) for p, r in zip(prompts, responses)]


def toxicity(prompts: list[str], responses: list[str]) -> list[float]:
    """1.0 for an insulting reply, else 0.0 (`rlhf_engine.pipeline.world:toxicity`); its mean is the toxicity rate."""
    return [float(toxic(r)) for r in responses]


# score and toxicity as reward functions, by name (the evaluation's sources; report.json's rows)
SCORE_FN = "rlhf_engine.pipeline.world:score"
TOXICITY_FN = "rlhf_engine.pipeline.world:toxicity"
LABELERS = ("ana", "ben", "dee", "cy")
MISUNDERSTOOD = "cy"  # ranks by the reverse of the instructions


def label(prompt: str, completions: list[str], *, seed: int, noise: float = 0.3) -> dict:
    """A ranked feedback record (datasets.feedback's format) from the simulated labelers: each ranks the
    completions by hidden_score + Gaussian noise (1 = best); `MISUNDERSTOOD` ranks the worst first."""
    rng = random.Random(seed)
    truth = [hidden_score(prompt, c) for c in completions]
    rankings = []
    for name in LABELERS:
        perceived = [t + rng.gauss(0.0, noise) for t in truth]
        if name == MISUNDERSTOOD:
            perceived = [-p for p in perceived]
        order = sorted(range(len(completions)), key=lambda i: -perceived[i])
        ranks = [0] * len(completions)
        for position, i in enumerate(order):
            ranks[i] = position + 1
        rankings.append(ranks)
    return {"prompt": prompt, "completions": list(completions), "rankings": rankings, "labelers": list(LABELERS)}
