"""Data: strict readers of every input file (prompts, SFT records, feedback with its consensus and
pairs, the constitution and templates), the embedded corpus, the text layout every stage shares
(layout: how a prompt and a completion become tokens), and batching (one collate, seeded and
length-bucketed orders).

Imports core/ and errors only; the readers are pure Python, so the CLI checks inputs before torch loads.
"""
