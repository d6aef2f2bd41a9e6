"""Run one op's benchmark: python -m bench <op> [--quick] [--json PATH] [--device cpu|cuda]

Ops are the bench/bench_<op>.py files (python -m bench --list lists them).
"""

import importlib
import pkgutil
import sys
from pathlib import Path

from bench.harness import run_bench


def available_ops() -> list[str]:
    here = Path(__file__).parent
    return sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_"))


def main(argv: list[str]) -> int:
    ops = available_ops()
    if not argv or argv[0] in ("-h", "--help", "--list"):
        print(__doc__.strip())
        print("ops:", " ".join(ops))
        return 0 if argv else 2
    op, rest = argv[0], argv[1:]
    if op not in ops:
        print(f"python -m bench: unknown op {op!r}; choose one of: {' '.join(ops)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"bench.bench_{op}")
    if hasattr(module, "main"):  # a whole-step benchmark with its own flags (bench_ppo_step)
        return module.main(rest)
    run_bench(module.BENCH, rest)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
