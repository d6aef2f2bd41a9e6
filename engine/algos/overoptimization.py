"""Reward over-optimisation: the signal that a policy has started to game its reward model, and the
trainer's policy when it shows (`--on-overoptimization off|warn|stop`).

The reward model is a proxy for what people want (the "gold" reward). Gao et al. 2022, "Scaling laws
for reward model overoptimization": as the policy moves away from its start, measured by
d = sqrt(KL(pi || pi_init)), the gold reward rises, peaks and then falls (their RL fit
R_gold(d) = d (alpha - beta log d)) while the proxy keeps rising. Coste et al. 2023, "Reward model
ensembles help mitigate overoptimization": where the policy leaves the RM's data the members of an RM
ensemble disagree, so a conservative ensemble reward (mean - lambda std, or the worst member) falls
there even when the mean still rises; it stands in for gold when no gold scorer exists.

OverOptimizationMonitor sees a run's held-out evaluations in order, each with the proxy P (the RM
ensemble's mean), the watched score W (the gold scorer's when there is one, else the conservative
ensemble reward, else P itself) and the KL to the reference. It keeps the best evaluation by W (among
those within the KL budget, when there is one: the weights a `stop` keeps) and raises the alarm when

    (a) W has stayed more than `tolerance` below its best for `patience` evaluations in a row, each
        with P above its value at that best: the proxy still rises while the watched score falls,
        the far side of Gao et al.'s peak (with W = P this cannot happen: no gold, no ensemble, no
        alarm of this kind); or
    (b) the KL has passed `kl_budget` nats per response.

Its state is plain numbers (a checkpoint keeps it, so an alarm and the best evaluation survive a
restart), and data-parallel ranks feed it the same all-reduced numbers, so every rank decides alike.
Pure Python: no torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class Verdict:
    """What one evaluation changed."""

    new_best: bool  # the watched score is the best so far (within the KL budget): keep these weights
    fired: bool  # the alarm fired at this evaluation (the first time only)


@dataclass
class OverOptimizationMonitor:
    """See the module docstring: observe() per held-out evaluation, state_dict() for the checkpoint."""

    patience: int = 2  # evaluations in a row below the best (with the proxy above its value there)
    tolerance: float = 0.0  # how far below its best the watched score must be to count (its own units)
    kl_budget: float | None = None  # nats per response; None: no KL alarm
    # ---- state ----
    best_step: int | None = None  # the evaluation with the best watched score
    best_watched: float | None = None
    best_proxy: float | None = None
    streak: int = 0  # evaluations in a row that count towards (a)
    alarm_step: int | None = None  # where the alarm first fired
    reason: str = ""  # why, in words (the log line and the result)

    def observe(self, step: int, *, proxy: float, watched: float, kl: float) -> Verdict:
        """One held-out evaluation at `step` (steps done)."""
        within = self.kl_budget is None or kl <= self.kl_budget
        new_best = within and math.isfinite(watched) and (self.best_watched is None or watched > self.best_watched)
        if new_best:
            self.best_step, self.best_watched, self.best_proxy, self.streak = step, watched, proxy, 0
        elif self.best_watched is not None and watched < self.best_watched - self.tolerance and proxy > self.best_proxy:
            self.streak += 1
        else:
            self.streak = 0
        reason = ""
        if self.streak >= self.patience:
            reason = (f"the watched score fell from {self.best_watched:.3f} (step {self.best_step}) to {watched:.3f} "
                      f"over {self.streak} evaluations while the proxy rose from {self.best_proxy:.3f} to {proxy:.3f}")
        elif not within:
            reason = f"the KL to the reference, {kl:.3f} nats per response, passed the budget of {self.kl_budget:g}"
        fired = bool(reason) and self.alarm_step is None
        if fired:
            self.alarm_step, self.reason = step, reason
        return Verdict(new_best=new_best, fired=fired)

    def metrics(self) -> dict:
        """The alarm state for a metrics row: alarm (1 once it has fired), alarm_streak, best_step."""
        return {"alarm": int(self.alarm_step is not None), "alarm_streak": self.streak,
                "best_step": self.best_step}  # fmt: skip

    def summary(self) -> dict:
        """The outcome for a result file: where the alarm fired and why, and the best evaluation."""
        return {"alarm_step": self.alarm_step, "reason": self.reason, "best_step": self.best_step,
                "best_watched": self.best_watched, "best_proxy": self.best_proxy}  # fmt: skip

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            if name not in self.__dataclass_fields__:
                raise ValueError(f"over-optimisation monitor: unknown state {name!r}")
            setattr(self, name, value)
