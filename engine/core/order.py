"""Seeded data orders and the RNG states a checkpoint carries: a batch is a pure function of (seed,
step), so a resumed run sees the batches of the uninterrupted one.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch

from ..errors import ConfigError


def epoch_seed(seed: int, epoch: int, name: str = "data") -> int:
    """A 63-bit generator seed for (seed, epoch, name), from sha256: any seed and epoch work (the
    old `seed * 1000003 + epoch` overflowed torch's seed range at seed ~1.8e13). The hashed text names the
    module this lived in first: changing it would change every seeded order and sample."""
    digest = hashlib.sha256(f"rlhf_engine.run/{name}/{seed}/{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seeded_permutation(n: int, seed: int, epoch: int, name: str = "data") -> list[int]:
    """The visiting order of n items in `epoch`: a pure function of (n, seed, epoch, name)."""
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch, name))
    return torch.randperm(n, generator=generator).tolist()


class DataOrder:
    """Batches of n items: epoch e visits seeded_permutation(n, seed, e) in slices of batch_size (the
    last slice of an epoch may be shorter). batch(step) is a pure function of (seed, step), so a
    resumed run sees exactly the batches the uninterrupted run would have seen."""

    def __init__(self, n: int, batch_size: int, seed: int, name: str = "data"):
        if n < 1 or batch_size < 1:
            raise ConfigError(f"{name}: {n} items in batches of {batch_size}: need at least one of each")
        self.n, self.batch_size, self.seed, self.name = n, batch_size, seed, name
        self.steps_per_epoch = -(-n // batch_size)
        self._epoch, self._perm = -1, []

    def position(self, step: int) -> dict:
        """Where `step` (steps done) leaves the data: epoch and offset of the next item."""
        epoch, k = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "offset": k * self.batch_size}

    def batch(self, step: int) -> list[int]:
        """Item indices of the batch of `step` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, seeded_permutation(self.n, self.seed, epoch, self.name)
        return self._perm[k * self.batch_size : (k + 1) * self.batch_size]

    def describe(self) -> dict:
        return {"n": self.n, "batch_size": self.batch_size, "seed": self.seed}


def seed_everything(seed: int) -> None:
    """python, numpy (which takes 32 bits) and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(state["state"]["key"].astype(np.int64)), "pos": state["state"]["pos"],
                  "has_gauss": state["has_gauss"], "gauss": state["gauss"]},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npy = state["numpy"]
    np.random.set_state({
        "bit_generator": "MT19937", "state": {"key": npy["key"].numpy().astype(np.uint32), "pos": npy["pos"]},
        "has_gauss": npy["has_gauss"], "gauss": npy["gauss"],
    })
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        for device, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, device)
