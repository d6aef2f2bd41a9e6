"""Compile every @triton.jit kernel of rlhf_kernels for sm_90 (H100/H200), without a GPU.

The Triton interpreter (what CPU tests run) does not type-check like the compiler: code it accepts
can fail to compile (a loop-carried variable that changes shape, a constexpr branch). This script
runs the public ops' Triton paths with GPU launch settings on CPU tensors, through Triton's real JIT
(its own argument specialization), against a stand-in driver that reports an sm_90 target: every
launch compiles to a cubin and none executes. Then it checks that every @triton.jit kernel in the
package was compiled at least once.

    python -P tests/_sm90_compile.py [vocab|rl|layers ...]     (run by tests/test_triton_compile.py)

Scenarios cover every constexpr combination the launchers can pick: flags and dtypes at the block
sizes of real vocabularies, every power-of-two block width, both paths of each two-path launcher.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: real JIT, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)
H100_SMS = 132


class _Sm90Driver:
    """What JITFunction.run asks of the active driver before it compiles (nothing launches)."""

    def get_current_target(self):
        return SM90

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


COMPILED: dict[str, set] = {}


def _compile_only(run):
    def wrapper(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        assert "cubin" in kernel.asm, f"{self.fn.__name__}: no cubin"
        COMPILED.setdefault(self.fn.__name__, set()).add(id(kernel))  # one per distinct specialization
        return kernel

    return wrapper


def _gpu_launch_settings():
    """Every module's launch choices as on a GPU (its `triton_interpreted` -> False), while dispatch
    still lets the "triton" backend take CPU tensors; an H100's SM count for gae's span split."""
    import rlhf_kernels
    from rlhf_kernels import _dispatch

    for info in pkgutil.iter_modules(rlhf_kernels.__path__):
        mod = importlib.import_module(f"rlhf_kernels.{info.name}")
        if mod is not _dispatch and hasattr(mod, "triton_interpreted"):
            mod.triton_interpreted = lambda: False
    _dispatch.triton_interpreted = lambda: True

    class _Props:
        multi_processor_count = H100_SMS

    torch.cuda.get_device_properties = lambda device=None: _Props()


def jit_kernels() -> dict[str, str]:
    """Every launchable @triton.jit kernel (named `*_kernel`, as the house style has it) in
    rlhf_kernels: name -> module. Device helpers compile inside the kernels that call them."""
    import rlhf_kernels

    found = {}
    for info in pkgutil.iter_modules(rlhf_kernels.__path__):
        mod = importlib.import_module(f"rlhf_kernels.{info.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and obj.__module__ == mod.__name__ and name.endswith("_kernel"):
                found[name] = mod.__name__
    return found


# ---------------------------------------------------------------------------------------------------
# Scenarios: each runs the public ops' Triton paths (forward and backward) over the launch choices
# ---------------------------------------------------------------------------------------------------
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _pow2_sizes(top: int) -> list[int]:
    """Sizes whose next power of two is each of 1, 2, 4, ..., top."""
    return [1] + [(1 << k) + 1 for k in range(0, top.bit_length() - 1)]


def _vocab_step(kernels, lead, V, dtype, *, labels=True, entropy=True, kl=True, label_dtype=torch.int64,
                sliced=False):
    x = torch.zeros(*lead, V + (1 if sliced else 0), dtype=dtype)[..., :V] if sliced else torch.zeros(*lead, V,
                                                                                                           dtype=dtype)
    x.requires_grad_(True)
    z = torch.zeros(*lead, V, dtype=dtype)
    y = torch.zeros(lead, dtype=label_dtype)
    if labels and kl:
        outs = kernels.token_stats(x, z, y, backend="triton")
        if not entropy:
            outs = outs[0] + outs[2]
    elif labels:
        outs = kernels.logprobs(x, y, entropy=entropy, backend="triton")
    else:  # KL only (full_kl); entropy without labels is no public op's combination
        outs = kernels.full_kl(x, z, backend="triton")
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward([o.sum() for o in outs])


def scenario_vocab():
    import rlhf_kernels as kernels

    # every public flag combination and dtype at real vocabulary sizes (4096- and 2048-wide blocks)
    for dtype in DTYPES:
        for V in (32000, 128256):
            for labels, entropy, kl in ((True, True, True), (True, False, True), (True, True, False),
                                        (True, False, False), (False, False, True)):
                _vocab_step(kernels, (2,), V, dtype, labels=labels, entropy=entropy, kl=kl)
    # every block width the row launcher can pick, with and without KL (its narrower cap)
    for V in _pow2_sizes(4096):
        for kl in (False, True):
            _vocab_step(kernels, (3,), V, torch.bfloat16, kl=kl)
    # strided rows, int32 labels
    _vocab_step(kernels, (2, 3), 1000, torch.bfloat16, sliced=True, label_dtype=torch.int32)
    # int32 / expanded labels with an ignore_index beyond int32 (an int64 scalar specialization)
    x = torch.zeros(2, 3, 500, dtype=torch.bfloat16, requires_grad=True)
    y32 = torch.zeros(2, 3, dtype=torch.int32)
    torch.autograd.backward([o.sum() for o in kernels.logprobs(x, y32, ignore_index=2**32 + 5, entropy=True,
                                                                backend="triton")])  # fmt: skip
    outs = kernels.token_stats(x, x.detach(), torch.tensor([1]).expand(2, 3), ignore_index=2**40, backend="triton")
    torch.autograd.backward([o.sum() for o in outs])
    # the block widths the tests force (forced_blocks(row=...): 4 warps on a GPU), so that the GPU run
    # of the multi-block tests compiles
    from rlhf_kernels._triton import forced_blocks

    for block, dtypes in ((16, (torch.float32, torch.bfloat16)), (1024, (torch.float32,)), (2048, (torch.float32,))):
        with forced_blocks(row=block):
            for dtype in dtypes:
                for labels, entropy, kl in ((True, True, True), (True, True, False), (True, False, False),
                                            (False, False, True)):
                    _vocab_step(kernels, (2,), 3000, dtype, labels=labels, entropy=entropy, kl=kl)
    # the fused-linear ops (chunks written in place over the logits, vocabulary slices)
    for dtype in (torch.float32, torch.bfloat16):
        h = torch.zeros(4, 64, dtype=dtype, requires_grad=True)
        w = torch.zeros(3000, 64, dtype=dtype, requires_grad=True)
        y = torch.zeros(4, dtype=torch.long)
        kernels.linear_logprobs(h, w, y, backend="triton").sum().backward()
        kernels.linear_logprobs(h, w.detach(), y, backend="triton").sum().backward()
        outs = kernels.linear_token_stats(h, h.detach(), w, y, backend="triton")
        torch.autograd.backward([o.sum() for o in outs])


def scenario_rl():
    import rlhf_kernels as kernels

    # gae: one program per row (every block width up to 1024), and rows split into S spans (every S_POW2)
    for dtype in DTYPES:
        for T in (1, 700, 5000):
            kernels.gae(torch.zeros(4, T, dtype=dtype), torch.zeros(4, T, dtype=dtype), torch.ones(4, T),
                        backend="triton")
    for T in _pow2_sizes(1024):
        kernels.gae(torch.zeros(300, T), torch.zeros(300, T), torch.ones(300, T), backend="triton")
    for spans in (2, 3, 5, 9, 17, 33, 65, 129, 260):
        T = 1024 * spans
        kernels.gae(torch.zeros(1, T), torch.zeros(1, T), torch.ones(1, T), backend="triton")
    # flat kernels: every dtype, and partial counts that give every reduction block width
    n_tokens = [1, 5000] + [2048 * (1 << k) + 1 for k in range(0, 10)]
    for dtype in DTYPES:
        x = torch.zeros(3000, dtype=dtype, requires_grad=True)
        m = torch.ones(3000)
        kernels.masked_whiten(x.detach(), m, backend="triton")
        kernels.masked_whiten(x.detach(), m, shift_mean=False, backend="triton")
        for dual in (None, 3.0):
            kernels.ppo_loss(x, x.detach(), x.detach(), m, dual_clip=dual, backend="triton")[0].backward()
        kernels.value_loss(x, x.detach(), x.detach(), m, backend="triton")[0].backward()
        for kind in ("k1", "k2", "k3"):
            kernels.kl_penalty(x, x.detach(), kind=kind, backend="triton").sum().backward()
    for N in n_tokens:
        x = torch.zeros(N, requires_grad=True)
        m = torch.ones(N)
        kernels.masked_whiten(x.detach(), m, backend="triton")
        kernels.value_loss(x, x.detach(), x.detach(), m, backend="triton")[0].backward()
    for N in [70000 + 1024 * (1 << k) for k in range(0, 10)]:  # past the one-program ppo forward
        x = torch.zeros(N, requires_grad=True)
        kernels.ppo_loss(x, x.detach(), x.detach(), torch.ones(N), backend="triton")[0].backward()
    # the small blocks the tests force (on a GPU machine they run compiled): flat 16/64/1024-token
    # blocks, 2/4-wide reductions, both ppo forwards, gae chunks of 4-16 with spans
    import importlib

    from rlhf_kernels._triton import forced_blocks

    ppo = importlib.import_module("rlhf_kernels.ppo_loss")
    gae = importlib.import_module("rlhf_kernels.gae")
    one_program_max = ppo.ONE_PROGRAM_MAX_N
    for flat, reduce in ((16, 2), (16, 4), (64, 4), (1024, 4)):
        with forced_blocks(flat=flat, reduce=reduce):
            x = torch.zeros(3000, requires_grad=True)
            m = torch.ones(3000)
            kernels.masked_whiten(x.detach(), m, backend="triton")
            kernels.value_loss(x, x.detach(), x.detach(), m, backend="triton")[0].backward()
            kernels.kl_penalty(x, x.detach(), kind="k3", backend="triton").sum().backward()
            for limit in (one_program_max, 0):
                ppo.ONE_PROGRAM_MAX_N = limit
                kernels.ppo_loss(x, x.detach(), x.detach(), m, dual_clip=3.0, backend="triton")[0].backward()
            ppo.ONE_PROGRAM_MAX_N = one_program_max
    for block, span in ((8, None), (8, 16), (4, 4), (16, 32)):
        z = torch.zeros(6, 37)
        gae._gae_triton(z, z, torch.ones(6, 37, dtype=torch.uint8), 0.99, 0.95, block=block, span=span)


def scenario_layers():
    import rlhf_kernels as kernels
    from rlhf_kernels._triton import forced_blocks

    def norm(lead, H, dtype, w_dtype=None, *, w_grad=False, transposed=False):
        x = torch.zeros(H, *lead, dtype=dtype).movedim(0, -1) if transposed else torch.zeros(*lead, H, dtype=dtype)
        x.requires_grad_(True)
        w = torch.ones(H, dtype=w_dtype or dtype, requires_grad=w_grad)
        kernels.rms_norm(x, w, backend="triton").sum().backward()

    def glu(M, C, dtype, up_dtype=None):
        gate = torch.zeros(M, C, dtype=dtype, requires_grad=True)
        up = torch.zeros(M, C, dtype=up_dtype or dtype, requires_grad=True)
        kernels.swiglu(gate, up, backend="triton").sum().backward()

    # rms_norm: dtypes with a frozen and a trainable weight (and bf16 x with an fp32 weight), one
    # block (576) and two passes (8192); every block width the row launcher can pick; strided rows
    # (column stride != 1); the blocks tests/test_rms_norm.py forces
    for dtype in DTYPES:
        for H in (576, 8192):
            for w_grad in (False, True):
                norm((3, 5), H, dtype, w_grad=w_grad)
    norm((3, 5), 576, torch.bfloat16, torch.float32, w_grad=True)
    for H in _pow2_sizes(4096):
        norm((4,), H, torch.bfloat16, w_grad=True)
    norm((2, 7), 577, torch.bfloat16, transposed=True)
    for block in (16, 128):
        with forced_blocks(row=block):
            norm((7,), 577, torch.float32, w_grad=True)
    # swiglu: dtypes (and a mixed pair); every tile shape (BLOCK_M x BLOCK_C = 1024, BLOCK_C each
    # power of two); chunks of one fused projection (row stride 2C); the tiles tests force
    for dtype in DTYPES:
        glu(1024, 1536, dtype)
    glu(3, 33, torch.bfloat16, torch.float32)
    for C in _pow2_sizes(1024):
        glu(5, C, torch.bfloat16)
    fused = torch.zeros(4, 2 * 577, dtype=torch.bfloat16, requires_grad=True)
    kernels.swiglu(*fused.chunk(2, dim=-1), backend="triton").sum().backward()
    for tile, C in ((16, 37), (64, 5), (64, 577)):
        with forced_blocks(flat=tile):
            glu(13, C, torch.float32)


SCENARIOS = {"vocab": scenario_vocab, "rl": scenario_rl, "layers": scenario_layers}
# which kernels each scenario must reach (by module)
AREAS = {"vocab": ("rlhf_kernels._vocab",), "rl": ("rlhf_kernels.gae", "rlhf_kernels.whiten",
                                                      "rlhf_kernels.ppo_loss", "rlhf_kernels.value_loss",
                                                      "rlhf_kernels.kl_penalty"),
         "layers": ("rlhf_kernels.rms_norm", "rlhf_kernels.swiglu")}  # fmt: skip
# tests/test_triton_compile.py runs one process per name here (2 cores on CI); "layers" (10 s of
# compiles) rides in the vocab process, the shorter one (17 s against rl's 22 s on a 2-core CPU): the
# test went from 26 s to 28 s of wall time there
PROCESSES = {"vocab": ("vocab", "layers"), "rl": ("rl",)}


def main(areas: list[str]) -> int:
    driver.set_active(_Sm90Driver())
    JITFunction.run = _compile_only(JITFunction.run)
    _gpu_launch_settings()
    areas = list(dict.fromkeys(a for name in areas for a in PROCESSES.get(name, (name,))))
    t0 = time.perf_counter()
    for area in areas:
        SCENARIOS[area]()
    kernels = jit_kernels()
    covered = {m for a in areas for m in AREAS[a]}
    unowned = sorted(f"{m}.{k}" for k, m in kernels.items() if not any(m in mods for mods in AREAS.values()))
    missing = sorted(f"{m}.{k}" for k, m in kernels.items() if m in covered and k not in COMPILED)
    print(json.dumps({"seconds": round(time.perf_counter() - t0, 1),
                      "compiled": {k: len(v) for k, v in sorted(COMPILED.items())},
                      "missing": missing, "unowned": unowned}))
    return 1 if missing or unowned else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or list(SCENARIOS)))
