"""One decoder block's tasks, one by one: wall and CPU seconds and peak memory of each, from the job's own task
records (the farm's tasks, run embedded on a folder store).

    .venv/bin/python bench/bench_block.py --threads 1                  # Llama, hidden 1024, 16 x 256 tokens
    .venv/bin/python bench/bench_block.py --importance tlq --method gptaq
    .venv/bin/python bench/bench_block.py --device cuda

Builds a Llama from a config (2 blocks, no download) and a calibration set of text rows, runs the job with
`run_embedded`, and prints the tasks of block 0 (and the job-wide ones before it) in the order they ran.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from tlq_farm import steps  # noqa: E402
from tlq_farm.spec import JobSpec, QuantSpec  # noqa: E402
from tlq_farm.staging import stage_job  # noqa: E402
from tlq_farm.store import LocalStore  # noqa: E402

WORDS = "the a cat dog red blue green tree car house runs sits is on under near big small one two three".split()


def text_rows(path: Path, n: int, words: int) -> Path:
    """n rows of `words` words each (prompt and answer halves), deterministic."""
    rows = []
    for i in range(n):
        w = [WORDS[(i * 7 + j * 3 + j * j) % len(WORDS)] for j in range(words)]
        rows.append(json.dumps({"prompt": " ".join(w[: words // 2]), "answer": " ".join(w[words // 2:])}))
    path.write_text("\n".join(rows) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--words", type=int, default=240, help="words per calibration row (about one token each)")
    ap.add_argument("--importance", default="uniform")
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from tlq_farm.models.tiny import make_tiny

    with tempfile.TemporaryDirectory() as tmp:
        heads = args.hidden // 64
        model = make_tiny("llama", Path(tmp) / "m", hidden_size=args.hidden, intermediate_size=args.intermediate,
                          num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), head_dim=64,
                          num_hidden_layers=2)
        calib = text_rows(Path(tmp) / "calib.jsonl", args.samples, args.words)
        spec = JobSpec(model=str(model), calib=str(calib), samples=args.samples, seq_len=4096,
                       quant=QuantSpec(method=args.method, importance=args.importance, group_size=128))
        store = LocalStore(Path(tmp) / "store")
        job, _ = stage_job(store, spec)
        assert steps.run_embedded(store, job, device=args.device)
        records = sorted(steps.task_records(store, job), key=lambda r: r["started"])
        manifest = steps.job_context(store, job).manifest
        tokens = sum(manifest["shard_tokens"])
        print(f"Llama, hidden {args.hidden}, MLP {args.intermediate}, {args.samples} samples, {tokens} tokens, "
              f"{args.method} / {args.importance}, device {args.device}, torch threads {args.threads}\n")
        print("| task | wall s | CPU s | peak RSS (MiB) | outputs reused | kept after (MiB) |\n|---|---:|---:|---:|---:|---:|")
        for r in records:
            if r["block"] in (None, 0) and r["kind"] != "export":
                print(f"| {r['task']} | {r['seconds']:.3f} | {r['cpu_s']:.3f} | {r['peak_rss_mib']:.0f} | "
                      f"{r.get('reused_outputs', 0)} | {r.get('kept_outputs_mib', 0):.0f} |")
        block0 = [r for r in records if r["block"] == 0]
        print(f"\nblock 0: {sum(r['seconds'] for r in block0):.2f} s wall, {sum(r['cpu_s'] for r in block0):.2f} s CPU "
              f"in {len(block0)} tasks")


if __name__ == "__main__":
    main()
