"""Time gptq_quantize (act-order on/off) and rtn_quantize on square layers; print a markdown table.

    .venv/bin/python bench/bench_solver.py --sizes 256 512 1024 2048 --threads 2
    .venv/bin/python bench/bench_solver.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from tlq_farm.quant import gptq_quantize, rtn_quantize


def synthetic_layer(size: int, tokens: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight [size, size] and H = 2 X X^T / n from correlated activations X [tokens, size]."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(size) + torch.randn(size, size, generator=g) / size**0.5
    X = torch.randn(tokens, size, generator=g) @ mix
    H = (2 * X.double().T @ X.double() / tokens)
    W = torch.randn(size, size, generator=g) / size**0.5
    return W.to(device), H.to(device)


def timed(fn, device: str) -> tuple[float, object]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=1, help="best of this many runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{args.bits}-bit, group {args.group_size}, sym, damp 0.01, blocksize 128")
    print()
    warm_W, warm_H = synthetic_layer(256, tokens=256, device=args.device)
    gptq_quantize(warm_W, warm_H, bits=args.bits, group_size=128)  # first-call library set-up, not timed
    print("| size (out = in) | rtn s | gptq s | gptq act-order s | gptq loss / rtn loss |")
    print("|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        W, H = synthetic_layer(size, tokens=size + 256, device=args.device)
        kwargs = dict(bits=args.bits, group_size=args.group_size)
        best = {}
        for name, fn in [("rtn", lambda: rtn_quantize(W, H=H, **kwargs)),
                         ("gptq", lambda: gptq_quantize(W, H, **kwargs)),
                         ("gptq_act", lambda: gptq_quantize(W, H, act_order=True, **kwargs))]:
            runs = [timed(fn, args.device) for _ in range(args.repeats)]
            best[name] = min(runs, key=lambda r: r[0])
        ratio = best["gptq"][1].loss / best["rtn"][1].loss
        print(f"| {size} | {best['rtn'][0]:.3f} | {best['gptq'][0]:.2f} | {best['gptq_act'][0]:.2f} | "
              f"{ratio:.3f} |", flush=True)


if __name__ == "__main__":
    main()
