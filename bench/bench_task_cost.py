"""The fixed cost of a task, whatever it computes: store round trips, checksums, commit markers, locks, the
task record, the reconcile that follows. Measured on a folder store and on S3 (moto's server over loopback).

    .venv/bin/python bench/bench_task_cost.py [--repeats 200]

Prints, per store, the CPU and wall milliseconds of: a committed write of a small object (1 KiB), a verified
read of it, a cancel-flag check, a commit-marker check, opening a job's context, reconcile_job on a finished
job, and a whole task whose body does nothing (execute: cancel check, skip check, meter, record). Then what
scheduling by full reconciles would cost on Qwen2-VL-7B's plan (28 blocks, 32 shards of 128 x 2048 tokens):
the waves of ready tasks from the staged job to its export, and the CPU of a plan.reconcile per wave.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tlq_farm import plan, steps  # noqa: E402
from tlq_farm.store import LocalStore, keys, open_store  # noqa: E402
from tlq_farm.store.tensors import get_json, put_json  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, float]:
    """(CPU ms, wall ms) per call, the mean over `repeats` calls after one untimed call."""
    fn(0)
    c0, w0 = time.process_time(), time.perf_counter()
    for i in range(repeats):
        fn(i + 1)
    return 1e3 * (time.process_time() - c0) / repeats, 1e3 * (time.perf_counter() - w0) / repeats


def demo_job(store) -> str:
    """The demo job, staged and run embedded (its objects are what a real job reads and writes)."""
    from tlq_farm.demo import DEMO_CALIB_JSONL, DEMO_MODEL_DIR
    from tlq_farm.spec import JobSpec
    from tlq_farm.staging import stage_job

    job, _ = stage_job(store, JobSpec(model=str(DEMO_MODEL_DIR), calib=str(DEMO_CALIB_JSONL), samples=16))
    steps.run_embedded(store, job)
    return job


def measure(store, job: str, repeats: int) -> dict[str, tuple[float, float]]:
    payload = {"x": "y" * 1000}
    key = keys.job_prefix(job) + "bench/object-{}.json"
    rows = {"write 1 KiB (put_json)": timed(lambda i: put_json(store, key.format(i), payload), repeats),
            "read 1 KiB (get_json)": timed(lambda i: get_json(store, key.format(i % repeats + 1)), repeats),
            "cancel flag check": timed(lambda i: steps.is_cancelled(store, job), repeats),
            "commit marker check": timed(lambda i: store.is_committed(key.format(i % repeats + 1)), repeats)}
    rows["open a job context"] = timed(lambda i: steps.JobContext(store, job), max(5, repeats // 20))
    rows["reconcile_job (finished job)"] = timed(lambda i: steps.reconcile_job(store, job, {}), max(5, repeats // 20))

    def nothing(ctx, task):
        put_json(ctx.store, keys.job_prefix(job) + f"bench/out-{time.perf_counter_ns()}.json", {})

    # The groups task with its body replaced by one small write and an output that is never committed, so that
    # every execute computes: what remains is the protocol around any task.
    body, plan_outputs = steps.BODIES["groups"], plan.outputs
    steps.BODIES["groups"] = nothing
    plan.outputs = lambda t, m, g=None: [keys.job_prefix(job) + "bench/never"] if t.kind == "groups" \
        else plan_outputs(t, m, g)
    try:
        rows["task with a one-write body (execute)"] = timed(lambda i: steps.execute(store, job, plan.Task("groups")),
                                                             max(5, repeats // 4))
    finally:
        steps.BODIES["groups"], plan.outputs = body, plan_outputs
    return rows


def plan_7b_waves() -> tuple[int, int, float]:
    """(tasks, waves, CPU seconds of one plan.reconcile per wave) on a gptq job with Qwen2-VL-7B's plan: every
    ready task of a wave committed before the next reconcile, from the embeds' outputs to the export."""
    from tlq_farm.spec import JobSpec, QuantSpec

    job, n_blocks, n_shards = "job-7b", 28, 32
    spec = JobSpec(model="m", calib="c", quant=QuantSpec(method="gptq"), samples=128, seq_len=2048)
    manifest = {"job": job, "spec": spec.to_dict(), "n_blocks": n_blocks, "n_samples": 128,
                "calibration": {"vision_tokens": 0}, "shards": [[4 * k, 4 * k + 4] for k in range(n_shards)],
                "shard_tokens": [8192] * n_shards, "shard_input_bytes": [0] * n_shards, "files": ["config.json"],
                "sizes": {"embed": 0, "head": 0, "blocks": [466_000_000] * n_blocks, "hidden": 3584}}
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj"]
    shapes = {"self_attn.q_proj": [3584, 3584], "self_attn.k_proj": [512, 3584], "self_attn.v_proj": [512, 3584],
              "self_attn.o_proj": [3584, 3584], "mlp.gate_proj": [18944, 3584], "mlp.up_proj": [18944, 3584],
              "mlp.down_proj": [3584, 18944]}
    block = {"names": names, "groups": [names[:3], names[3:4], names[4:6], names[6:]],
             "in_features": {n: shapes[n][1] for n in names}, "shapes": shapes}
    groups = {"blocks": [block] * n_blocks}
    committed = {keys.staged_file(job, "config.json"), keys.staged_embed(job), keys.staged_head(job)}
    committed |= {keys.staged_block(job, b) for b in range(n_blocks)}
    committed |= {keys.calib_shard(job, k) for k in range(n_shards)}
    for task in [plan.Task("embed", shard=k) for k in range(n_shards)] + [plan.Task("groups")]:
        committed |= set(plan.outputs(task, manifest))
    tasks = waves = 0
    cpu = 0.0
    while True:
        c0 = time.process_time()
        rec = plan.reconcile(manifest, committed, groups)
        cpu += time.process_time() - c0
        if rec.done:
            return tasks, waves, cpu
        waves += 1
        tasks += len(rec.ready)
        for task in rec.ready:
            committed |= set(plan.outputs(task, manifest, groups))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory(prefix="tlq-cost-") as tmp:
        local = LocalStore(Path(tmp) / "store")
        job = demo_job(local)
        results["folder"] = measure(local, job, args.repeats)
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
        server.start()
        try:
            host, port = server.get_host_and_port()
            os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="x",
                              AWS_SECRET_ACCESS_KEY="x", AWS_DEFAULT_REGION="us-east-1")
            import boto3

            boto3.client("s3").create_bucket(Bucket="bench")
            s3 = open_store("s3://bench/cost")
            job = demo_job(s3)
            results["S3 (moto, loopback)"] = measure(s3, job, max(20, args.repeats // 4))
        finally:
            server.stop()
    names = list(results["folder"])
    print("| step | " + " | ".join(f"{s}: CPU ms | {s}: wall ms" for s in results) + " |")
    print("|---|" + "---:|---:|" * len(results))
    for n in names:
        print(f"| {n} | " + " | ".join(f"{results[s][n][0]:.2f} | {results[s][n][1]:.2f}" for s in results) + " |")
    print(json.dumps({s: {n: [round(c, 3), round(w, 3)] for n, (c, w) in r.items()} for s, r in results.items()}))
    tasks, waves, cpu = plan_7b_waves()
    print(f"Qwen2-VL-7B plan: {tasks} tasks in {waves} waves; a reconcile per wave: {cpu:.1f} CPU s "
          f"({1e3 * cpu / (waves + 1):.0f} ms each)")


if __name__ == "__main__":
    main()
