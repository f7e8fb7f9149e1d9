"""Peak memory against depth: the same job on a model of 4 and of 32 decoder blocks.

    .venv/bin/python bench/bench_depth.py [--hidden 512] [--depths 4 32] [--samples 8] [--importance uniform]

Builds two Llama models from a config (no download) that differ only in their number of blocks, runs
`tlq-farm run` (embedded, a folder store, one torch thread) with GPTQ on each, and prints every task kind's
largest peak RSS (from the task records) side by side, with the ratio. A task that holds one block at a
time has the same peak at any depth. (The command's own ru_maxrss is no measure here: each task resets
the process's high-water mark to measure itself, and the kernel reports the last mark.) Markdown, for
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tlq_farm import plan, steps  # noqa: E402
from tlq_farm.staging import list_jobs  # noqa: E402
from tlq_farm.store import LocalStore  # noqa: E402

WORDS = "the a cat dog red blue green tree car house runs sits is on under near big small one two three".split()


def make_model(root: Path, depth: int, hidden: int) -> Path:
    from tlq_farm.models.tiny import make_tiny

    return make_tiny("llama", root / f"model-{depth}", seed=0, num_hidden_layers=depth, hidden_size=hidden,
                     intermediate_size=hidden * 11 // 4, num_attention_heads=8, num_key_value_heads=4,
                     head_dim=hidden // 8)


def make_calib(root: Path, samples: int) -> Path:
    rows = []
    for i in range(samples):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(48)]
        rows.append(json.dumps({"prompt": " ".join(words[:24]), "answer": " ".join(words[24:])}))
    path = root / "calib.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def run(model: Path, calib: Path, store: Path, out: Path, samples: int, importance: str) -> float:
    """`tlq-farm run` in a process of its own, one torch thread -> the process's largest RSS in GB, read from
    /proc every 20 ms (its own high-water mark is reset by each task to measure that task)."""
    cmd = [str(Path(sys.executable).parent / "tlq-farm"), "run", str(model), "--calib", str(calib), "--store",
           str(store), "--create-store", "--out", str(out), "--samples", str(samples), "--seq-len", "128",
           "--group-size", "64", "--importance", importance, "--quiet", "--overwrite"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    peak = 0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                peak = max(peak, next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")))
        except (OSError, StopIteration):
            pass
        time.sleep(0.02)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return peak * 1024 / 1e9


def peaks(store: Path) -> dict[str, float]:
    s = LocalStore(store)
    (job,) = list_jobs(s)
    out: dict[str, float] = {}
    for r in steps.task_records(s, job):
        out[r["kind"]] = max(out.get(r["kind"], 0.0), r["peak_rss_mib"] * 2**20 / 1e9)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("/tmp/tlq-depth"))
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--depths", type=int, nargs=2, default=[4, 32])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--importance", default="uniform")
    args = ap.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    calib = make_calib(args.root, args.samples)
    found = {}
    for depth in args.depths:
        model = make_model(args.root, depth, args.hidden)
        store = args.root / f"store-{depth}-{args.importance}"
        if store.exists():
            shutil.rmtree(store)  # a job staged before would only be attached to
        whole = run(model, calib, store, args.root / f"out-{depth}-{args.importance}", args.samples, args.importance)
        found[depth] = peaks(store)
        found[depth]["whole `tlq-farm run` process"] = whole
    a, b = args.depths
    print(f"| peak RSS (GB) | {a} blocks | {b} blocks | {b} / {a} |")
    print("|---|---:|---:|---:|")
    for kind in [*plan.KINDS, "whole `tlq-farm run` process"]:
        if kind in found[a] and kind in found[b]:
            print(f"| {kind} | {found[a][kind]:.2f} | {found[b][kind]:.2f} | {found[b][kind] / found[a][kind]:.2f} |")


if __name__ == "__main__":
    main()
