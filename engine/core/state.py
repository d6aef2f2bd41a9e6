"""What a Run tracks across a restart (core.run: Run.track): named tensors as Weights, or any object with
state_dict / load_state_dict; and the non-finite check of a state before it is checkpointed."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping

import torch


class Weights:
    """Named tensors (the trainable parameters) as a tracked state: saved as CPU copies, restored in
    place, so the optimizer keeps pointing at the same parameters."""

    def __init__(self, named: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor]):
        self.named = dict(named.items() if isinstance(named, Mapping) else named)

    def state_dict(self) -> dict:
        return {n: t.detach().cpu().clone() for n, t in self.named.items()}

    def load_state_dict(self, state: dict) -> None:
        missing, unexpected = sorted(set(self.named) - set(state)), sorted(set(state) - set(self.named))
        if missing or unexpected:
            raise ValueError(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        with torch.no_grad():
            for n, t in self.named.items():
                if state[n].shape != t.shape:
                    raise ValueError(f"{n} has shape {tuple(state[n].shape)}, expected {tuple(t.shape)}")
                t.copy_(state[n])


def as_tracked(name: str, obj):
    """`obj` as a tracked state of Run.track: named tensors become Weights; anything else needs
    state_dict / load_state_dict."""
    if isinstance(obj, (Mapping, list, tuple)) or (isinstance(obj, Iterator) and not hasattr(obj, "state_dict")):
        return Weights(obj)
    if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
        raise TypeError(f"track({name}=...): expected named tensors or an object with state_dict/load_state_dict")
    return obj


def first_non_finite(state, path: str = "") -> str | None:
    """Dotted path of the first floating tensor or float in `state` holding a NaN or inf."""
    if isinstance(state, torch.Tensor):
        ok = not state.is_floating_point() or bool(torch.isfinite(state).all())
        return None if ok else path
    if isinstance(state, float):
        return None if math.isfinite(state) else path
    if isinstance(state, Mapping):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return None
    for k, v in items:
        bad = first_non_finite(v, f"{path}.{k}" if path else str(k))
        if bad is not None:
            return bad
    return None
