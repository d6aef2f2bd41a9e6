"""Whole trainer steps side by side with TRL: python -m bench trainers [--quick] [--kinds dpo,grpo,...]
[--threads 1,2] [--repeats N] [--warmup W] [--steps N] [--model DIR] [--peer-python PATH] [--json PATH]

One steady-state optimizer step of our trainers (rlhf_engine: train_dpo, train_ppo, train_sft,
train_reward_model) and of TRL's (DPOTrainer, GRPOTrainer, SFTTrainer, RewardTrainer) on identical
settings, every run in its own process: ours with this interpreter (.venv), TRL's with the peer
environment's (.venv-bench, `make bench-venv`; TRL never enters requirements.txt). `make bench-trainers`
builds both and runs this. Both sides get:
  - the same base: one save_pretrained directory (default: the small-llama-32k preset, seed 0, saved
    once; --quick: tiny-llama; --model DIR: any causal LM directory), NF4 with double quant, fp32
    compute, on CPU; bitsandbytes' avx512-bf16 CPU repack off on both (rlhf_engine.model.loading explains why);
  - LoRA r = 16, alpha = 32, dropout 0 on every linear layer but lm_head, starting from the SAME weights:
    our initial adapter (B drawn from N(0, INIT_B_STD^2), so the policy differs from the base) saved once
    and copied into TRL's peft model; the reward model starts from our fresh reward adapter and head;
  - AdamW (torch's), a constant learning rate, max grad norm 1.0, no gradient checkpointing, fp32 (TRL's
    bf16 flag off and its QLoRA cast of the adapters to bf16 undone), the same batch, micro-batches
    (TRL: per-device batch x gradient accumulation), lengths, generations, new tokens, loss aggregation;
  - the same synthetic data: JSONL for us, read into a datasets.Dataset for TRL (prompt + "\\n", our
    layout: rlhf_engine.datasets.layout.format_sample);
  - the same threads: --threads N sets torch.set_num_threads(N) and OMP/MKL_NUM_THREADS in the child
    (each side with its own OpenMP wait policy: ours as `import rlhf_engine` chooses it by the machine's
    load, rlhf_engine.core.threads; TRL's libgomp's default, unless the environment sets OMP_WAIT_POLICY for
    both; each --json row records the policy its processes ran with, omp_wait_policy); ours with the
    engine's caching allocator for large CPU tensors unless RLHF_CPU_ALLOCATOR=system (rlhf_engine.core.
    allocator; recorded per row as cpu_allocator).

Ours runs with the fused layers on (stack.fused_layers=true, the engine's default: rlhf_engine.model.fused);
--no-fused runs ours with the model's own norm and MLP modules.

Kinds (--kinds, all by default):
  dpo              DPO (sigmoid, beta 0.1), reference forward every step (the base: adapters off)
  dpo_precomputed  the same with the reference log-probs computed once before training
  grpo             GRPO, beta 0 (no reference forward on TRL's side), group-normalised advantages,
                   token-mean loss (TRL's "dapo" = our loss_agg="token_mean"), 1 update per rollout
  grpo_kl          GRPO with beta 0.04, k3 KL in the loss on both sides (TRL's use_bias_correction_kl off:
                   the plain k3 term, as ours)
  sft              completion-only token-mean NLL
  rm               pairwise reward model, -log sigmoid(r_chosen - r_rejected)
  ppo              PPO with GAE and a value adapter: ours only, TRL 1.16 has no PPO trainer

Timing: each repeat is a fresh process per side, paired and interleaved (ours, TRL, ours, TRL, ...):
--warmup steps (default 1), then --steps timed steps (default 2). A step's time is the wall time between
the ends of consecutive optimizer steps (ours: the metrics rows' elapsed_s; TRL: a TrainerCallback's
on_step_end), so data collation and logging count on both sides. Reported: min and median s/step over
every timed step of every repeat, samples/s at the median, TRL / ours, the peak resident memory of each
process and of a step, and for GRPO / PPO the generation time and the rest (ours also split into the
old-log-prob and reference forwards). A step's peak: VmHWM reset at the step start (our metrics'
peak_mem_mib, every stage; TRL's on_step_begin). The process's: the larger of VmHWM polled by this
process every 50 ms and the peak the child reports, which folds every step's peak in before the next
reset (ours: result.json's peak_rss_mib, rlhf_engine.core.device.PeakWindow; TRL's: trl_peer), so a
spike between two polls is not lost.

Like-for-like check: the first step's loss of both sides on the same batch from the same initial weights
(every step of DPO / SFT / RM sees the whole data set, so step 1 is the same batch on both sides); GRPO's
cannot agree (each side samples its own completions) and says so.

Files: this one runs the processes, aggregates and reports; bench/trainer_sides.py holds the shared settings,
the inputs, our step and the child's entry; bench/trl_peer.py TRL's step.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time


from bench.trainer_sides import (DEFAULT_PEER_PYTHON, KINDS, POLL_S, ROOT, samples_per_step, save_preset, shapes,
                                 write_data, write_initial_adapters, write_pair_ids)  # fmt: skip

def versions_ours() -> dict:
    import importlib.metadata as md

    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft", "bitsandbytes", "accelerate", "rlhf-engine"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    try:
        out["git"] = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True,
                                    text=True, timeout=10).stdout.strip() or None  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        out["git"] = None
    return out


# --------------------------------------------------------------------------------------------------
# Children: one process per (side, kind, threads, repeat)
# --------------------------------------------------------------------------------------------------
def child_env(threads: int, work: str) -> dict:
    """The child's threads, and no network or shared cache: every hub lookup offline, datasets' cache files
    (TRL's precomputed reference log-probs) in this run's work directory."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HOME=os.path.join(work, "hf-home"), HF_DATASETS_CACHE=os.path.join(work, "hf-datasets"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")  # fmt: skip
    return env


def _vm_hwm_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def run_child(python: str, spec: dict, work: str, name: str, timeout: float, keep: bool) -> dict:
    """Run `python -m bench.trainer_sides --worker SPEC` from the checkout's root; -> its result, with the
    child's peak resident memory (max of its VmHWM polled every POLL_S) as process_peak_mib."""
    spec_path = os.path.join(work, f"{name}.spec.json")
    spec = {**spec, "result": os.path.join(work, f"{name}.result.json"), "out": os.path.join(work, name)}
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    log_path = os.path.join(work, f"{name}.log")
    peak = [0]
    with open(log_path, "w") as log:
        proc = subprocess.Popen([python, "-m", "bench.trainer_sides", "--worker", spec_path], cwd=ROOT,
                                env=child_env(spec["threads"], work), stdout=log, stderr=subprocess.STDOUT)  # fmt: skip

        def watch():
            while proc.poll() is None:
                kib = _vm_hwm_kib(proc.pid)
                if kib is not None:
                    peak[0] = max(peak[0], kib)
                time.sleep(POLL_S)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
        watcher.join()
    result = None
    if rc == 0 and os.path.isfile(spec["result"]):
        with open(spec["result"]) as f:
            result = json.load(f)
    if result is None:
        with open(log_path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
        why = "timed out" if rc is None else f"exit {rc}: {lines[-1] if lines else 'no output'}"
        where = f"log: {log_path}" if keep else "--workdir DIR keeps the logs"
        result = {"status": f"error: {why} ({where})"}
    polled = peak[0] / 1024 if peak[0] else None
    reported = result.get("reported_peak_mib")
    result["process_peak_mib"] = max((v for v in (polled, reported) if v), default=None)
    return result


def probe_peer(python: str, work: str) -> dict:
    """{"status": "ok", "versions": ..., "trainers": ...} from the peer environment, or why it cannot run."""
    if not os.path.isfile(python):
        return {"status": f"not installed: no {python} (make bench-venv creates .venv-bench)"}
    path = os.path.join(work, "peer-probe.json")
    try:
        out = subprocess.run([python, "-m", "bench.bench_trainers", "--probe", path], cwd=ROOT, env=child_env(1, work),
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    except (OSError, subprocess.SubprocessError) as e:
        return {"status": f"not installed: {python} does not run ({e})"}
    if out.returncode != 0 or not os.path.isfile(path):
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": f"not installed: trl does not import in {python} ({last})"}
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------------
# Aggregation and report
# --------------------------------------------------------------------------------------------------
def summarize(kind: str, side: str, threads: int, results: list[dict], shape: dict, warmup: int) -> dict:
    """One row of (kind, side, threads) from its repeats: timed steps pooled over the repeats."""
    row = {"op": "trainers", "kind": kind, "side": side, "threads": threads, "repeats": len(results)}
    bad = [r["status"] for r in results if r["status"] != "ok"]
    if bad or not results:
        row["status"] = bad[0] if bad else "not run"
        return row
    timed = [s for r in results for s in r["steps"] if s["step"] > warmup]
    walls = [s["wall_s"] for s in timed if s["wall_s"] is not None]
    if not walls:
        row["status"] = "error: no timed step (need --warmup >= 1 and --steps >= 1)"
        return row
    med = statistics.median(walls)
    qs = statistics.quantiles(walls, n=10, method="inclusive") if len(walls) > 1 else [med] * 9
    row.update(status="ok", steps_timed=len(walls), s_per_step_min=min(walls), s_per_step_median=med,
               s_per_step_p20=qs[1], s_per_step_p80=qs[7], samples_per_s=samples_per_step(kind, shape) / med,
               process_peak_mib=max((r["process_peak_mib"] for r in results if r.get("process_peak_mib")),
                                    default=None),
               step_peak_mib=max((s["peak_mib"] for s in timed if s["peak_mib"] is not None),
                                 default=None))  # fmt: skip
    for key in ("engine_step_s", "old_logprobs_s", "ref_logprobs_s"):  # ours: the engine's own split
        values = [s[key] for s in timed if s.get(key) is not None]
        if values:
            row[f"{key}_median"] = statistics.median(values)
    gens = [s["generate_s"] for s in timed if s.get("generate_s") is not None]
    if gens:
        row["generate_s_median"] = statistics.median(gens)
        row["rest_s_median"] = statistics.median(s["wall_s"] - s["generate_s"] for s in timed
                                                 if s.get("generate_s") is not None and s["wall_s"] is not None)
    lengths = [s["response_length"] for s in timed if s.get("response_length") is not None]
    if lengths:
        row["response_length_mean"] = statistics.mean(lengths)
    first = results[0]["steps"][0] if results[0]["steps"] else {}
    if kind not in ("grpo", "grpo_kl", "ppo"):  # sampled completions: no common loss to show
        row["step1_loss"] = first.get("loss")
    for key in ("notes", "trainable_params"):
        if key in results[0]:
            row[key] = results[0][key]
    row["omp_wait_policy"] = sorted({r.get("omp_wait_policy") or "?" for r in results})  # per process, as chosen
    if any("cpu_allocator" in r for r in results):
        row["cpu_allocator"] = sorted({r["cpu_allocator"] for r in results if "cpu_allocator" in r})
    return row


def agreement(kind: str, ours: dict, trl: dict) -> dict:
    """The like-for-like check of one kind: step-1 losses (same batch, same initial weights) and their
    relative difference, or why there is none."""
    if kind in ("grpo", "grpo_kl"):
        return {"check": "n/a: each side samples its own completions (own RNG streams), so the losses differ; "
                         "prompts, sizes, lengths and the initial adapter are the same"}  # fmt: skip
    for side in (ours, trl):
        if side.get("status") != "ok":
            return {"check": f"n/a: {side['side']}: {side.get('status')}"}
    a, b = ours.get("step1_loss"), trl.get("step1_loss")
    if a is None or b is None:
        return {"check": "n/a: no step-1 loss"}
    rel = abs(a - b) / max(abs(a), 1e-30)
    return {"check": f"ours {a:.9g} vs TRL {b:.9g}: relative difference {rel:.2g}", "step1_rel_diff": rel}


def _fmt(v, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def print_header() -> None:
    print(f"{'kind':16} {'thr':>3} {'side':5} {'s/step min':>10} {'median':>8} {'samples/s':>9} {'TRL/ours':>8} "
          f"{'proc MiB':>8} {'step MiB':>8} {'gen s':>7} {'rest s':>7} {'step-1 loss':>12}")  # fmt: skip


def print_table(rows: list[dict]) -> None:
    for r in rows:
        head = f"{r['kind']:16} {r['threads']:>3} {r['side']:5}"
        if r["status"] != "ok":
            print(f"{head} ({r['status']})")
            continue
        print(f"{head} {r['s_per_step_min']:10.3f} {r['s_per_step_median']:8.3f} {r['samples_per_s']:9.2f} "
              f"{_fmt(r.get('ratio_trl_over_ours'), '8.2f')} {_fmt(r['process_peak_mib'], '8.0f')} "
              f"{_fmt(r.get('step_peak_mib'), '8.0f')} {_fmt(r.get('generate_s_median'), '7.3f')} "
              f"{_fmt(r.get('rest_s_median'), '7.3f')} {_fmt(r.get('step1_loss'), '12.6g')}")  # fmt: skip
    sys.stdout.flush()


def loadavg() -> str | None:
    try:
        with open("/proc/loadavg") as f:
            return f.read().strip()
    except OSError:
        return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} CPU, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def parse_args(argv):
    doc = __doc__.split("\n\n")[0]
    p = argparse.ArgumentParser(prog="python -m bench trainers", description=doc)
    p.add_argument("--quick", action="store_true", help="tiny-llama and a few tokens, 1 repeat, 1 timed step")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of: {','.join(KINDS)}")
    p.add_argument("--threads", help="comma-separated thread counts, each a separate run (default 1,2; --quick 1)")
    p.add_argument("--repeats", type=int, help="paired repeats per kind and thread count (default 3; --quick 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of every process (default 1)")
    p.add_argument("--steps", type=int, help="timed steps per process after the warm-up (default 2; --quick 1)")
    p.add_argument("--model", help="a save_pretrained causal-LM directory (default: the preset, saved once)")
    p.add_argument("--peer-python", default=DEFAULT_PEER_PYTHON, help="TRL's interpreter (default .venv-bench)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds one child may run (default 1800)")
    p.add_argument("--workdir", help="keep data, logs and outputs here (default: a temporary directory)")
    p.add_argument("--json", metavar="PATH", help="write one JSON row per (kind, threads, side) to PATH")
    p.add_argument("--no-fused", action="store_true",
                   help="ours with the model's own norm and MLP modules (stack.fused_layers=false; "
                        "the bench runs ours with fused_layers=true otherwise: model/fused.py)")
    args = p.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        p.error(f"--kinds: unknown {', '.join(bad) or repr(args.kinds)}; choose from {','.join(KINDS)}")
    args.threads = args.threads or ("1" if args.quick else "1,2")
    try:
        threads = [int(t) for t in args.threads.split(",") if t.strip()]
    except ValueError:
        threads = []
    if not threads or min(threads) < 1:
        p.error(f"--threads {args.threads!r}: expected positive integers, e.g. 1,2")
    args.repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    args.steps = args.steps if args.steps is not None else (1 if args.quick else 2)
    if args.repeats < 1 or args.steps < 1 or args.warmup < 1:
        p.error("--repeats, --steps and --warmup: at least 1 (a step's time is measured from the previous step's end)")
    args.peer_python = os.path.abspath(args.peer_python)  # the children run from the checkout's root
    if args.model and not os.path.isfile(os.path.join(args.model, "config.json")):
        p.error(f"--model {args.model!r}: no config.json (expected a save_pretrained directory)")
    return args, kinds, threads


def main(argv: list[str] | None = None) -> int:
    args, kinds, thread_counts = parse_args(argv)
    shape = shapes(args.quick)
    own_tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="bench-trainers-")
    work = os.path.abspath(args.workdir or own_tmp.name)
    os.makedirs(work, exist_ok=True)
    try:
        return _run(args, kinds, thread_counts, shape, work)
    finally:
        if own_tmp is not None:
            own_tmp.cleanup()


def _run(args, kinds, thread_counts, shape, work) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the preset's save and the initial adapters' loads
    load_start = loadavg()
    model = os.path.abspath(args.model) if args.model else os.path.join(work, "model")
    if not args.model:
        save_preset(shape["model"], model)
    shape = {**shape, "model": args.model or shape["model"], **({"fused_layers": False} if args.no_fused else {})}
    files = write_data(work, shape, args.warmup + args.steps)
    if "rm" in kinds:
        files = write_pair_ids(work, model, files)
    init = write_initial_adapters(work, model, shape, {"reward" if k == "rm" else "policy" for k in kinds})
    peer = probe_peer(args.peer_python, work)
    meta = {"device": cpu_name(), "versions": {"ours": versions_ours(), "trl": peer.get("versions")},
            "date": _dt.date.today().isoformat(), "warmup_steps": args.warmup, "timed_steps": args.steps,
            "shape": shape}  # fmt: skip
    print(f"# trainers on {meta['device']} | {meta['date']} | loadavg {load_start}")
    print(f"# ours: {meta['versions']['ours']}")
    print(f"# TRL:  {peer.get('versions') or peer['status']}")
    print(f"# {shape}; {args.warmup} warm-up + {args.steps} timed step(s) per process, {args.repeats} paired "
          f"repeat(s), NF4 + LoRA r={shape['lora_r']} alpha={shape['lora_alpha']}, fp32 on CPU")  # fmt: skip
    print_header()
    keep = bool(args.workdir)
    spec0 = {"model": model, "shape": shape, "data": files, "init": init, "warmup": args.warmup, "steps": args.steps}
    rows, checks = [], []
    for threads in thread_counts:
        for kind in kinds:
            block_load = loadavg()
            results = {"ours": [], "trl": []}
            peer_status = peer["status"]
            if peer_status == "ok" and kind not in peer.get("kinds", ()):
                peer_status = peer.get("unavailable", {}).get(kind, f"unavailable: TRL has no trainer for {kind}")
            for r in range(args.repeats):
                spec = {**spec0, "kind": kind, "threads": threads}
                results["ours"].append(run_child(sys.executable, {**spec, "side": "ours"}, work,
                                                 f"{kind}-t{threads}-r{r}-ours", args.timeout, keep))  # fmt: skip
                if peer_status == "ok":
                    results["trl"].append(run_child(args.peer_python, {**spec, "side": "trl"}, work,
                                                    f"{kind}-t{threads}-r{r}-trl", args.timeout, keep))  # fmt: skip
            ours = summarize(kind, "ours", threads, results["ours"], shape, args.warmup)
            trl = summarize(kind, "trl", threads, results["trl"], shape, args.warmup)
            if peer_status != "ok":
                trl["status"] = peer_status
            if ours["status"] == "ok" and trl["status"] == "ok":
                trl["ratio_trl_over_ours"] = trl["s_per_step_median"] / ours["s_per_step_median"]
                trl["ratio_trl_over_ours_min"] = trl["s_per_step_min"] / ours["s_per_step_min"]
            check = agreement(kind, ours, trl)
            checks.append((kind, threads, check["check"]))
            extra = {**meta, "samples_per_step": samples_per_step(kind, shape), "loadavg_start": block_load,
                     "loadavg_end": loadavg(), **{k: v for k, v in check.items() if k != "check"},
                     "agreement": check["check"]}  # fmt: skip
            rows += [{**ours, **extra}, {**trl, **extra}]
            print_table(rows[-2:])
    print("# like-for-like: step-1 loss, the same batch and initial weights on both sides")
    for kind, threads, text in checks:
        print(f"#   {kind} ({threads} thread{'s' if threads > 1 else ''}): {text}")
    load_end = loadavg()
    print(f"# loadavg at start {load_start}, at end {load_end}")
    for r in rows:
        r.update(run_loadavg_start=load_start, run_loadavg_end=load_end)
    if args.json:
        from bench.harness import write_rows

        write_rows(args.json, rows)
        print(f"# wrote {len(rows)} rows to {args.json}")
    return 0


