"""Generation, the engine's sampler against transformers' `generate`, on one base in both precisions:
python -m bench generate [--model smollm2-135m-instruct] [--batch 32] [--new-tokens 64] [--repeats 3]
[--quantizations nf4,none] [--threads N] [--json PATH]

Both sides sample (temperature 1) the same `--batch` rows (8 of the pipeline world's prompts x 4, each
laid out by the chat template) for exactly `--new-tokens` tokens: the end-of-turn token is not a stop
on either side (ours: the stack's tokenizer without EOS; generate: min_new_tokens = max_new_tokens), so
both do the same work. The same ModelStack serves both: ours is `model.generation.sample` on the bare
base (KV cache, the fused last-position logits, per-row Gumbel streams), theirs is the causal LM's own
`generate` (dynamic cache, sampling). On CPU the NF4 base runs through rlhf_kernels.nf4_linear; the
"bnb" provider is transformers' generate on bitsandbytes' own Linear4bit path (what a peer without our
kernel gets). Paired, interleaved repeats (ours, theirs, ours, ...); min and median seconds, decode
ms/step, tokens/s.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import statistics
import time

import torch

from bench.harness import device_name, versions, write_rows


def _stack(model: str, quantization: str | None, route: bool):
    import bitsandbytes as bnb

    from rlhf_engine.model.config import StackConfig
    from rlhf_engine.model.stack import ModelStack

    stack = ModelStack.build(StackConfig(model=model, adapters=("policy",), quantization=quantization)).eval()
    if quantization and not route:  # give the Linear4bit layers their own forward back (bitsandbytes' path)
        for m in stack.model.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                del m.forward  # the instance attribute set by model.loading.route_nf4_through_kernels
    return stack


def _prompts(stack, batch: int) -> list[list[int]]:
    from rlhf_engine.datasets.layout import prompt_ids
    from rlhf_engine.pipeline import world

    prompts = world.prompts()[::8]
    return [prompt_ids(stack.tokenizer, prompts[i % len(prompts)]) for i in range(batch)]


def ours(stack, ids: list[list[int]], new_tokens: int) -> float:
    from rlhf_engine.model.config import SamplingConfig
    from rlhf_engine.model.generation import sample

    eos = stack.tokenizer.eos_token
    stack.tokenizer.eos_token = None  # no stop: exactly new_tokens tokens, as min_new_tokens does for generate
    try:
        t0 = time.perf_counter()
        sample(stack, ids, SamplingConfig(max_new_tokens=new_tokens, temperature=1.0, max_prompt_length=512),
               adapter=None, seed=0)  # fmt: skip
        return time.perf_counter() - t0
    finally:
        stack.tokenizer.eos_token = eos


def theirs(stack, ids: list[list[int]], new_tokens: int) -> float:
    from rlhf_engine.core.tensors import pad

    input_ids, mask = pad(ids, stack.tokenizer.pad_token_id, side="left")
    lm = stack.model.get_base_model()
    with stack._active(None), torch.no_grad():  # the bare base, as ours samples it
        t0 = time.perf_counter()
        lm.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                    max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=stack.tokenizer.pad_token_id)
        return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a named base or a save_pretrained dir")
    parser.add_argument("--batch", type=int, default=32, help="rows sampled together (default 32: 8 prompts x 4)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per row (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="paired repeats (default 3)")
    parser.add_argument("--quantizations", default="nf4,none", help="comma-separated: nf4, none")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", metavar="PATH", help="write one JSON row per (precision, provider)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    meta = {"device": device_name(torch.device("cpu")), "versions": versions(), "date": _dt.date.today().isoformat(),
            "threads": torch.get_num_threads()}  # fmt: skip
    print(f"# generate on {meta['device']} | {meta['versions']} | {meta['date']} | {meta['threads']} threads")
    print(f"# {args.model}, {args.batch} rows x {args.new_tokens} new tokens, {args.repeats} paired repeats")
    print(f"{'precision':9} {'provider':9} {'min s':>8} {'median s':>9} {'ms/token step':>14} {'tokens/s':>9}")
    rows = []
    for q in [x.strip() for x in args.quantizations.split(",") if x.strip()]:
        quant = None if q == "none" else q
        providers = {"ours": (_stack(args.model, quant, True), ours), "generate": (None, theirs)}
        providers["generate"] = (providers["ours"][0], theirs)
        if quant:  # transformers' generate on bitsandbytes' own 4-bit path
            providers["bnb"] = (_stack(args.model, quant, False), theirs)
        ids = _prompts(providers["ours"][0], args.batch)
        for name, (stack, fn) in providers.items():  # a warm-up each: allocator, caches
            fn(stack, ids, 4)
        times = {name: [] for name in providers}
        for _ in range(args.repeats):
            for name, (stack, fn) in providers.items():
                times[name].append(fn(stack, ids, args.new_tokens))
        for name, ts in times.items():
            med = statistics.median(ts)
            row = {"op": "generate", "model": args.model, "precision": q, "provider": name, "batch": args.batch,
                   "new_tokens": args.new_tokens, "min_s": min(ts), "median_s": med, "times_s": ts,
                   "ms_per_step": 1e3 * med / args.new_tokens, "tokens_per_s": args.batch * args.new_tokens / med,
                   **meta}  # fmt: skip
            rows.append(row)
            print(f"{q:9} {name:9} {min(ts):8.2f} {med:9.2f} {row['ms_per_step']:14.1f} {row['tokens_per_s']:9.1f}")
    if args.json:
        write_rows(args.json, rows)
    return 0
