"""pipeline.world: the pipeline's embedded world (prompts, replies, the hidden score, the labelers)."""

import json

import pytest

from rlhf_engine.datasets.feedback import build_pairs, parse_record
from rlhf_engine.pipeline import world


def test_prompts_and_replies():
    prompts = world.prompts()
    assert len(prompts) == 64 == len(set(prompts))
    for p in prompts:
        kinds = world.replies(p)
        assert set(kinds) == {"helpful", "dismissive", "rude"} and all(kinds.values())
    assert len(world.sft_examples(prompts[:5])) == 15


def test_hidden_score_hand_cases():
    p = "My house is too hot."
    # helpful 1.0 + polite 0.5 + every tip word 1.5 = 3.0
    assert world.hidden_score(p, world.replies(p)["helpful"][0]) == 3.0
    # help cue 1.0, half the tip's content words (curtains, during, run, fan, night, close: 3 of 6) 0.75
    assert world.hidden_score(p, "You could close the curtains and run.") == pytest.approx(1.0 + 1.5 * 3 / 6)
    assert world.hidden_score(p, "There is nothing you can do about it.") == -1.0
    assert world.hidden_score(p, "That is a stupid question. Stop whining.") == -2.0
    # garbled: 4 of 8 characters are not letters / spaces / punctuation -> -0.5
    assert world.hidden_score(p, "ab\x01\x02cd\x03\x04") == -0.5
    assert world.hidden_score(p, "") == -1.0
    assert world.toxicity([p, p], ["Deal with it, idiot.", "Good luck!"]) == [1.0, 0.0]


def test_labelers_follow_the_score_except_the_one_who_misunderstood():
    p = world.prompts()[1]
    kinds = world.replies(p)
    completions = [kinds["rude"][0], kinds["helpful"][0], kinds["dismissive"][0]]
    record = world.label(p, completions, seed=3)
    ranks = dict(zip(record["labelers"], record["rankings"]))
    for name in ("ana", "ben", "dee"):
        assert ranks[name] == [3, 1, 2]  # scores -2, 3, -1 (noise 0.3 cannot reorder gaps of 1)
    assert ranks["cy"] == [1, 3, 2]
    # the engine's feedback code reads the record, builds the consensus and flags cy
    pairs, reports = build_pairs([parse_record(record, 1)] * 3)
    assert reports["cy"].flagged and not reports["ana"].flagged
    assert (pairs[0].chosen, pairs[0].rejected) == (kinds["helpful"][0], kinds["dismissive"][0])


def test_the_shipped_world_tokenizer_is_the_one_trained_on_the_world():
    # model/ ships the world-llama tokenizer as a file (the model layer never imports the pipeline's world);
    # it must be exactly what training on the world's text gives (a changed world needs a new file)
    from tokenizers import Tokenizer

    from rlhf_engine.model.tokenizers import DATA_DIR

    shipped = Tokenizer.from_file(f"{DATA_DIR}/world.json")
    assert json.loads(shipped.to_str()) == json.loads(world.train_tokenizer().to_str())


def test_world_tokenizer_is_deterministic_and_encodes_any_text():
    from rlhf_engine.model.config import MODEL_PRESETS
    from rlhf_engine.model.tokenizers import TOKENIZERS

    world_tokenizer = TOKENIZERS["world"]
    a, b = world_tokenizer(), world_tokenizer()
    assert a.get_vocab() == b.get_vocab() and len(a) <= MODEL_PRESETS["world-llama"]["vocab_size"]
    assert (a.pad_token_id, a.eos_token_id) == (0, 1)
    p = world.prompts()[0]
    reply = world.replies(p)["helpful"][0]
    ids = a(reply, add_special_tokens=False)["input_ids"]
    assert len(ids) <= len(reply.split()) + 4 and a.decode(ids) == reply  # about a token per word of the world
    other = "Ünïcode & unseen words: zyxw 🙂"
    assert a.decode(a(other, add_special_tokens=False)["input_ids"]) == other  # byte-level: nothing is unknown


def _score_before_free_text(prompt, reply):
    """hidden_score as it was before it read free text (the embedded world's own terms only)."""
    import re

    text, score = reply.lower(), 0.0
    score += 1.0 if any(c in text for c in world.HELP_CUES) else 0.0
    score += 0.5 if any(c in text for c in world.POLITE_CUES) else 0.0
    i = world.situation_of(prompt)
    if i is not None:
        tip = {w for w in re.findall(r"[a-z']+", world.TIPS[i]) if w not in world._STOP}
        score += 1.5 * len(tip & set(re.findall(r"[a-z']+", text))) / len(tip)
    score -= 1.0 if any(d in text for d in world.DISMISSALS) else 0.0
    score -= 2.0 if world.toxic(reply) else 0.0
    score -= 1.0 * (1 - sum(c.isalpha() or c in " .,!?'" for c in reply) / len(reply)) if reply else 1.0
    return max(-3.0, min(3.0, score))


def test_the_free_text_terms_never_fire_on_the_embedded_worlds_texts():
    # the rubric reads a real model's answers, but on the embedded world (make run) it is what it was: every
    # reply of every kind, to every prompt (its own situation's and the others'), and word salads of the world's
    # vocabulary (what an early world-llama samples) score as before
    import random

    replies = [r for p in world.prompts()[::4] for kind in world.replies(p).values() for r in kind]
    vocabulary = " ".join(world.texts()).split()
    rng = random.Random(0)
    salads = [" ".join(rng.choice(vocabulary) for _ in range(rng.randint(1, 30))) for _ in range(300)]
    for p in world.prompts()[::3]:
        for r in replies + salads:
            assert world.hidden_score(p, r) == pytest.approx(_score_before_free_text(p, r), abs=1e-12), (p, r)


def test_the_rubric_reads_free_text_hand_cases():
    hot = "My house is too hot. How can I cool it down?"
    # tip words {close, curtains, during, run, fan, night}: 6; related words count half a tip word
    assert world.hidden_score(hot, "Keep the blinds shut and use fans.") == pytest.approx(1.5 * 1.0 / 6)
    # advice in other words (+1), one tip word ("fan") and one related word ("shades"): 1.5 * (1 + 0.5) / 6
    assert world.hidden_score(hot, "Consider shades and a fan at noon.") == pytest.approx(1 + 1.5 * 1.5 / 6)
    # a refusal or a misreading costs 1.5 (the instruct model's own "I'm sorry for your inconvenience, but as a
    # helpful AI ..." answer)
    assert world.hidden_score(hot, "I'm sorry for your loss.") == pytest.approx(-1.5)
    assert world.hidden_score(hot, "As an AI I cannot help with that.") == pytest.approx(-1.5)
    # rambling past 80 words: up to -0.5 (120 distinct words: -0.25)
    ramble = " ".join("abcdefghij"[i % 10] * (1 + i // 10) for i in range(120))  # 120 distinct letter words
    assert world.hidden_score(hot, ramble) == pytest.approx(-0.5 * 40 / 80)
    # a loop: "this helps" over and over repeats nearly every trigram (-1 at the limit), polite cue or not
    loop = " ".join(["I hope this helps"] * 10)
    assert world.hidden_score(hot, loop) < world.hidden_score(hot, "I hope this helps") - 0.8
