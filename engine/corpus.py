"""The embedded prompts: small everyday requests that ship with the package (no downloads), used when a
stage gets no prompt file (`python -m engine ppo --preset tiny` without --prompts) and by tests.

Each prompt is a situation a user describes ("My house is too hot.") or a request; they are templated
from a few lists so there are enough of them for held-out prompts to exist.
"""

from __future__ import annotations

# (situation, what the person wants): each pair reads as one short message to an assistant.
SITUATIONS = (
    ("My house is too hot.", "How can I cool it down?"),
    ("I can't sleep at night.", "What should I try?"),
    ("My plants keep dying.", "What am I doing wrong?"),
    ("I have a job interview tomorrow.", "How do I prepare?"),
    ("My laptop is very slow.", "How can I speed it up?"),
    ("I forgot my friend's birthday.", "How do I make it up to her?"),
    ("My dog barks at night.", "How do I calm him down?"),
    ("I want to learn to cook.", "Where do I start?"),
    ("My bike has a flat tire.", "How do I fix it?"),
    ("I feel stressed at work.", "What can I do?"),
    ("My kitchen sink is clogged.", "How do I clear it?"),
    ("I want to save money.", "Any simple tips?"),
    ("My phone battery dies fast.", "How can it last longer?"),
    ("I am moving to a new city.", "How do I make friends there?"),
    ("My coffee tastes bitter.", "How do I make it better?"),
    ("I need to write a thank-you note.", "What should it say?"),
)
REQUESTS = (
    "Translate 'thank you' into Spanish.",
    "Give me a word that rhymes with 'cat'.",
    "What is two plus three?",
    "Name a fruit that is yellow.",
    "Suggest a name for a goldfish.",
    "What is the opposite of 'cold'?",
    "Tell me a color of the sky.",
    "Which day comes after Monday?",
)


def embedded_prompts() -> list[str]:
    """The embedded prompts, in a fixed order: every situation alone, every situation with its
    question, and the requests (16 + 16 + 8 = 40)."""
    prompts = [s for s, _ in SITUATIONS]
    prompts += [f"{s} {q}" for s, q in SITUATIONS]
    prompts += list(REQUESTS)
    return prompts
