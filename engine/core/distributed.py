"""Data parallel for the trainers (under `torchrun`): every rank holds the whole 4-bit base and its
adapters; each takes its share of the step's prompts; gradients of the trainable adapter and head
parameters are summed across ranks before the optimizer step, so every rank applies the same update.

Losses are written as sums over this rank's tokens divided by the GLOBAL token count (all-reduced),
so summing gradients over ranks gives exactly the gradient of the token mean over the global batch:
2 ranks x b sequences make the update 1 rank x 2b sequences makes (up to floating-point order).

    torchrun --nproc-per-node 2 -m engine ppo ...      (gloo on CPU, nccl on CUDA)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: rank in [0, world)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0 owns the output directory (checkpoints, metrics, files)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def share(self, n: int) -> slice:
        """This rank's contiguous share of n items (the first n % world ranks take one more)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over ranks (a new tensor; x itself when there is one rank)."""
        if not self.active:
            return x
        y = x.detach().clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y

    def sum_floats(self, *values: float) -> list[float]:
        """Python numbers summed over ranks, in one collective."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def max_int(self, value: int) -> int:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.long, device=_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t)

    def gather_rows(self, x: torch.Tensor, fill=0) -> torch.Tensor:
        """Every rank's (n_r, ...) rows concatenated in rank order; trailing dims padded with `fill` to
        the largest (per-token tensors whose response length differs between ranks)."""
        if not self.active:
            return x
        shape = torch.tensor([x.shape[0], *(x.shape[1:] or ())], dtype=torch.long, device=_device())
        shapes = [torch.zeros_like(shape) for _ in range(self.world)]
        dist.all_gather(shapes, shape)
        top = torch.stack(shapes).max(dim=0).values.tolist()
        padded = torch.full(top, fill, dtype=x.dtype, device=x.device)
        padded[tuple(slice(0, s) for s in x.shape)] = x
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded.to(_device()))
        return torch.cat([p[: int(s[0])].to(x.device) for p, s in zip(parts, shapes)])

    def reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of `params` over ranks, in one flat collective (a parameter without a
        gradient on some rank counts as zeros there)."""
        if not self.active:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads]).to(_device())
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(g).to(p.dtype).to(p.device)
            offset += n

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def _device() -> torch.device:
    """Where collectives run: the current CUDA device under nccl, else CPU (gloo)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed() -> Dist:
    """The job's Dist: one process, or torchrun's ranks (WORLD_SIZE > 1) joined in a process group
    (nccl where CUDA is available, else gloo); a rank's CUDA device is its LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return Dist(rank=dist.get_rank(), world=dist.get_world_size())
