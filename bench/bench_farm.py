"""Farm figures: overhead of the farm against the embedded run, 1 vs 2 workers, bytes moved per block.

    .venv/bin/python bench/bench_farm.py [--layers 4] [--hidden 256] [--samples 16] [--shard-tokens 256]

Builds a small Llama from a config (no download), stages one GPTQ job and runs it:
  1. embedded (this process, folder store),
  2. on a farm of 1 worker, then 2 workers (Celery over a private redis-server, moto S3 over loopback),
     each worker with one torch thread;
and reports wall time from staging to committed export, plus the bytes each block's tasks read and wrote
through the store against the minimum (the block's weights, its input activations and its outputs).
Prints a Markdown table (for docs/benchmarks.md, section "Farm").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tlq_farm import plan, steps  # noqa: E402
from tlq_farm.staging import stage_job  # noqa: E402
from tlq_farm.store import LocalStore, keys, open_store  # noqa: E402

WORDS = "the a cat dog red blue green tree car house runs sits is on under near big small one two three".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_job(root: Path, layers: int, hidden: int, samples: int):
    from tlq_farm.models.tiny import make_tiny

    model = make_tiny("llama", root / "model", seed=0, num_hidden_layers=layers, hidden_size=hidden,
                      intermediate_size=2 * hidden, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=hidden // 4)
    rng = torch.Generator().manual_seed(0)
    rows = []
    for i in range(samples):
        n = 24 + int(torch.randint(0, 16, (1,), generator=rng))
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (n,), generator=rng)]
        rows.append(json.dumps({"prompt": " ".join(words[: n // 2]), "answer": " ".join(words[n // 2:])}))
    calib = root / "calib.jsonl"
    calib.write_text("\n".join(rows) + "\n")
    return model, calib


def spec_for(model, calib, samples, shard_tokens):
    from tlq_farm.spec import JobSpec, QuantSpec

    return JobSpec(model=str(model), calib=str(calib), quant=QuantSpec(group_size=64), samples=samples, seq_len=512,
                   shard_tokens=shard_tokens)


def bytes_per_block(store, job) -> list[dict]:
    """Bytes read + written by each block's tasks (from commit sizes) and the minimum a block must move."""
    manifest = steps.get_json(store, keys.manifest(job))
    committed = steps.committed_keys(store, job)
    groups = steps.job_groups(store, job, committed)

    def size(k):
        info = store.commit_info(k)
        return info.size if info else 0

    sizes: dict[str, int] = {}
    rows = []
    for b in range(manifest["n_blocks"]):
        moved = 0
        for t in plan.all_tasks(manifest, groups):
            if t.block != b:
                continue
            for k in plan.inputs(t, manifest, groups) + plan.outputs(t, manifest):
                if k not in sizes:
                    sizes[k] = size(k)
                moved += sizes[k]
        shards = range(len(manifest["shards"]))
        acts_in = sum(size(keys.acts(job, "q", b, k)) for k in shards)
        acts_out = sum(size(keys.acts(job, "q", b + 1, k)) for k in shards) if b + 1 < manifest["n_blocks"] else 0
        minimum = size(keys.staged_block(job, b)) + acts_in + acts_out
        rows.append({"block": b, "moved": moved, "minimum": minimum})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--shard-tokens", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-farm-"))
    model, calib = make_job(work, args.layers, args.hidden, args.samples)
    spec = spec_for(model, calib, args.samples, args.shard_tokens)

    t = time.perf_counter()
    store = LocalStore(work / "embedded")
    job, _ = stage_job(store, spec)
    assert steps.run_embedded(store, job)
    embedded_s = time.perf_counter() - t
    manifest = steps.get_json(store, keys.manifest(job))
    n_tasks = len(plan.all_tasks(manifest, steps.job_groups(store, job, steps.committed_keys(store, job))))
    per_block = bytes_per_block(store, job)

    sys.path.insert(0, str(ROOT / "tests"))
    from s3_server import DUMMY_ENVIRONMENT, start_moto

    os.environ.update(DUMMY_ENVIRONMENT)
    server, endpoint = start_moto()
    port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL)
    broker = f"redis://127.0.0.1:{port}/0"
    env = dict(os.environ, TLQ_BROKER_URL=broker, AWS_ENDPOINT_URL=endpoint, TLQ_TORCH_THREADS="1",
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TLQ_ALLOWED_STORES="s3://bench-farm")
    cli = str(Path(sys.executable).parent / "tlq-farm")
    farm_s = {}
    workers: list[subprocess.Popen] = []
    try:
        time.sleep(0.5)
        for n in (1, 2):
            while len(workers) < n:
                workers.append(subprocess.Popen([cli, "worker", "--loglevel", "WARNING"], env=env, cwd=ROOT,
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(15)  # workers import torch and transformers before they take tasks
            url = f"s3://bench-farm/{uuid.uuid4().hex[:8]}"
            s3 = open_store(url, endpoint_url=endpoint)
            s3.ensure_bucket()
            out = work / f"farm-{n}"
            t = time.perf_counter()
            subprocess.run([cli, "run", str(model), "--calib", str(calib), "--samples", str(args.samples),
                            "--seq-len", "512", "--group-size", "64", "--shard-tokens", str(args.shard_tokens),
                            "--store", url, "--broker", broker, "--quiet", "--out", str(out)],
                           env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            farm_s[n] = time.perf_counter() - t
            ref = work / "embedded-out"
            if not ref.exists():
                from tlq_farm.jobs import download_export

                download_export(store, job, ref)
            same = all((out / p.name).read_bytes() == p.read_bytes() for p in ref.iterdir())
            farm_s[f"same-{n}"] = same
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait(20)
        redis.terminate()
        server.stop()

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"Machine: {cpu}, {os.cpu_count()} cores; torch {torch.__version__}, 1 torch thread per process.")
    print(f"Job: Llama {args.layers} blocks, hidden {args.hidden}, GPTQ w4 g64, {args.samples} samples, "
          f"{len(manifest['shards'])} shards, {n_tasks} tasks.\n")
    print("| run | wall time (s) | export equals embedded |")
    print("|---|---:|---|")
    print(f"| embedded (folder store, in process) | {embedded_s:.1f} | - |")
    for n in (1, 2):
        print(f"| farm, {n} worker{'s' if n > 1 else ''} (Redis + moto S3 over loopback) | {farm_s[n]:.1f} | "
              f"{'yes' if farm_s[f'same-{n}'] else 'NO'} |")
    print("\n| block | bytes moved through the store | minimum (weights + acts in + out) | ratio |")
    print("|---:|---:|---:|---:|")
    for r in per_block:
        print(f"| {r['block']} | {r['moved']:,} | {r['minimum']:,} | {r['moved'] / max(r['minimum'], 1):.1f} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
