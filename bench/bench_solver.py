"""Time gptq_quantize against a plain float32 GPTQ written here, on the same W and H; print markdown tables.

    .venv/bin/python bench/bench_solver.py --shapes 4096x4096 3584x18944 --threads 1
    .venv/bin/python bench/bench_solver.py --shapes 1024x1024 --gptaq --check-loss
    .venv/bin/python bench/bench_solver.py --sizes 256 512 --device cuda

Shapes are OUTxIN (3584x18944: Qwen2-VL-7B's down_proj). Each shape runs the reference and gptq_quantize
alternately (A B A B, --pairs times), so that a busy machine slows both alike; each call is reported with its
cost split, wall and CPU seconds, and peak memory (Linux: VmHWM, reset before each call via
/proc/self/clear_refs), and the ratio of each pair.

The reference is the textbook algorithm of GPTQ (arXiv 2210.17323, Algorithm 1 with lazy batches): float32 H,
damping, Cholesky, inverse from it, upper Cholesky of the inverse, blocks of 128 columns, a symmetric min-max
grid per group of 128 columns, and the loop's per-column loss terms.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from tlq_farm.quant import gptq_quantize, rtn_quantize
from tlq_farm.quant.gptq import plain_loss

GB = 1e9


# ---- memory and time ----------------------------------------------------------------------------------------

def _status_bytes(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class Measured:
    """Wall and CPU seconds of a block, and the process's peak RSS during it (above what it held before)."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        reset_peak()
        self.rss_before = _status_bytes("VmRSS")
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        self.peak = _status_bytes("VmHWM")
        self.own = self.peak - self.rss_before
        if self.device.startswith("cuda"):
            self.own = torch.cuda.max_memory_allocated()
        return False


# ---- the layer ------------------------------------------------------------------------------------------------

def synthetic_layer(out_f: int, in_f: int, device: str, seed: int = 0, rank: int = 64
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] and a float64 H [in, in] like a layer's input Gram: per-input scales spread over two decades,
    and correlated inputs (a rank-`rank` common part plus an independent part), built in O(in^2 rank) so that
    18944 columns take seconds (2 X^T X / n would take minutes)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(in_f, generator=g, dtype=torch.float64))
    B = torch.randn(in_f, rank, generator=g, dtype=torch.float64) / rank**0.5
    H = B @ B.T
    H.diagonal().add_(0.25)
    H *= scale.unsqueeze(0)
    H *= scale.unsqueeze(1)
    H *= 2
    W = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    return W.to(device), H.to(device)


# ---- the reference: plain float32 GPTQ ------------------------------------------------------------------------

def sym_grid(w: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric min-max grid of w [rows, cols] -> (scale [rows, 1], zero [rows, 1])."""
    amax = torch.maximum(w.min(1).values.abs(), w.max(1).values).unsqueeze(1)
    amax[amax == 0] = 1
    return 2 * amax / maxq, torch.full_like(amax, (maxq + 1) / 2)


def reference_gptq(W: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int = 128, blocksize: int = 128,
                   percdamp: float = 0.01, timings: dict | None = None) -> tuple[torch.Tensor, float]:
    """GPTQ's Algorithm 1 in float32 -> (dequantized weight [out, in], the loop's loss sum(err^2) / 2)."""
    start = time.perf_counter()
    W = W.float().clone()
    H = H.float()  # a float32 copy of the statistics: the reference's own
    maxq = 2**bits - 1
    columns = W.shape[1]
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(percdamp * torch.diagonal(H).mean())
    Hinv = torch.linalg.cholesky(H)
    del H
    Hinv = torch.cholesky_inverse(Hinv)
    Hinv = torch.linalg.cholesky(Hinv, upper=True)
    factored = time.perf_counter()
    Q = torch.zeros_like(W)
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    scale = zero = None
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            if (i1 + i) % group_size == 0:
                scale, zero = sym_grid(W[:, i1 + i:i1 + i + group_size], maxq)
            q = (scale * (torch.clamp(torch.round(w.unsqueeze(1) / scale) + zero, 0, maxq) - zero)).flatten()
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        loss += Err1.double().square().sum() / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    if timings is not None:
        timings["factor"] = factored - start
        timings["loop"] = time.perf_counter() - factored
    return Q, float(loss)


# ---- the benchmark --------------------------------------------------------------------------------------------

def parse_shape(text: str) -> tuple[int, int]:
    try:
        out_f, in_f = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not OUTxIN, e.g. 3584x18944") from None
    if in_f % 128:
        raise argparse.ArgumentTypeError(f"shape {text!r}: IN must be a multiple of the group size 128")
    return out_f, in_f


def run_ours(W, H, device, gptaq: bool, exact_check: bool):
    """gptq_quantize on a fresh copy of H that it may overwrite (what a solve task does)."""
    Hc = H.clone()
    kwargs = {}
    if gptaq:
        # What the reduction hands over: W D ([out, in]) and tr(W Hfp W^T). Synthetic values: the cost does not
        # depend on them (nor is the loss then meaningful).
        g = torch.Generator().manual_seed(1)
        kwargs = dict(WD=0.05 * torch.randn(W.shape, generator=g, dtype=torch.float64).to(device), WHfpW=1.0)
    timings: dict = {}
    with Measured(device) as m:
        res = gptq_quantize(W, Hc, bits=4, group_size=128, overwrite_H=True, timings=timings, **kwargs)
    del Hc
    check = None
    if exact_check and not gptaq:
        check = res.loss / plain_loss(res.weight, W, H) - 1
    return m, timings, res, check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=parse_shape, nargs="+", default=None, help="OUTxIN, e.g. 4096x4096 3584x18944")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="square layers (N -> NxN)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--pairs", type=int, default=2, help="reference / gptq_quantize pairs per shape (A B A B)")
    parser.add_argument("--gptaq", action="store_true", help="also time a GPTAQ solve (its target W + W D H^-1)")
    parser.add_argument("--check-loss", action="store_true",
                        help="compare the loop's loss with the float64 formula (2 out in^2 float64 flops)")
    parser.add_argument("--rtn", action="store_true", help="add RTN's time and GPTQ loss / RTN loss (small shapes)")
    args = parser.parse_args()
    shapes = list(args.shapes or []) + [(n, n) for n in (args.sizes or [])]
    if not shapes:
        shapes = [(n, n) for n in (256, 512, 1024, 2048)]
    torch.set_num_threads(args.threads)

    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, 4-bit, group 128, "
          f"sym, damp 0.01, blocksize 128")
    print()
    warm_W, warm_H = synthetic_layer(64, 256, args.device)
    gptq_quantize(warm_W, warm_H)  # first-call library set-up, not timed
    reference_gptq(warm_W, warm_H)

    rows, ratios, extra = [], [], []
    for out_f, in_f in shapes:
        W, H = synthetic_layer(out_f, in_f, args.device)
        shape = f"{out_f}x{in_f}"
        for pair in range(args.pairs):
            ref_t: dict = {}
            with Measured(args.device) as ref:
                reference_gptq(W, H, timings=ref_t)
            rows.append(f"| {shape} | reference (float32) | {ref_t['factor']:.2f} | - | {ref_t['loop']:.2f} | - | "
                        f"{ref.wall:.2f} | {ref.cpu:.2f} | {ref.own / GB:.2f} |")
            ours, t, res, check = run_ours(W, H, args.device, False, args.check_loss and pair == 0)
            rows.append(f"| {shape} | gptq_quantize | {t.get('factor', 0):.2f} | - | {t.get('loop', 0):.2f} | "
                        f"{t.get('loss', 0):.2f} | {ours.wall:.2f} | {ours.cpu:.2f} | {ours.own / GB:.2f} |")
            ratios.append(f"| {shape} | {pair + 1} | {ours.wall / ref.wall:.2f} | {ours.cpu / ref.cpu:.2f} |")
            if check is not None:
                extra.append(f"{shape}: loop loss / float64 formula - 1 = {check:.1e}")
            print(rows[-2], rows[-1], ratios[-1], sep="\n", flush=True)
        if args.gptaq:
            aq, t, _, _ = run_ours(W, H, args.device, True, False)
            rows.append(f"| {shape} | gptq_quantize, GPTAQ | {t.get('factor', 0):.2f} | {t.get('target', 0):.2f} | "
                        f"{t.get('loop', 0):.2f} | {t.get('loss', 0):.2f} | {aq.wall:.2f} | {aq.cpu:.2f} | "
                        f"{aq.own / GB:.2f} |")
            print(rows[-1], flush=True)
        if args.rtn:
            with Measured(args.device) as r:
                rtn = rtn_quantize(W, bits=4, group_size=128, H=H)
            extra.append(f"{shape}: rtn {r.wall:.2f} s, gptq loss / rtn loss {res.loss / rtn.loss:.3f}")
        del W, H

    print()
    print("| shape (out x in) | solver | factor s | target s | loop s | loss s | wall s | CPU s | own peak GB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    print()
    print("| shape | pair | gptq_quantize / reference, wall | CPU |")
    print("|---|---:|---:|---:|")
    print("\n".join(ratios))
    if extra:
        print()
        print("\n".join(extra))


if __name__ == "__main__":
    main()
