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


def lowercase_share(prompts, responses):
    """A dense rule-based reward a tiny random model can learn quickly: the share of the response's
    characters that are ASCII lowercase letters (about 10% for uniformly random bytes)."""
    return [sum("a" <= c <= "z" for c in r) / max(1, len(r)) for r in responses]


def not_lowercase(prompts, responses):
    """A gold reward that falls exactly as lowercase_share rises (1 minus it): a proxy that is always
    wrong, so an over-optimisation monitor watching it must fire as soon as PPO learns the proxy."""
    return [1.0 - s for s in lowercase_share(prompts, responses)]
