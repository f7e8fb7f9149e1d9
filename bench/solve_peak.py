"""Peak memory of one solve task at a given layer shape, against plan.estimate_memory, staging nothing.

    .venv/bin/python bench/solve_peak.py --method gptq  --shape 3584x18944
    .venv/bin/python bench/solve_peak.py --method gptaq --shape 3584x18944 --partials 2

Synthetic float32 partials of the right shapes (sums of H, and for GPTAQ the linear's W D and
tr(W Hfp W^T), hessian.fold_cross_terms) are written to a folder store as the stats task writes them; then, from a reset high-water mark (/proc/self/clear_refs), the solve
task's own steps run: the partials read one at a time as do_solve reads them (stored_partial over
get_tensors_and_metadata) and block.solve_partials (the ordered float64 reduction, then the solver). The
weight is made in float32 inside the measured region, as the task reads it. Prints the peak RSS, the task's
own part (above the process before it), the estimate, and the time of each phase. One torch thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from tlq_farm import block as B
from tlq_farm import plan
from tlq_farm.quant import fold_cross_terms
from tlq_farm.spec import QuantSpec
from tlq_farm.steps import SEP, stored_partial
from tlq_farm.store import LocalStore
from tlq_farm.store import keys as store_keys
from tlq_farm.store.tensors import get_tensors_and_metadata, put_tensors

GB = 1e9
MODULE = "mlp.down_proj"


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}: this script needs Linux")


def synthetic_partial(in_f: int, gptaq: bool, seed: int, weight: torch.Tensor, rank: int = 64) -> dict[str, torch.Tensor]:
    """Float32 sums of one partition, shaped like the stats task's: H (positive definite), and for GPTAQ the
    products of D and Hfp with the weight."""
    g = torch.Generator().manual_seed(seed)
    tokens = 8192
    B_q = torch.randn(in_f, rank, generator=g) * (tokens / rank) ** 0.5
    part = {"H": B_q @ B_q.T}
    part["H"].diagonal().add_(0.1 * tokens)
    if gptaq:
        B_d = 0.1 * torch.randn(in_f, rank, generator=g) * (tokens / rank) ** 0.5
        D = B_d @ B_q.T
        part.update(fold_cross_terms(weight, {"D": D, "Hfp": part["H"] + D + D.T + B_d @ B_d.T}))
        del D
    part["w_sum"] = torch.tensor(float(tokens), dtype=torch.float64)
    part["tokens"] = torch.tensor(tokens)
    return part


def estimate(method: str, out_f: int, in_f: int, act_order: bool) -> int:
    """plan.estimate_memory for this solve, from a manifest and groups of one block holding this one linear."""
    quant = {"method": method, "importance": "uniform", "act_order": act_order}
    manifest = {"sizes": {"blocks": [out_f * in_f * 2], "embed": 0, "head": 0, "hidden": out_f},
                "shard_tokens": [8192], "spec": {"quant": quant}}
    groups = {"blocks": [{"groups": [[MODULE]], "shapes": {MODULE: [out_f, in_f]},
                          "in_features": {MODULE: in_f}, "inputs": [[MODULE]]}]}
    return plan.estimate_memory(plan.Task("solve", block=0, group=0, module=MODULE), manifest, groups)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=["gptq", "gptaq"], default="gptq")
    parser.add_argument("--shape", default="3584x18944", help="OUTxIN (Qwen2-VL-7B's down_proj: 3584x18944)")
    parser.add_argument("--partials", type=int, default=2, help="statistics partitions to reduce")
    parser.add_argument("--act-order", action="store_true")
    parser.add_argument("--store", default=None, help="folder for the partials (default: a temporary one)")
    args = parser.parse_args()
    out_f, in_f = (int(x) for x in args.shape.lower().split("x"))
    torch.set_num_threads(1)
    gptaq = args.method == "gptaq"
    spec = QuantSpec(method=args.method, bits=4, group_size=128, act_order=args.act_order)

    def weight() -> torch.Tensor:
        return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(9)) / in_f**0.5

    with tempfile.TemporaryDirectory(prefix="tlq-solve-peak-", dir=args.store) as tmp:
        store = LocalStore(Path(tmp) / "store")
        keys = [store_keys.stats("solve-peak", 0, 3, p) for p in range(args.partials)]
        t0 = time.perf_counter()
        for p, key in enumerate(keys):
            part = synthetic_partial(in_f, gptaq, p, weight())
            put_tensors(store, key, {f"{MODULE}{SEP}{k}": t for k, t in part.items()},
                        metadata={"tlq": json.dumps({"owners": {MODULE: MODULE}}, sort_keys=True)})
            del part
        print(f"wrote {args.partials} partials in {time.perf_counter() - t0:.0f} s", flush=True)

        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = status_bytes("VmRSS")
        wall, cpu = time.perf_counter(), time.process_time()
        w = weight()
        reduced = {}

        def partials():
            for key in keys:  # as do_solve reads them
                part = stored_partial(*get_tensors_and_metadata(store, key), MODULE)
                yield part
            reduced["wall"], reduced["cpu"] = time.perf_counter() - wall, time.process_time() - cpu

        res, counts = B.solve_partials(w, partials(), spec)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        peak = status_bytes("VmHWM")
    own = peak - before
    est = estimate(args.method, out_f, in_f, args.act_order)
    print("| method | shape | partials | peak RSS GB | own GB | estimate GB | own / estimate | reduce wall / CPU s | "
          "solve wall / CPU s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {args.method} | {out_f}x{in_f} | {args.partials} | {peak / GB:.2f} | {own / GB:.2f} | {est / GB:.2f} | "
          f"{own / est:.2f} | {reduced['wall']:.0f} / {reduced['cpu']:.0f} | {wall - reduced['wall']:.0f} / "
          f"{cpu - reduced['cpu']:.0f} |")
    print(f"loss {res.loss:.6g}, tokens {counts.get('tokens')}, damp {res.damp_used}")


if __name__ == "__main__":
    main()
