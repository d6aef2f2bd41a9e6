"""Benchmark harness shared by every bench/bench_<op>.py.

A bench module defines `BENCH = Bench(...)`:
    op         the op name (as in kernels.<op>)
    cases      cases(quick: bool, device: torch.device) -> list[Case]
    providers  names, in table order: our backends ("torch", "triton", "cpp", "cuda") and the
               baselines ("eager", "compile", "liger")
    build      build(case, provider, device) -> a zero-argument callable running ONE iteration of
               case.mode, or None when that provider cannot run the case (its reason is printed)

The harness times every (case, provider) in one process, measures the roofline in the same run
(copy bandwidth for bytes, matmul rate for flops), and reports median/p20/p80 time, achieved GB/s
and TFLOP/s, the ratio to the roofline and the peak extra memory. `--json PATH` writes one
machine-readable row per measurement with device, versions and date.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

BASELINES = ("eager", "compile", "liger")


@dataclass
class Case:
    """One shape/dtype/mode. `bytes` and `flops` are what the op MUST move/compute (the roofline)."""

    mode: str  # "fwd" or "fwd+bwd"
    shape: dict  # e.g. {"N": 2048, "V": 32000}
    dtype: torch.dtype
    bytes: int = 0  # bytes that must cross the memory bus: inputs read + outputs written, per pass
    flops: int = 0  # flops that must be done (GEMM-bound ops), 0 if memory-bound
    extra: dict = field(default_factory=dict)  # op-specific settings (temperature, entropy, ...)

    def label(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.shape.items())


@dataclass
class Bench:
    op: str
    cases: Callable[[bool, torch.device], list]
    providers: tuple
    build: Callable


# --------------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable, device: torch.device, *, min_time_s: float = 0.5, max_reps: int = 100) -> list[float]:
    """Per-iteration wall times in ms, after warm-up (the first call compiles/autotunes)."""
    fn()
    _sync(device)
    if device.type == "cuda":
        from triton.testing import do_bench

        # do_bench flushes L2 between reps and returns the requested quantiles.
        p20, med, p80 = do_bench(fn, quantiles=[0.2, 0.5, 0.8], warmup=25, rep=max(100, int(min_time_s * 1000)))
        return [p20, med, p80]
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (time.perf_counter() - start < min_time_s or len(times) < 5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def peak_extra_bytes(fn: Callable, device: torch.device) -> int | None:
    """Peak memory one call allocates beyond what was live before it (None if unmeasurable).

    CUDA: the caching allocator's peak. CPU: the process high-water mark (VmHWM, reset through
    /proc/self/clear_refs) minus the resident set before the call.
    """
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated() - base
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _rss_kib("VmRSS")
        fn()
        return max(0, _rss_kib("VmHWM") - base) * 1024
    except OSError:
        return None


# --------------------------------------------------------------------------------------------------
# Rooflines, measured in the same run
# --------------------------------------------------------------------------------------------------
def copy_bandwidth_gbs(device: torch.device) -> float:
    """Device copy bandwidth in GB/s (read + write counted), from a large tensor copy."""
    n_bytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.ones(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    times = time_fn(lambda: dst.copy_(src), device, min_time_s=0.3)
    return 2 * n_bytes / (statistics.median(times) * 1e-3) / 1e9


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Dense matmul rate in TFLOP/s for `dtype` (fp32 on CPU)."""
    n = 8192 if device.type == "cuda" else 2048
    if device.type == "cpu":
        dtype = torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = time_fn(lambda: a @ b, device, min_time_s=0.3, max_reps=20)
    return 2 * n**3 / (statistics.median(times) * 1e-3) / 1e12


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads"


def bf16_weight_bytes(model: str) -> int:
    """Bytes of one bf16 copy of a model's weights (2 x its parameter count, tied weights once, counted on
    meta): a MODEL_PRESETS name, a named base (converted once and cached) or a save_pretrained directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    from rlhf_engine.model.config import MODEL_PRESETS
    from rlhf_engine.model.named import is_named, resolve_named

    if model in MODEL_PRESETS:
        config = LlamaConfig(**MODEL_PRESETS[model])
    else:
        config = AutoConfig.from_pretrained(resolve_named(model, progress=False) if is_named(model) else model)
    with torch.device("meta"):
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    return 2 * n


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    return out


# --------------------------------------------------------------------------------------------------
# Running and reporting
# --------------------------------------------------------------------------------------------------
def write_rows(path: str, rows: list[dict]) -> None:
    """One JSON row per line (what --json writes and gpu_check reads back)."""
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, default=str) + "\n")


STEP_PROVIDERS = ("auto", "torch")  # the trainer-step benches: the fused kernels on every hot path, or the references


def trainer_step_parser(prog: str, doc: str, default_steps: int) -> argparse.ArgumentParser:
    """The flags every trainer-step bench (ppo_step, dpo_step) shares; the bench adds its own."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--providers", default=",".join(STEP_PROVIDERS),
                        help=f"comma-separated subset of: {','.join(STEP_PROVIDERS)}")  # fmt: skip
    parser.add_argument("--steps", type=int, default=default_steps,
                        help=f"timed steps after the warm-up step (default {default_steps})")  # fmt: skip
    parser.add_argument("--json", metavar="PATH", help="write one JSON row per provider to PATH")
    parser.add_argument("--model", help="a real base instead of the preset: a named base (smollm2-135m-instruct) or "
                                        "a save_pretrained directory; the prompts are the pipeline world's situations")
    return parser


def trainer_step_args(parser: argparse.ArgumentParser, argv: list[str] | None):
    """(args, providers, device) of a trainer-step bench; anything unusable is a one-line usage error."""
    args = parser.parse_args(argv)
    providers = _split(args.providers)
    bad = [p for p in providers if p not in STEP_PROVIDERS]
    if bad or not providers:
        parser.error(f"--providers: unknown {', '.join(bad) or repr(args.providers)}; "
                     f"choose from {','.join(STEP_PROVIDERS)}")  # fmt: skip
    if args.device not in ("cpu", "cuda"):
        parser.error(f"--device {args.device!r}: expected cpu or cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.steps < 1:
        parser.error("--steps: at least 1")
    return args, providers, torch.device(args.device)


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _check_args(parser: argparse.ArgumentParser, bench: Bench, args) -> tuple[torch.device, list[str], list[str]]:
    """(device, providers, modes) from the flags; anything unusable is a one-line usage error."""
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        parser.error(f"--device {args.device!r}: expected cpu or cuda")
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            parser.error(f"--device {args.device}: no CUDA device here (torch {torch.__version__}, "
                         f"CUDA build: {torch.version.cuda or 'no'})")
        index = torch.device(args.device).index
        if index is not None and index >= torch.cuda.device_count():
            parser.error(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s)")
    wanted = _split(args.providers)
    unknown = [p for p in wanted if p not in bench.providers]
    if unknown or (args.providers is not None and not wanted):
        parser.error(f"--providers: unknown {', '.join(unknown) or repr(args.providers)}; "
                     f"choose from {','.join(bench.providers)}")
    modes = _split(args.modes)
    bad_modes = [m for m in modes if m not in ("fwd", "fwd+bwd")]
    if bad_modes or not modes:
        parser.error(f"--modes: unknown {', '.join(bad_modes) or repr(args.modes)}; choose from fwd,fwd+bwd")
    providers = [p for p in bench.providers if not wanted or p in wanted]
    return torch.device(args.device), providers, modes


def run_bench(bench: Bench, argv: list[str] | None = None, *, deadline: float | None = None) -> list[dict]:
    """Time every (case, provider) of `bench` as the flags in `argv` select; -> the JSON rows.

    `deadline` (a time.monotonic() value) skips the measurements left when it passes: each is still
    printed, as skipped, so a time-boxed run (bench/gpu_check.py) says what it did not measure."""
    parser = argparse.ArgumentParser(prog=f"python -m bench {bench.op}", description=f"Benchmark kernels.{bench.op}")
    parser.add_argument("--quick", action="store_true", help="small shapes and few reps (smoke run)")
    parser.add_argument("--target", action="store_true", help="only the first (target) shape of the full cases")
    parser.add_argument("--json", metavar="PATH", help="write one JSON row per measurement to PATH")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--providers", help=f"comma-separated subset of: {','.join(bench.providers)}")
    parser.add_argument("--modes", default="fwd,fwd+bwd", help="comma-separated subset of: fwd,fwd+bwd")
    args = parser.parse_args(argv)
    device, providers, modes = _check_args(parser, bench, args)
    cases = [c for c in bench.cases(args.quick, device) if c.mode in modes]
    if args.target and cases:
        cases = [c for c in cases if c.shape == cases[0].shape]
    min_time = 0.2 if args.quick else 1.0

    bw = copy_bandwidth_gbs(device)
    needs_flops = any(c.flops for c in cases)
    rate = matmul_tflops(device, cases[0].dtype) if needs_flops and cases else 0.0
    meta = {"device": device_name(device), "versions": versions(), "date": _dt.date.today().isoformat()}
    print(f"# {bench.op} on {meta['device']} | {meta['versions']} | {meta['date']}")
    roof = f"# roofline: copy {bw:.1f} GB/s" + (f", matmul {rate:.2f} TFLOP/s" if needs_flops else "")
    print(roof + " (measured in this run)")
    header = f"{'mode':8} {'shape':28} {'dtype':9} {'provider':8} {'median ms':>10} {'p20':>9} {'p80':>9} "
    header += f"{'GB/s':>8} {'TFLOP/s':>8} {'x roof':>7} {'extra MiB':>10}"
    print(header)
    rows = []
    for case in cases:
        ideal_ms = max(case.bytes / (bw * 1e9), case.flops / (rate * 1e12) if case.flops else 0.0) * 1e3
        for provider in providers:
            dtype = str(case.dtype).replace("torch.", "")
            if deadline is not None and time.monotonic() > deadline:
                print(f"{case.mode:8} {case.label():28} {dtype:9} {provider:8} {'-':>10}  (skipped: time budget)")
                continue
            fn = bench.build(case, provider, device)
            if isinstance(fn, str) or fn is None:
                why = fn or "unavailable"
                print(f"{case.mode:8} {case.label():28} {dtype:9} {provider:8} {'-':>10}  ({why})")
                continue
            times = time_fn(fn, device, min_time_s=min_time)
            qs = statistics.quantiles(times, n=10) if len(times) >= 3 else times * 9
            med = statistics.median(times) if device.type == "cpu" else times[1]
            p20, p80 = (qs[1], qs[7]) if device.type == "cpu" else (times[0], times[2])
            extra = peak_extra_bytes(fn, device)
            row = {
                "op": bench.op, "provider": provider, "mode": case.mode, "shape": case.shape, "dtype": dtype,
                "median_ms": med, "p20_ms": p20, "p80_ms": p80,
                "gb_s": case.bytes / (med * 1e-3) / 1e9 if case.bytes else None,
                "tflop_s": case.flops / (med * 1e-3) / 1e12 if case.flops else None,
                "x_roofline": med / ideal_ms if ideal_ms else None,
                "roofline": {"copy_gb_s": bw, "matmul_tflop_s": rate or None},
                "peak_extra_mib": extra / 2**20 if extra is not None else None,
                **case.extra, **meta,
            }  # fmt: skip
            rows.append(row)
            fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
            print(
                f"{case.mode:8} {case.label():28} {dtype:9} {provider:8} {med:10.3f} {p20:9.3f} {p80:9.3f} "
                f"{fmt(row['gb_s'], '8.1f')} {fmt(row['tflop_s'], '8.2f')} {fmt(row['x_roofline'], '7.2f')} "
                f"{fmt(row['peak_extra_mib'], '10.1f')}"
            )
            sys.stdout.flush()
            del fn
    if args.json:
        write_rows(args.json, rows)
        print(f"# wrote {len(rows)} rows to {args.json}")
    return rows


def grad_step(forward: Callable, inputs: list, grads: list) -> Callable:
    """A fwd+bwd iteration: outputs = forward(); d(outputs . grads)/d(inputs), nothing accumulated."""

    def step():
        outs = forward()
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        torch.autograd.grad(outs, inputs, grads[: len(outs)])

    return step


def backend_unavailable(provider: str, device: torch.device) -> str | None:
    """Why one of our backends cannot be timed on `device` (None if it can). Triton on CPU is the
    interpreter: correct, but its times mean nothing."""
    import rlhf_kernels as kernels

    status = kernels.backends()[provider]
    if not status.startswith("yes"):
        return f"{provider}: {status}"
    if provider == "cpp" and device.type != "cpu":
        return "cpp: runs CPU tensors"
    if provider in ("triton", "cuda") and device.type != "cuda":
        return f"{provider}: needs a CUDA device (triton on CPU is the interpreter only)"
    return None


def provider_fn(provider: str, device: torch.device, implemented: tuple, ours: Callable, ref: Callable,
                *, liger: Callable | None = None, trl: Callable | None = None, others: dict | None = None):
    """The callable that `provider` times, or the reason it cannot run (a str).

    ours(*inputs, backend=...) is our op, ref(*inputs) its PyTorch reference ("eager", and "compile"
    compiles it), liger() / trl() build Liger's / TRL's fused counterpart (CUDA, when installed),
    others maps extra baseline names to callables."""
    if provider in implemented:
        why = backend_unavailable(provider, device)
        return why or (lambda *inputs: ours(*inputs, backend=provider))
    if provider == "eager":
        return ref
    if provider == "compile":
        return torch.compile(ref)
    if provider == "liger" and liger is not None:
        return liger() if liger_available() else "liger-kernel not installed or no CUDA"
    if provider == "trl" and trl is not None:
        return baseline(trl, device)
    if others and provider in others:
        return others[provider]
    return f"unknown provider {provider}"


def baseline(make: Callable, device: torch.device) -> Callable | str:
    """make() -> a third-party fused baseline (TRL's kernels: Triton on CUDA), or why it cannot run."""
    if device.type != "cuda":
        return "needs a CUDA device (a Triton baseline)"
    try:
        return make()
    except ImportError as e:  # not installed, or an import-time dependency missing
        return f"not importable ({type(e).__name__}: {e})"


def vocab_cases(quick: bool, device: torch.device, fwd_passes: int, fwdbwd_passes: int, extra=None) -> list:
    """[N, V] cases of the vocabulary ops: LLM vocabularies in bf16 on GPU, V=32000 fp32/bf16 on CPU.
    Roofline bytes = `fwd_passes` (forward) or `fwdbwd_passes` (forward + backward) [N, V] passes."""
    if device.type == "cuda":
        shapes = [(4096, 32000)] if quick else [(16384, 128256), (4096, 151936)]
        dtypes = [torch.bfloat16]
    else:
        shapes = [(512, 32000)] if quick else [(2048, 32000)]
        dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    out = []
    for N, V in shapes:
        for dtype in dtypes:
            elt = torch.finfo(dtype).bits // 8
            for mode, passes in (("fwd", fwd_passes), ("fwd+bwd", fwdbwd_passes)):
                out.append(Case(mode, {"N": N, "V": V}, dtype, bytes=passes * N * V * elt, extra=dict(extra or {})))
    return out


def liger_available() -> bool:
    try:
        import liger_kernel  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()
