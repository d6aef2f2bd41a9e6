"""The run machinery every training stage shares: a stage is its loss and its batches.

Files, locking, resume, metrics, progress and the data order live here, once:

    OUT/run.lock        flock-ed by the process that uses OUT (the file holds its pid): a second run on
                        the same OUT fails at once with "OUT is in use by pid N"; the kernel drops the
                        lock when the holder dies, SIGKILL included, so a crashed run never blocks
    OUT/checkpoint.pt   written atomically (a temp file unique to the writer, fsync, os.replace, fsync
                        of OUT): stage, format, step, the config, sha256 of every input file, every
                        tracked state (trainable weights, optimizer, scheduler, trainer state such as a
                        KL controller), RNG states (python, numpy, torch CPU, every CUDA device) and the
                        data position. A kill at any moment leaves the previous checkpoint or the new
                        one, never a torn file; a resumed run repeats the uninterrupted one bit for bit.
    OUT/metrics.jsonl   one strict JSON object per line (a non-finite number is written as null), flushed
                        per row; a resumed run drops the rows past its checkpoint and a partial last line
    OUT/result.json     strict JSON, written atomically when the run finishes (so: the run completed)
    OUT/config.json     the stage and its whole config, written when the run opens
    OUT/tensorboard/    the metrics rows as TensorBoard scalars, when tensorboard is installed (core.events)

A stage opens a Run, builds its data and model, tracks what must survive a restart, and loops over
numbered steps (`stages/rm.py` is a whole stage in ~60 lines; tests/test_run.py has a toy one):

    with Run("rm", config) as run:               # validate, lock OUT, hash inputs, seed, vet a checkpoint
        order = run.data_order(len(pairs), config.batch_size)   # a pure function of (seed, epoch)
        run.track(weights=named_params, optimizer=optimizer)    # checkpointed and restored
        run.resume()                             # the checkpoint's step, state and RNG; 0 when fresh
        for step in run.steps(total):            # from run.start, behind a progress bar
            loss = ...                           # the stage's loss on order.batch(step)
            grad_norm = run.update(loss, optimizer, params, config.max_grad_norm)  # non-finite guard
            run.end_step(step + 1, {"loss": loss, "grad_norm": grad_norm})  # row, checkpoint, bar
        run.finish(result)                       # OUT/result.json: the run completed

Other helpers: `run.due(step, every)` for a stage's own cadence (held-out evaluation),
`run.check_finite(eval_loss=...)` to stop on any other value, `run.log(step, row)` for an extra row
(a step-0 baseline), `run.write_json(name, obj)` for a side report.

PPO/GRPO: one run step is one rollout + optimisation round; `run.update` runs once per minibatch
(or `run.optimizer_step` after several backward passes; a non-finite value names the round), a KL
controller or reward normaliser is tracked like the optimizer (`run.track(kl_ctl=...)`: anything
with state_dict / load_state_dict holding tensors and plain values), and a prompt set gets its own
`run.data_order(..., name="prompts")`. DPO: the frozen reference is not tracked.

Errors a user can act on are EngineError (one line on the CLI): RunLockedError, CheckpointError
(unreadable or incompatible checkpoint), NonFiniteError (the run stopped; its exit status is 3).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch

from ..errors import CheckpointError, ConfigError, NonFiniteError, StaleCheckpointError
from .config import RunConfig, short_repr
from .device import PeakWindow
from .events import Events
from .state import as_tracked, first_non_finite
from .files import (
    CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE, RESULT_FILE, TENSORBOARD_DIR, atomic_write, dumps, is_temp_file, plain,
    probe_writable, read_metrics, remove_temp, save_through, sha256_file, write_error, write_json,
)  # fmt: skip
from .lock import OutputLock
from .order import DataOrder, rng_state, seed_everything, set_rng_state
from .progress import bar, hub_progress

CHECKPOINT_FORMAT = 1  # bump when the checkpoint layout changes; an older one is refused with a clear line
_CHECKPOINT_KEYS = ("format", "stage", "step", "config", "inputs", "data", "state", "rng")


@dataclass
class StageResult:
    """What every stage returns (and writes as OUT/result.json); a stage's result adds its own fields."""

    out: str  # output directory
    steps: int  # steps done in total (resumed ones included)
    resumed_from: int  # step the run resumed from (0: fresh)
    files: list[str]  # what the stage's final save wrote
    # the run's memory peaks (Run.finish: core.device.PeakWindow, every step's peak and the setup's):
    peak_mem_mib: float | None = field(default=None, kw_only=True)  # the device's, as the rows' peak_mem_mib
    peak_rss_mib: float | None = field(default=None, kw_only=True)  # the process's resident set (host memory)


def _flatten(d: Mapping, prefix: str = "") -> dict:
    """{"stack": {"seed": 0}} -> {"stack.seed": 0}; tuples as lists, so a reloaded config compares."""
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


# ---- the run ----------------------------------------------------------------------------------


class Run:
    """One training run of `stage` in config.out; use as a context manager (see the module docstring).

    Opening it validates the config (RunConfig.validate: every float finite, every int within int64,
    the seed in range, OUT usable; plus the stage's own checks), creates OUT and writes a probe file in it,
    locks it, removes temp files a crash left, hashes config.input_paths(), seeds python/numpy/torch with
    config.seed and, when config.resume and OUT/checkpoint.pt exists, reads and vets the checkpoint
    (stage, format, config, input hashes) before any model is built; otherwise it starts over (the old
    checkpoint, metrics and event files removed). A refused checkpoint leaves OUT as it was; past the
    vetting, result.json is removed either way: it marks a completed run.

    A file system that refuses a write inside the run (disk full, a read-only remount) stops it with one
    WriteError line; every file written before is intact and the same command resumes.
    """

    def __init__(self, stage: str, config: RunConfig, progress_keys: tuple[str, ...] = ("loss",), *,
                 main: bool = True):  # fmt: skip
        self.stage = stage
        # A data-parallel run has one main process (rank 0) that owns OUT: the lock, the metrics, the
        # checkpoints, result.json and the progress bar. The others (main=False) vet and resume from the
        # same checkpoint read-only and write nothing; they keep the same steps and guards.
        self.main = main
        self.config = config
        self.out = config.out
        self.progress_keys = progress_keys  # row entries shown on the progress bar
        self.start = 0  # step the run (re)starts from
        self.step = 0  # index of the step in progress (0-based); its number in messages is step + 1
        self.total: int | None = None  # steps of the whole run, set by steps()
        self.last_checkpoint: int | None = None  # step of the newest checkpoint on disk
        self.inputs: dict[str, dict] = {}
        self._tracked: dict[str, object] = {}
        self._orders: dict[str, DataOrder] = {}
        self._pending: dict | None = None  # a vetted checkpoint's metadata, restored by resume()
        self._lock = OutputLock(self.out)
        self._metrics = None
        self._events = Events(self.path(TENSORBOARD_DIR), stage)
        self._bar = None
        self._stack = contextlib.ExitStack()
        self._t0 = time.perf_counter()
        self._peak: PeakWindow | None = None

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    # ---- open / close ---------------------------------------------------------------------------

    def __enter__(self) -> Run:
        try:
            self._open()
        except BaseException as e:
            self.close()
            self._raise_write_error(e)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except BaseException as e:  # the last metrics rows flushed into a full disk
            self._raise_write_error(exc or e)
            raise
        self._raise_write_error(exc)

    def _raise_write_error(self, e: BaseException | None) -> None:  # disk full, read-only: one line
        if (err := write_error(e, self.out, f"{self._last_good()}; the same command resumes once it can write")):
            raise err from e

    def _open(self) -> None:
        self.config.validate()
        self._peak = PeakWindow()
        self._stack.callback(self._peak.close)
        if not self.main:
            self._open_follower()
            return
        try:
            os.makedirs(self.out, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"out {self.out!r}: cannot create the output directory ({e.strerror})") from e
        probe_writable(self.out)  # a read-only OUT is one line now, not an error after the first steps
        self._lock.acquire()
        self._stack.callback(self._lock.release)
        for name in os.listdir(self.out):  # temp files of a writer that died (we hold the lock)
            if is_temp_file(name):
                remove_temp(self.path(name))
        self._hash_inputs()
        seed_everything(self.config.seed)
        ckpt, metrics = self.path(CHECKPOINT_FILE), self.path(METRICS_FILE)
        rows = []
        if self.config.resume and os.path.isfile(ckpt):
            self._pending = self._vet(self._read_checkpoint(mmap=True))  # a refusal leaves OUT untouched
            rows = [r for r in read_metrics(metrics) if r["step"] <= self._pending["step"]]
            atomic_write(metrics, lambda f: f.write("".join(dumps(r) + "\n" for r in rows).encode()))
        else:  # a fresh run: an old checkpoint must not be resumed if this one dies before its first
            for path in (ckpt, metrics):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path(RESULT_FILE))  # describes an earlier run
        self._stack.callback(self._events.close)
        self._events.restart(rows)
        self._metrics = open(metrics, "a", encoding="utf-8")
        self._stack.callback(self._metrics.close)
        write_json(self.path(CONFIG_FILE), {"stage": self.stage, "config": self.config.to_dict()})
        self._stack.enter_context(hub_progress(self.config.progress))

    def _hash_inputs(self) -> None:
        for label, path in self.config.input_paths().items():
            try:
                self.inputs[label] = {"path": path, "sha256": sha256_file(path), "bytes": os.path.getsize(path)}
            except OSError as e:
                raise ConfigError(f"{label} {path!r}: cannot read ({e.strerror})") from e

    def _open_follower(self) -> None:
        """A non-main rank: hash the inputs, seed, and vet the checkpoint to resume (read-only)."""
        self._hash_inputs()
        seed_everything(self.config.seed)
        if self.config.resume and os.path.isfile(self.path(CHECKPOINT_FILE)):
            self._pending = self._vet(self._read_checkpoint(mmap=True))
        self._stack.enter_context(hub_progress(self.config.progress))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._stack.close()

    # ---- checkpoint: read and vet -------------------------------------------------------------

    def _read_checkpoint(self, mmap: bool) -> dict:
        path = self.path(CHECKPOINT_FILE)
        advice = "delete it or rerun with --no-resume"
        if os.path.getsize(path) == 0:
            raise CheckpointError(f"{path}: empty file, not a checkpoint; {advice}")
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"{path}: truncated or not a checkpoint; {advice}")
        try:
            if mmap and (bad := zipfile.ZipFile(path).testzip()) is not None:  # torch.load checks no CRC
                raise CheckpointError(f"{path}: corrupt checkpoint ({bad} fails its CRC check); {advice}")
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except CheckpointError:
            raise
        except Exception as e:  # a damaged file can fail in many ways inside torch.load and pickle
            detail = (str(e).splitlines() or [""])[0][:120]
            raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {detail}); {advice}") from e
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            found = state.get("format") if isinstance(state, dict) else None
            raise CheckpointError(
                f"{path}: not a checkpoint of format {CHECKPOINT_FORMAT} (found {found!r}); {advice}"
            )
        missing = sorted(set(_CHECKPOINT_KEYS) - set(state))
        if missing:
            raise CheckpointError(f"{path}: incomplete checkpoint (no {', '.join(missing)}); {advice}")
        return state

    def _vet(self, state: dict) -> dict:
        """Refuse a checkpoint of another stage, config or input data; return its metadata."""
        path = self.path(CHECKPOINT_FILE)
        advice = "use another --out or --no-resume"
        if state["stage"] != self.stage:
            raise CheckpointError(f"{path}: written by stage {state['stage']!r}, not {self.stage!r}; {advice}")
        saved, current = _flatten(state["config"]), _flatten(self.config.to_dict())
        skip = set(self.config.RESUMABLE_CHANGES) | set(self.config.INPUT_FILES)
        changed = [k for k in sorted(saved.keys() | current.keys()) if k not in skip and saved.get(k) != current.get(k)]
        if changed:
            what = ", ".join(f"{k} {short_repr(saved.get(k))} -> {short_repr(current.get(k))}" for k in changed[:3])
            more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
            raise StaleCheckpointError(f"{path}: written with a different config ({what}{more}); {advice}")
        for name, now in self.inputs.items():
            then = state["inputs"].get(name)
            if then is None or then["sha256"] != now["sha256"]:
                was = "absent" if then is None else f"sha256 {then['sha256'][:12]}..."
                raise StaleCheckpointError(
                    f"{path}: {name} file {now['path']!r} changed since the checkpoint "
                    f"({was}, now {now['sha256'][:12]}...); {advice}"
                )
        self.last_checkpoint = state["step"]
        return {"step": state["step"], "data": state["data"]}

    # ---- what a checkpoint carries ----------------------------------------------------------------

    def track(self, **objects) -> None:
        """Register state the checkpoint carries: named tensors (e.g. `weights=[(name, param), ...]`,
        saved as copies and restored in place) or anything with state_dict / load_state_dict
        (optimizer, scheduler, KL controller, reward normaliser, an nn.Module)."""
        for name, obj in objects.items():
            self._tracked[name] = as_tracked(name, obj)

    def data_order(self, n: int, batch_size: int, name: str = "data") -> DataOrder:
        """The seeded order of n items in batches; its size and position go into the checkpoint."""
        order = DataOrder(n, batch_size, self.config.seed, name)
        self._orders[name] = order
        return order

    def resume(self) -> int:
        """Restore every tracked state, the data position and the RNG states from the vetted
        checkpoint, after everything tracked is built and right before the loop. Returns the step
        to start from (0 for a fresh run)."""
        if self._pending is None:
            return self.start
        path, advice = self.path(CHECKPOINT_FILE), "use another --out or --no-resume"
        state = self._read_checkpoint(mmap=False)
        if state["step"] != self._pending["step"]:
            raise CheckpointError(f"{path}: changed while this run held OUT; {advice}")
        self._pending = None
        if set(state["state"]) != set(self._tracked):
            raise CheckpointError(
                f"{path}: holds {', '.join(sorted(state['state']))}; this run tracks "
                f"{', '.join(sorted(self._tracked))}; {advice}"
            )
        if set(state["data"]) != set(self._orders):
            raise CheckpointError(f"{path}: data orders {sorted(state['data'])}, this run has {sorted(self._orders)}")
        for name, order in self._orders.items():
            then = {k: state["data"][name][k] for k in ("n", "batch_size", "seed")}
            if then != order.describe():
                raise CheckpointError(f"{path}: {name} order was {then}, now {order.describe()}; {advice}")
        for name, obj in self._tracked.items():
            try:
                obj.load_state_dict(state["state"][name])
            except (KeyError, ValueError, RuntimeError, TypeError) as e:
                detail = (str(e).splitlines() or [""])[0][:120]
                raise CheckpointError(f"{path}: cannot restore {name} ({detail}); {advice}") from e
        set_rng_state(state["rng"])
        self.start = self.step = state["step"]
        return self.start

    def checkpoint(self, step: int) -> None:
        """Write OUT/checkpoint.pt for `step` steps done, atomically. Refuses (NonFiniteError) when a
        tracked tensor holds a NaN or inf: the last good checkpoint stays."""
        state = {name: obj.state_dict() for name, obj in self._tracked.items()}
        bad = first_non_finite(state)
        if bad is not None:
            raise NonFiniteError(f"step {step}: {bad} is not finite; {self._last_good()}")
        if not self.main:
            self.last_checkpoint = step
            return
        payload = {
            "format": CHECKPOINT_FORMAT,
            "stage": self.stage,
            "step": step,
            "config": self.config.to_dict(),
            "inputs": self.inputs,
            "data": {name: {**o.describe(), **o.position(step)} for name, o in self._orders.items()},
            "state": state,
            "rng": rng_state(),
        }
        self._metrics.flush()  # every row up to this step is on disk before the checkpoint is
        os.fsync(self._metrics.fileno())
        atomic_write(self.path(CHECKPOINT_FILE), lambda f: save_through(f, lambda g: torch.save(payload, g)))
        self.last_checkpoint = step

    def _last_good(self) -> str:
        if self.last_checkpoint is None:
            return "stopped; no checkpoint was written yet"
        return f"stopped; the last good checkpoint is {self.path(CHECKPOINT_FILE)} (step {self.last_checkpoint})"

    # ---- the loop ---------------------------------------------------------------------------------

    def steps(self, total: int) -> Iterator[int]:
        """0-based step indices from the resumed step to `total`, behind a progress bar."""
        self.total = total
        self._bar = bar(total, self.stage, enabled=self.config.progress and self.main, unit="step",
                        initial=min(self.start, total))
        for step in range(self.start, total):
            self.step = step
            yield step

    def due(self, step: int, every: int) -> bool:
        """`step` steps done is a multiple of `every` (0: never), or the last step."""
        return (every > 0 and step % every == 0) or step == self.total

    def check_finite(self, **values) -> None:
        """Stop the run (NonFiniteError naming the step and the last good checkpoint) when any value
        (a float or a tensor) is NaN or inf; None is skipped."""
        for name, value in values.items():
            if value is None:
                continue
            v = float(value) if isinstance(value, torch.Tensor) and value.numel() == 1 else value
            bad = first_non_finite(v)
            if bad is not None:
                shown = v if isinstance(v, float) else "a NaN or inf entry"
                raise NonFiniteError(f"step {self.step + 1}: {name} is {shown}; {self._last_good()}")

    def optimizer_step(self, optimizer, params, max_grad_norm: float = 0.0, scheduler=None, loss=None) -> float:
        """After the backward pass(es): the gradient norm (clipped to max_grad_norm when > 0), the
        non-finite guard on it and on `loss` (before anything changes), then the optimizer and
        scheduler steps. Returns the norm before clipping."""
        params = [p for p in params if p.grad is not None]
        if loss is not None:
            self.check_finite(loss=loss.detach())
        if not params:
            grad_norm = torch.zeros(())
        elif max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        self.check_finite(grad_norm=grad_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        return float(grad_norm)

    def update(self, loss: torch.Tensor, optimizer, params, max_grad_norm: float = 0.0, scheduler=None) -> float:
        """One optimizer update from one loss: zero grads, backward, then optimizer_step."""
        params = list(params)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return self.optimizer_step(optimizer, params, max_grad_norm, scheduler, loss=loss)

    def log(self, step: int, row: Mapping) -> None:
        """One metrics row ({"step": step, **row, "elapsed_s": ...}) as strict JSON, flushed; the same
        numbers to TensorBoard (OUT/tensorboard) when the tensorboard package is installed."""
        if not self.main:
            return
        values = {k: v for k, v in row.items() if k != "step"}
        line = dumps({"step": step, **values, "elapsed_s": round(time.perf_counter() - self._t0, 3)})
        self._metrics.write(line + "\n")
        self._metrics.flush()
        self._events.add(json.loads(line))

    def logged_rows(self) -> list[dict]:
        """The metrics rows written so far (a resumed run's kept rows included), e.g. a step-0 baseline
        that a resumed run did not compute again."""
        if self._metrics is not None:
            self._metrics.flush()
        return read_metrics(self.path(METRICS_FILE))

    def end_step(self, step: int, row: Mapping | None = None, *, log: bool = False) -> None:
        """After the update that makes `step` steps done: the metrics row when `step` is a multiple
        of log_every, the last step, or `log` is set; a checkpoint when it is a multiple of
        checkpoint_every or the last step; the progress bar."""
        if row is not None and (log or self.due(step, self.config.log_every)):
            self.log(step, row)
        if self.due(step, self.config.checkpoint_every):
            self.checkpoint(step)
        if self._bar is not None:
            if row is not None:
                shown = {k: plain(row[k]) for k in self.progress_keys if k in row}
                self._bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in shown.items()})
            self._bar.update(1)

    # ---- outputs ----------------------------------------------------------------------------------

    def write_json(self, name: str, obj) -> str:
        """OUT/name as strict JSON, written atomically (by the main process); returns its path."""
        path = self.path(name)
        if self.main:
            write_json(path, obj)
        return path

    def finish(self, result) -> str:
        """OUT/result.json (a dict or dataclass), the mark of a completed run; returns its path. A
        StageResult gets the run's memory peaks (peak_mem_mib: CUDA's when the run used CUDA, else the
        resident set's; peak_rss_mib), which the per-step resets of the rows' peaks do not lose."""
        if isinstance(result, StageResult) and self._peak is not None:
            rss, cuda = self._peak.peak_mib("cpu"), self._peak.peak_mib("cuda")
            result.peak_rss_mib = rss
            result.peak_mem_mib = cuda if cuda is not None else rss
        return self.write_json(RESULT_FILE, result)
