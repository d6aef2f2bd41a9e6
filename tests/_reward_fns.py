"""Reward functions the tests name as `module:function` (tests/ is on sys.path under pytest)."""


def count_e(prompts, responses):
    """A rule-based reward: the share of the letter 'e' in the response."""
    return [r.count("e") / max(1, len(r)) for r in responses]


def wrong_length(prompts, responses):
    return [0.0]


def not_numbers(prompts, responses):
    return ["high"] * len(responses)


def nan_for_second(prompts, responses):
    return [0.0, float("nan")] + [0.0] * (len(responses) - 2)


NOT_CALLABLE = 3
