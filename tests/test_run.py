"""The run machinery (rlhf_engine.core.run) on a toy stage: OUT lock, atomic checkpoints under SIGKILL,
bit-exact resume, refusals (data content, config, damaged checkpoint), metrics JSONL, strict JSON, the
non-finite guard, the seeded data order, progress.

The toy stage is a regression whose loss draws on python, numpy and torch randomness and on a tracked
trainer state, with an optimizer and a scheduler: forgetting to checkpoint or restore any of them makes
a resumed run differ from the uninterrupted one. Run as a script (`python tests/test_run.py CONFIG`)
it trains in a child process, which the SIGKILL test kills."""

import hashlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from rlhf_engine.core.config import RunConfig
from rlhf_engine.core.files import CHECKPOINT_FILE, METRICS_FILE, RESULT_FILE, atomic_write, dumps, read_metrics
from rlhf_engine.core.lock import LOCK_FILE, OutputLock
from rlhf_engine.core.order import DataOrder, epoch_seed, seeded_permutation
from rlhf_engine.core.run import Run
from rlhf_engine.errors import CheckpointError, ConfigError, NonFiniteError, RunLockedError

# ---- the toy stage ----------------------------------------------------------------------------------


@dataclass
class ToyConfig(RunConfig):
    """A regression stage with just enough in it to use every part of the machinery."""

    data: str = ""  # one number per line: offsets of the regression targets
    steps: int = 12  # optimizer steps
    lr: float = 1e-2  # AdamW learning rate (decayed by the scheduler)
    batch_size: int = 3  # items per step; 7 items -> 3 steps per epoch, the last one short
    max_grad_norm: float = 1.0  # clipping; 0 disables it
    ballast_mb: int = 0  # tracked zeros, so that one checkpoint write takes a while (SIGKILL test)

    INPUT_FILES = ("data",)
    RESUMABLE_CHANGES = RunConfig.RESUMABLE_CHANGES + ("steps",)


class RunningScale:
    """Trainer state a stage registers (as PPO would a KL controller): a running mean scaling the loss."""

    def __init__(self):
        self.mean, self.count = 1.0, 0

    def update(self, x: float) -> None:
        self.count += 1
        self.mean += (x - self.mean) / self.count

    def state_dict(self) -> dict:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.count = state["mean"], state["count"]


def train_toy(config: ToyConfig, main: bool = True) -> dict[str, torch.Tensor]:
    """The toy stage; returns copies of the final weights. main=False: a non-main data-parallel rank."""
    with Run("toy", config, main=main) as run:
        # step 1. data: targets from the file, inputs from the seeded torch RNG
        with open(config.data) as f:
            offsets = torch.tensor([float(x) for x in f.read().split()])
        x = torch.randn(len(offsets), 8)
        y = x.sum(dim=1) + offsets
        order = run.data_order(len(offsets), config.batch_size)

        # step 2. model, optimizer, scheduler, trainer state: all tracked
        model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.25), nn.Linear(16, 1))
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (1 + 0.1 * s))
        scale = RunningScale()
        ballast = nn.Module()
        ballast.register_buffer("zeros", torch.zeros(config.ballast_mb * 2**18))
        run.track(
            weights=model.named_parameters(), optimizer=optimizer, scheduler=scheduler, scale=scale, ballast=ballast
        )
        run.resume()

        for step in run.steps(config.steps):
            # step 3. the loss: python and numpy noise, torch dropout, the tracked scale
            idx = order.batch(step)
            noise = random.gauss(0, 0.1) + float(np.random.normal(0, 0.1))
            pred = model(x[idx]).squeeze(-1)
            loss = ((pred - y[idx] - noise) ** 2).mean() / scale.mean

            # step 4. update
            grad_norm = run.update(loss, optimizer, model.parameters(), config.max_grad_norm, scheduler)
            scale.update(loss.item())

            # step 5. log, checkpoint
            run.end_step(step + 1, {"loss": loss, "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0]})
        run.finish({"steps": config.steps, "scale": scale.mean})
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def toy(tmp_path, out="out", **kw) -> ToyConfig:
    data = tmp_path / "offsets.txt"
    if not data.exists():
        data.write_text("0.5\n-1.0\n2.0\n0.0\n1.5\n-0.5\n3.0\n")
    kw.setdefault("progress", False)
    return ToyConfig(data=str(data), out=str(tmp_path / out), **kw)


def strict_rows(path) -> list[dict]:
    """Every line of a JSONL file as strict JSON (NaN / Infinity tokens raise)."""
    text = open(path).read()
    assert text.endswith("\n")
    return [json.loads(line, parse_constant=_no_constant) for line in text.splitlines()]


def _no_constant(name):
    raise AssertionError(f"{name} in JSON")


def without_time(rows):
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    diff = {k: (a[k] - b[k]).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not diff, f"weights differ (max abs diff per tensor): {diff}"


def load_checkpoint(out) -> dict:
    return torch.load(os.path.join(out, CHECKPOINT_FILE), weights_only=True)


# ---- checkpoint contents and bit-exact resume -------------------------------------------------------


def test_resume_repeats_the_uninterrupted_run_bit_for_bit(tmp_path):
    straight = train_toy(toy(tmp_path, "straight", steps=12, checkpoint_every=100))

    # stop after 5 steps (2 epochs of 3 steps, less one), then resume to 12: steps is resumable
    train_toy(toy(tmp_path, "split", steps=5, checkpoint_every=100))
    ckpt = load_checkpoint(tmp_path / "split")
    resumed = train_toy(toy(tmp_path, "split", steps=12, checkpoint_every=100))
    assert_same_weights(straight, resumed)
    rows = strict_rows(tmp_path / "split" / METRICS_FILE)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert without_time(rows) == without_time(strict_rows(tmp_path / "straight" / METRICS_FILE))
    # the resumed run really started at step 5: a fresh 12-step run on the checkpoint's out differs
    assert not all(torch.equal(ckpt["state"]["weights"][k], resumed[k]) for k in resumed)

    # what the checkpoint holds
    data = tmp_path / "offsets.txt"
    assert ckpt["format"] == 1 and ckpt["stage"] == "toy" and ckpt["step"] == 5
    assert ckpt["config"]["lr"] == 1e-2 and ckpt["config"]["steps"] == 5
    assert ckpt["inputs"]["data"] == {
        "path": str(data), "sha256": hashlib.sha256(data.read_bytes()).hexdigest(), "bytes": data.stat().st_size
    }
    assert set(ckpt["state"]) == {"weights", "optimizer", "scheduler", "scale", "ballast"}
    assert set(ckpt["state"]["weights"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert len(ckpt["state"]["optimizer"]["state"]) == 4 and ckpt["state"]["scheduler"]["last_epoch"] == 5
    assert ckpt["state"]["scale"]["count"] == 5
    assert set(ckpt["rng"]) == {"python", "numpy", "torch", "cuda"}
    assert len(ckpt["rng"]["cuda"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    # 7 items in batches of 3: 3 steps per epoch; 5 steps done -> epoch 1, next item at offset 2 * 3
    assert ckpt["data"]["data"] == {"n": 7, "batch_size": 3, "seed": 0, "epoch": 1, "offset": 6}
    assert json.loads((tmp_path / "split" / RESULT_FILE).read_text())["steps"] == 12


def test_a_follower_rank_resumes_read_only_and_writes_nothing(tmp_path):
    # Data parallel: rank 0 owns OUT; another rank resumes from the same checkpoint, takes no lock and
    # writes nothing, and ends where the uninterrupted run ends.
    straight = train_toy(toy(tmp_path, "straight", steps=12, checkpoint_every=100))
    train_toy(toy(tmp_path, "shared", steps=5, checkpoint_every=100))
    out = tmp_path / "shared"
    before = {name: (out / name).read_bytes() for name in (CHECKPOINT_FILE, METRICS_FILE, RESULT_FILE)}
    lock = OutputLock(str(out))
    lock.acquire()  # rank 0 holds OUT meanwhile
    try:
        follower = train_toy(toy(tmp_path, "shared", steps=12, checkpoint_every=4), main=False)
    finally:
        lock.release()
    assert_same_weights(straight, follower)
    assert {name: (out / name).read_bytes() for name in before} == before
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def child_training(cfg: dict) -> subprocess.Popen:
    """The toy stage in a child process (this file run as a script)."""
    return subprocess.Popen([sys.executable, "-P", __file__, json.dumps(cfg)], stderr=subprocess.PIPE, text=True)


def wait_for(condition, child, what, timeout=60.0, poll=0.0005):
    deadline = time.monotonic() + timeout
    while not condition():
        if child.poll() is not None:
            raise AssertionError(f"the child exited ({child.returncode}) before {what}: {child.stderr.read()}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


def early_temp_file(out) -> bool:
    """A checkpoint temp file exists and holds less than a quarter of the 64 MB it will."""
    for name in os.listdir(out):
        if name.endswith(".tmp"):
            try:
                return os.path.getsize(out / name) < 16 * 2**20
            except FileNotFoundError:  # renamed meanwhile
                return False
    return False


def test_sigkill_during_a_checkpoint_write_and_a_held_lock(tmp_path):
    cfg = toy(tmp_path, "killed", steps=40, checkpoint_every=1, ballast_mb=64)
    out = tmp_path / "killed"
    child = child_training(cfg.to_dict())
    try:
        wait_for(lambda: (out / CHECKPOINT_FILE).exists(), child, "the first checkpoint", poll=0.01)
        # the child holds OUT: a second run fails at once, naming the child
        with pytest.raises(RunLockedError, match=f"^{re.escape(str(out))} is in use by pid {child.pid}$"):
            with Run("toy", cfg):
                pass
        # kill it early in writing a checkpoint (64 MB of ballast: ~0.15 s per write), so the kill
        # surely lands before the rename
        wait_for(lambda: early_temp_file(out), child, "a checkpoint write")
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    left = [n for n in os.listdir(out) if n.endswith(".tmp")]
    assert left and left[0].startswith(f".{CHECKPOINT_FILE}.{child.pid}."), left  # killed mid-write
    killed_at = load_checkpoint(out)["step"]  # the previous checkpoint is whole
    assert 1 <= killed_at < 40

    # the dead child's lock does not block; its temp file is cleaned up; the result is bit-exact
    resumed = train_toy(ToyConfig(**{**cfg.to_dict(), "checkpoint_every": 1000}))
    straight = train_toy(ToyConfig(**{**cfg.to_dict(), "out": str(tmp_path / "straight"), "checkpoint_every": 1000}))
    assert_same_weights(straight, resumed)
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    rows, straight_rows = strict_rows(out / METRICS_FILE), strict_rows(tmp_path / "straight" / METRICS_FILE)
    assert without_time(rows) == without_time(straight_rows)
    assert (out / LOCK_FILE).read_text() == ""  # released cleanly: no stale pid


# ---- the lock and atomic writes ---------------------------------------------------------------------


def test_a_second_run_on_the_same_out_fails_fast(tmp_path):
    cfg = toy(tmp_path)
    with Run("toy", cfg):
        assert (tmp_path / "out" / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        # flock belongs to an open file description: a second Run in this very process is refused too
        with pytest.raises(RunLockedError, match=f"is in use by pid {os.getpid()}$"):
            with Run("toy", cfg):
                pass
    with Run("toy", cfg):  # released on exit
        pass
    # an exception inside the run releases the lock as well
    with pytest.raises(KeyError):
        with Run("toy", cfg):
            raise KeyError
    lock = OutputLock(str(tmp_path / "out"))
    lock.acquire()
    lock.release()


def test_concurrent_writers_never_share_a_temp_file(tmp_path):
    # two writers of one file, both mid-write at the same moment: with a shared temp name the second
    # would truncate the first's bytes and one os.replace would find no file
    target = str(tmp_path / CHECKPOINT_FILE)
    both_started = threading.Barrier(2, timeout=10)
    errors = []

    def writer(byte: bytes):
        def write(f):
            f.write(byte * 5000)
            f.flush()
            both_started.wait()
            f.write(byte * 5000)

        try:
            atomic_write(target, write)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(b,)) for b in (b"a", b"b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert open(target, "rb").read() in (b"a" * 10000, b"b" * 10000)
    assert os.listdir(tmp_path) == [CHECKPOINT_FILE]


# ---- refusals ---------------------------------------------------------------------------------------


def test_changed_data_content_is_refused_even_at_the_same_path(tmp_path):
    train_toy(toy(tmp_path, steps=3))
    data = tmp_path / "offsets.txt"
    original = data.read_text()
    data.write_text(original.replace("2.0", "-2.0"))  # same path, same size class, other content
    with pytest.raises(CheckpointError, match=r"data file .* changed since the checkpoint \(sha256 [0-9a-f]{12}"):
        train_toy(toy(tmp_path, steps=6))
    # the same bytes under another path resume
    moved = tmp_path / "moved.txt"
    moved.write_text(original)
    cfg = toy(tmp_path, steps=6)
    cfg.data = str(moved)
    train_toy(cfg)
    assert [r["step"] for r in strict_rows(tmp_path / "out" / METRICS_FILE)] == [1, 2, 3, 4, 5, 6]


def test_changed_config_or_stage_is_refused(tmp_path):
    train_toy(toy(tmp_path, steps=2))
    refused = r"different config \(lr 0\.01 -> 0\.02\); use another --out or --no-resume"
    with pytest.raises(CheckpointError, match=refused):
        train_toy(toy(tmp_path, steps=4, lr=0.02))
    with pytest.raises(CheckpointError, match="written by stage 'toy', not 'sft'"):
        with Run("sft", toy(tmp_path)):
            pass
    # resume=False starts over and removes the old checkpoint at once: a crash before the new run's
    # first checkpoint must not let a later run resume the old one
    with pytest.raises(KeyboardInterrupt):
        with Run("toy", toy(tmp_path, lr=0.02, resume=False)):
            raise KeyboardInterrupt
    assert not (tmp_path / "out" / CHECKPOINT_FILE).exists()
    train_toy(toy(tmp_path, steps=1, lr=0.02))
    assert load_checkpoint(tmp_path / "out")["config"]["lr"] == 0.02


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b"", "empty file, not a checkpoint"),
        (lambda b: b[: len(b) // 2], "truncated or not a checkpoint"),
        (lambda b: b"\x00" * 100, "truncated or not a checkpoint"),
        (None, r"not a checkpoint of format 1 \(found None\)"),  # a torch file, not ours
    ],
)
def test_a_damaged_checkpoint_is_one_clear_error(tmp_path, damage, message):
    train_toy(toy(tmp_path, steps=2))
    path = tmp_path / "out" / CHECKPOINT_FILE
    if damage is None:
        torch.save({"weights": torch.zeros(2)}, path)
    else:
        path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=f"{message}.*--no-resume"):
        train_toy(toy(tmp_path, steps=4))
    train_toy(toy(tmp_path, steps=4, resume=False))  # the advice works
    assert load_checkpoint(tmp_path / "out")["step"] == 4


# ---- metrics ----------------------------------------------------------------------------------------


def test_metrics_rows_past_the_checkpoint_and_a_partial_last_line_are_dropped(tmp_path):
    train_toy(toy(tmp_path, steps=4, checkpoint_every=3))  # checkpoints at 3 and 4 (the last)
    metrics = tmp_path / "out" / METRICS_FILE
    with metrics.open("a") as f:  # a crash after step 5 was logged, while step 6 was being written
        f.write(json.dumps({"step": 5, "loss": 123.0}) + "\n" + '{"step": 6, "lo')
    assert [r["step"] for r in read_metrics(str(metrics))] == [1, 2, 3, 4, 5]  # tolerated, not parsed
    train_toy(toy(tmp_path, steps=7, checkpoint_every=3))
    rows = strict_rows(metrics)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert all(r["loss"] != 123.0 for r in rows)

    # a damaged line that is not the last is an error naming it, never a traceback
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(lines[:2] + ['{"step": 3, "loss": NaN}\n'] + lines[3:]))
    with pytest.raises(CheckpointError, match=f"{re.escape(str(metrics))}:3: not a metrics row"):
        train_toy(toy(tmp_path, steps=8, checkpoint_every=3))


def test_json_is_strict(tmp_path):
    row = {"a": math.nan, "b": -math.inf, "t": torch.tensor(math.inf), "n": np.float32(1.5), "l": [1.0, math.nan]}
    assert json.loads(dumps(row)) == {"a": None, "b": None, "t": None, "n": 1.5, "l": [1.0, None]}
    with Run("toy", toy(tmp_path)) as run:
        run.log(1, {"loss": torch.tensor(math.nan), "x": 2})
        run.finish({"eval_loss": math.inf})
    assert strict_rows(tmp_path / "out" / METRICS_FILE)[0]["loss"] is None
    assert json.loads((tmp_path / "out" / RESULT_FILE).read_text(), parse_constant=_no_constant) == {"eval_loss": None}


# ---- the non-finite guard ---------------------------------------------------------------------------


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    # lr 1e30: step 1 moves the weights to ~1e30 (finite), step 2's loss overflows
    with pytest.raises(NonFiniteError) as e:
        train_toy(toy(tmp_path, steps=10, lr=1e30, checkpoint_every=1))
    message = str(e.value)
    m = re.fullmatch(r"step (\d+): loss is (nan|inf); stopped; the last good checkpoint is (.+) \(step (\d+)\)",
                     message)
    assert m, message
    failed, path, good = int(m[1]), m[3], int(m[4])
    assert failed == 2 and good == 1 and path == str(tmp_path / "out" / CHECKPOINT_FILE)
    ckpt = load_checkpoint(tmp_path / "out")
    assert ckpt["step"] == good
    assert all(torch.isfinite(t).all() for t in ckpt["state"]["weights"].values())
    assert [r["step"] for r in strict_rows(tmp_path / "out" / METRICS_FILE)] == [1]
    assert not (tmp_path / "out" / RESULT_FILE).exists()
    assert NonFiniteError.exit_status == 3


def test_non_finite_gradient_norm_and_weights_are_caught(tmp_path):
    with Run("toy", toy(tmp_path, checkpoint_every=1)) as run:
        w = nn.Parameter(torch.tensor([1.0]))
        optimizer = torch.optim.SGD([w], lr=0.1)
        run.track(weights=[("w", w)], optimizer=optimizer)
        for step in run.steps(3):
            if step == 0:  # a finite loss whose gradient is inf: d sqrt(u) / du at u = 0
                loss = torch.sqrt(w - w.detach()).sum()
                with pytest.raises(NonFiniteError, match=r"^step 1: grad_norm is inf; stopped; no checkpoint"):
                    run.update(loss, optimizer, [w], max_grad_norm=0.0)
                assert w.item() == 1.0  # stopped before the optimizer step
                run.update((w * 2).sum(), optimizer, [w])
                run.end_step(1)
                assert load_checkpoint(tmp_path / "out")["step"] == 1
            else:  # a weight gone NaN is never checkpointed
                with torch.no_grad():
                    w.fill_(math.nan)
                with pytest.raises(NonFiniteError, match=r"^step 2: weights\.w is not finite; .*\(step 1\)$"):
                    run.end_step(2)
                break
    assert load_checkpoint(tmp_path / "out")["state"]["weights"]["w"].item() == pytest.approx(0.8)


# ---- config, data order, progress -------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(lr=math.inf), "lr=inf: not a finite number"),
        (dict(lr=math.nan), "lr=nan: not a finite number"),
        (dict(seed=-1), "seed=-1: expected an integer with 0 <= seed < 2\\*\\*63"),
        (dict(seed=2**63), "seed=9223372036854775808: expected"),
        (dict(steps=10**400), r"steps=10000000000.*\.\.\.0+ \(401 characters\): outside the int64 range"),
        (dict(checkpoint_every=0), "log_every=1, checkpoint_every=0: both must be >= 1"),
    ],
)
def test_config_values_are_validated(tmp_path, change, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        toy(tmp_path, **change).validate()


def test_out_must_be_creatable(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        toy(tmp_path, out="file/run").validate()
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        toy(tmp_path, out="file").validate()
    cfg = toy(tmp_path)
    cfg.out = "/proc/rlhf-engine-run"
    with pytest.raises(ConfigError, match="^out '/proc/rlhf-engine-run': cannot create the output directory"):
        with Run("toy", cfg):
            pass


def test_data_order_is_a_pure_function_of_seed_and_epoch():
    order = DataOrder(7, 3, seed=11)
    assert order.steps_per_epoch == 3
    epochs = [[i for s in range(3 * e, 3 * e + 3) for i in order.batch(s)] for e in range(3)]
    assert all(sorted(e) == list(range(7)) for e in epochs)  # each epoch visits every item once
    assert [len(order.batch(s)) for s in range(3)] == [3, 3, 1]
    assert epochs[0] != epochs[1] != epochs[2]
    assert DataOrder(7, 3, seed=11).batch(7) == order.batch(7)  # a fresh object (a resumed run) agrees
    assert DataOrder(7, 3, seed=12).batch(0) != order.batch(0) or DataOrder(7, 3, seed=12).batch(1) != order.batch(1)
    # any valid seed works; the old seed * 1000003 + epoch overflowed torch's seed range
    for seed in (0, 2**63 - 1):
        perm = seeded_permutation(1000, seed, epoch=10**6)
        assert sorted(perm) == list(range(1000)) and perm == seeded_permutation(1000, seed, epoch=10**6)
        assert 0 <= epoch_seed(seed, 10**6) < 2**63


def test_progress_bar_only_when_enabled(tmp_path, capsys):
    train_toy(toy(tmp_path, "quiet", steps=3))
    assert capsys.readouterr().err == ""
    train_toy(toy(tmp_path, "bar", steps=3, progress=True))
    err = capsys.readouterr().err
    assert "toy: 100%" in err and "3/3" in err and "loss=" in err


if __name__ == "__main__":  # the SIGKILL test's child
    train_toy(ToyConfig(**json.loads(sys.argv[1])))


def test_metrics_also_go_to_tensorboard_when_installed(tmp_path, monkeypatch):
    # tensorboard is not part of the pinned stack: a stand-in SummaryWriter records what the run writes
    import importlib.util
    import types

    written = []

    class Writer:
        def __init__(self, logdir):
            written.append(("dir", logdir))

        def add_scalar(self, tag, value, step):
            written.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            written.append(("closed",))

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "tensorboard" else real_find_spec(name, *a))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    train_toy(toy(tmp_path, steps=2))
    assert written[0] == ("dir", str(tmp_path / "out" / "tensorboard")) and written[-1] == ("closed",)
    losses = [(v, s) for tag, *rest in written[1:-1] if tag == "toy/loss" for v, s in [rest]]
    rows = read_metrics(tmp_path / "out" / METRICS_FILE)
    assert losses == [(r["loss"], r["step"]) for r in rows]


def tensorboard_steps(out) -> dict[str, list[int]]:
    """tag -> the steps of its scalars, over every event file in OUT/tensorboard, as TensorBoard's own
    reader gives them (every event, so an old run's or a repeated step shows)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps: dict[str, list[int]] = {}
    directory = os.path.join(out, "tensorboard")
    for name in sorted(os.listdir(directory)):
        for event in EventFileLoader(os.path.join(directory, name)).Load():
            for value in event.summary.value:
                steps.setdefault(value.tag, []).append(event.step)
    return {tag: sorted(s) for tag, s in steps.items()}


def test_tensorboard_events_follow_metrics_jsonl_across_a_resume_and_a_fresh_start(tmp_path, monkeypatch):
    # issue 21: a resumed run repeated the steps past its checkpoint in the curves, and --no-resume kept the
    # old run's event files beside the new ones
    pytest.importorskip("tensorboard")
    real_end_step = Run.end_step

    def crash_after_step_5(self, step, row=None, **kw):
        real_end_step(self, step, row, **kw)
        if step == 5:  # rows 1-5 logged, the last checkpoint at step 3
            raise KeyboardInterrupt

    monkeypatch.setattr(Run, "end_step", crash_after_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_toy(toy(tmp_path, steps=6, checkpoint_every=3))
    assert tensorboard_steps(tmp_path / "out")["toy/loss"] == [1, 2, 3, 4, 5]
    monkeypatch.undo()
    train_toy(toy(tmp_path, steps=6, checkpoint_every=3))  # resumes at 3
    steps = tensorboard_steps(tmp_path / "out")
    assert steps["toy/loss"] == [r["step"] for r in read_metrics(tmp_path / "out" / METRICS_FILE)] == [1, 2, 3, 4, 5, 6]
    assert all(s == [1, 2, 3, 4, 5, 6] for s in steps.values()), steps
    train_toy(toy(tmp_path, steps=2, resume=False))  # a fresh start: the old curves are gone
    assert tensorboard_steps(tmp_path / "out")["toy/loss"] == [1, 2]


# ---- memory peaks ---------------------------------------------------------------------------------


def test_a_peak_window_keeps_the_run_peak_across_step_resets():
    # A step's peak restarts at reset_peak_memory (the rows' peak_mem_mib), the run's must not: a
    # 256 MiB spike in one "step" stays in the window after the next step's reset. (256 MiB: far
    # above glibc's largest mmap threshold, 32 MiB, so the free returns it to the kernel at once.)
    from rlhf_engine.core.device import PeakWindow, peak_memory_mib, reset_peak_memory

    cpu = torch.device("cpu")
    window = PeakWindow()
    try:
        start = window.peak_mib("cpu")
        reset_peak_memory(cpu)
        spike = torch.ones(256 * 2**20 // 4)  # written: resident
        del spike
        assert peak_memory_mib(cpu) >= start + 250
        reset_peak_memory(cpu)  # the next step
        assert peak_memory_mib(cpu) < start + 100
        assert window.peak_mib("cpu") >= start + 250
    finally:
        window.close()
