"""GPTAQ's statistics of one linear, the two ways a task can sum them: wall and CPU seconds per token.

    .venv/bin/python bench/bench_stats.py                                  # 1024x2816 and Qwen2-VL-7B's down_proj
    .venv/bin/python bench/bench_stats.py --shapes 3584x18944 --tokens 256 --pairs 2

For a linear of shape out x in, on the same random inputs of both chains (x~ and x, float32, all weights 1),
alternately (A B A B, one torch thread):

  - grams: S_H, S_D and S_Hfp summed as [in, in] matrices, then W S_D and tr(W S_Hfp W^T) taken once
    (hessian.fold_cross_terms), what a stats task does for a linear that shares its input;
  - products: S_H, and W S_D and tr(W S_Hfp W^T) summed token by token from products with W
    (start_sums' product_rows; plan.product_cross_terms picks this where out <= in / 2).

Prints a Markdown table (docs/benchmarks.md, "Statistics of a wide linear") with each call's CPU seconds, split
into the sums (per token) and the fold (once per partition), the multiply-adds per token each way, the CPU
seconds projected to a partition of --project tokens, and the largest relative difference of the two results.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from tlq_farm.quant import add_tokens, finish_sums, fold_cross_terms, start_sums  # noqa: E402
from tlq_farm.quant.hessian import upper_length  # noqa: E402


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(way: str, W: torch.Tensor, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[dict, float, float, float]:
    """(W D and tr(W Hfp W^T), CPU s of the sums, CPU s of the fold, wall s) of one way over the batches. The
    fold (grams only: `2 out in^2` multiply-adds) is paid once per partition, the sums per token."""
    out_f, in_f = W.shape
    t, c = time.perf_counter(), cpu_seconds()
    if way == "grams":
        sums = start_sums(in_f, cross=True, need_fp_gram=True)
        for xq, xf in batches:
            add_tokens(sums, xq, torch.ones(xq.shape[:-1]), xf)
        finish_sums(sums)
        summed = cpu_seconds() - c
        result = fold_cross_terms(W, sums)
    else:
        sums = start_sums(in_f, product_rows=out_f)
        for xq, xf in batches:
            add_tokens(sums, xq, torch.ones(xq.shape[:-1]), xf, W)
        finish_sums(sums)
        summed = cpu_seconds() - c
        result = {"WD": sums["WD"], "WHfpW": sums["WHfpW"]}
    return result, summed, cpu_seconds() - c - summed, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["1024x2816", "3584x18944"], help="out x in of each linear")
    ap.add_argument("--tokens", type=int, default=512, help="tokens summed per call (in batches of 256)")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--project", type=int, default=128 * 2048,
                    help="tokens of a whole job (one partition) to project the CPU seconds to: sums per token + fold")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"| shape (out x in) | way | pair | sums: CPU s | CPU ms / token | fold: CPU s | wall s | "
          f"multiply-adds / token (M) | at {args.project} tokens: CPU s |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|")
    notes = []
    for shape in args.shapes:
        out_f, in_f = (int(x) for x in shape.split("x"))
        g = torch.Generator().manual_seed(0)
        W = torch.randn(out_f, in_f, generator=g) * 0.02
        batches = []
        for start in range(0, args.tokens, 256):
            xq = torch.randn(min(256, args.tokens - start), in_f, generator=g)
            batches.append((xq, xq + 0.05 * torch.randn(xq.shape, generator=g)))
        flops = {"grams": (upper_length(in_f) * 2 + in_f * in_f) / 1e6,
                 "products": (upper_length(in_f) + 3 * out_f * in_f) / 1e6}
        results = {}
        for pair in range(1, args.pairs + 1):
            for way in ("grams", "products"):
                results[way], summed, fold, wall = run(way, W, batches)
                per_token = summed / args.tokens
                print(f"| {shape} | {way} | {pair} | {summed:.2f} | {1e3 * per_token:.2f} | {fold:.2f} | {wall:.2f} | "
                      f"{flops[way]:.1f} | {per_token * args.project + fold:.0f} |", flush=True)
        a, b = results["grams"], results["products"]
        wd = float((a["WD"].double() - b["WD"].double()).abs().max() / a["WD"].double().abs().max())
        tr = abs(float(a["WHfpW"]) - float(b["WHfpW"])) / abs(float(a["WHfpW"]))
        notes.append(f"{shape}: W D differs by {wd:.1e} of its largest entry, tr(W Hfp W^T) by {tr:.1e} (relative)")
    print()
    for n in notes:
        print(f"- {n}")
    print(f"\n{args.tokens} tokens per call, one torch thread; torch {torch.__version__}.")


if __name__ == "__main__":
    main()
