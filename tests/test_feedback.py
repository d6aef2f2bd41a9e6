"""Feedback formats, consensus, ranked -> pairwise expansion and labeler agreement (pure Python)."""

import json
import math
import os

import pytest

from rlhf_engine.datasets.feedback import (
    PreferencePair,
    RankedFeedback,
    build_pairs,
    consensus_ranking,
    kendall_tau,
    labeler_agreement,
    load_feedback,
    pairs_from_ranking,
    pairs_from_thumbs,
)
from rlhf_engine.errors import FeedbackError

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples", "feedback_ranked.jsonl")

HOT = "My house is too hot."
HOT_COMPLETIONS = (
    "There is nothing you can do about hot houses.",
    "You can cool your house with air conditioning.",
    "It is not too hot.",
)


def hot_record(rankings=((2, 1, 3), (2, 1, 3), (2, 3, 1)), labelers=("ana", "ben", "cy")):
    return RankedFeedback(HOT, HOT_COMPLETIONS, tuple(rankings), tuple(labelers), None, 1)


def write_jsonl(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# ---- consensus ---------------------------------------------------------------------------------


def test_consensus_of_the_issue_example():
    # mean ranks: c0 = (2+2+2)/3 = 2, c1 = (1+1+3)/3 = 5/3, c2 = (3+3+1)/3 = 7/3 -> c1 < c0 < c2
    assert consensus_ranking([(2, 1, 3), (2, 1, 3), (2, 3, 1)]) == [2, 1, 3]


def test_consensus_mean_rank_hand_case():
    # 4 completions, 3 labelers; mean ranks:
    # c0 = (3+2+3)/3 = 8/3, c1 = (2+3+1)/3 = 2, c2 = (1+1+2)/3 = 4/3, c3 = (4+4+4)/3 = 4
    # order c2 (4/3) < c1 (2) < c0 (8/3) < c3 (4)
    rankings = [(3, 2, 1, 4), (2, 3, 1, 4), (3, 1, 2, 4)]
    assert consensus_ranking(rankings) == [3, 2, 1, 4]


def test_consensus_ties_share_a_rank():
    # c0 and c1 both have mean rank 1.5: a tie, whatever the labeler order (list position breaks nothing)
    assert consensus_ranking([(1, 2), (2, 1)]) == [1, 1]
    assert consensus_ranking([(2, 1), (1, 2)]) == [1, 1]
    # three-way tie on mean 2 (each labeler a rotation)
    assert consensus_ranking([(1, 2, 3), (2, 3, 1), (3, 1, 2)]) == [1, 1, 1]
    # a tie below a clear winner: c2 best (mean 1), c0 and c1 tied at 2.5 -> both rank 2 (competition ranking)
    assert consensus_ranking([(2, 3, 1), (3, 2, 1)]) == [2, 2, 1]
    # a tie above a clear loser: c0, c1 at 1.5, c2 at 3 -> [1, 1, 3]
    assert consensus_ranking([(1, 2, 3), (2, 1, 3)]) == [1, 1, 3]


# ---- pairs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 4, 5, 7])
def test_pairs_count_and_order(n):
    completions = [f"c{i}" for i in range(n)]
    ranks = list(range(n, 0, -1))  # the last completion is the best
    pairs = pairs_from_ranking("p", completions, ranks, line=9)
    assert len(pairs) == math.comb(n, 2)
    rank_of = dict(zip(completions, ranks))
    assert all(rank_of[p.chosen] < rank_of[p.rejected] for p in pairs)  # preferred first
    assert len({(p.chosen, p.rejected) for p in pairs}) == len(pairs)  # no duplicates
    # best-first order: (1st, 2nd), (1st, 3rd), ..., (2nd, 3rd), ...
    expected = [(f"c{n - 1 - a}", f"c{n - 1 - b}") for a in range(n) for b in range(a + 1, n)]
    assert [(p.chosen, p.rejected) for p in pairs] == expected
    assert all(p.prompt == "p" and p.line == 9 and p.margin == 0.0 for p in pairs)


def test_issue_example_pairs_follow_the_consensus():
    pairs, _ = build_pairs([hot_record()])
    ac, nothing, not_hot = HOT_COMPLETIONS[1], HOT_COMPLETIONS[0], HOT_COMPLETIONS[2]
    assert [(p.chosen, p.rejected) for p in pairs] == [(ac, nothing), (ac, not_hot), (nothing, not_hot)]


def test_a_tie_in_the_consensus_gives_no_pair():
    # two labelers voting [1, 2] and [2, 1]: no preference, no pair, in either vote order
    for rankings in (((1, 2), (2, 1)), ((2, 1), (1, 2))):
        pairs, _ = build_pairs([RankedFeedback("p", ("a", "b"), rankings, ("x", "y"), None, 3)])
        assert pairs == []
    # a partial order: c (mean 1) beats a and b, which tie (2.5): the two pairs c > a, c > b only
    rec = RankedFeedback("p", ("a", "b", "c"), ((2, 3, 1), (3, 2, 1)), ("x", "y"), None, 3)
    pairs, _ = build_pairs([rec])
    assert [(p.chosen, p.rejected) for p in pairs] == [("c", "a"), ("c", "b")]
    assert pairs_from_ranking("p", ["a", "b", "c"], [1, 1, 3]) == [PreferencePair("p", "a", "c"),
                                                                   PreferencePair("p", "b", "c")]  # fmt: skip


def test_thumbs_pairs():
    pairs = pairs_from_thumbs("p", ["u1", "d1", "n", "u2", "d2"], [1, -1, None, 1, -1])
    assert [(p.chosen, p.rejected) for p in pairs] == [("u1", "d1"), ("u1", "d2"), ("u2", "d1"), ("u2", "d2")]
    assert pairs_from_thumbs("p", ["a", "b"], [1, 1]) == []


def test_build_pairs_mixes_record_kinds():
    pair = PreferencePair("q", "good", "bad", 0.5, 2)
    thumbs = RankedFeedback("t", ("up", "down"), (), (), (1, -1), 3)
    pairs, _ = build_pairs([hot_record(), pair, thumbs])
    assert len(pairs) == 3 + 1 + 1
    assert pairs[3] == pair
    assert (pairs[4].chosen, pairs[4].rejected, pairs[4].line) == ("up", "down", 3)


# ---- agreement ---------------------------------------------------------------------------------


def test_kendall_tau_hand_cases():
    assert kendall_tau([1, 2, 3], [1, 2, 3]) == 1.0
    # a tie in one ranking: pair (0, 1) counts in C(3, 2) = 3 but is neither concordant nor discordant
    assert kendall_tau([1, 2, 3], [1, 1, 3]) == pytest.approx(2 / 3)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0
    # [2,1,3] vs [1,2,3]: pair (0,1) discordant, (0,2) and (1,2) concordant -> (2 - 1) / 3
    assert kendall_tau([2, 1, 3], [1, 2, 3]) == pytest.approx(1 / 3)
    # 4 items, one adjacent swap: 5 concordant, 1 discordant -> 4/6
    assert kendall_tau([1, 2, 4, 3], [1, 2, 3, 4]) == pytest.approx(4 / 6)


def test_disagreeing_labeler_of_the_issue_is_flagged():
    # consensus [2, 1, 3]; cy's [2, 3, 1] reverses all 3 completion pairs -> tau = -1
    reports = labeler_agreement([hot_record()], threshold=0.3)
    assert reports["ana"].tau == 1.0 and reports["ben"].tau == 1.0
    assert (reports["cy"].concordant, reports["cy"].discordant) == (0, 3)
    assert reports["cy"].tau == -1.0 and reports["cy"].agreement == 0.0
    assert [name for name, r in reports.items() if r.flagged] == ["cy"]
    # still flagged at a lenient threshold; nobody is flagged at -1
    assert labeler_agreement([hot_record()], threshold=-0.5)["cy"].flagged
    assert not any(r.flagged for r in labeler_agreement([hot_record()], threshold=-1.0).values())


def test_a_tie_counts_against_no_labeler():
    # Two labelers voting [1, 2] and [2, 1]: the consensus ties, so neither disagrees with it (ordered by
    # list position instead, one of them would be flagged, and the other once the votes are swapped).
    for rankings in (((1, 2), (2, 1)), ((2, 1), (1, 2))):
        rec = RankedFeedback("p", ("a", "b"), rankings, ("x", "y"), None, 1)
        reports = labeler_agreement([rec], threshold=0.3)
        assert [(r.concordant, r.discordant, r.tau, r.flagged) for r in reports.values()] == [(0, 0, 1.0, False)] * 2
    # x [1, 2, 3], y [2, 1, 3]: totals 3, 3, 6 -> consensus [1, 1, 3]. Pair (a, b) is tied: neither's; pairs
    # (a, c) and (b, c) both order as the consensus: 2 concordant, 0 discordant each, tau 1 for both.
    rec = RankedFeedback("p", ("a", "b", "c"), ((1, 2, 3), (2, 1, 3)), ("x", "y"), None, 1)
    reports = labeler_agreement([rec], threshold=0.3)
    assert [(r.concordant, r.discordant, r.tau) for r in reports.values()] == [(2, 0, 1.0), (2, 0, 1.0)]


def test_agreement_pools_a_named_labeler_over_prompts():
    # ana agrees on both prompts; cy disagrees on one (3 discordant) and agrees on the other (3 concordant)
    other = RankedFeedback("p2", ("a", "b", "c"), ((1, 2, 3), (1, 2, 3), (1, 2, 3)), ("ana", "cy", "ben"), None, 2)
    reports = labeler_agreement([hot_record(), other], threshold=0.3)
    assert reports["cy"].prompts == 2 and reports["cy"].lines == [1, 2]
    assert (reports["cy"].concordant, reports["cy"].discordant) == (3, 3)
    assert reports["cy"].tau == 0.0 and reports["cy"].flagged
    assert reports["ana"].tau == 1.0 and not reports["ana"].flagged


def test_excluding_flagged_labelers_changes_the_consensus():
    # without ben, ana [1,2,3] and cy [3,2,1] tie everywhere; a fourth labeler dan sides with ana.
    # cy is the odd one out (tau -1 vs the consensus [1,2,3]); excluded -> consensus of ana + dan.
    rec = RankedFeedback("p", ("a", "b", "c"), ((1, 2, 3), (3, 2, 1), (1, 3, 2)), ("ana", "cy", "dan"), None, 1)
    # mean ranks all labelers: a = 5/3, b = 7/3, c = 2 -> [1, 3, 2]
    kept, reports = build_pairs([rec], threshold=0.3, exclude_flagged=False)
    assert reports["cy"].flagged and not reports["ana"].flagged
    assert [(p.chosen, p.rejected) for p in kept] == [("a", "c"), ("a", "b"), ("c", "b")]
    # without cy: a = 1, b = 2.5, c = 2.5 -> b and c tie: no pair between them
    excluded, _ = build_pairs([rec], threshold=0.3, exclude_flagged=True)
    assert [(p.chosen, p.rejected) for p in excluded] == [("a", "b"), ("a", "c")]


def test_issue_example_with_exclusion_keeps_the_two_agreeing_labelers():
    pairs, reports = build_pairs([hot_record()], threshold=0.3, exclude_flagged=True)
    assert reports["cy"].flagged
    assert [(p.chosen, p.rejected) for p in pairs][0] == (HOT_COMPLETIONS[1], HOT_COMPLETIONS[0])


# ---- loading and bad data ----------------------------------------------------------------------


def test_example_file_loads_and_flags_the_third_labeler():
    records = load_feedback(EXAMPLES)
    assert records[0].prompt == HOT and records[0].completions == HOT_COMPLETIONS
    assert records[0].rankings == ((2, 1, 3), (2, 1, 3), (2, 3, 1))
    pairs, reports = build_pairs(records, threshold=0.3)
    assert [name for name, r in reports.items() if r.flagged] == ["cy"]
    assert all(isinstance(p, PreferencePair) and p.chosen != p.rejected for p in pairs)
    assert any(p.margin == 1.0 for p in pairs)  # the pairwise record with a margin


def test_loader_parses_every_kind(tmp_path):
    path = write_jsonl(tmp_path, [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        "",
        {"prompt": "p", "completions": ["a", "b", "c"], "rankings": [[3, 1, 2]]},
        {"prompt": "p", "completions": ["a", "b"], "thumbs": [True, None]},
    ])
    pair, ranked, thumbs = load_feedback(path)
    assert pair == PreferencePair("p", "a", "b", 0.0, 1)
    assert ranked.rankings == ((3, 1, 2),) and ranked.labelers == ("0",) and ranked.line == 3
    assert thumbs.thumbs == (1, None) and thumbs.rankings == ()


@pytest.mark.parametrize(
    "row, message",
    [
        ({"chosen": "a", "rejected": "b"}, "missing key 'prompt'"),
        ({"prompt": "p", "chosen": "a"}, "missing key 'rejected'"),
        ({"prompt": "p", "answer": "a"}, "missing key: expected 'chosen' and 'rejected'"),
        ({"prompt": "p", "completions": ["a", "b"]}, "missing key 'rankings'"),
        ({"prompt": "p", "completions": ["a", "b", "c"], "rankings": [[1, 2, 3], [1, 2]]},
         "ranking 1 has 2 ranks for 3 completions"),
        ({"prompt": "p", "completions": ["a", "b", "c"], "rankings": [[1, 2, 3, 4]]}, "ranking 0 has 4 ranks"),
        ({"prompt": "p", "completions": ["a", "b", "c"], "rankings": [[2, 1, 2]]},
         "ranking 0 gives rank 2 twice (completions 0 and 2)"),
        ({"prompt": "p", "completions": ["a", "b", "c"], "rankings": [[1, 2, 4]]}, "rank 4, outside 1..3"),
        ({"prompt": "p", "completions": ["a", "b"], "rankings": [[1, "2"]]}, "integer ranks"),
        ({"prompt": "p", "completions": ["a", "b"], "rankings": []}, "non-empty list"),
        ({"prompt": "p", "completions": ["a"], "rankings": [[1]]}, "at least 2 strings"),
        ({"prompt": "p", "completions": ["a", "a"], "rankings": [[1, 2]]}, "same text twice"),
        ({"prompt": "p", "completions": ["a", "b"], "rankings": [[1, 2]], "labelers": ["x", "y"]}, "1 distinct names"),
        ({"prompt": "p", "completions": ["a", "b"], "thumbs": [1]}, "list of 2 entries"),
        ({"prompt": "p", "completions": ["a", "b"], "thumbs": [1, 0]}, "thumb 0"),
        ({"prompt": "p", "chosen": "a", "rejected": "a"}, "same text"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "non-empty string"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, "'margin' must be a finite number"),
        ([1, 2], "expected a JSON object"),
        ("{not json", "not valid JSON"),
        # issue 8, item 18: each of these was a traceback
        ({"prompt": "p", "completions": ["a", "b"], "thumbs": None}, "'thumbs' must be a list of 2 entries"),
        ({"prompt": "p", "completions": ["a", "b"], "rankings": [[1, 2]], "thumbs": None}, "got None"),
        ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1' + "0" * 400 + "}",
         "'margin' must be a finite number within float32 range, got 1000000000000000000000"),
        ('{"prompt": "p", "completions": ["a", "b"], "rankings": [[1, 2' + "0" * 400 + "]]}",
         "ranking 0 gives completion 1 rank 200000000000000000000000...00000000 (401 characters), outside 1..2"),
        ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": ' + "9" * 5000 + "}",
         "not valid JSON (a number with too many digits)"),
        ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1e39}', "within float32 range, got 1e+39"),
        ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": NaN}', "not valid JSON (NaN is not a JSON number)"),
        ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": -Infinity}', "-Infinity is not a JSON number"),
        ("[" * 100000 + "]" * 100000, "not valid JSON (nested too deeply)"),
        ('{"prompt": "p", "chosen": "a", "rejected": "b", "prompt": "q"}', "not valid JSON (key 'prompt' given twice)"),
        ({"prompt": "p", "completions": ["a", "b"], "rankings": [[1, 2]], "labelers": None}, "'labelers' must be 1"),
        # item 19: a misspelled or unknown field changes the result silently; rejected, known fields listed
        ({"prompt": "p", "completions": ["a", "b"], "rankings": [[1, 2]], "labeller": ["x"]},
         "unknown field 'labeller' (did you mean 'labelers'?); ranked records have: "
         "prompt, completions, rankings, labelers, thumbs"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "completions": ["a", "b"]},
         "unknown field 'completions'; pairwise records have: prompt, chosen, rejected, margin"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "source": "web"},
         "unknown field 'source'; pairwise records have: prompt, chosen, rejected, margin"),
    ],
)
def test_bad_data_names_the_line(tmp_path, row, message):
    good = {"prompt": "ok", "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path, [good, good, row])
    with pytest.raises(FeedbackError) as e:
        load_feedback(path)
    assert str(e.value).startswith(f"{path}:3: "), str(e.value)
    assert message in str(e.value), str(e.value)


def test_non_utf8_bytes_name_their_line(tmp_path):
    good = json.dumps({"prompt": "ok", "chosen": "a", "rejected": "b"}).encode()
    path = tmp_path / "latin1.jsonl"
    latin1 = '{"prompt": "caf\u00e9", "chosen": "a", "rejected": "b"}'.encode("latin-1")
    path.write_bytes(good + b"\n" + good + b"\n" + latin1 + b"\n")
    with pytest.raises(FeedbackError) as e:
        load_feedback(str(path))
    assert str(e.value) == f"{path}:3: not UTF-8 (byte 0xe9 at column 16)"


def test_a_byte_order_mark_opens_the_file(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}).encode() + b"\n")
    assert load_feedback(str(path)) == [PreferencePair("p", "a", "b", 0.0, 1)]


def test_missing_or_empty_file(tmp_path):
    with pytest.raises(FeedbackError, match="cannot open"):
        load_feedback(str(tmp_path / "absent.jsonl"))
    with pytest.raises(FeedbackError, match="no records"):
        load_feedback(write_jsonl(tmp_path, [""]))
