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


# ---- the embedded SFT corpus: one helpful reply per embedded prompt ----------------------------------

# (reply to the situation alone, answer to the situation with its question), one per SITUATIONS entry.
SITUATION_REPLIES = (
    ("That sounds uncomfortable. Keeping the blinds closed during the day helps a lot.",
     "Close the blinds in the day, open the windows at night, and run a fan near an open window."),
    ("I am sorry to hear that. A calm routine before bed often helps.",
     "Go to bed at the same time, keep the room dark and cool, and put the phone away an hour before."),
    ("That is frustrating. Most plants die from too much water, not too little.",
     "Water only when the soil is dry, give them more light, and check that the pots drain."),
    ("Good luck! A little preparation will make you feel calmer.",
     "Read about the company, practice short answers about your work, and prepare two questions to ask."),
    ("That is annoying. Closing programs you do not use is a good first step.",
     "Restart it, remove programs you never use, and free up some disk space."),
    ("It happens to everyone. A late but sincere message still means a lot.",
     "Say sorry honestly, send a warm message today, and plan something nice to do together."),
    ("That can keep the whole house awake. He is probably bored or hears something outside.",
     "Give him a long walk in the evening, keep him inside at night, and reward him when he is quiet."),
    ("That is a great idea. Cooking is easier to learn than most people think.",
     "Start with simple dishes like eggs, pasta and soup, and cook the same recipe a few times."),
    ("That is bad luck. A flat tire is one of the easiest repairs to learn.",
     "Take the wheel off, find the hole, put on a patch or a new tube, and pump the tire up again."),
    ("I am sorry you feel that way. Short breaks during the day can help.",
     "Take short breaks, make a list of what matters most today, and talk to your manager about the load."),
    ("That is unpleasant. Hot water often clears a small clog.",
     "Pour in hot water, then try a plunger; if that fails, clean the trap under the sink."),
    ("That is a good goal. Small changes add up quickly.",
     "Write down what you spend for a month, cook at home more often, and save a little from every paycheck."),
    ("That is annoying. Bright screens use the most power.",
     "Lower the screen brightness, close apps you do not use, and turn off location when you do not need it."),
    ("How exciting! A new city is a fresh start.",
     "Join a club or a class for something you enjoy, say yes to invitations, and talk to your neighbors."),
    ("That is a pity. The beans and the water both matter.",
     "Use fresh beans, water that is a little below boiling, and a shorter brewing time."),
    ("That is a kind thing to do. A short and honest note is best.",
     "Thank them for what they did, say how it helped you, and end with a warm wish."),
)  # fmt: skip
REQUEST_ANSWERS = (
    "In Spanish, 'thank you' is 'gracias'.",
    "The word 'hat' rhymes with 'cat'.",
    "Two plus three is five.",
    "A banana is a yellow fruit.",
    "You could call your goldfish Bubbles.",
    "The opposite of 'cold' is 'hot'.",
    "The sky is blue on a clear day.",
    "Tuesday comes after Monday.",
)


def embedded_sft_examples() -> list[tuple[str, str]]:
    """(prompt, completion) for every embedded prompt, in the order of embedded_prompts(): a reply to
    each situation alone, an answer to each situation with its question, and the requests' answers
    (40 distinct completions, so held-out prompts have unseen completions)."""
    completions = [alone for alone, _ in SITUATION_REPLIES]
    completions += [answer for _, answer in SITUATION_REPLIES]
    completions += list(REQUEST_ANSWERS)
    return list(zip(embedded_prompts(), completions, strict=True))
