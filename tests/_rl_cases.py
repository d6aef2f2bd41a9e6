"""Masks, inputs and checks shared by the RL-math tests (gae, ppo_loss, value_loss, whiten, kl_penalty).

Letters: B batch, T time, N tokens.
"""

from __future__ import annotations

import contextlib
import re

import torch

MASK_KINDS = ("full", "right_pad", "left_pad", "holes", "mixed")


def make_mask(B: int, T: int, kind: str, *, seed: int = 0) -> torch.Tensor:
    """[B, T] bool mask.

    right_pad / left_pad: row b keeps a random length in [1, T] at the end / start.
    holes: random interior gaps (tool or observation tokens), at least one valid token per row.
    mixed: every row pattern at once, row by row: full, right pad, left pad, holes, all masked,
    a single valid token (then random) — the edge cases the issue names.
    """
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(T)
    if kind == "full":
        return torch.ones(B, T, dtype=torch.bool)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    if kind == "right_pad":
        return t[None, :] < lengths[:, None]
    if kind == "left_pad":
        return t[None, :] >= (T - lengths)[:, None]
    if kind == "holes":
        m = torch.rand(B, T, generator=g) > 0.35
        m[:, 0] = True
        return m
    assert kind == "mixed"
    m = torch.rand(B, T, generator=g) > 0.4
    rows = [
        torch.ones(T, dtype=torch.bool),
        t < max(1, T // 2),
        t >= T - max(1, T // 3),
        (t % 3) != 1,
        torch.zeros(T, dtype=torch.bool),
        t == (T // 2),
    ]
    for b, row in enumerate(rows[:B]):
        m[b] = row
    return m


def randn(*shape, seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale + shift


# ---------------------------------------------------------------------------------------------------
# Shared checks of the RL-math ops
# ---------------------------------------------------------------------------------------------------
def documented_backends(fn) -> set[str]:
    """The backend names a public op's docstring lists on its `backend:` line."""
    doc = fn.__doc__ or ""
    match = re.search(r"backend:(.*?)(?:\(see|\n\s*\n)", doc, re.S)
    assert match, f"{fn.__name__}: no `backend:` entry in the docstring"
    return set(re.findall(r'"(\w+)"', match.group(1)))


@contextlib.contextmanager
def record_launches(module, monkeypatch):
    """Within: every `*_kernel` launch of `module` is recorded as (kernel name, the device its
    on_device context made current at launch time or None outside one, the devices of the tensor
    arguments). Triton launches on the current CUDA device, so each launch must sit inside
    on_device(tensor) of its own tensors' device (the real on_device still runs underneath)."""
    current: list[torch.device] = []
    launches: list[tuple[str, torch.device | None, set]] = []
    real_on_device = module.on_device

    @contextlib.contextmanager
    def on_device(t):
        with real_on_device(t):
            current.append(t.device)
            try:
                yield
            finally:
                current.pop()

    class Recorded:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launch = self.kernel[grid]

            def run(*args, **kwargs):
                devices = {a.device for a in args if isinstance(a, torch.Tensor)}
                launches.append((self.name, current[-1] if current else None, devices))
                return launch(*args, **kwargs)

            return run

    monkeypatch.setattr(module, "on_device", on_device)
    for name in [n for n in vars(module) if n.endswith("_kernel")]:
        monkeypatch.setattr(module, name, Recorded(name, getattr(module, name)))
    yield launches


@contextlib.contextmanager
def intra_op_threads(n: int):
    """Run with `n` intra-op threads, so at::parallel_for splits a range into several unequal parts
    whatever the machine (the C++ kernels' range arithmetic runs)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


# ---------------------------------------------------------------------------------------------------
# Past the C++ chunk (csrc/cpu_math.h kChunk = 4096 tokens): the per-chunk results must merge
# ---------------------------------------------------------------------------------------------------
CHUNK = 4096
LONG_SHAPE = (11, 1201)  # 13211 tokens: chunks [0, 4096), [4096, 8192), [8192, 12288), [12288, 13211)
MASKED_CHUNK = 2  # every token of this chunk is masked (its partials are empty) and holds garbage


def long_mask(seed: int) -> torch.Tensor:
    """[11, 1201] bool: random holes (~80% valid), chunk 2 entirely masked."""
    m = make_mask(*LONG_SHAPE, "holes", seed=seed).reshape(-1)
    m |= torch.rand(m.shape, generator=torch.Generator().manual_seed(seed + 1)) > 0.5
    m[MASKED_CHUNK * CHUNK : (MASKED_CHUNK + 1) * CHUNK] = False
    return m.view(LONG_SHAPE)


def at_chunk(chunk: int, offset: int) -> int:
    """Flat token index `offset` tokens into `chunk`."""
    return chunk * CHUNK + offset
