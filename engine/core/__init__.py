"""The run machinery every stage shares: configs (the base, presets, merge, the shared checks), files
(atomic writes, strict JSON / JSONL), the lock on OUT, seeded data orders, devices and memory, padding,
the Run (checkpoint, resume, metrics, progress) and data parallel.

Imports `..errors` only (and torch, numpy where a module needs them); never model/, datasets/, algos/,
stages/ or pipeline/.
"""
